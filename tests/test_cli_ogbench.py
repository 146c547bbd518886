"""The real CLI on the shipped OGBench fixture: the scalar contract, the baselines' paper configs (configs/ as users
compose it: tests/test_configs.py)."""

from __future__ import annotations

import math

import pytest

from helpers import CONFIGS, assert_dual_descent, fast_trainer_args, read_scalars, run_cli, run_dir
from trqam_lit.agents import AGENTS

QUICK = str(CONFIGS / "quickstart-scene.yaml")
SMALL = [
    "--data.init_args.env_name=cube-single-play-singletask-task5-v0",  # short episodes (the quickstart's are 750)
    "--model.init_args.bc_warmup_steps=5",
    "--model.init_args.actor_hidden_dims=[32,32]",
    "--model.init_args.critic_hidden_dims=[32,32]",
    "--data.init_args.batch_size=16",
    "--data.init_args.eval_episodes=2",
    "--data.init_args.eval_envs=2",
]
CONTRACT = ("critic/critic_loss", "critic/q_mean", "critic/q_min", "actor/bc_loss", "actor/am_loss", "actor/adj_max",
            "dual/kl", "dual/kl_clipped", "dual/kl_ema", "dual/lambda", "train/grad_norm", "train/nonfinite_steps",
            "eval/success", "eval/return", "eval/length")  # fmt: skip
WARMUP, STEPS = 5, 12  # SMALL's bc_warmup_steps; the fixture run's max_steps (and val_check_interval)
EPS_KL, ETA = 1.0, 0.01  # configs/quickstart-scene.yaml's eps_kl; eta: TRQAM's default
ENV_ID = "cube-single-singletask-task5-v0"  # the environment of SMALL's cube-single-play-... dataset


def assert_cube_single_evaluation(scalars) -> None:
    """Each logged evaluation (means over the episodes) is one that cube-single can produce.

    Single-task cube envs reward (#cubes at the goal) - (#cubes) for the state before the action (success_timing
    'pre', spec data.md) and end the episode at success: with one cube every step of an episode pays -1
    except the step taken from the goal state, which pays 0 and ends it. So per episode return = success - length,
    and so for the means; success in [0, 1]; length in [1, the env's time limit].
    """
    import gymnasium
    import ogbench  # noqa: F401  (registers the environments)

    max_steps = gymnasium.spec(ENV_ID).max_episode_steps  # the TimeLimit: 200 for cube-single (data.md)
    success, ret, length = (scalars[f"eval/{k}"] for k in ("success", "return", "length"))
    assert [s for s, _ in success] == [s for s, _ in ret] == [s for s, _ in length]
    for (_, succ), (_, r), (_, n) in zip(success, ret, length, strict=True):
        assert 0.0 <= succ <= 1.0 and 1.0 <= n <= max_steps, (succ, n)
        assert r == pytest.approx(succ - n, abs=1e-4), (r, succ, n)


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ogb")
    proc = run_cli(["fit", "--config", QUICK, *fast_trainer_args(root, 12, 12), *SMALL], cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, proc


def test_fit_on_the_fixture_logs_the_scalar_contract(fixture_run):
    root, proc = fixture_run
    scalars = read_scalars(run_dir(root))
    for tag in CONTRACT:
        assert tag in scalars, f"{tag} missing; have {sorted(scalars)}"
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    assert "perf/steps_per_sec" in scalars
    assert all(v == 0.0 for _, v in scalars["train/nonfinite_steps"])  # no update was skipped
    fine_tuning = range(WARMUP, STEPS)  # every update after the BC warm-up, logged at step global_step - 1
    q_mean = dict(scalars["critic/q_mean"])
    assert sorted(q_mean) == list(fine_tuning)
    assert all(q_min <= q_mean[s] for s, q_min in scalars["critic/q_min"])
    # Fine-tuning starts at the prior (v_ft = v_base = v_bc after the warm-up): the first path-KL estimate is 0
    assert scalars["dual/kl"][0] == (WARMUP, 0.0)
    assert_dual_descent(scalars, EPS_KL, ETA, fine_tuning)
    # one evaluation: at the end, which is also the val_check_interval (logged at global_step - 1)
    assert [s for s, _ in scalars["eval/success"]] == [STEPS - 1]
    assert_cube_single_evaluation(scalars)
    assert "tensorboard --logdir" in proc.stdout


def test_validate_a_saved_policy_on_the_fixture(fixture_run):
    root, _ = fixture_run
    ckpt = next((root / "runs").glob("*/version_*/checkpoints/last.ckpt"))
    proc = run_cli(["validate", "--config", QUICK, "--ckpt_path", str(ckpt), *SMALL,
                    f"--trainer.logger.init_args.save_dir={root / 'val'}"], cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    scalars = read_scalars(run_dir(root, "val"))
    assert len(scalars["eval/success"]) == 1  # one evaluation of the 2 episodes
    assert_cube_single_evaluation(scalars)
    # its policy as a file names the run's dataset (whose single-task environment a deployment loop makes)
    from trqam_lit.tools.export import export_checkpoint

    meta = export_checkpoint(ckpt, root / "policy.pt2")
    assert meta["env_name"] == "cube-single-play-singletask-task5-v0" and meta["global_step"] == STEPS


# The baselines through the real CLI with their paper config on the shipped cube-double fixture (the config's env
# name is the fixture's), shrunk to a few dozen steps: every scalar the agent declares, every step, finite; one
# evaluation. QAM-F and QAM-E are plain QAM on cube-double (the spec's fql_alpha / edit_scale there is 0): they run
# their cube-triple values (non-zero) on the fixture's cube-double environment.
BASELINES = [name for name in AGENTS if name not in ("bc", "trqam", "qam")]
BASELINE_CONFIG = {"qam-f": "cube-triple.yaml", "qam-e": "cube-triple.yaml"}
BASELINE_STEPS = 24


# FQL (a one-step policy) and QAM-E (a variant of the AM step) in the default run; the others (~20 s each) with -m
# slow, to keep the default suite in its budget: their golden and unit tests cover their own code.
DEFAULT_RUN = ("fql", "qam-e")


@pytest.mark.parametrize(
    "agent", [a if a in DEFAULT_RUN else pytest.param(a, marks=pytest.mark.slow) for a in BASELINES]
)
def test_baseline_paper_config_runs_on_the_fixture(agent, tmp_path):
    per_domain = CONFIGS / "model" / agent / BASELINE_CONFIG.get(agent, "cube-double.yaml")  # if it has any
    configs = [CONFIGS / "model" / f"{agent}.yaml", CONFIGS / "data" / "cube-double.yaml"]
    configs += [per_domain] if per_domain.is_file() else []
    args = ["fit", *(a for c in configs for a in ("--config", str(c))), "--data.init_args.dataset_dir=fixture",
            "--data.init_args.env_name=cube-double-play-singletask-task1-v0",
            *fast_trainer_args(tmp_path, BASELINE_STEPS, BASELINE_STEPS), "--model.init_args.actor_hidden_dims=[32,32]",
            "--model.init_args.critic_hidden_dims=[32,32]", "--model.init_args.num_critics=2",
            "--data.init_args.batch_size=16", "--data.init_args.eval_episodes=2", "--data.init_args.eval_envs=2",
            f"--checkpoint.every_n_train_steps={BASELINE_STEPS}", "--model.init_args.bc_warmup_steps=0"]  # fmt: skip
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    scalars = read_scalars(run_dir(tmp_path))
    for tag in AGENTS[agent].logged_scalars():
        assert [s for s, _ in scalars.get(tag, [])] == list(range(BASELINE_STEPS)), (tag, sorted(scalars))
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    assert all(v == 0.0 for _, v in scalars["train/nonfinite_steps"])
    assert [s for s, _ in scalars["eval/success"]] == [BASELINE_STEPS - 1]
    assert list(tmp_path.glob("runs/*/version_*/checkpoints/last.ckpt"))
