"""Shared test helpers: run the real CLI, read TensorBoard event files back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Import into a module to run its tests on one intra-op thread: small tensors gain nothing from more, and extra
    threads only contend with the rest of a busy CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard run directory: tag -> [(step, value), ...]."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run_cli(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed `trqam-lit` console script's code path, in a subprocess (as a user runs it)."""
    full_env = {**os.environ, "MUJOCO_GL": "disable", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "trqam_lit.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def toy_fit(
    steps: int, callbacks: list | None = None, ckpt_path: str | None = None
) -> tuple[pl.LightningModule, pl.Trainer]:
    """A tiny TRQAM (fused solver, analytic critic, 2 BC warm-up steps) fitted for ``steps`` steps on the toy bandit
    by a bare Trainer (no logger, checkpoints or evaluation): the real fit loop and hooks, in under a second;
    ``ckpt_path`` resumes from a checkpoint (``trainer.save_checkpoint``)."""
    from trqam_lit.agents import TRQAM
    from trqam_lit.data import ToyBanditDataModule

    dm = ToyBanditDataModule(action_dim=1, batch_size=16)
    model = TRQAM(obs_dim=dm.obs_dim, action_dim=dm.chunk_dim, horizon=1, actor_hidden_dims=[8], critic_hidden_dims=[8],
                  num_critics=2, analytic_critic=True, bc_warmup_steps=2, sde_solver="fused")  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=callbacks or [])  # fmt: skip
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model, trainer


def fast_trainer_args(root: Path, max_steps: int, val_every: int) -> list[str]:
    return [
        f"--trainer.max_steps={max_steps}",
        f"--trainer.val_check_interval={val_every}",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={root / 'runs'}",
    ]


class StateDump(pl.Callback):
    """Lightning callback (used by the DDP test): each rank saves its final module state to ``dirpath``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.dirpath / f"rank{trainer.global_rank}.pt")


class OnlineDump(pl.Callback):
    """Online-phase test probe: each rank saves its replay buffer, environment step count, lambda and KL average at
    the first training batch (after any resume) and at the end, to ``dirpath/{start,end}-rank{r}.pt``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self._started = False

    def _dump(self, trainer, pl_module, tag: str) -> None:
        from trqam_lit.training.online import OnlinePhase

        (online,) = [c for c in trainer.callbacks if isinstance(c, OnlinePhase)]
        buf = online.buffer
        state = {"global_step": trainer.global_step, "env_steps": online.env_steps, "episodes": online.episodes}
        if buf is not None:
            t, n = buf._table, len(buf)
            keys = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")
            state["buffer"] = {k: torch.from_numpy(getattr(t, k)[:n].copy()) for k in keys}
            state["offline_size"] = buf.offline_size
        if hasattr(pl_module, "dual"):
            state["lam"], state["kl_ema"] = pl_module.dual.lam.clone(), pl_module.dual.kl_ema.clone()
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.dirpath / f"{tag}-rank{trainer.global_rank}.pt")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._started:
            self._started = True
            self._dump(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module) -> None:
        self._dump(trainer, pl_module, "end")


class StepValues(pl.Callback):
    """DDP test probe: each rank saves, per global step, its LOCAL recorded losses and path-KL estimate (before any
    cross-rank average) and a checksum of each of its random draws, to ``dirpath/values-rank{r}.pt``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.values: dict[int, dict[str, float]] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        record, draw = pl_module.record, pl_module.draw

        def recording(**values):
            self.values.setdefault(trainer.global_step, {}).update({k: float(v) for k, v in values.items()})
            record(**values)

        def drawing(name, *shape, uniform=False):
            out = draw(name, *shape, uniform=uniform)
            self.values.setdefault(trainer.global_step, {})[f"draw/{name}"] = float(out.double().sum())
            return out

        pl_module.record, pl_module.draw = recording, drawing

    def on_train_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(self.values, self.dirpath / f"values-rank{trainer.global_rank}.pt")


def assert_kl_is_the_rank_mean(log_dir: str | Path, dump: Path, first_step: int) -> None:
    """The logged ``dual/kl`` of every step equals the mean of the two ranks' local estimates, which differ (each rank
    has its own batch and noise), and every random draw differs between the ranks."""
    v0, v1 = (torch.load(Path(dump) / f"values-rank{r}.pt", weights_only=False) for r in (0, 1))
    logged = dict(read_scalars(log_dir)["dual/kl"])
    assert sorted(logged) == [s for s in sorted(v0) if s >= first_step], (sorted(logged), sorted(v0))
    for step, kl in logged.items():
        a, b = v0[step]["kl"], v1[step]["kl"]
        assert abs(kl - (a + b) / 2) <= 1e-6 * abs(a + b) / 2 + 1e-12, (step, kl, a, b)
    # the first fine-tuning step has KL 0 on both ranks (v_ft = v_base); every later one differs between ranks
    assert all(v0[s]["kl"] != v1[s]["kl"] for s in sorted(logged)[1:]), [(v0[s]["kl"], v1[s]["kl"]) for s in logged]
    for step in v0:
        for name in v0[step]:
            if name.startswith("draw/"):
                assert v0[step][name] != v1[step][name], (step, name)


# The dual step runs in float32 and TensorBoard stores float32; recomputed here in float64 from the logged values,
# one step differs by the float32 roundings of its 3 operations and of 0.9 and 0.1 (2^-24 = 6e-8 relative each,
# at most ~2e-7 together; measured <= 1.2e-7 over the 1500 steps of test_toy_bandit): allow 4e-7.
F32 = 4e-7


def run_dir(root, sub: str = "runs") -> str:
    (path,) = list((root / sub).glob("*/version_*"))
    return path


def spec_dual_step(lam: float, ema: float, kl: float, eps_kl: float, eta: float) -> tuple[float, float]:
    """One projected dual-descent step as the spec (section 4) writes it, with TRQAM's default rho = 0.1, KL clip
    2 eps_kl and lambda in [0.01, 100]; written out here rather than calling math.dual, so that a change to that
    code is caught. Returns (lambda, KL average)."""
    ema = 0.9 * ema + 0.1 * min(kl, 2.0 * eps_kl)
    return min(max(lam + eta * (ema - eps_kl), 0.01), 100.0), ema


def assert_dual_descent(scalars, eps_kl: float, eta: float, steps) -> None:
    """Logged at every step in ``steps`` (one per applied update, at global_step - 1): dual/kl_clipped is
    min(dual/kl, 2 eps_kl), and dual/kl_ema and dual/lambda follow ``spec_dual_step`` fed with the logged KL from
    lambda = lam_init = 1 and a KL average of 0, one step at a time from the logged previous values (to F32)."""
    kl, clipped, ema, lam = (dict(scalars[f"dual/{k}"]) for k in ("kl", "kl_clipped", "kl_ema", "lambda"))
    assert sorted(kl) == sorted(clipped) == sorted(ema) == sorted(lam) == list(steps), sorted(kl)
    prev_lam, prev_ema = 1.0, 0.0
    for step in steps:
        assert clipped[step] == pytest.approx(min(kl[step], 2 * eps_kl), rel=F32), (step, kl[step], clipped[step])
        exp_lam, exp_ema = spec_dual_step(prev_lam, prev_ema, kl[step], eps_kl, eta)
        assert ema[step] == pytest.approx(exp_ema, rel=F32), (step, ema[step], exp_ema)
        assert lam[step] == pytest.approx(exp_lam, rel=F32), (step, lam[step], exp_lam)
        prev_lam, prev_ema = lam[step], ema[step]


class KillDuringEvaluation(pl.Callback):
    """Kill test probe: SIGKILLs its own process when the evaluation at global step ``step`` starts."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
