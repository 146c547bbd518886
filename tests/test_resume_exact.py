"""A run killed with SIGKILL and resumed from its checkpoint equals an uninterrupted run, bit for bit.

The experiment a user would try: the quickstart on the shipped fixture with 100 BC steps, 300 steps, a checkpoint
every 150; one run straight through, another killed after step 150 and resumed from its step-150 checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import CONFIGS, read_scalars, run_cli

QUICK = str(CONFIGS / "quickstart.yaml")


def args(root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", QUICK, "--model.init_args.bc_warmup_steps=100", "--trainer.max_steps=300",
        "--checkpoint.every_n_train_steps=150", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=10",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={root}", *extra,
    ]  # fmt: skip


def checkpoint(root: Path, name: str) -> dict:
    (path,) = root.glob(f"*/version_*/checkpoints/{name}")
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_equal_states(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == 300
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0, msg=key)
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index, state in opt_a["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], opt_b["state"][index][key], rtol=0, atol=0, msg=f"{index} {key}")


def test_a_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    straight = run_cli(args(tmp_path / "straight"), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MUJOCO_GL": "disable"}
    cmd = [sys.executable, "-m", "trqam_lit.cli", *args(tmp_path / "killed", "--trainer.max_steps=100000")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    try:
        while not list((tmp_path / "killed").glob("*/version_*/checkpoints/epoch=0-step=150.ckpt")):
            assert proc.poll() is None, "the run died"
            assert time.time() < deadline, "no step-150 checkpoint appeared"
            time.sleep(0.1)
        time.sleep(1.5)  # a dozen steps or so past the checkpoint
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = checkpoint(tmp_path / "killed", "epoch=0-step=150.ckpt")
    assert killed_at["global_step"] == 150
    assert not list((tmp_path / "killed").glob("*/version_*/checkpoints/*step=300*"))  # it was killed before the end

    (ckpt,) = (tmp_path / "killed").glob("*/version_*/checkpoints/epoch=0-step=150.ckpt")
    resumed = run_cli([*args(tmp_path / "resumed"), "--ckpt_path", str(ckpt)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert_equal_states(checkpoint(tmp_path / "straight", "last.ckpt"), checkpoint(tmp_path / "resumed", "last.ckpt"))
    # the logged curves after the resume point coincide too (same batches, same noise, same lambda)
    a, b = (read_scalars(next((tmp_path / run).glob("*/version_*"))) for run in ("straight", "resumed"))
    for tag in ("actor/am_loss", "critic/critic_loss", "dual/kl", "dual/lambda"):
        late = [(s, v) for s, v in a[tag] if s >= 150]
        assert late and late == [(s, v) for s, v in b[tag] if s >= 150], tag
    assert pytest.approx(dict(a["dual/lambda"])[299]) == dict(b["dual/lambda"])[299]
