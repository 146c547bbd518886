"""The float32 GEMM kernels (trqam_lit.math.gemm): MKL and oneDNN give the same outputs and gradients to float32
rounding on every network, the lean adjoint's VJPs and the critic's action gradient; oneDNN is never used where it
does not apply (other dtypes and devices, autocast, torch.compile); the switch (``gemm_backend``, ``TRQAM_GEMM``) and
the calibration's choice."""

from __future__ import annotations

import pytest
import torch

from trqam_lit.agents import TRQAM
from trqam_lit.math import gemm
from trqam_lit.math.nets import (
    CriticEnsemble,
    Linear,
    OneStepPolicy,
    TanhGaussianPolicy,
    VelocityField,
    set_gemm_backend,
)

pytestmark = pytest.mark.skipif(not gemm.onednn_available(), reason="this torch build has no oneDNN linear op")
RTOL = 1e-5  # of each tensor's largest entry: float32 rounding of sums over a few hundred products


@pytest.fixture(autouse=True)
def _no_forced_kernel(monkeypatch):
    monkeypatch.delenv(gemm.ENV_VAR, raising=False)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual - expected).abs().max() / scale).item()
    assert err < rtol, f"{what}: relative difference {err:.2e}"


def outputs_and_grads(backend: str, net: torch.nn.Module, fn, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """fn(net, *inputs) and the gradients of a fixed random projection of it w.r.t. the inputs and parameters."""
    set_gemm_backend(net, backend, backend)
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    params = list(net.parameters())
    outs = fn(net, *inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(3)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [*inputs, *params])
    return [o.detach() for o in outs] + list(grads)


NETS = {
    "velocity field": (lambda: VelocityField(37, 25, (256, 256), layer_norm=False), lambda n, s, x: n(s, x, 0.3)),
    "velocity field with LayerNorm, K x B points": (
        lambda: VelocityField(37, 25, (256, 256), layer_norm=True),
        lambda n, s, x: n(s, x.expand(10, *x.shape), torch.rand(10, 1, 1, generator=torch.Generator().manual_seed(1))),
    ),
    "one-step policy": (lambda: OneStepPolicy(37, 25, (128, 128)), lambda n, s, x: n(s, x)),
    "critic ensemble": (lambda: CriticEnsemble(37, 25, 4, (128, 128)), lambda n, s, x: n(s, x)),
    "tanh-Gaussian policy": (lambda: TanhGaussianPolicy(62, 25, (128, 128)), lambda n, s, x: n(torch.cat([s, x], -1))),
}


@pytest.mark.parametrize("name", NETS)
def test_both_kernels_give_the_same_outputs_and_gradients(name):
    build, fn = NETS[name]
    torch.manual_seed(0)
    net = build()
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randn(96, 37, generator=gen), torch.randn(96, 25, generator=gen)]
    mkl = outputs_and_grads("mkl", net, fn, inputs)
    onednn = outputs_and_grads("onednn", net, fn, inputs)
    assert len(mkl) == len(onednn)
    for i, (a, b) in enumerate(zip(onednn, mkl, strict=True)):
        assert_close(a, b, f"{name}: output or gradient {i}")


def test_the_ensemble_layer_with_a_shared_input_agrees_on_both_kernels():
    # (B, in) shared by the members: the einsum path, and its input gradient summed over the members
    torch.manual_seed(0)
    net = CriticEnsemble(37, 25, 3, (64,))
    x = torch.randn(16, 62, generator=torch.Generator().manual_seed(2))
    mkl = outputs_and_grads("mkl", net.hidden[0], lambda n, x: n(x), [x])
    onednn = outputs_and_grads("onednn", net.hidden[0], lambda n, x: n(x), [x])
    for i, (a, b) in enumerate(zip(onednn, mkl, strict=True)):
        assert_close(a, b, f"shared-input ensemble: output or gradient {i}")


def test_the_lean_adjoints_vjps_and_the_action_gradient_agree_on_both_kernels():
    torch.manual_seed(0)
    v, critic = VelocityField(37, 25, (128, 128), layer_norm=True), CriticEnsemble(37, 25, 2, (128, 128))
    gen = torch.Generator().manual_seed(4)
    s, xs, adj = torch.randn(32, 37, generator=gen), torch.randn(5, 32, 25, generator=gen), torch.randn(32, 25)
    t = torch.linspace(0.2, 1.0, 5).reshape(5, 1, 1)
    out = {}
    for backend in ("mkl", "onednn"):
        set_gemm_backend(v, backend, backend)
        set_gemm_backend(critic, backend, backend)
        jac = v.linearize(s, xs, t)
        a = xs[0]
        grad_q = torch.func.grad(lambda a: critic(s, a).mean(0).sum())(a)  # the terminal adjoint's transform
        out[backend] = [jac.vjp(i, adj) for i in range(5)] + [critic.action_gradient(s, a), grad_q]
    for i, (a, b) in enumerate(zip(out["onednn"], out["mkl"], strict=True)):
        assert_close(a, b, f"VJP or action gradient {i}")


def test_a_trqam_fine_tuning_step_has_the_same_losses_and_gradients_on_both_kernels():
    gen = torch.Generator().manual_seed(5)
    B, obs, A = 16, 11, 6
    batch = {
        "observations": torch.randn(B, obs, generator=gen),
        "actions": torch.rand(B, A, generator=gen) * 2 - 1,
        "next_observations": torch.randn(B, obs, generator=gen),
        "rewards": torch.randn(B, generator=gen),
        "masks": torch.ones(B),
        "valid": torch.ones(B),
    }
    results = {}
    for backend in ("mkl", "onednn"):
        torch.manual_seed(0)
        model = TRQAM(obs_dim=obs, action_dim=A, horizon=2, actor_hidden_dims=[64, 64], critic_hidden_dims=[64, 64],
                      num_critics=2, flow_steps=4, sde_solver="fused", gemm_backend=backend)  # fmt: skip
        assert model.configure_gemm(B)["linear"]["choice"] == backend
        loss, info = model.fine_tune_loss(batch)
        loss.backward()
        results[backend] = [loss.detach()] + [p.grad for p in model.parameters() if p.grad is not None]
    assert len(results["mkl"]) == len(results["onednn"]) > 10
    for i, (a, b) in enumerate(zip(results["onednn"], results["mkl"], strict=True)):
        assert_close(a, b, f"loss or gradient {i}", rtol=1e-4)  # through the K-step rollout and the adjoint


def test_onednn_is_used_only_for_float32_cpu_tensors_in_eager_mode_outside_autocast():
    x32 = torch.randn(4, 3)
    assert gemm.uses_onednn("onednn", x32, x32)
    assert not gemm.uses_onednn("mkl", x32, x32)
    assert not gemm.uses_onednn("onednn", x32.double(), x32.double())
    assert not gemm.uses_onednn("onednn", x32.bfloat16(), x32)
    # another device (a CUDA tensor's case: never rerouted)
    assert not gemm.uses_onednn("onednn", torch.empty(4, 3, device="meta"), torch.empty(3, 3, device="meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gemm.uses_onednn("onednn", x32, x32)
        lin = Linear(3, 5)
        lin.gemm = "onednn"
        assert lin(x32).dtype == torch.bfloat16  # autocast's cast, as for nn.Linear


def test_under_torch_compile_the_default_ops_are_traced(monkeypatch):
    calls = []
    real = gemm._lp
    monkeypatch.setattr(gemm, "_lp", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    net = VelocityField(5, 3, (16,))
    set_gemm_backend(net, "onednn", "onednn")
    s, x = torch.randn(4, 5), torch.randn(4, 3)
    eager = net(s, x, 0.5)
    assert calls, "the eager call goes through oneDNN"
    calls.clear()
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="eager", fullgraph=True)(s, x, 0.5)
    assert not calls, "inside torch.compile the aten ops are traced (inductor cannot lower the training op)"
    assert_close(compiled, eager, "compiled output")


def test_the_switch_forces_a_kernel_and_auto_calibrates_at_the_networks_shapes(monkeypatch):
    def build(**kw):
        torch.manual_seed(0)
        return TRQAM(obs_dim=7, action_dim=4, horizon=2, actor_hidden_dims=[32, 48], critic_hidden_dims=[24],
                     num_critics=3, flow_steps=5, **kw)  # fmt: skip

    def kernels(model):
        return {m.gemm for m in model.modules() if hasattr(m, "gemm")}

    with pytest.raises(ValueError, match="gemm_backend"):
        build(gemm_backend="blas")
    seen = {}

    def fake_calibrate(linear, ensemble):
        seen["linear"], seen["ensemble"] = set(linear), set(ensemble)
        return {"linear": {"choice": "onednn"}, "ensemble": {"choice": "mkl"}}

    monkeypatch.setattr(gemm, "calibrate", fake_calibrate)
    model = build()
    assert kernels(model) == {"mkl"}  # until chosen
    model.configure_gemm(8)
    assert {(r, i, o) for r, i, o in seen["linear"]} >= {(8, 12, 32), (40, 12, 32), (8, 32, 48), (40, 48, 4)}
    assert seen["ensemble"] == {(3, 8, 11, 24), (3, 8, 24, 1)}
    assert {m.gemm for m in model.modules() if isinstance(m, Linear)} == {"onednn"}
    assert {m.gemm for m in model.modules() if type(m).__name__ == "EnsembleLinear"} == {"mkl"}
    # the hyperparameter forces a kernel without timing; the environment variable wins over it
    seen.clear()
    model = build(gemm_backend="onednn")
    model.configure_gemm(8)
    assert kernels(model) == {"onednn"} and not seen
    monkeypatch.setenv(gemm.ENV_VAR, "mkl")
    model.configure_gemm(8)
    assert kernels(model) == {"mkl"} and not seen
    monkeypatch.setenv(gemm.ENV_VAR, "onednn")
    assert kernels(build()) == {"onednn"}  # every network built while it is set starts with the forced kernel
    monkeypatch.setenv(gemm.ENV_VAR, "cublas")
    with pytest.raises(ValueError, match=gemm.ENV_VAR):
        gemm.forced_backend()


@pytest.mark.parametrize(("mkl_s", "onednn_s", "choice"), [(1.0, 0.5, "onednn"), (1.0, 0.95, "mkl"), (1.0, 2.0, "mkl")])
def test_calibration_chooses_onednn_only_when_it_is_clearly_faster(monkeypatch, mkl_s, onednn_s, choice):
    monkeypatch.setattr(gemm, "_time_kinds", lambda cases, repeats: {"mkl": mkl_s, "onednn": onednn_s})
    out = gemm.calibrate([(8, 4, 4)], [])
    assert out["linear"]["choice"] == choice
    assert out["ensemble"]["choice"] == "mkl"  # nothing to time


def test_calibration_times_both_kernels_at_real_shapes():
    out = gemm.calibrate([(16, 8, 8)], [(2, 16, 8, 8)], repeats=2)
    for kind in ("linear", "ensemble"):
        assert out[kind]["choice"] in ("mkl", "onednn")
        assert out[kind]["mkl_s"] > 0 and out[kind]["onednn_s"] > 0
