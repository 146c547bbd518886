"""The speed-ups compute the same numbers as the plain forms they replace (docs/performance.md)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

from helpers import read_scalars, toy_fit
from trqam_lit.agents import TRQAM
from trqam_lit.data.toy import ToyBanditDataModule
from trqam_lit.math.adjoint import lean_adjoint
from trqam_lit.math.nets import VelocityField, gelu_tanh

OBS, ACT, B, K = 7, 5, 16, 10


def test_gelu_tanh_equals_torch_kernel_in_value_and_gradient():
    x = torch.linspace(-8, 8, 4001, dtype=torch.float32).requires_grad_(True)
    y = gelu_tanh(x)
    (dy,) = torch.autograd.grad(y.sum(), x)
    ref_x = x.detach().requires_grad_(True)
    ref = F.gelu(ref_x, approximate="tanh")
    (dref,) = torch.autograd.grad(ref.sum(), ref_x)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(dy, dref, rtol=1e-5, atol=3e-6)  # float32 rounding of a slope of order 1
    with torch.no_grad():  # the in-place no-grad path
        torch.testing.assert_close(gelu_tanh(x.detach()), ref.detach(), rtol=0, atol=1e-6)


def test_gelu_tanh_no_grad_path_leaves_its_input_alone():
    x = torch.randn(64, 32)
    before = x.clone()
    with torch.no_grad():
        gelu_tanh(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_lean_adjoint_through_the_linearisation_equals_autograd(layer_norm):
    """The VelocityField fast path (one batched forward, matmul VJPs) against per-step autograd VJPs."""
    torch.manual_seed(0)
    v_base = VelocityField(OBS, ACT, (32, 32, 32), layer_norm=layer_norm)
    if layer_norm:  # non-trivial LayerNorm scale and shift, so their VJP is exercised
        for norm in v_base.mlp.norms:
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
            torch.nn.init.normal_(norm.bias)
    s, xs, adj_final = torch.randn(B, OBS), torch.randn(K + 1, B, ACT), torch.randn(B, ACT)
    fast = lean_adjoint(v_base, s, xs, adj_final)
    plain = lean_adjoint(lambda s_, x_, t_: v_base(s_, x_, t_), s, xs, adj_final)  # not a VelocityField: autograd
    assert fast.shape == (K, B, ACT)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast[0], adj_final, atol=1e-2)  # the recursion moved the adjoint


@pytest.mark.parametrize("every", [1, 4])
def test_scalars_are_logged_on_logging_steps_only_and_the_dual_steps_every_update(tmp_path, every):
    """Per-step scalars reach Lightning only on the steps its logger writes; lambda still moves at every update."""

    def run(log_every: int, root):
        pl.seed_everything(0)
        dm = ToyBanditDataModule(action_dim=2, batch_size=32, eval_samples=16, c=3.0)
        model = TRQAM(obs_dim=dm.obs_dim, action_dim=dm.chunk_dim, horizon=dm.horizon, discount=dm.discount,
                      actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16), num_critics=2, eta=0.5,
                      eps_kl=0.05)  # fmt: skip
        trainer = pl.Trainer(max_steps=12, limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu", log_every_n_steps=log_every,
                             logger=TensorBoardLogger(root, name="", version=""))  # fmt: skip
        trainer.fit(model, datamodule=dm)
        return model, read_scalars(root)

    model, scalars = run(every, tmp_path / "a")
    reference, ref_scalars = run(1, tmp_path / "b")
    expected_steps = [s for s in range(12) if (s + 1) % every == 0]
    for tag in ("dual/lambda", "dual/kl", "actor/am_loss", "critic/critic_loss", "train/grad_norm"):
        assert [step for step, _ in scalars[tag]] == expected_steps, tag
        assert scalars[tag] == [(s, v) for s, v in ref_scalars[tag] if s in expected_steps], tag  # same values
    assert model.dual.lam.item() == reference.dual.lam.item() != 1.0
    assert torch.equal(model.dual.kl_ema, reference.dual.kl_ema)


def test_compile_step_refuses_an_unknown_setting():
    with pytest.raises(ValueError, match="compile_step must be"):
        TRQAM(obs_dim=OBS, action_dim=ACT, compile_step="sometimes")


@pytest.mark.parametrize(
    ("solver", "device", "max_steps", "warmup", "compiles"),
    [
        ("fused", "cpu", 6000, 1000, True),  # 5,000 fine-tuning steps planned: the threshold
        ("fused", "cpu", 5999, 1000, False),
        ("fused", "cpu", -1, 0, False),  # no step budget (epochs): nothing to weigh the compilation against
        ("torchsde", "cpu", 6000, 1000, True),  # torchsde's rollout stays eager, the rest is compiled
        ("fused", "cuda", 10**6, 0, False),  # compiled on CPU only (not measured on GPUs)
    ],
)
def test_compile_step_auto_compiles_long_cpu_fits(solver, device, max_steps, warmup, compiles):
    from trqam_lit.agents.adjoint_matching import AUTO_COMPILE_MIN_STEPS

    assert AUTO_COMPILE_MIN_STEPS == 5000
    model = TRQAM(obs_dim=OBS, action_dim=ACT, sde_solver=solver, bc_warmup_steps=warmup)
    assert model.hparams.compile_step == "auto" and model.compiles is False  # auto: eager until a fit decides
    assert model.resolve_compile_step(torch.device(device), max_steps) is compiles
    assert model.compiles is compiles
    explicit = TRQAM(obs_dim=OBS, action_dim=ACT, sde_solver="fused", compile_step=False)
    assert explicit.resolve_compile_step(torch.device("cpu"), 10**6) is False


def test_a_short_fit_with_compile_step_auto_stays_eager():
    model, _ = toy_fit(6)
    assert model.compiles is False
    assert model.step_losses().__func__ is TRQAM.fine_tune_losses


def test_a_resumed_fit_keeps_the_compile_decision_of_its_checkpoint(monkeypatch, tmp_path, capsys):
    """compile_step auto decides from the planned steps; a resume that plans more (a larger max_steps) keeps the
    checkpoint's path, since compiled and eager steps round differently (the exact resume)."""
    from trqam_lit.agents import adjoint_matching

    monkeypatch.setattr(adjoint_matching, "AUTO_COMPILE_MIN_STEPS", 10)
    model, trainer = toy_fit(4)  # 2 fine-tuning steps planned: eager
    assert model.compiles is False
    trainer.save_checkpoint(tmp_path / "short.ckpt")
    assert torch.load(tmp_path / "short.ckpt", weights_only=False)["compile_step_resolved"] is False
    resumed, trainer = toy_fit(14, ckpt_path=str(tmp_path / "short.ckpt"))  # 12 planned: auto alone would compile
    assert trainer.global_step == 14 and resumed.compiles is False
    assert "compile_step auto" not in capsys.readouterr().err
    fresh = TRQAM(obs_dim=OBS, action_dim=ACT, sde_solver="fused", bc_warmup_steps=2)
    fresh.on_load_checkpoint({"compile_step_resolved": True, "state_dict": {}})
    assert fresh.resolve_compile_step(torch.device("cpu"), 5) is True  # and the other way round
    assert "as the run this checkpoint comes from decided" in capsys.readouterr().err
    older = TRQAM(obs_dim=OBS, action_dim=ACT, sde_solver="fused", bc_warmup_steps=2)
    older.on_load_checkpoint({"state_dict": {}})  # a checkpoint written before the decision was recorded: decide
    assert older.resolve_compile_step(torch.device("cpu"), 100) is True
    # ... by the rule of its time, under which torchsde stayed eager (so its run continues on its path)
    older_sde = TRQAM(obs_dim=OBS, action_dim=ACT, sde_solver="torchsde", bc_warmup_steps=2)
    older_sde.on_load_checkpoint({"state_dict": {}})
    assert older_sde.resolve_compile_step(torch.device("cpu"), 100) is False
    fresh.on_load_checkpoint({"compile_step_resolved": True, "state_dict": {}})
    assert fresh.resolve_compile_step(torch.device("cuda"), 100) is False  # a CPU decision does not bind a GPU run


@pytest.mark.slow
def test_a_long_fit_with_compile_step_auto_compiles_and_says_so(monkeypatch, capsys):
    from trqam_lit.agents import adjoint_matching

    monkeypatch.setattr(adjoint_matching, "AUTO_COMPILE_MIN_STEPS", 4)  # "long": 4 fine-tuning steps
    monkeypatch.setattr(adjoint_matching, "_COMPILED", {})
    model, _ = toy_fit(6)
    assert model.compiles is True and TRQAM in adjoint_matching._COMPILED
    out = capsys.readouterr()
    log = out.out + out.err
    assert "compile_step auto: 4 fine-tuning steps planned" in log
    assert "compiling TRQAM's fine-tuning step" in log and "compiled TRQAM's fine-tuning step in" in log
