"""The real CLI on the shipped OGBench fixture, and every config under configs/ parsing and instantiating."""

from __future__ import annotations

import math
import os

import pytest

from helpers import CONFIGS, fast_trainer_args, read_scalars, run_cli
from trqam_lit.cli import build_cli

QUICK = str(CONFIGS / "quickstart.yaml")
SMALL = [
    "--model.init_args.bc_warmup_steps=5",
    "--model.init_args.actor_hidden_dims=[32,32]",
    "--model.init_args.critic_hidden_dims=[32,32]",
    "--data.init_args.batch_size=16",
    "--data.init_args.eval_episodes=2",
    "--data.init_args.eval_envs=2",
]
CONTRACT = ("critic/critic_loss", "actor/bc_loss", "actor/am_loss", "critic/q_mean", "dual/kl", "dual/kl_ema",
            "dual/lambda", "eval/success", "eval/return", "eval/length")  # fmt: skip


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ogb")
    proc = run_cli(["fit", "--config", QUICK, *fast_trainer_args(root, 12, 12), *SMALL], cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, proc


def test_fit_on_the_fixture_logs_the_scalar_contract(fixture_run):
    root, proc = fixture_run
    (log_dir,) = list((root / "runs").glob("*/version_*"))
    scalars = read_scalars(log_dir)
    for tag in CONTRACT:
        assert tag in scalars, f"{tag} missing; have {sorted(scalars)}"
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    assert "perf/steps_per_sec" in scalars
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(log_dir))
    assert "tensorboard --logdir" in proc.stdout


def test_validate_a_saved_policy_on_the_fixture(fixture_run):
    root, _ = fixture_run
    ckpt = next((root / "runs").glob("*/version_*/checkpoints/last.ckpt"))
    proc = run_cli(["validate", "--config", QUICK, "--ckpt_path", str(ckpt), *SMALL,
                    f"--trainer.logger.init_args.save_dir={root / 'val'}"], cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "eval/success" in proc.stdout


ALL_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "trainer")


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_parses_and_instantiates(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    presets = [str(CONFIGS / "trainer" / "cpu.yaml")]  # compose with a trainer preset, as users do
    cli = build_cli(["--config", presets[0], "--config", str(config)], run=False)
    model, dm = cli.model, cli.datamodule
    assert model.hparams.obs_dim == dm.obs_dim and model.hparams.action_dim == dm.chunk_dim
    assert model.hparams.horizon == dm.horizon


@pytest.mark.parametrize("preset", ["gpu", "ddp"])
def test_gpu_and_ddp_presets_parse(preset, tmp_path):
    # Parse only (--print_config): instantiating the gpu preset needs a GPU, which CI never has.
    proc = run_cli(["fit", "--config", str(CONFIGS / "trqam" / "cube-double.yaml"), "--config",
                    str(CONFIGS / "trainer" / f"{preset}.yaml"), "--print_config"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "accelerator: " + ("gpu" if preset == "gpu" else "auto") in proc.stdout
