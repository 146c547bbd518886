"""The real `trqam-lit` CLI on the built-in toy bandit: fit, validate, print_config, errors, resume, bf16."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
import yaml

from helpers import CONFIGS, assert_dual_descent, fast_trainer_args, read_scalars, run_cli, run_dir
from trqam_lit.math.dual import dual_step
from trqam_lit.math.flow import sample_actions
from trqam_lit.training.rng import EVAL_NOISE, seeded

TOY = str(CONFIGS / "toy" / "bandit.yaml")
SMALL = ["--model.init_args.bc_warmup_steps=10", "--data.init_args.eval_samples=200", "--data.init_args.batch_size=64"]
WARMUP, EVAL_SAMPLES = 10, 200  # as set by SMALL
EPS_KL, ETA, C = 0.01, 0.1, 3.0  # configs/toy/bandit.yaml: model eps_kl and eta, data c (reward 3a)
FIT_STEPS = 30  # the toy_run fixture's max_steps


def checkpoint_eval_returns(ckpt, step: int) -> dict[str, float]:
    """The toy evaluation's return of the checkpoint's v_ft and of its v_bc, both from the acting noise that an
    evaluation at global step ``step`` draws (training.rng: seeded by (seed, rank, step); what FlowAgent.act draws)."""
    from trqam_lit.agents import TRQAM

    model = TRQAM.load_from_checkpoint(ckpt, map_location="cpu")
    with seeded(torch.device("cpu"), model.seed_of(EVAL_NOISE, step)):
        noise = torch.randn(EVAL_SAMPLES, 1)
    obs = torch.zeros(EVAL_SAMPLES, 1)
    return {
        net: C * sample_actions(getattr(model, net), obs, noise, model.flow_steps).mean().item()
        for net in ("v_ft", "v_bc")
    }


def assert_evaluates_v_ft(log_dir, ckpt) -> None:
    """`validate` and `test` log one toy evaluation, and it is the checkpoint's fine-tuned policy v_ft's."""
    scalars = read_scalars(log_dir)
    ((step, ret),) = scalars["eval/return"]
    ((_, mean),) = scalars["eval/action_mean"]
    assert scalars["eval/length"] == [(step, 1.0)]  # a bandit episode is one step
    assert ret == pytest.approx(C * mean, rel=1e-5, abs=1e-6)  # reward c a (1-D): return = c * action mean
    # Outside `fit` Lightning restores the weights but not the loop's step count: validate/test evaluate (and log)
    # at global step 0, so their acting noise is step 0's, not that of the fit's final evaluation (step 30; the
    # two differ by Monte Carlo error: 0.48 and 0.45 here). The step-0 noise through the checkpoint's v_ft gives
    # the value again: the same float32 operations on the same CPU; only the metric's summation order differs,
    # so rel 1e-5.
    assert step == 0
    expected = checkpoint_eval_returns(ckpt, step)
    assert ret == pytest.approx(expected["v_ft"], rel=1e-5, abs=1e-6), (ret, expected)
    assert abs(expected["v_bc"] - expected["v_ft"]) > 0.05, expected  # so the check tells v_ft from v_bc


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    # evaluations every WARMUP steps: the first one, at the end of the BC warm-up, is the BC policy's
    proc = run_cli(["fit", "--config", TOY, *fast_trainer_args(root, FIT_STEPS, WARMUP), *SMALL], cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


def test_fit_logs_every_scalar_finite(toy_run):
    root, proc = toy_run
    scalars = read_scalars(run_dir(root))
    for tag in ("critic/critic_loss", "critic/q_mean", "critic/q_min", "actor/bc_loss", "actor/am_loss",
                "actor/adj_max", "dual/kl", "dual/kl_clipped", "dual/kl_ema", "dual/lambda", "eval/return",
                "eval/action_mean", "eval/length", "perf/steps_per_sec", "train/grad_norm",
                "train/nonfinite_steps"):  # fmt: skip
        assert tag in scalars, f"{tag} missing; have {sorted(scalars)}"
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    # log_every_n_steps=1: every update is logged at step global_step - 1; the critic and actor terms after the
    # BC warm-up only
    fine_tuning = list(range(WARMUP, FIT_STEPS))
    assert [s for s, _ in scalars["actor/bc_loss"]] == list(range(FIT_STEPS))
    for tag in ("critic/critic_loss", "critic/q_mean", "critic/q_min", "actor/am_loss", "actor/adj_max"):
        assert [s for s, _ in scalars[tag]] == fine_tuning, tag
    assert all(v == 0.0 for _, v in scalars["train/nonfinite_steps"])  # no update was skipped
    assert all(v == 0.0 for _, v in scalars["critic/critic_loss"])  # the analytic critic is fixed: no critic loss
    q_mean = dict(scalars["critic/q_mean"])
    assert all(q_min <= q_mean[s] for s, q_min in scalars["critic/q_min"])
    # The terminal adjoint of Q(a) = c a is -c for every action inside the [-1, 1] clip (TRQAM: no temperature)
    assert all(v == pytest.approx(C) for _, v in scalars["actor/adj_max"]), scalars["actor/adj_max"][:3]
    # Fine-tuning starts at the prior (v_ft = v_base = v_bc after the warm-up): the first path-KL estimate is 0
    assert scalars["dual/kl"][0] == (WARMUP, 0.0)
    assert_dual_descent(scalars, EPS_KL, ETA, fine_tuning)
    assert any(v > 2 * EPS_KL for _, v in scalars["dual/kl"])  # the clip is exercised, not only the pass-through
    # evaluated at the interval (steps 10, 20, 30), logged at global_step - 1
    assert [s for s, _ in scalars["eval/return"]] == [9, 19, 29]
    assert all(v == 1.0 for _, v in scalars["eval/length"])  # a bandit episode is one step
    for (_, ret), (_, mean) in zip(scalars["eval/return"], scalars["eval/action_mean"], strict=True):
        assert ret == pytest.approx(C * mean, rel=1e-5, abs=1e-6)  # reward c a (1-D): return = c * action mean
    assert "TensorBoard logs:" in proc.stdout and "tensorboard --logdir" in proc.stdout
    assert f"trqam-lit: logging to {run_dir(root)}" in proc.stdout  # said at the start, not only at the end
    assert "last.ckpt" in proc.stdout

    # the whole resolved config (trainer, checkpoint, data, model), not only the model's arguments, is in the run's
    # hparams (TensorBoard's HPARAMS tab)
    class Loader(yaml.SafeLoader):  # the file also holds a few python objects (paths): read them as None
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda *_: None)
    hparams = yaml.load((run_dir(root) / "hparams.yaml").read_text(), Loader=Loader)
    assert hparams["trainer"]["max_steps"] == FIT_STEPS and hparams["checkpoint"]["every_n_train_steps"] == 1000
    assert hparams["data"]["init_args"]["batch_size"] == 64
    # The closing summary puts the BC policy (evaluated at the end of the warm-up) next to the fine-tuned one
    returns = dict(scalars["eval/return"])
    assert f"BC policy           return {returns[WARMUP - 1]:.4g}  (step {WARMUP})" in proc.stdout, proc.stdout[-800:]
    assert f"fine-tuned policy   return {returns[FIT_STEPS - 1]:.4g}  (step {FIT_STEPS})" in proc.stdout


def test_validate_evaluates_the_saved_checkpoint(toy_run):
    root, _ = toy_run
    ckpt = next((root / "runs").glob("*/version_*/checkpoints/last.ckpt"))
    proc = run_cli(["validate", "--config", TOY, "--ckpt_path", str(ckpt), *SMALL,
                    f"--trainer.logger.init_args.save_dir={root / 'val'}"], cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_evaluates_v_ft(run_dir(root, "val"), ckpt)
    # and the fit's final evaluation (global step 30) was of the policy this checkpoint holds: its v_ft with the
    # noise of step 30 gives the logged value again (same argument and tolerance as in assert_evaluates_v_ft)
    ret = dict(read_scalars(run_dir(root))["eval/return"])[FIT_STEPS - 1]
    assert ret == pytest.approx(checkpoint_eval_returns(ckpt, FIT_STEPS)["v_ft"], rel=1e-5, abs=1e-6)


def test_print_config_resolves_links_and_classes(tmp_path):
    proc = run_cli(["fit", "--config", TOY, "--print_config"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "class_path: trqam_lit.agents.TRQAM" in proc.stdout
    assert "class_path: trqam_lit.data.ToyBanditDataModule" in proc.stdout
    assert "every_n_train_steps" in proc.stdout


def test_wrong_key_gives_a_clear_error(tmp_path):
    proc = run_cli(["fit", "--config", TOY, "--model.init_args.lamda_init=2.0"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "lamda_init" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bf16_mixed_trains_without_nan(tmp_path, toy_run):
    steps = 20
    proc = run_cli(["fit", "--config", TOY, *fast_trainer_args(tmp_path, steps, steps), *SMALL,
                    "--trainer.precision=bf16-mixed"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = read_scalars(run_dir(tmp_path))
    for tag in ("actor/am_loss", "actor/bc_loss", "dual/kl", "dual/lambda", "eval/return"):
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    assert all(v == 0.0 for _, v in scalars["train/nonfinite_steps"])  # no update was skipped
    # lambda and the KL average stay float32 buffers, stepped outside autocast: the recursion holds to rounding
    assert_dual_descent(scalars, EPS_KL, ETA, range(WARMUP, steps))
    # The float32 toy_run draws the same batches and noise for its first 20 steps (streams keyed by seed, rank and
    # step; its evaluation at step 15 has its own stream), so bf16 must track it. Tolerance 2^-6: bf16 keeps 8
    # significant bits (unit roundoff u = 2^-9 = 0.2%); the losses and the path KL are batch means of float32-
    # accumulated terms, so the roundings average out and 10 fine-tuning steps compound them only mildly: measured
    # <= 0.02% (BC loss), <= 0.18% (path KL, AM loss); 2^-6 = 8u = 1.6% leaves a margin of ~9.
    fp32 = read_scalars(run_dir(toy_run[0]))
    for tag in ("actor/bc_loss", "actor/am_loss", "dual/kl"):
        ref = dict(fp32[tag])
        for step, value in scalars[tag]:
            assert value == pytest.approx(ref[step], rel=2.0**-6, abs=1e-6), (tag, step, value, ref[step])
    ref = dict(fp32["actor/bc_loss"])
    assert any(value != ref[step] for step, value in scalars["actor/bc_loss"])  # and bf16 did run


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


def test_a_config_without_a_trainer_section_gets_the_documented_defaults(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import TensorBoardLogger

    from trqam_lit.cli import build_cli
    from trqam_lit.training.checkpoint import AtomicCheckpointIO

    cfg = tmp_path / "bare.yaml"
    cfg.write_text(
        "model:\n  class_path: trqam_lit.agents.TRQAM\n  init_args: {actor_hidden_dims: [8], critic_hidden_dims: [8]}\n"
        "data:\n  class_path: trqam_lit.data.ToyBanditDataModule\n  init_args: {discount: 0.9}\n"
    )
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(cfg)], run=False)
    t = cli.trainer
    assert cli.model.hparams.discount == 0.9  # linked from the DataModule, like obs_dim, action_dim and horizon
    assert (t.max_steps, t.val_check_interval, t.num_sanity_val_steps, t.log_every_n_steps) == (1000, 1000, 0, 50)
    assert t.checkpoint_callback._every_n_train_steps == 1000 and t.checkpoint_callback.save_last
    assert isinstance(t.strategy.checkpoint_io, AtomicCheckpointIO)  # no half-written last.ckpt after a kill
    with warnings.catch_warnings():  # the run's saved config.yaml names the plugin (an instance made a warning)
        warnings.simplefilter("error")
        saved = cli.parser.dump(cli.config)
    assert "class_path: trqam_lit.training.checkpoint.AtomicCheckpointIO" in saved
    assert isinstance(t.logger, TensorBoardLogger) and t.logger.save_dir == "runs"
    assert t.logger._default_hp_metric is False


def test_omegaconf_interpolation_in_configs(tmp_path, monkeypatch):
    from trqam_lit.cli import build_cli

    cfg = tmp_path / "interp.yaml"
    cfg.write_text(
        "model:\n  class_path: trqam_lit.agents.TRQAM\n  init_args:\n    actor_hidden_dims: [48, 48]\n"
        "    critic_hidden_dims: ${model.init_args.actor_hidden_dims}\n"
        "data:\n  class_path: trqam_lit.data.ToyBanditDataModule\n"
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
    assert_evaluates_v_ft(run_dir(root, "test"), ckpt)


def final_state(root) -> dict:
    ckpt = torch.load(run_dir(root) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["state_dict"]


def test_a_run_killed_during_an_evaluation_resumes_before_it_and_evaluates_that_step(tmp_path):
    """A checkpoint due at an evaluation step is written after the evaluation. A run SIGKILLed during the step-20
    evaluation resumes from step 15, evaluates step 20 and ends as an uninterrupted run does; one stopped after
    the step-20 evaluation resumes without evaluating step 20 twice. (Before, the step-20 checkpoint was written
    before the evaluation and Lightning's resume skipped it: the evaluation was lost.)"""
    common = ["fit", "--config", TOY, *SMALL, "--checkpoint.every_n_train_steps=5"]
    env = {"PYTHONPATH": str(CONFIGS.parent / "tests")}

    def fit(name: str, max_steps: int, *extra: str) -> subprocess.CompletedProcess:
        return run_cli([*common, *fast_trainer_args(tmp_path / name, max_steps, 10), *extra], cwd=tmp_path, env=env)

    assert (straight := fit("straight", 30)).returncode == 0, straight.stderr[-3000:]
    killed = fit("killed", 30, "--trainer.callbacks+=helpers.KillDuringEvaluation", "--trainer.callbacks.step=20")
    assert killed.returncode == -signal.SIGKILL
    stopped = fit("stopped", 20)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    evals = {name: read_scalars(run_dir(tmp_path / name))["eval/return"] for name in ("straight", "killed", "stopped")}
    # TensorBoard's step of a scalar logged after global step k is k - 1 (Lightning's batches-stepped counter)
    assert [s for s, _ in evals["straight"]] == [9, 19, 29]
    assert [s for s, _ in evals["killed"]] == [9]
    assert [s for s, _ in evals["stopped"]] == [9, 19]

    for name, resumed_step, expected_evals in (("killed", 15, [19, 29]), ("stopped", 20, [29])):
        last = run_dir(tmp_path / name) / "checkpoints" / "last.ckpt"
        assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == resumed_step
        resumed = fit(name + "-resumed", 30, "--ckpt_path", str(last))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        scalars = read_scalars(run_dir(tmp_path / (name + "-resumed")))
        assert scalars["eval/return"] == [e for e in evals["straight"] if e[0] in expected_evals], name
        assert min(s for s, _ in scalars["actor/bc_loss"]) == resumed_step  # training continues at the checkpoint
        straight_state, state = final_state(tmp_path / "straight"), final_state(tmp_path / (name + "-resumed"))
        for key in straight_state:
            torch.testing.assert_close(state[key], straight_state[key], rtol=0, atol=0, msg=f"{name}: {key}")


def test_export_writes_a_policy_file_that_reproduces_the_runs_final_evaluation(toy_run):
    import shutil

    from trqam_lit.agents import TRQAM
    from trqam_lit.tools.export import load_policy

    root, _ = toy_run
    ckpt = root / "final.ckpt"  # the default output is beside the checkpoint, with .pt2
    shutil.copy(next((root / "runs").glob("*/version_*/checkpoints/last.ckpt")), ckpt)
    proc = run_cli(["export", str(ckpt)], cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = root / "final.pt2"
    assert f"TRQAM fine-tuned policy (step {FIT_STEPS}) -> {out}" in proc.stdout
    policy = load_policy(out)
    assert (policy.meta["global_step"], policy.meta["checkpoint"], policy.meta["networks"]) == (FIT_STEPS, str(ckpt),
                                                                                                ["v_ft"])  # fmt: skip
    # the fit's final evaluation (step 30) again, from the file: its acting noise through the file's policy
    with seeded(torch.device("cpu"), TRQAM.load_from_checkpoint(ckpt).seed_of(EVAL_NOISE, FIT_STEPS)):
        noise = torch.randn(EVAL_SAMPLES, 1)
    chunk = policy(torch.zeros(EVAL_SAMPLES, 1), noise)
    ret = dict(read_scalars(run_dir(root))["eval/return"])[FIT_STEPS - 1]
    assert ret == pytest.approx(C * chunk.mean().item(), rel=1e-5, abs=1e-6)

    proc = run_cli(["export", str(root / "missing.ckpt"), "-o", str(root / "x.pt2")], cwd=root)
    assert proc.returncode == 2 and "trqam-lit export: error: checkpoint not found" in proc.stderr, proc.stderr[-2000:]
    assert not (root / "x.pt2").exists()
