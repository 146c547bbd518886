"""A real 2-process DDP run on CPU (gloo): lambda, the KL average and every parameter end identical; the dual step
uses the mean of the ranks' KL estimates; every rank draws its own noise."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import CONFIGS, REPO, assert_kl_is_the_rank_mean, fast_trainer_args, run_cli
from trqam_lit.agents import AGENTS


def ddp_toy_run(run_dir, *extra: str, env: dict | None = None) -> tuple[dict, dict]:
    """A 12-step 2-process DDP TRQAM run on the toy bandit with a learned critic; both ranks' final states."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dump = run_dir / "states"
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    args = [
        "fit", "--config", str(CONFIGS / "toy" / "bandit.yaml"), *fast_trainer_args(run_dir, 12, 12),
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
        "--model.init_args.bc_warmup_steps=4", "--model.init_args.analytic_critic=false",
        "--data.init_args.batch_size=32", "--data.init_args.eval_samples=64",
        "--trainer.callbacks+=helpers.StateDump", f"--trainer.callbacks.dirpath={dump}",
        "--trainer.callbacks+=helpers.StepValues", f"--trainer.callbacks.dirpath={dump}", *extra,
    ]  # fmt: skip
    proc = run_cli(args, cwd=run_dir, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0.keys() == r1.keys()
    assert r0["dual.lam"].item() != 1.0  # the dual step ran
    for key in r0:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0, msg=f"{key} differs between ranks")
    # DDP broadcasts rank 0's buffers before every forward, so identical lambdas alone would not show the average
    (log_dir,) = (run_dir / "runs").glob("*/version_*")
    assert_kl_is_the_rank_mean(log_dir, dump, first_step=4)
    return r0, r1


def test_two_process_ddp_keeps_every_rank_identical(tmp_path):
    ddp_toy_run(tmp_path)


@pytest.mark.slow
def test_the_compiled_step_under_ddp_keeps_every_rank_identical_and_equals_the_eager_step(tmp_path):
    """compile_step under 2-process DDP: gradients still all-reduced (ranks identical, KL the rank mean), and the
    final state is the eager DDP run's (same draws, same batches; fp32 reassociation only)."""
    fused = ["--model.init_args.sde_solver=fused"]
    env = {"OMP_NUM_THREADS": "1"}  # two compiling processes on 2 cores
    compiled, _ = ddp_toy_run(tmp_path / "compiled", *fused, "--model.init_args.compile_step=true", env=env)
    eager, _ = ddp_toy_run(tmp_path / "eager", *fused, env=env)
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5, msg=f"{key}: compiled vs eager")
    # and the compiled graph did run: its fused kernels round differently somewhere (a silent eager run would not)
    assert any(not torch.equal(compiled[k], eager[k]) for k in eager if eager[k].is_floating_point())


# One baseline in the default run (the DDP machinery is the shared base's; each agent's own state is covered by its
# fast tests), every one with -m slow: ~15 s each on 2 cores keeps the default suite in its budget.
BASELINES = [name for name in AGENTS if name not in ("bc", "trqam", "qam")]  # TRQAM, QAM: the tests above


@pytest.mark.parametrize("agent", [a if a == "qam-f" else pytest.param(a, marks=pytest.mark.slow) for a in BASELINES])
def test_two_process_ddp_baselines_keep_every_rank_identical(agent, tmp_path):
    """Each baseline under 2-process DDP through a BC warm-up (idle networks touched) into its own losses: every
    parameter and buffer ends identical on both ranks, while each rank drew its own noise."""
    dump = tmp_path / "states"
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    args = [
        "fit", "--config", str(CONFIGS / "toy" / "bandit.yaml"), *fast_trainer_args(tmp_path, 10, 10),
        f"--model=trqam_lit.agents.{AGENTS[agent].__name__}", "--model.init_args.bc_warmup_steps=3",
        "--model.init_args.analytic_critic=false", "--trainer.strategy=ddp", "--trainer.devices=2",
        "--trainer.accelerator=cpu", "--data.init_args.batch_size=32", "--data.init_args.eval_samples=64",
        "--trainer.callbacks+=helpers.StateDump", f"--trainer.callbacks.dirpath={dump}",
        "--trainer.callbacks+=helpers.StepValues", f"--trainer.callbacks.dirpath={dump}",
    ]  # fmt: skip
    proc = run_cli(args, cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0.keys() == r1.keys()
    for key in r0:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0, msg=f"{key} differs between ranks")
    v0, v1 = (torch.load(dump / f"values-rank{r}.pt", weights_only=False) for r in (0, 1))
    assert sorted(v0) == sorted(v1) == list(range(10))
    for step in v0:
        assert v0[step].keys() == v1[step].keys()
        for name in v0[step]:
            if name == "kl" and v0[step][name] == v1[step][name] == 0.0:
                continue  # AM agents: v_ft = v_base just after the warm-up's copy, KL_hat exactly 0 on every rank
            assert v0[step][name] != v1[step][name], (step, name)  # own batch, own draws: own losses
