"""Offline-to-online fine-tuning (`trqam_lit.training.online`): the real CLI on the shipped fixture and the toy bandit,
kill-and-resume inside the online phase, 2-process DDP, errors, and the deferred batches of the DataModules."""

from __future__ import annotations

import glob
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import CONFIGS, REPO, assert_kl_is_the_rank_mean, fast_trainer_args, read_scalars, run_cli
from trqam_lit.agents import AGENTS
from trqam_lit.cli import build_cli
from trqam_lit.data import ReplayBuffer, fixture_path, load_table
from trqam_lit.data.toy import ToyBanditDataModule
from trqam_lit.training.online import OnlinePhase

QUICK = str(CONFIGS / "quickstart-scene.yaml")
TOY = str(CONFIGS / "online" / "toy-bandit.yaml")
CUBE = "cube-single-play-singletask-task5-v0"
TINY = [
    f"--data.init_args.env_name={CUBE}",  # 200-step episodes (the quickstart's scene has 750)
    "--model.init_args.bc_warmup_steps=5",
    "--model.init_args.actor_hidden_dims=[32,32]",
    "--model.init_args.critic_hidden_dims=[32,32]",
    "--model.init_args.flow_steps=4",
    "--data.init_args.batch_size=16",
    "--data.init_args.eval_episodes=2",
    "--data.init_args.eval_envs=2",
]
ONLINE_SCALARS = ("online/return", "online/success", "online/length", "online/env_steps", "online/buffer_size",
                  "online/env_steps_per_sec")  # fmt: skip
PROBE_ENV = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}


def probe(dump) -> list[str]:
    return ["--trainer.callbacks+=helpers.OnlineDump", f"--trainer.callbacks.dirpath={dump}"]


def run_dir(root) -> str:
    (path,) = glob.glob(str(root / "runs" / "*" / "version_*"))
    return path


# ---------------------------------------------------------------- the fixture, offline then online


@pytest.fixture(scope="module")
def fixture_online(tmp_path_factory):
    # 20 offline steps, then 230 env steps: a burst of 100 without updates, then one update per env step (131),
    # so one 200-step episode finishes and evaluations fall in both phases.
    root = tmp_path_factory.mktemp("online")
    args = ["fit", "--config", QUICK, *fast_trainer_args(root, 20, 60), *TINY, *probe(root / "dump"),
            "--online.online_steps=230", "--online.start_training=100", "--trainer.log_every_n_steps=10"]  # fmt: skip
    proc = run_cli(args, cwd=root, env=PROBE_ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, proc


def test_fixture_offline_then_online_fills_the_buffer(fixture_online):
    root, proc = fixture_online
    assert "online phase after 20 offline steps: 230 environment steps, 131 updates" in proc.stdout
    end = torch.load(root / "dump" / "end-rank0.pt", weights_only=False)
    assert end["global_step"] == 20 + 131 and end["env_steps"] == 230
    offline = load_table(fixture_path("cube-single-play-v0"), CUBE)
    n_off = len(offline)
    buf = end["buffer"]
    assert end["offline_size"] == n_off and len(buf["rewards"]) == n_off + 230
    for key in buf:  # no offline row changed
        np.testing.assert_array_equal(buf[key][:n_off].numpy(), getattr(offline, key)[:n_off], err_msg=key)
    online = {k: v[n_off:].numpy() for k, v in buf.items()}
    assert np.abs(online["actions"]).max() < 1.0
    np.testing.assert_array_equal(online["observations"][1:200], online["next_observations"][:199])
    assert online["terminals"][199] == 1.0 and online["terminals"][:199].sum() == 0  # the 200-step time limit
    assert set(np.unique(online["masks"])) <= {0.0, 1.0}
    assert online["masks"][199] == 1.0  # cut off by the time limit (truncated), not terminated: still bootstraps


def test_fixture_online_scalars_are_logged_and_finite(fixture_online):
    root, _ = fixture_online
    scalars = read_scalars(run_dir(root))
    for tag in ONLINE_SCALARS + ("actor/am_loss", "dual/lambda", "eval/return", "eval/success"):
        assert tag in scalars, f"{tag} missing; have {sorted(scalars)}"
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    env_steps = dict(scalars["online/env_steps"])
    assert min(env_steps) >= 19 and max(env_steps.values()) == 230  # the step axis continues from the offline phase
    assert dict(scalars["online/buffer_size"])[max(env_steps)] == 1992 + 230
    assert [v for _, v in scalars["online/length"]] == [200.0]
    rewards = torch.load(root / "dump" / "end-rank0.pt", weights_only=False)["buffer"]["rewards"][-230:]
    assert [v for _, v in scalars["online/return"]] == [pytest.approx(float(rewards[:200].sum()), rel=1e-5)]
    assert max(s for s, _ in scalars["eval/return"]) > 20 and min(s for s, _ in scalars["actor/am_loss"]) < 20


# ---------------------------------------------------------------- kill and resume inside the online phase


def test_killed_online_run_resumes_buffer_env_step_and_dual_state_exactly(tmp_path):
    # start_training 22: a checkpoint at update step s holds 22 + s - 10 env steps, never a multiple of H = 5, so
    # the kill falls inside an action chunk and the chunk's remaining actions must be resumed too
    # compile_step pinned: "auto" decides from the planned steps, which the killed run (online_steps 100000) and the
    # others do not share, and a compiled step's float rounding differs from the eager one's
    base = ["fit", "--config", QUICK, *TINY, "--online.start_training=22", "--trainer.val_check_interval=100000",
            "--model.init_args.compile_step=false"]  # fmt: skip
    args = [*base, *fast_trainer_args(tmp_path / "a", 10, 100_000), "--online.online_steps=100000",
            "--checkpoint.every_n_train_steps=25"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "trqam_lit.cli", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore",
                                                            "MUJOCO_GL": "disable"})  # fmt: skip
    ckpts = tmp_path / "a" / "runs"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            steps = [int(p.split("step=")[1][:-5]) for p in glob.glob(str(ckpts / "*/*/checkpoints/*step=*.ckpt"))]
            if any(s >= 50 for s in steps):  # 40 online updates in, 61 env steps taken
                time.sleep(0.5)
                break
            assert proc.poll() is None, "the run died"
            time.sleep(0.2)
        else:
            pytest.fail("no online checkpoint appeared")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # checkpoints are written atomically: last.ckpt is complete whenever the kill struck
    (last,) = glob.glob(str(ckpts / "*/*/checkpoints/last.ckpt"))
    saved = torch.load(last, map_location="cpu", weights_only=False)
    step, online = saved["global_step"], saved["callbacks"]["OnlinePhase"]
    (rows,) = saved["OGBenchDataModule"]["replay_buffer"]["ranks"]
    env_steps = online["env_steps"]
    assert step >= 50 and step % 25 == 0 and env_steps == 22 + (step - 10)  # env steps of the next update included
    assert env_steps % 5 != 0 and len(online["progress"][0]["queue"]) == 5 - env_steps % 5  # mid-chunk: rest saved
    assert len(rows["online"]["rewards"]) == env_steps

    # Resume for 3 more env steps (online_steps may grow; the schedule itself must not change).
    dump = tmp_path / "dump"
    more = [*base, *fast_trainer_args(tmp_path / "b", 10, 100_000), f"--online.online_steps={env_steps + 3}",
            "--ckpt_path", str(last), *probe(dump)]  # fmt: skip
    resumed = run_cli(more, cwd=tmp_path, env=PROBE_ENV)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    start, end = (torch.load(dump / f"{t}-rank0.pt", weights_only=False) for t in ("start", "end"))
    assert start["global_step"] == step and start["env_steps"] == env_steps
    assert start["episodes"] == online["episodes"][0]  # the interrupted episode continues (replayed)
    n_off = start["offline_size"]
    for key, value in rows["online"].items():
        torch.testing.assert_close(start["buffer"][key][n_off:], value, rtol=0, atol=0, msg=key)
        torch.testing.assert_close(end["buffer"][key][n_off : n_off + env_steps], value, rtol=0, atol=0, msg=key)
    assert start["lam"] == saved["state_dict"]["dual.lam"] and start["kl_ema"] == saved["state_dict"]["dual.kl_ema"]
    # the first resumed update needs no env step (the checkpoint holds them), the next three one each
    assert end["global_step"] == step + 4 and end["env_steps"] == env_steps + 3
    assert len(end["buffer"]["rewards"]) == n_off + env_steps + 3
    assert end["lam"] != start["lam"]  # the dual step ran after the online updates

    # ... and the resumed run equals a run straight through to the same end, bit for bit
    straight = [*base, *fast_trainer_args(tmp_path / "c", 10, 100_000), f"--online.online_steps={env_steps + 3}",
                *probe(tmp_path / "dump-straight")]  # fmt: skip
    proc = run_cli(straight, cwd=tmp_path, env=PROBE_ENV)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (a,), (b,) = (glob.glob(str(tmp_path / r / "runs/*/*/checkpoints/last.ckpt")) for r in ("b", "c"))
    a, b = (torch.load(p, map_location="cpu", weights_only=False) for p in (a, b))
    assert a["global_step"] == b["global_step"] == step + 4
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0, msg=key)
    for index, state in a["optimizer_states"][0]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(value, b["optimizer_states"][0]["state"][index][key], rtol=0, atol=0)
    straight_end = torch.load(tmp_path / "dump-straight" / "end-rank0.pt", weights_only=False)
    for key, value in end["buffer"].items():
        torch.testing.assert_close(straight_end["buffer"][key], value, rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------- DDP


def test_two_process_ddp_online_phase_keeps_ranks_identical(tmp_path):
    dump, states = tmp_path / "dump", tmp_path / "states"
    args = ["fit", "--config", QUICK, *fast_trainer_args(tmp_path, 6, 100_000), *TINY,
            "--model.init_args.bc_warmup_steps=3", "--online.online_steps=40", "--online.start_training=10",
            "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
            "--checkpoint.every_n_train_steps=20", *probe(dump),
            "--trainer.callbacks+=helpers.StateDump", f"--trainer.callbacks.dirpath={states}",
            "--trainer.callbacks+=helpers.StepValues", f"--trainer.callbacks.dirpath={states}"]  # fmt: skip
    proc = run_cli(args, cwd=tmp_path, env={**PROBE_ENV, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(states / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["dual.lam"].item() != 1.0
    for key in r0:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0, msg=f"{key} differs between ranks")
    e0, e1 = (torch.load(dump / f"end-rank{r}.pt", weights_only=False) for r in (0, 1))
    n_off = e0["offline_size"]
    assert e0["env_steps"] == e1["env_steps"] == 40 and len(e0["buffer"]["rewards"]) == n_off + 40
    # each rank ran its own environment: different online data, same offline rows
    assert not torch.equal(e0["buffer"]["observations"][n_off:], e1["buffer"]["observations"][n_off:])
    # ... from its own episodes: the first reset already differs (the rank is in each episode's seed; the acting
    # noise alone would make the data differ only after the first action)
    assert not torch.equal(e0["buffer"]["observations"][n_off], e1["buffer"]["observations"][n_off])
    assert torch.equal(e0["buffer"]["observations"][:n_off], e1["buffer"]["observations"][:n_off])
    (ckpt,) = glob.glob(str(tmp_path / "runs" / "*/*/checkpoints/last.ckpt"))
    ranks = torch.load(ckpt, weights_only=False)["OGBenchDataModule"]["replay_buffer"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["online"]["observations"], ranks[1]["online"]["observations"])
    assert_kl_is_the_rank_mean(run_dir(tmp_path), states, first_step=3)


# ---------------------------------------------------------------- the toy bandit, other agents, errors


def toy_fit(root, *extra: str):
    build_cli(["fit", "--config", TOY, "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
               f"--trainer.logger.init_args.save_dir={root / 'runs'}", *extra])  # fmt: skip
    return read_scalars(run_dir(root))


# BC, QAM and one policy of each other kind (a one-step policy: FQL) in the default run; the rest with -m slow.
ONLINE_AGENTS = [name for name in AGENTS if name != "trqam"]  # TRQAM: the tests above


@pytest.mark.parametrize(
    "agent", [a if a in ("bc", "qam", "fql") else pytest.param(a, marks=pytest.mark.slow) for a in ONLINE_AGENTS]
)
def test_other_agents_run_the_online_phase_unchanged(agent, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ["--model.init_args.bc_warmup_steps=0"] if agent != "bc" else []
    scalars = toy_fit(tmp_path, f"--model=trqam_lit.agents.{AGENTS[agent].__name__}", "--trainer.max_steps=20", *extra,
                      "--online.online_steps=30", "--online.start_training=5", "--trainer.val_check_interval=1000",
                      "--trainer.log_every_n_steps=5")  # fmt: skip
    assert dict(scalars["online/env_steps"])[max(dict(scalars["online/env_steps"]))] == 30
    assert len(scalars["online/return"]) == 30  # every bandit step is an episode
    assert "online/success" not in scalars  # the bandit reports no success


def test_online_phase_starts_from_an_offline_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    short = ["--trainer.max_steps=20", "--model.init_args.bc_warmup_steps=10", "--trainer.val_check_interval=1000"]
    toy_fit(tmp_path / "offline", *short, "--online.online_steps=0")
    (ckpt,) = glob.glob(str(tmp_path / "offline" / "runs" / "*/*/checkpoints/last.ckpt"))
    assert torch.load(ckpt, weights_only=False)["global_step"] == 20
    dump = tmp_path / "dump"
    scalars = toy_fit(tmp_path / "online", *short, "--online.online_steps=15", "--online.start_training=5",
                      "--trainer.log_every_n_steps=5", "--ckpt_path", ckpt,
                      "--trainer.callbacks+=helpers.OnlineDump", f"--trainer.callbacks.dirpath={dump}")  # fmt: skip
    start, end = (torch.load(dump / f"{t}-rank0.pt", weights_only=False) for t in ("start", "end"))
    assert start["global_step"] == 20 and start["env_steps"] == 5  # the burst ran before the first online update
    burst = start["buffer"]["actions"][-5:]  # one policy, before any online update: only the acting noise differs
    assert len({tuple(row.tolist()) for row in burst}) == 5  # fresh noise for each environment step
    assert end["global_step"] == 20 + 11 and end["env_steps"] == 15 and len(scalars["online/return"]) == 15
    with pytest.raises(ValueError, match="resumed at global step 20, past the online phase's start"):
        toy_fit(tmp_path / "late", "--trainer.max_steps=10", "--online.online_steps=15", "--online.start_training=5",
                "--ckpt_path", ckpt)  # fmt: skip


def test_utd_ratio_takes_that_many_updates_per_environment_step(tmp_path, monkeypatch):
    # utd_ratio 2, 15 env steps, updates from env step 5: 2 x 11 updates after the 20 offline steps, each env step
    # (logged at every update) held for two consecutive updates, the last env step for the rest.
    monkeypatch.chdir(tmp_path)
    online = ["--online.online_steps=15", "--online.start_training=5", "--online.utd_ratio=2"]
    scalars = toy_fit(tmp_path, "--trainer.max_steps=20", *online, "--trainer.val_check_interval=1000",
                      "--trainer.log_every_n_steps=1")  # fmt: skip
    env_steps = dict(scalars["online/env_steps"])
    assert max(env_steps) == 20 + 2 * 11 and len(scalars["online/return"]) == 15
    assert env_steps == {s: min(5.0 + (s - 19) // 2, 15.0) for s in range(19, 43)}


@pytest.mark.slow
def test_toy_online_phase_beats_the_offline_phase_over_three_seeds(tmp_path, monkeypatch):
    # Learned critic; the reward c * a peaks at a = +1, behaviour N(-0.5, 0.3^2): the offline data barely reach 0.
    # Offline: 300 BC + 300 TRQAM steps (evaluated at steps 449 and 599); online: 700 bandit steps.
    monkeypatch.chdir(tmp_path)
    margins = []
    for seed in (0, 1, 2):
        scalars = toy_fit(tmp_path / str(seed), f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
                          f"--online.seed={seed}")  # fmt: skip
        evals = dict(scalars["eval/return"])
        offline_best = max(v for s, v in evals.items() if 300 <= s < 600)
        margins.append(evals[max(evals)] - offline_best)
    print("online - best offline eval/return per seed:", [round(m, 3) for m in margins])
    assert min(margins) > 0.08 and np.mean(margins) > 0.1, margins


class _Stub:
    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


def test_a_checkpoint_of_another_env_schedule_or_world_size_is_refused():
    state = {"env_id": "cube-single-play-singletask-task5-v0", "env_steps": 35, "episodes": [1], "offline_steps": 10,
             "utd_ratio": 1, "start_training": 20}  # fmt: skip
    phase = OnlinePhase(online_steps=100, start_training=20, offline_steps=10)

    def trainer(env: str = state["env_id"], world: int = 1):
        return _Stub(datamodule=_Stub(env_name=env), world_size=world, global_rank=0)

    phase._restore(trainer(), state)
    assert phase.env_steps == 35 and phase.episodes == 1
    with pytest.raises(ValueError, match="online data come from 'cube-single-play-singletask-task5-v0'.*task4"):
        phase._restore(trainer("cube-single-play-singletask-task4-v0"), state)
    with pytest.raises(ValueError, match="ran on 1 rank"):
        phase._restore(trainer(world=2), state)
    with pytest.raises(ValueError, match="online.start_training=30 but the checkpoint's online phase ran with 20"):
        OnlinePhase(online_steps=100, start_training=30, offline_steps=10)._restore(trainer(), state)
    OnlinePhase(online_steps=100, start_training=30)._restore(trainer("other"), {**state, "env_steps": 0})  # offline


def test_inconsistent_max_steps_and_bad_settings_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", TOY, "--online.offline_steps=100", "--trainer.max_steps=5000",
                     f"--trainer.logger.init_args.save_dir={tmp_path}"], run=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"trainer.max_steps=5000 contradicts .* Set trainer.max_steps to 100 or 781"):
        cli.trainer.fit(cli.model, cli.datamodule)
    with pytest.raises(ValueError, match="start_training=800 leaves no update within online_steps=700"):
        build_cli(["--config", TOY, "--online.start_training=800"], run=False)


def test_a_truncated_checkpoint_file_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    toy_fit(tmp_path / "a", "--trainer.max_steps=3", "--trainer.val_check_interval=1000", "--online.online_steps=0")
    (ckpt,) = glob.glob(str(tmp_path / "a" / "runs" / "*/*/checkpoints/last.ckpt"))
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(open(ckpt, "rb").read()[:5000])
    with pytest.raises(ValueError, match="cut.ckpt is damaged or not a Lightning checkpoint"):
        build_cli(["fit", "--config", TOY, "--ckpt_path", str(cut)])


def test_damaged_or_foreign_buffer_state_is_refused():
    dm = ToyBanditDataModule(num_samples=50)
    buf = dm.make_replay_buffer(10)
    buf.add(np.zeros(1), np.ones(1) * 0.5, 0.5, True, 0.0, np.zeros(1))
    state = buf.state_dict()
    wide = ReplayBuffer(ToyBanditDataModule(num_samples=50, action_dim=2).offline_table(), capacity_extra=10)
    with pytest.raises(ValueError, match="online actions has shape .*another environment"):
        wide.load_state_dict(state)
    with pytest.raises(ValueError, match="damaged"):
        ToyBanditDataModule(num_samples=50).make_replay_buffer(10).load_state_dict({"offline_size": 50})
    with pytest.raises(ValueError, match="damaged: it lacks"):
        OnlinePhase(online_steps=10, start_training=1).load_state_dict({"env_steps": 3})
    with pytest.raises(ValueError, match="2 rank"):
        ToyBanditDataModule(num_samples=50).load_state_dict({"replay_buffer": {"ranks": [state, state]}})


# ---------------------------------------------------------------- deferred batches


def test_deferred_batches_are_drawn_after_the_env_steps_before_them():
    dm = ToyBanditDataModule(num_samples=100, batch_size=64, mu=-0.5)
    dm.defer_sampling_from(3)
    it = iter(dm.train_dataloader())
    offline = [next(it) for _ in range(3)]
    placeholder = next(it)  # fetched ahead, before the online transitions below exist
    assert all(b["actions"].shape == (64, 1) for b in offline) and set(placeholder) == {"deferred_step"}
    buf = dm.make_replay_buffer(1000)
    for _ in range(1000):
        buf.add(np.zeros(1), np.full(1, 0.9), 0.9, True, 0.0, np.zeros(1))
    batch = dm.on_before_batch_transfer(placeholder, 0)
    assert (batch["actions"] > 0.89).float().mean() > 0.7  # drawn now, over everything stored
    assert set(batch) == {"observations", "actions", "rewards", "masks", "valid", "next_observations"}
    again = dm.on_before_batch_transfer({"deferred_step": torch.tensor(3)}, 0)
    torch.testing.assert_close(again, batch)  # a pure function of (seed, rank, step, buffer contents)


def test_online_over_a_shard_directory_starts_from_the_current_shard(tmp_path):
    import shutil

    from trqam_lit.data import OGBenchDataModule

    shutil.copy(fixture_path("cube-single-play-v0"), tmp_path / "a.npz")
    shutil.copy(fixture_path("cube-single-play-v0").with_name("cube-single-play-v0-val.npz"), tmp_path / "b.npz")
    dm = OGBenchDataModule(env_name=CUBE, dataset_path=str(tmp_path), shard_steps=2, shard_prefetch=False)
    dm.setup("fit")
    dm.defer_sampling_from(3)  # global step 3 samples shard 3 // 2 = 1 (b.npz, the short one)
    buf = dm.make_replay_buffer(10)
    assert len(buf) == len(load_table(tmp_path / "b.npz", CUBE)) < len(load_table(tmp_path / "a.npz", CUBE))


def test_a_datamodule_without_the_online_contract_is_refused_naming_what_it_lacks():
    import lightning.pytorch as pl

    from trqam_lit.training.online import OnlineData

    class Trainer:
        datamodule = pl.LightningDataModule()

    assert isinstance(ToyBanditDataModule(), OnlineData)
    assert not isinstance(Trainer.datamodule, OnlineData)
    lacks = r"meets training.online.OnlineData .* LightningDataModule lacks \['action_dim'"
    with pytest.raises(ValueError, match=lacks):
        OnlinePhase(online_steps=5, start_training=1).setup(Trainer(), None, "fit")
