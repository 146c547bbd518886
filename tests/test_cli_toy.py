"""The real `trqam-lit` CLI on the built-in toy bandit: fit, validate, print_config, errors, resume, bf16."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import CONFIGS, fast_trainer_args, read_scalars, run_cli
from trqam_lit.dual import dual_step

TOY = str(CONFIGS / "toy" / "bandit.yaml")
SMALL = ["--model.init_args.bc_warmup_steps=10", "--data.init_args.eval_samples=200", "--data.init_args.batch_size=64"]


def run_dir(root) -> str:
    (path,) = list((root / "runs").glob("*/version_*"))
    return path


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    proc = run_cli(["fit", "--config", TOY, *fast_trainer_args(root, 30, 15), *SMALL], cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


def test_fit_logs_every_scalar_finite(toy_run):
    root, proc = toy_run
    scalars = read_scalars(run_dir(root))
    for tag in ("critic/critic_loss", "actor/bc_loss", "actor/am_loss", "critic/q_mean", "dual/kl", "dual/kl_ema",
                "dual/lambda", "eval/return", "eval/action_mean", "eval/length", "perf/steps_per_sec",
                "train/grad_norm"):  # fmt: skip
        assert tag in scalars, f"{tag} missing; have {sorted(scalars)}"
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    # evaluated at the interval (step 15) and once more at the end (step 30)
    assert len(scalars["eval/return"]) == 2
    assert "TensorBoard logs:" in proc.stdout and "tensorboard --logdir" in proc.stdout
    assert "last.ckpt" in proc.stdout


def test_validate_evaluates_the_saved_checkpoint(toy_run):
    root, _ = toy_run
    ckpt = next((root / "runs").glob("*/version_*/checkpoints/last.ckpt"))
    proc = run_cli(["validate", "--config", TOY, "--ckpt_path", str(ckpt), *SMALL,
                    f"--trainer.logger.init_args.save_dir={root / 'val'}"], cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval/return" in proc.stdout


def test_print_config_resolves_links_and_classes(tmp_path):
    proc = run_cli(["fit", "--config", TOY, "--print_config"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "class_path: trqam_lit.agents.TRQAM" in proc.stdout
    assert "class_path: trqam_lit.toy.ToyBanditDataModule" in proc.stdout
    assert "every_n_train_steps" in proc.stdout


def test_wrong_key_gives_a_clear_error(tmp_path):
    proc = run_cli(["fit", "--config", TOY, "--model.init_args.lamda_init=2.0"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "lamda_init" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bf16_mixed_trains_without_nan(tmp_path):
    proc = run_cli(["fit", "--config", TOY, *fast_trainer_args(tmp_path, 20, 20), *SMALL,
                    "--trainer.precision=bf16-mixed"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = read_scalars(run_dir(tmp_path))
    for tag in ("actor/am_loss", "actor/bc_loss", "dual/kl", "dual/lambda", "eval/return"):
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag


def test_killed_run_resumes_lambda_kl_average_and_step_exactly(tmp_path):
    args = ["fit", "--config", TOY, *fast_trainer_args(tmp_path / "a", 100_000, 100_000), *SMALL,
            "--checkpoint.every_n_train_steps=15"]  # fmt: skip
    cmd = [sys.executable, "-m", "trqam_lit.cli", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**__import__("os").environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    ckpt_glob = (tmp_path / "a" / "runs").glob
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            ckpts = list(ckpt_glob("*/version_*/checkpoints/*step=*.ckpt"))
            if any(int(p.stem.split("step=")[1]) >= 30 for p in ckpts):  # a checkpoint past the warm-up
                time.sleep(0.5)
                break
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    last = next(ckpt_glob("*/version_*/checkpoints/last.ckpt"))
    saved = torch.load(last, map_location="cpu", weights_only=False)
    step, lam, ema = saved["global_step"], saved["state_dict"]["dual.lam"], saved["state_dict"]["dual.kl_ema"]
    assert step >= 30 and step % 15 == 0
    resumed = run_cli(["fit", "--config", TOY, *fast_trainer_args(tmp_path / "b", step + 3, 100_000), *SMALL,
                       "--ckpt_path", str(last)], cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    scalars = read_scalars(run_dir(tmp_path / "b"))
    steps = [s for s, _ in scalars["dual/lambda"]]
    assert steps[0] == step  # the step count continues
    kl = dict(scalars["dual/kl"])[step]
    exp_lam, exp_ema = dual_step(lam, ema, torch.tensor(kl), eps_kl=0.01, eta=0.1)
    assert scalars["dual/lambda"][0][1] == pytest.approx(exp_lam.item(), rel=1e-5)
    assert scalars["dual/kl_ema"][0][1] == pytest.approx(exp_ema.item(), rel=1e-5)
    final = torch.load(next((tmp_path / "b" / "runs").glob("*/version_*/checkpoints/last.ckpt")),
                       map_location="cpu", weights_only=False)  # fmt: skip
    assert final["global_step"] == step + 3


def test_resume_from_a_checkpoint_taken_at_the_end_of_the_bc_warmup(tmp_path):
    """A checkpoint saved at step == bc_warmup_steps (before v_ft is set from v_bc) must still resume right."""
    first = run_cli(["fit", "--config", TOY, *fast_trainer_args(tmp_path / "a", 10, 100), *SMALL,
                     "--checkpoint.every_n_train_steps=10"], cwd=tmp_path)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = next((tmp_path / "a" / "runs").glob("*/version_*/checkpoints/last.ckpt"))
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 10 and not saved["state_dict"]["policy_from_bc"]
    dump = tmp_path / "states"
    env = {"PYTHONPATH": str(CONFIGS.parent / "tests")}
    resumed = run_cli(["fit", "--config", TOY, *fast_trainer_args(tmp_path / "b", 11, 100), *SMALL,
                       "--ckpt_path", str(ckpt), "--trainer.callbacks+=helpers.StateDump",
                       f"--trainer.callbacks.dirpath={dump}"], cwd=tmp_path, env=env)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = torch.load(dump / "rank0.pt", weights_only=False)
    assert state["policy_from_bc"]
    # v_ft started from the checkpoint's v_bc and took one step; the untouched random init would be far away
    for key in saved["state_dict"]:
        if key.startswith("v_bc."):
            ft = state["v_ft." + key[len("v_bc.") :]]
            assert (ft - saved["state_dict"][key]).abs().max() < 0.01, key


def test_checkpoint_holds_the_lambda_of_its_own_step_and_evaluates_v_ft(tmp_path):
    """The dual step runs before checkpoint callbacks: a checkpoint at step S has lambda after S dual steps."""
    args = [*SMALL, "--model.init_args.bc_warmup_steps=4", "--checkpoint.every_n_train_steps=6"]
    proc = run_cli(["fit", "--config", TOY, *fast_trainer_args(tmp_path, 12, 100), *args], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = read_scalars(run_dir(tmp_path))
    lam_logged = dict(scalars["dual/lambda"])
    ema_logged = dict(scalars["dual/kl_ema"])
    for ckpt in run_dir(tmp_path).glob("checkpoints/*step=*.ckpt"):
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        step = saved["global_step"]
        assert saved["state_dict"]["dual.lam"].item() == pytest.approx(lam_logged[step - 1], rel=1e-6)
        assert saved["state_dict"]["dual.kl_ema"].item() == pytest.approx(ema_logged[step - 1], rel=1e-6)
    from trqam_lit.agents import TRQAM

    model = TRQAM.load_from_checkpoint(run_dir(tmp_path) / "checkpoints" / "last.ckpt", map_location="cpu")
    assert model.policy_net is model.v_ft  # `validate` and `test` evaluate the fine-tuned policy


def test_init_from_a_bc_checkpoint_starts_fine_tuning_from_v_bc(tmp_path):
    bc = run_cli(["fit", "--config", TOY, *fast_trainer_args(tmp_path / "bc", 20, 100), *SMALL,
                  "--model=trqam_lit.agents.BC"], cwd=tmp_path)  # fmt: skip
    assert bc.returncode == 0, bc.stderr[-3000:]
    bc_ckpt = next((tmp_path / "bc" / "runs").glob("*/version_*/checkpoints/last.ckpt"))
    bc_state = torch.load(bc_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    dump = tmp_path / "states"
    ft = run_cli(["fit", "--config", TOY, *fast_trainer_args(tmp_path / "ft", 1, 100), *SMALL,
                  "--model.init_args.bc_warmup_steps=0", f"--model.init_args.init_from={bc_ckpt}",
                  "--trainer.callbacks+=helpers.StateDump", f"--trainer.callbacks.dirpath={dump}"],
                 cwd=tmp_path, env={"PYTHONPATH": str(CONFIGS.parent / "tests")})  # fmt: skip
    assert ft.returncode == 0, ft.stderr[-3000:]
    state = torch.load(dump / "rank0.pt", weights_only=False)
    for key, value in bc_state.items():
        if not key.startswith("v_bc."):
            continue
        name = key[len("v_bc.") :]
        for net in ("v_ft", "v_base"):  # one Adam step (lr 1e-3) or one polyak step away from the BC weights
            assert (state[f"{net}.{name}"] - value).abs().max() < 2e-3, (net, name)


def test_omegaconf_interpolation_in_configs(tmp_path, monkeypatch):
    from trqam_lit.cli import build_cli

    cfg = tmp_path / "interp.yaml"
    cfg.write_text(
        "model:\n  class_path: trqam_lit.agents.TRQAM\n  init_args:\n    actor_hidden_dims: [48, 48]\n"
        "    critic_hidden_dims: ${model.init_args.actor_hidden_dims}\n"
        "data:\n  class_path: trqam_lit.toy.ToyBanditDataModule\n"
    )
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(cfg)], run=False)
    assert list(cli.model.hparams.critic_hidden_dims) == [48, 48]
    assert cli.model.critic.hidden[0].weight.shape[-1] == 48


def test_test_subcommand_runs_the_evaluation(toy_run):
    root, _ = toy_run
    ckpt = next((root / "runs").glob("*/version_*/checkpoints/last.ckpt"))
    proc = run_cli(["test", "--config", TOY, "--ckpt_path", str(ckpt), *SMALL,
                    f"--trainer.logger.init_args.save_dir={root / 'test'}"], cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval/return" in proc.stdout
