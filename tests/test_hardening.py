"""Faults never poison a run, fine-tuning starts at the prior, per-step random streams, unsupported settings refused.

In-process Trainer runs on the toy bandit with a learned critic (seconds each); faults are injected for chosen steps.
"""

from __future__ import annotations

import math
import shutil
import types
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

import trqam_lit
from trqam_lit.agents import BC, CGQL, QAM, TRQAM
from trqam_lit.agents.update_guard import AppliedUpdate
from trqam_lit.data import OGBenchDataModule
from trqam_lit.data.errors import DatasetFormatError
from trqam_lit.data.toy import ToyBanditDataModule
from trqam_lit.training.rng import EVAL_NOISE, TRAIN_NOISE, fold_seed, seeded

FIXTURES = Path(trqam_lit.__file__).parent / "data" / "fixtures"


def toy(cls=TRQAM, **kwargs):
    dm = ToyBanditDataModule(action_dim=2, batch_size=32, eval_samples=16, c=3.0)
    args = {
        "obs_dim": dm.obs_dim, "action_dim": dm.chunk_dim, "horizon": dm.horizon, "discount": dm.discount,
        "actor_hidden_dims": (32, 32), "critic_hidden_dims": (32, 32), "num_critics": 2, "lr": 1e-3,
        "bc_warmup_steps": 2, **kwargs,
    }  # fmt: skip
    if cls is TRQAM:
        args.setdefault("eta", 0.5)  # a dual step that visibly moves lambda (and stays off its bounds)
        args.setdefault("eps_kl", 0.05)
    return cls(**args), dm


def fit(model, dm, steps, callbacks=(), **trainer_kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, callbacks=list(callbacks), **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    return trainer


def snapshot(trainer: pl.Trainer, model: pl.LightningModule) -> dict[str, torch.Tensor]:
    """Every weight and buffer (targets, lambda, KL average) and every Adam moment, copied."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("nonfinite")}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in trainer.optimizers[0].state.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            state[f"adam/{names[id(p)]}/{key}"] = st[key].clone()
    return state


class Fault(pl.Callback):
    """Applies ``inject(model)`` during the steps in ``steps`` (it returns an undo function) and keeps a snapshot of
    the whole state at the start of every step, so ``states[k + 1]`` is the state after step k."""

    def __init__(self, steps, inject) -> None:
        self.steps, self.inject, self.states, self._undo = set(steps), inject, {}, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None
        self.states[trainer.global_step] = snapshot(trainer, pl_module)
        if trainer.global_step in self.steps:
            self._undo = self.inject(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.states[trainer.global_step] = snapshot(trainer, pl_module)


def nan_critic(model):
    handle = model.critic.register_forward_hook(lambda mod, inp, out: out * float("nan"))
    return handle.remove


def nan_kl(model):
    original = model.actor_objective

    def objective(*args, **kwargs):
        out = original(*args, **kwargs)
        out.path_kl = torch.full_like(out.path_kl, float("nan"))
        return out

    model.actor_objective = objective
    return lambda: delattr(model, "actor_objective")


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def changed(a: dict, b: dict) -> list[str]:
    return [k for k in a if k in b and not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("inject", [nan_critic, nan_kl], ids=["nan-critic-output", "nan-kl"])
def test_a_non_finite_step_changes_nothing_and_the_run_goes_on(inject):
    model, dm = toy()
    fault = Fault({5}, inject)
    with pytest.warns(UserWarning, match="step 5: non-finite"):
        fit(model, dm, 9, [fault])
    states = fault.states
    assert_same(states[5], states[6])  # weights, targets, lambda, KL average, Adam: all as before step 5
    for step in (4, 6):  # the steps around it do update weights, targets, Adam and lambda
        moved = changed(states[step], states[step + 1])
        for key in ("v_ft.mlp.out.weight", "critic.out.weight", "target_critic.out.weight", "dual.lam",
                    "dual.kl_ema", "adam/v_ft.mlp.out.weight/exp_avg"):  # fmt: skip
            assert key in moved, (step, key)
    assert int(model.nonfinite_steps) == 1 and int(model.nonfinite_run) == 0
    assert all(torch.isfinite(v).all() for v in states[9].values())


def test_a_non_finite_diagnostic_is_logged_but_never_skips_a_step():
    """The template step checks the loss terms (``*_loss``) and ``kl``; a diagnostic such as CGQL's
    ``critic/exp_bias`` (exp(inv_temp Q), which overflows while the clipped LINEX loss stays finite) is only
    logged. A non-finite loss term added the same way does skip the step."""

    def with_term(name):
        class Diagnosed(CGQL):
            def fine_tune_loss(self, batch):
                loss, info = super().fine_tune_loss(batch)
                return loss, {**info, name: torch.tensor(float("inf"))}

        return Diagnosed

    model, dm = toy(with_term("critic/exp_bias"), bc_warmup_steps=0)
    fit(model, dm, 3)
    assert int(model.nonfinite_steps) == 0
    model, dm = toy(with_term("critic/extra_loss"), bc_warmup_steps=0, max_nonfinite_steps=5)
    with pytest.warns(UserWarning, match="non-finite critic/extra_loss on this rank"):
        fit(model, dm, 3)
    assert int(model.nonfinite_steps) == 3


def test_consecutive_non_finite_steps_stop_the_run_with_a_clear_error():
    model, dm = toy(max_nonfinite_steps=3)
    fault = Fault(range(4, 100), nan_critic)
    with pytest.warns(UserWarning), pytest.raises(FloatingPointError) as err:
        fit(model, dm, 20, [fault])
    message = str(err.value)
    assert "3 consecutive" in message and "critic_loss" in message and "global step 6" in message
    assert "max_nonfinite_steps" in message
    assert_same(fault.states[4], snapshot(model.trainer, model))  # nothing changed after the first NaN
    assert int(model.nonfinite_steps) == 3


def test_a_non_finite_kl_never_reaches_lambda_even_when_called_directly():
    model, _ = toy()
    with pytest.raises(ValueError, match="non-finite path-KL"):
        model.dual.step(torch.tensor(float("inf")))
    assert model.dual.lam.item() == 1.0 and model.dual.kl_ema.item() == 0.0


@pytest.mark.parametrize("column", ["observations", "actions"])
def test_a_dataset_with_an_infinite_row_is_refused_at_load_time(tmp_path, column):
    for name in ("cube-single-play-v0.json", "cube-single-play-v0-val.npz", "cube-single-play-v0-val.json"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    with np.load(FIXTURES / "cube-single-play-v0.npz") as f:
        arrays = dict(f)
    arrays[column] = arrays[column].copy()
    arrays[column][7, 1] = np.inf
    np.savez_compressed(tmp_path / "cube-single-play-v0.npz", **arrays)
    dm = OGBenchDataModule(env_name="cube-single-play-singletask-task5-v0", dataset_dir=str(tmp_path), batch_size=8)
    with pytest.raises(DatasetFormatError, match="NaN or infinite observations or actions"):
        dm.setup("fit")


def test_trqam_fine_tuning_starts_at_the_prior_and_qam_keeps_its_own_init():
    trqam, _ = toy(bc_warmup_steps=0)
    for net in (trqam.v_ft, trqam.v_base):
        for (name, p), q in zip(net.state_dict().items(), trqam.v_bc.state_dict().values(), strict=True):
            assert torch.equal(p, q), name
    assert trqam.policy_net is trqam.v_ft
    qam, _ = toy(QAM, bc_warmup_steps=0)  # QAM's reference trains v_ft from its own random init
    assert not torch.equal(qam.v_ft.mlp.out.weight, qam.v_bc.mlp.out.weight)
    assert torch.equal(qam.v_base.mlp.out.weight, qam.v_bc.mlp.out.weight)


def test_draws_are_a_function_of_seed_rank_and_step_only():
    model, _ = toy()
    model.rng_seed.fill_(7)

    def draws(rank: int, step: int) -> torch.Tensor:
        model._trainer = types.SimpleNamespace(global_rank=rank, global_step=step)
        model._gen_step = -1  # as at the start of a training step (draws within one step continue the stream)
        torch.manual_seed(rank * 100 + step + 12345)  # the global generator plays no part
        out = torch.cat([model.draw("am/x0", 4, 3).flatten(), model.draw("bc/t", 4, 1, uniform=True).flatten()])
        model._trainer = None
        return out

    assert torch.equal(draws(0, 5), draws(0, 5))
    assert not torch.equal(draws(0, 5), draws(1, 5))  # every DDP rank draws its own noise
    assert not torch.equal(draws(0, 5), draws(0, 6))
    seven = draws(0, 5)
    model.rng_seed.fill_(8)
    assert not torch.equal(seven, draws(0, 5))

    # Within one step the draws continue one stream (bc/x0, critic/next_noise, am/x0 are different noise), and that
    # stream is not the evaluation's acting noise at the same step (trqam_lit.training.rng: one seed per purpose).
    model._trainer = types.SimpleNamespace(global_rank=0, global_step=5)
    model._gen_step = -1
    first, second = model.draw("bc/x0", 4, 3), model.draw("critic/next_noise", 4, 3)
    assert not torch.equal(first, second)
    with seeded(torch.device("cpu"), model.seed_of(EVAL_NOISE)):
        acting = torch.randn(4, 3)
    assert not torch.equal(first, acting)
    model._trainer = None


def test_a_draw_source_hands_out_every_draw_and_without_one_the_seeded_generator_does():
    model, _ = toy()
    model.rng_seed.fill_(7)
    model._trainer = types.SimpleNamespace(global_rank=1, global_step=5)
    assert model.draw_source is None  # the default: the generator seeded by (seed, rank, step), in call order
    gen = torch.Generator().manual_seed(fold_seed(7, 1, 5, TRAIN_NOISE))
    assert torch.equal(model.draw("bc/x0", 4, 3), torch.randn(4, 3, generator=gen))
    assert torch.equal(model.draw("bc/t", 4, 1, uniform=True), torch.rand(4, 1, generator=gen))

    calls = []

    def source(name: str, shape: tuple[int, ...], uniform: bool) -> torch.Tensor:
        calls.append((name, shape, uniform))
        return torch.full(shape, float(len(calls)))

    model.draw_source = source  # on the instance of the real class: every draw comes from it
    assert torch.equal(model.draw("am/x0", 2, 3), torch.full((2, 3), 1.0))
    assert torch.equal(model.draw("bc/t", 2, 1, uniform=True), torch.full((2, 1), 2.0))
    assert calls == [("am/x0", (2, 3), False), ("bc/t", (2, 1), True)]
    model.draw_source = None  # the generator again: its stream goes on where it was (the source read none of it)
    assert torch.equal(model.draw("critic/next_noise", 4, 3), torch.randn(4, 3, generator=gen))
    model._trainer = None


def test_a_fresh_fit_takes_the_seed_of_seed_everything():
    model, dm = toy()
    pl.seed_everything(1234)
    fit(model, dm, 1)
    assert int(model.rng_seed) == 1234


def test_gradient_accumulation_is_refused_with_a_clear_error():
    for cls in (TRQAM, QAM, BC):
        model, dm = toy(cls)
        with pytest.raises(ValueError, match="accumulate_grad_batches=2 is not supported"):
            fit(model, dm, 2, accumulate_grad_batches=2)


def test_fp16_steps_skipped_by_the_grad_scaler_update_no_target_and_no_lambda():
    model, dm = toy(bc_warmup_steps=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # every step overflows until the scale falls
    fault = Fault((), lambda m: None)
    fit(model, dm, 3, [fault], plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    assert scaler.get_scale() < 2.0**60  # the scaler did skip
    assert_same(fault.states[0], fault.states[3])  # no weight, Adam, polyak target or dual update on those steps
    assert int(model.nonfinite_steps) == 0  # a scaler overflow is not a fault: it never stops the run


def test_the_dual_step_is_a_callback_that_runs_before_model_checkpoint(tmp_path):
    model, dm = toy()
    trainer = pl.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, accelerator="cpu",
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1)])  # fmt: skip
    trainer.fit(model, datamodule=dm)
    kinds = [type(c) for c in trainer.callbacks]
    assert AppliedUpdate in kinds
    assert kinds.index(AppliedUpdate) < kinds.index(pl.callbacks.ModelCheckpoint)
    assert model.dual.lam.item() != 1.0
    saved = torch.load(tmp_path / "epoch=0-step=4.ckpt", map_location="cpu", weights_only=False)
    assert saved["state_dict"]["dual.lam"].item() == model.dual.lam.item()
    assert math.isfinite(model.dual.kl_ema.item())


def test_fine_tuning_starts_with_a_fresh_adam_after_the_bc_warm_up():
    # Adam's moments and count from the BC warm-up (v_bc's 2 steps) are dropped when fine-tuning starts, as when it
    # starts from a BC checkpoint: after the first fine-tuning step every parameter's count is 1.
    model, dm = toy(bc_warmup_steps=2)
    seen = {}

    class Counts(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            (opt,) = trainer.optimizers
            seen[trainer.global_step] = {int(s["step"]) for s in opt.state.values()}

    fit(model, dm, 3, callbacks=[Counts()])
    assert seen[2] == {2}  # the warm-up's two steps (idle networks are touched by a zero loss: stepped too)
    assert seen[3] == {1}  # the first fine-tuning step, on a fresh Adam


def test_a_run_ending_off_the_evaluation_grid_evaluates_its_last_step():
    # FinalEvaluation: max_steps 5 with an evaluation every 2 steps evaluates at 2, 4 and, once more, at 5; on the
    # grid (max_steps 4) the last evaluation is the regular one, not a second.
    from trqam_lit.training.callbacks import FinalEvaluation

    class Evaluations(pl.Callback):
        def __init__(self, steps: list[int]) -> None:
            self.steps = steps

        def on_validation_end(self, trainer, pl_module) -> None:
            self.steps.append(trainer.global_step)

    for max_steps, expected in ((5, [2, 4, 5]), (4, [2, 4])):
        model, dm = toy(BC)
        steps: list[int] = []
        trainer = pl.Trainer(
            max_steps=max_steps, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            accelerator="cpu", devices=1, callbacks=[FinalEvaluation(), Evaluations(steps)],
        )  # fmt: skip
        trainer.fit(model, datamodule=dm)
        assert steps == expected, (max_steps, steps)


def test_a_checkpoint_reaches_the_disk_before_it_replaces_the_last_one(tmp_path, monkeypatch):
    # Atomic against a SIGKILL is the rename; against a power cut the new bytes must be on disk before the rename
    # (and the directory entry after it), or last.ckpt can come back empty after a reboot.
    import os

    import torch

    from trqam_lit.training.checkpoint import AtomicCheckpointIO

    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd))[1]
    )
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), replace(a, b))[1])
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, target)
    partial = str(tmp_path / f"last.ckpt.partial-{os.getpid()}")
    assert events == [("fsync", partial), ("replace", partial, str(target)), ("fsync", str(tmp_path))]
    assert torch.equal(torch.load(target)["w"], torch.ones(3)) and not os.path.exists(partial)
