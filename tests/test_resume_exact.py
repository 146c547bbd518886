"""A run killed with SIGKILL and resumed from its checkpoint equals an uninterrupted run, bit for bit.

The experiment a user would try: the quickstart on the shipped fixture with 100 BC steps, 300 steps, a checkpoint
every 150; one run straight through, another killed after step 150 and resumed from its step-150 checkpoint. Once
with TRQAM (the quickstart's agent), once per other agent with a state of its own (FQL: the one-step policy;
IFQL: the value net; CGQL: the time-conditioned critic and v_base).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import CONFIGS, read_scalars, run_cli
from trqam_lit.agents import AGENTS

QUICK = str(CONFIGS / "quickstart-scene.yaml")
CUBE = "cube-single-play-singletask-task5-v0"  # the fixture with the shortest episodes (the quickstart's are 750)


# registry name -> (BC warm-up steps, total steps (killed at half)); every scalar the agent logs must coincide after
# the resume. The other agents run shorter: their state has no running average to carry. BC and QAM: their state is
# a part of the others'.
RUNS = {"trqam": (100, 300), **{name: (40, 200) for name in AGENTS if name not in ("bc", "trqam", "qam")}}


def args(root: Path, agent: str, *extra: str) -> list[str]:
    warmup, steps = RUNS[agent]
    options = [] if agent == "trqam" else [f"--model=trqam_lit.agents.{AGENTS[agent].__name__}"]  # the quickstart's
    return [
        "fit", "--config", QUICK, f"--data.init_args.env_name={CUBE}", *options,
        f"--model.init_args.bc_warmup_steps={warmup}",
        f"--trainer.max_steps={steps}", f"--checkpoint.every_n_train_steps={steps // 2}",
        "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=10",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={root}", *extra,
        *compile_pinned(agent),
    ]  # fmt: skip


def compile_pinned(agent: str) -> list[str]:
    """compile_step false for the adjoint-matching agents: "auto" decides from the planned steps, and the killed run
    (max_steps 100000) plans more than the straight one; a compiled step rounds differently from the eager one."""
    from trqam_lit.agents import AdjointMatchingAgent

    return ["--model.init_args.compile_step=false"] if issubclass(AGENTS[agent], AdjointMatchingAgent) else []


def checkpoint(root: Path, name: str) -> dict:
    (path,) = root.glob(f"*/version_*/checkpoints/{name}")
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_equal_states(a: dict, b: dict, steps: int) -> None:
    assert a["global_step"] == b["global_step"] == steps
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0, msg=key)
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index, state in opt_a["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], opt_b["state"][index][key], rtol=0, atol=0, msg=f"{index} {key}")


# TRQAM in the default run; the others (~45 s each on 2 cores: three processes) with -m slow, to keep the default suite
# in its budget (the machinery under test is the shared base's; their fast tests cover their own state).
@pytest.mark.parametrize("agent", [a if a == "trqam" else pytest.param(a, marks=pytest.mark.slow) for a in RUNS])
def test_a_killed_and_resumed_run_equals_an_uninterrupted_one(agent, tmp_path):
    _, steps = RUNS[agent]
    tags = AGENTS[agent].logged_scalars()
    half = steps // 2
    straight = run_cli(args(tmp_path / "straight", agent), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MUJOCO_GL": "disable"}
    cmd = [sys.executable, "-m", "trqam_lit.cli", *args(tmp_path / "killed", agent, "--trainer.max_steps=100000")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    ckpt = tmp_path / "killed-at-half.ckpt"
    try:
        while not (found := list((tmp_path / "killed").glob(f"*/version_*/checkpoints/epoch=0-step={half}.ckpt"))):
            assert proc.poll() is None, "the run died"
            assert time.time() < deadline, f"no step-{half} checkpoint appeared"
            time.sleep(0.05)
        # kept aside: the killed run replaces it with its next checkpoint (files appear whole: atomic writes)
        shutil.copy(found[0], ckpt)
        time.sleep(1.5)  # a dozen steps or more past the checkpoint
        assert proc.poll() is None, "the run ended before it was killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == half

    resumed = run_cli([*args(tmp_path / "resumed", agent), "--ckpt_path", str(ckpt)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert_equal_states(
        checkpoint(tmp_path / "straight", "last.ckpt"), checkpoint(tmp_path / "resumed", "last.ckpt"), steps
    )
    # the logged curves after the resume point coincide too (same batches, same noise, same lambda)
    a, b = (read_scalars(next((tmp_path / run).glob("*/version_*"))) for run in ("straight", "resumed"))
    for tag in tags:
        late = [(s, v) for s, v in a[tag] if s >= half]
        assert late and late == [(s, v) for s, v in b[tag] if s >= half], tag
    if agent == "trqam":
        assert pytest.approx(dict(a["dual/lambda"])[steps - 1]) == dict(b["dual/lambda"])[steps - 1]
