"""The recorded official update through the real LightningModule and Trainer (hooks, clip, polyak, Adam, dual).

tests/test_golden.py runs the pure functions in the reference's order by hand; this test lets Lightning run
them: training_step -> backward -> clip -> polyak -> Adam -> dual step, with the recorded weights, Adam state,
lambda, KL average and random draws, and compares what the step computed and the change of every parameter, Adam
moment and dual variable. Every hyperparameter of the agent comes from the record (golden.agent_hparams).
"""

from __future__ import annotations

import pytest
import torch

import golden
from golden import assert_params_and_adam_match, assert_reference_adam, capture_calls, close, load, recorded_draws
from trqam_lit.agents import QAM, TRQAM, adjoint_matching
from trqam_lit.math.adjoint import adjoint_matching_terms
from trqam_lit.math.gemm import onednn_available

ONLINE = ("critic", "actor_slow", "actor_fast")


def recorded_agent(agent: str, **overrides):
    # keep what the step's loss terms returned, to compare them with the record
    keep = {"bc_loss": "bc_out", "critic_loss": ("critic_out", 0), "actor_objective": "am_out"}
    cls = TRQAM if agent == "trqam" else QAM
    model, maps, batch, arrays, meta = golden.recorded_agent_of(cls, agent, keep, **overrides)
    if agent == "trqam":
        assert model.dual.lam.item() == float(arrays["dual/lam_before"])  # lam_init, from the record
        model.dual.kl_ema.fill_(float(arrays["dual/kl_ema_before"]))
    return model, maps, batch, arrays, meta


@pytest.mark.parametrize(
    ("agent", "compiled", "gemm_backend"),
    [
        ("trqam", False, "auto"),
        ("qam", False, "auto"),
        ("trqam", True, "auto"),
        ("trqam", "torchsde", "auto"),  # compiled after an eager torchsde rollout
        pytest.param("qam", True, "auto", marks=pytest.mark.slow),
        pytest.param("trqam", False, "onednn", marks=pytest.mark.skipif(not onednn_available(), reason="no oneDNN")),
        ("trqam", False, "mkl"),
    ],
)
def test_one_trainer_step_reproduces_the_recorded_update(agent, compiled, gemm_backend, monkeypatch):
    """Eager, and with ``compile_step`` (the fine-tuning losses and their backward as one torch.compile graph); with
    the GEMM kernel calibrated ("auto") or forced to either kernel (``gemm_backend``)."""
    monkeypatch.delenv("TRQAM_GEMM", raising=False)
    fast = {"compile_step": True, "sde_solver": "fused" if compiled is True else compiled} if compiled else {}
    model, maps, batch, a, meta = recorded_agent(agent, gemm_backend=gemm_backend, **fast)
    cfg = meta["config"]
    count = meta["state_set_by_harness"]["adam_count"]
    assert count == int(a["adam_count_before"])
    # forward hooks that keep tensors are for the eager step (inside the compiled graph a hook would hold traced ones)
    if not compiled:
        bc_calls, critic_calls = capture_calls(model.v_bc), capture_calls(model.critic)
        target_calls = capture_calls(model.target_critic)
    trainer = golden.one_trainer_step(model, maps, batch, a, ONLINE, count)
    # the kernel was chosen once, at the first batch, and set on every network (the forced one where forced)
    kernels = {m.gemm for m in model.modules() if hasattr(m, "gemm")}
    assert model.gemm_choice is not None and kernels <= {"mkl", "onednn"}
    if gemm_backend != "auto":
        assert kernels == {gemm_backend}

    if compiled:  # the step ran through the compiled graph, not a silent eager fallback
        assert type(model) in adjoint_matching._COMPILED
    # Each recorded draw was asked for exactly once (shapes and kinds were checked as they were handed out).
    assert sorted(model.draw_calls) == sorted(recorded_draws(a, cfg)), model.draw_calls

    # What the step computed. BC: v_bc is evaluated once, at x_t with the drawn t.
    if not compiled:
        ((s, x_t, t_in, pred, _),) = bc_calls
        close(s, a["batch/observations"], "BC observations", rtol=0, atol=0)
        close(t_in, a["bc/t"], "BC time t", rtol=0, atol=0)
        close(x_t, a["bc/x_t"], "BC x_t")
        close(pred, a["bc/pred"], "BC prediction")
    close(model.bc_out, a["bc/flow_loss"], "BC loss")
    # Critic: Q(s, a) once; the target ensemble at (s', a') with a' from v_ft's ODE on the recorded noise.
    if not compiled:
        ((_, _, q, _),) = critic_calls
        close(q, a["critic/q"], "q")
        next_calls = [c for c in target_calls if torch.equal(c[0], batch["next_observations"])]
        assert len(next_calls) == 1, len(next_calls)
        close(next_calls[0][1], a["critic/next_actions"], "next actions")
        close(next_calls[0][2], a["critic/next_qs"], "next qs")
    close(model.critic_out, a["critic/critic_loss"], "critic loss")
    # Adjoint matching: states, adjoints, per-step loss terms, loss and path KL.
    am = model.am_out
    close(am.xs, a["am/xs"], "SDE states")
    close(am.adj_final, a["am/adj_K"], "terminal adjoint")
    close(am.adjs, a["am/adjs"], "lean adjoints")
    close(am.sigmas[:, None, None].expand(a["am/sigmas"].shape), a["am/sigmas"], "sigmas")
    terms = adjoint_matching_terms(am.v_ft, am.v_base, am.adjs, am.sigmas)
    close(terms, a["am/adj_loss_per_step_sample"], "AM loss per step and sample")
    close(am.loss, a["am/adj_loss"], "AM loss")
    close(model.bc_out + model.critic_out + am.loss, a["loss/total"], "total loss")
    if agent == "trqam":
        close(am.path_kl, a["am/path_kl"], "path KL")

    # The optimizer is the reference's optax.adam(lr) over exactly the three online networks.
    (opt,) = trainer.optimizers
    assert_reference_adam(opt, cfg, maps, ONLINE)

    # The update, as changes against the recorded changes (tolerances and their reasons: test_golden.py and
    # golden.update_tolerance): the global norm, every parameter and target, the Adam moments and count.
    assert model.grad_norm.item() == pytest.approx(float(a["grad_global_norm"]), rel=1e-4)
    assert_params_and_adam_match(a, opt, maps, tuple(n for n in maps if n not in ONLINE))
    if agent == "trqam":
        lam0, ema0 = float(a["dual/lam_before"]), float(a["dual/kl_ema_before"])
        d_lam, d_ema = float(a["dual/lam_after"]) - lam0, float(a["dual/kl_ema_after"]) - ema0
        assert model.dual.lam.item() - lam0 == pytest.approx(d_lam, rel=1e-3), "change of lambda"
        assert model.dual.kl_ema.item() - ema0 == pytest.approx(d_ema, rel=1e-3), "change of the KL average"


def one_step_losses(agent: str, precision: str, **fast) -> dict[str, float]:
    """The recorded step's BC, critic and AM losses and path KL through one Trainer step at ``precision``."""
    model, maps, batch, a, meta = recorded_agent(agent, **fast)
    golden.one_trainer_step(model, maps, batch, a, ONLINE, int(meta["state_set_by_harness"]["adam_count"]), precision)
    if fast:
        assert type(model) in adjoint_matching._COMPILED
    am = model.am_out
    return {"bc": model.bc_out.item(), "critic": model.critic_out.item(), "am": am.loss.item(),
            "kl": am.path_kl.item(), "xs_dtype": am.xs.dtype, "v_ft_dtype": am.v_ft.dtype}  # fmt: skip


@pytest.mark.slow
def test_the_compiled_step_under_bf16_autocast_equals_the_eager_bf16_step():
    """``compile_step`` with ``precision=bf16-mixed``: the compiled graph runs the networks in bf16 as the eager step
    does (both move the recorded fp32 losses by bf16-sized amounts) and keeps the SDE states and stored network
    outputs float32."""
    a, _ = load("trqam")
    fp32 = {"bc": float(a["bc/flow_loss"]), "critic": float(a["critic/critic_loss"]),
            "am": float(a["am/adj_loss"]), "kl": float(a["am/path_kl"])}  # fmt: skip
    eager = one_step_losses("trqam", "bf16-mixed")
    compiled = one_step_losses("trqam", "bf16-mixed", compile_step=True, sde_solver="fused")
    for run in (eager, compiled):
        assert run["xs_dtype"] == run["v_ft_dtype"] == torch.float32
    for key, value in fp32.items():
        # bf16 keeps ~3 significant digits: each loss moves from the fp32 record, by well under 1% (measured 3e-5 for
        # L_AM, ~5e-4 for the others; compiled vs eager bf16: 2.4e-3 for L_AM, <= 5e-4 for the others)
        assert eager[key] == pytest.approx(value, rel=1e-2), (key, eager[key], value)
        assert eager[key] != pytest.approx(value, rel=1e-5), (key, "autocast did not lower the networks to bf16")
        # the compiled step lowers the same ops: its losses are the eager bf16 step's, up to fused-kernel rounding
        assert compiled[key] == pytest.approx(eager[key], rel=1e-2), (key, compiled[key], eager[key])
        assert compiled[key] != pytest.approx(value, rel=1e-5), (key, "the compiled graph ignored autocast")
