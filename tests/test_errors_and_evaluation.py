"""The agent's configuration errors, damaged or foreign checkpoint files, and the OGBench evaluator's protocol.

Errors: each must be the stated type and name the offending setting (or file), before any weight is updated.
Evaluator (spec data.md section 6): an action chunk's H actions run first-first (the chunk is (H, act_dim)
flattened row-major), success is ``info['success']`` at the episode's final step, and episodes are sharded over
ranks (disjoint, covering all, each episode's seed fixed by its index). These run the real OGBench environment
(cube-single, task 5) behind a recording wrapper.
"""

from __future__ import annotations

import functools
import os
import re
import signal
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "disable")

import gymnasium
import lightning.pytorch as pl
import numpy as np
import pytest
import torch

import trqam_lit.training.evaluation as evaluation
from helpers import CONFIGS
from trqam_lit.agents import BC, TRQAM
from trqam_lit.cli import build_cli
from trqam_lit.data.ogbench_env import make_ogbench_env
from trqam_lit.data.toy import ToyBanditDataModule
from trqam_lit.training.checkpoint import check_checkpoint_file
from trqam_lit.training.evaluation import RolloutEvaluator

CUBE = "cube-single-play-singletask-task5-v0"
CUBE_ACT = 5  # per-step action dimension of the cube environments
TOY = str(CONFIGS / "toy" / "bandit.yaml")
SMALL = dict(obs_dim=1, action_dim=1, actor_hidden_dims=(8, 8), critic_hidden_dims=(8, 8), num_critics=2)


# ------------------------------------------------------------------------------------------------ files on disk
def tiny_trainer(root: Path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
        **kwargs,
    )


def toy_data() -> ToyBanditDataModule:
    return ToyBanditDataModule(num_samples=64, batch_size=16, eval_samples=8)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A real BC checkpoint (one Lightning step on the toy bandit), its truncation, and foreign files."""
    root = tmp_path_factory.mktemp("ckpts")
    trainer = tiny_trainer(root)
    trainer.fit(BC(obs_dim=1, action_dim=1, actor_hidden_dims=(8, 8), flow_steps=2), toy_data())
    trainer.save_checkpoint(root / "bc.ckpt")
    data = (root / "bc.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (root / "notes.ckpt").write_text("model: trqam\nsteps: 1000\n")  # a text file under a checkpoint name
    torch.save({"weights": torch.zeros(3)}, root / "plain-dict.ckpt")  # a torch file, but no state_dict / v_bc
    torch.save(torch.zeros(3), root / "tensor.ckpt")  # a torch file that is not even a dict
    bc = torch.load(root / "bc.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    torch.save({k: v for k, v in bc.items() if k.startswith("v_bc.")}, root / "raw-state-dict.pt")  # no Lightning
    return {p.stem: p for p in [*root.glob("*.ckpt"), *root.glob("*.pt")]}


def fit_with_init_from(path: Path, root: Path, **kwargs) -> None:
    """The path ``--model.init_args.init_from`` takes: the agent loads it in setup('fit') of a fresh fit."""
    tiny_trainer(root).fit(TRQAM(init_from=str(path), **{**SMALL, **kwargs}), toy_data())


# -------------------------------------------------------------------------------------- agent configuration
@pytest.mark.parametrize("obs_dim, action_dim", [(0, 3), (4, 0), (-1, 3)])
def test_nonpositive_shapes_are_refused_naming_them(obs_dim, action_dim):
    with pytest.raises(ValueError, match=rf"obs_dim and action_dim must be positive \(got {obs_dim}, {action_dim}\)"):
        TRQAM(**{**SMALL, "obs_dim": obs_dim, "action_dim": action_dim})
    with pytest.raises(ValueError, match="obs_dim and action_dim must be positive"):
        BC(obs_dim=obs_dim, action_dim=action_dim)


@pytest.mark.parametrize("flow_steps", [1, 0, -3])
def test_flow_steps_below_two_is_refused(flow_steps):
    # K >= 2: one stochastic SDE step plus the final base ODE step.
    with pytest.raises(ValueError, match=rf"flow_steps must be at least 2, got {flow_steps}"):
        TRQAM(**SMALL, flow_steps=flow_steps)
    TRQAM(**SMALL, flow_steps=2)  # the smallest valid K builds


def test_trainer_gradient_clip_val_is_refused_pointing_at_grad_clip_norm(tmp_path, monkeypatch):
    # Through the real CLI: the agent clips with its own global norm; Lightning's option would be silently
    # ignored, so the first optimizer step raises instead, naming both settings. No update is applied.
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", TOY, "--trainer.gradient_clip_val=0.5", "--trainer.max_steps=3",
                     "--trainer.enable_progress_bar=false", "--model.init_args.bc_warmup_steps=0",
                     "--data.init_args.num_samples=64", "--data.init_args.batch_size=16"], run=False)  # fmt: skip
    trained = {name: p.detach().clone() for name, p in cli.model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match=r"trainer\.gradient_clip_val .* set model\.init_args\.grad_clip_norm"):
        cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 0
    for name, p in cli.model.named_parameters():
        if name in trained:
            assert torch.equal(p, trained[name]), name


# ---------------------------------------------------------------------------------------------------- init_from
def test_init_from_missing_file_names_the_setting_and_path(tmp_path):
    missing = tmp_path / "no-such-bc.ckpt"
    with pytest.raises(FileNotFoundError, match=rf"init_from checkpoint not found: {re.escape(str(missing))}"):
        fit_with_init_from(missing, tmp_path)


@pytest.mark.parametrize(
    "change, mismatched",
    [({"action_dim": 2}, "mlp.out.weight"), ({"actor_hidden_dims": (16, 16)}, "mlp.hidden.0.weight")],
)
def test_init_from_with_other_v_bc_shapes_names_path_and_parameter(files, tmp_path, change, mismatched):
    # The BC checkpoint has obs_dim 1, action_dim 1, widths (8, 8).
    with pytest.raises(ValueError, match=re.escape(f"{files['bc']}: its v_bc does not match this model's shapes")) as e:
        fit_with_init_from(files["bc"], tmp_path, **change)
    assert f"size mismatch for {mismatched}" in str(e.value)


@pytest.mark.parametrize("name", ["truncated", "notes", "tensor", "plain-dict"])
def test_init_from_damaged_or_foreign_file_is_a_value_error_naming_it(files, tmp_path, name):
    # A truncated checkpoint (torch says "OSError: [Errno 22] Invalid argument"), a text file (pickle's
    # "UnpicklingError: Memo value not found"), a saved tensor (AttributeError) and a torch dict without v_bc.
    with pytest.raises(ValueError, match=re.escape(str(files[name]))):
        fit_with_init_from(files[name], tmp_path)


@pytest.mark.parametrize("name", ["bc", "raw-state-dict"])
def test_init_from_a_lightning_checkpoint_or_a_plain_state_dict_loads(files, name):
    # The controls for the failures above: the intact BC checkpoint, and its v_bc weights saved as a plain state
    # dict (no Lightning keys), are copied into v_bc, v_base and v_ft.
    model = TRQAM(**SMALL)
    model.load_bc_weights(str(files[name]))
    saved = torch.load(files["bc"], map_location="cpu", weights_only=False)["state_dict"]
    for net in (model.v_bc, model.v_base, model.v_ft):
        for key, value in net.state_dict().items():
            assert torch.equal(value, saved[f"v_bc.{key}"]), key


# ---------------------------------------------------------------------------------------------------- ckpt_path
@pytest.mark.parametrize("name", ["truncated", "notes"])
def test_ckpt_path_damaged_or_text_file_is_refused_naming_it(files, name):
    pattern = re.escape(f"checkpoint {files[name]} is damaged or not a Lightning checkpoint")
    with pytest.raises(ValueError, match=pattern):
        check_checkpoint_file(files[name])
    with pytest.raises(ValueError, match=pattern):  # the CLI checks right after parsing, before building anything
        build_cli(["fit", "--config", TOY, "--ckpt_path", str(files[name])])
    check_checkpoint_file(files["bc"])  # the intact checkpoint passes
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        check_checkpoint_file(files[name].with_name("missing.ckpt"))


def test_ckpt_path_foreign_torch_file_is_refused_naming_it(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(str(files["plain-dict"]))):
        build_cli(["fit", "--config", TOY, "--ckpt_path", str(files["plain-dict"]), "--trainer.max_steps=2",
                   "--trainer.enable_progress_bar=false", "--data.init_args.num_samples=64"])  # fmt: skip


# ---------------------------------------------------------------------------------------------------- evaluator
class Recorder(gymnasium.Wrapper):
    """Passes everything to the real environment and records it: reset seeds and first observations, actions,
    observations and rewards per step. ``max_steps`` shortens episodes (truncation). A ``script`` (success
    steps, terminating step) overrides ``info['success']`` and ``terminated`` to put success where a test needs it.
    """

    def __init__(self, env: gymnasium.Env, max_steps: int, scripts: list) -> None:
        super().__init__(env)
        self.max_steps, self.scripts = max_steps, scripts
        self.resets: list[tuple[int | None, np.ndarray]] = []
        self.actions: list[np.ndarray] = []
        self.obs: list[np.ndarray] = []
        self.rewards: list[float] = []

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self.resets.append((seed, np.array(obs, copy=True)))
        self.t = 0
        self.script = self.scripts.pop(0) if self.scripts else None
        return obs, info

    def step(self, action):
        self.actions.append(np.array(action, copy=True))
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.t += 1
        truncated = truncated or self.t >= self.max_steps
        if self.script is not None:
            success_steps, end = self.script
            info = {**info, "success": self.t in success_steps}
            terminated = self.t == end
        self.obs.append(np.array(obs, copy=True))
        self.rewards.append(float(reward))
        return obs, reward, terminated, truncated, info


def ogbench(env_name: str) -> functools.partial:
    """OGBench's environment factory for ``env_name`` (picklable, for worker processes)."""
    return functools.partial(make_ogbench_env, env_name)


@pytest.fixture(scope="module")
def cube_envs() -> list:
    """Two real environments (each takes seconds to build), shared by every evaluator below."""
    return [make_ogbench_env(CUBE) for _ in range(2)]


class RecordedEnvs:
    """An evaluator's environment factory: each env an evaluator builds is a Recorder around a real one
    (consecutive builds get different real envs, so one evaluator's two envs never share one)."""

    def __init__(self, cube_envs: list) -> None:
        self.cube_envs, self.made = cube_envs, []
        self.max_steps, self.scripts = 200, []

    def __call__(self) -> Recorder:
        rec = Recorder(self.cube_envs[len(self.made) % len(self.cube_envs)], self.max_steps, self.scripts)
        self.made.append(rec)
        return rec


@pytest.fixture
def recorded(cube_envs) -> RecordedEnvs:
    return RecordedEnvs(cube_envs)


def zero_policy(obs: torch.Tensor, chunk_dim: int):
    return torch.zeros(obs.shape[0], chunk_dim)


def test_chunk_actions_run_first_first_from_the_row_major_chunk(recorded):
    # One episode of 7 steps with H = 3: chunks at steps 0, 3, 6 (the last one cut by the time limit). Every
    # entry of every chunk is distinct, so the executed sequence pins both the order of the H actions and the
    # (H, act_dim) layout of the flattened chunk. Each new chunk is computed from the observation after the
    # previous chunk's last action (open loop within a chunk, closed loop between chunks).
    H, steps = 3, 7
    recorded.max_steps = steps
    chunks, seen = [], []

    def act(obs: torch.Tensor) -> torch.Tensor:
        seen.append(obs.clone())
        c = len(chunks)
        grid = torch.arange(H * CUBE_ACT, dtype=torch.float32).reshape(H, CUBE_ACT)  # (action k, entry j)
        chunk = (0.02 * grid + 0.3 * c - 0.5).reshape(1, H * CUBE_ACT)  # row-major flatten of (H, act_dim)
        chunks.append(chunk)
        return chunk.expand(obs.shape[0], -1)

    out = RolloutEvaluator(recorded, horizon=H, action_dim=CUBE_ACT, num_episodes=1, num_envs=1, seed=7).evaluate(act)
    (env,) = recorded.made
    expected = torch.cat([c.reshape(H, CUBE_ACT) for c in chunks])[:steps].numpy()
    np.testing.assert_array_equal(np.stack(env.actions), expected)
    assert len(chunks) == 3 and out["length"].tolist() == [float(steps)]
    assert torch.equal(seen[0], torch.as_tensor(env.resets[0][1], dtype=torch.float32)[None])
    for c in (1, 2):
        assert torch.equal(seen[c], torch.as_tensor(env.obs[H * c - 1], dtype=torch.float32)[None])


@pytest.mark.parametrize(("offset", "sparse"), [(0.0, False), (-1.0, False), (0.0, True)])
def test_the_discounted_return_sums_each_steps_training_reward_across_chunks(recorded, offset, sparse):
    # 7 steps with H = 3 (chunks of 3, 3, 1): the discount's exponent runs over environment steps, not chunks, and
    # each reward goes through the domain's transformation first (Robomimic's r - 1; QAM's sparse -1 * (r != 0)).
    recorded.max_steps = 7
    first = []

    def act(obs):
        chunk = torch.full((obs.shape[0], 3 * CUBE_ACT), 0.1 * (len(first) + 1))
        first.append(chunk)
        return chunk

    ev = RolloutEvaluator(recorded, horizon=3, action_dim=CUBE_ACT, num_episodes=1, num_envs=1, seed=3,
                          discount=0.9, reward_offset=offset, sparse=sparse)  # fmt: skip
    out = ev.evaluate(act)
    (env,) = recorded.made
    rewards = [r + offset for r in env.rewards]
    rewards = [-float(r != 0) for r in rewards] if sparse else rewards
    assert len(rewards) == 7
    assert out["discounted_return"].tolist() == [pytest.approx(sum(0.9**t * r for t, r in enumerate(rewards)))]
    np.testing.assert_array_equal(out["initial_obs"][0].numpy(), env.resets[0][1].astype(np.float32))
    np.testing.assert_array_equal(out["first_chunk"][0].numpy(), first[0][0].numpy())
    assert "discounted_return" not in RolloutEvaluator(recorded, 3, CUBE_ACT, 1, 1).evaluate(act)


def test_success_is_info_success_at_the_final_step(recorded):
    # Four episodes (time limit 5, two envs in lockstep), each with a scripted info['success']:
    #   success at step 2 only, then runs to the time limit   -> 0 (a max over the episode would say 1)
    #   success at step 3, which ends it (terminated)          -> 1, length 3
    #   success exactly at the time limit                      -> 1, length 5
    #   never                                                  -> 0
    recorded.max_steps = 5
    recorded.scripts = [({2}, None), ({3}, 3), ({5}, None), (set(), None)]
    ev = RolloutEvaluator(recorded, horizon=2, action_dim=CUBE_ACT, num_episodes=4, num_envs=2, seed=0)
    out = ev.evaluate(lambda obs: zero_policy(obs, 2 * CUBE_ACT))
    assert not recorded.scripts  # each script ran in exactly one episode
    got = sorted(zip(out["success"].tolist(), out["length"].tolist(), strict=True))
    assert got == [(0.0, 5.0), (0.0, 5.0), (1.0, 3.0), (1.0, 5.0)]
    assert float(out["success"].mean()) == 0.5
    # returns are the real environment's rewards, summed per episode
    assert float(out["return"].sum()) == pytest.approx(sum(sum(env.rewards) for env in recorded.made))


def test_episodes_are_sharded_over_ranks_with_seeds_fixed_by_episode(recorded):
    # Rank r of W runs a disjoint subset, the union over ranks is every episode, and an episode's seed (hence its
    # initial state in the real environment) does not depend on W, the rank or how many envs run at once.
    num_episodes, recorded.max_steps = 5, 2

    def run(rank: int, world: int, num_envs: int) -> dict[int, np.ndarray]:
        start = len(recorded.made)
        ev = RolloutEvaluator(recorded, horizon=2, action_dim=CUBE_ACT, num_episodes=num_episodes, num_envs=num_envs)
        out = ev.evaluate(lambda obs: zero_policy(obs, 2 * CUBE_ACT), rank=rank, world_size=world)
        resets = [r for env in recorded.made[start:] for r in env.resets]
        assert len(out["success"]) == len(out["return"]) == len(out["length"]) == len(resets)
        assert all(seed is not None for seed, _ in resets)
        seeds = [seed for seed, _ in resets]
        assert len(set(seeds)) == len(seeds), "an episode ran twice on one rank"
        return dict(resets)

    single = run(0, 1, num_envs=1)
    assert len(single) == num_episodes
    shardings = [[run(0, 1, num_envs=2)]]  # per world size: each rank's {seed: first observation}
    # W = 6 > 5 episodes: a rank runs none, builds no environment and returns empty per-episode values.
    for world in (2, 3, 6):
        shardings.append([run(r, world, num_envs=2) for r in range(world)])
    assert min(map(len, shardings[-1])) == 0
    for per_rank in shardings:
        seeds = [set(episodes) for episodes in per_rank]
        assert sum(map(len, seeds)) == num_episodes, "ranks overlap or miss episodes"
        assert set().union(*seeds) == set(single)
        for episodes in per_rank:
            for seed, first_obs in episodes.items():
                np.testing.assert_array_equal(first_obs, single[seed])


def observation_policy(obs: torch.Tensor, dim: int) -> torch.Tensor:
    """A deterministic function of the observation: two evaluators that run the same episodes see the same chunks."""
    w = torch.linspace(-1.0, 1.0, obs.shape[-1] * dim).reshape(obs.shape[-1], dim)
    return torch.tanh(obs @ w)


def test_worker_processes_run_the_same_episodes_as_the_training_process():
    # 5 episodes, 3 environments at a time over 2 workers (uneven: 2 + 1, then a wave of 2): every observation the
    # policy sees (the state at each chunk boundary of every episode) and the per-episode values are identical to
    # stepping in this process, and a second evaluation reuses the workers.
    kwargs = dict(horizon=2, action_dim=CUBE_ACT, num_episodes=5, num_envs=3, seed=3)

    def recording(seen):
        def act(obs):
            seen.append(obs.clone())
            return observation_policy(obs, 2 * CUBE_ACT)

        return act

    local_obs, first_obs, again_obs = [], [], []
    local = RolloutEvaluator(ogbench(CUBE), **kwargs).evaluate(recording(local_obs))
    ev = RolloutEvaluator(ogbench(CUBE), workers=2, **kwargs)
    try:
        first = ev.evaluate(recording(first_obs))
        pids = [p.pid for p in ev._pool.procs]
        again = ev.evaluate(recording(again_obs))
        assert [p.pid for p in ev._pool.procs] == pids and len(pids) == 2
    finally:
        ev.close()
    assert ev._pool is None
    assert len(local_obs) > 100 and not torch.equal(local_obs[0], local_obs[1])  # the states move
    for seen in (first_obs, again_obs):
        assert len(seen) == len(local_obs)
        assert all(torch.equal(a, b) for a, b in zip(seen, local_obs, strict=True))
    for key in ("success", "return", "length"):
        assert torch.equal(first[key], local[key]), key
        assert torch.equal(again[key], local[key]), key


class CountdownEnv:
    """An environment whose episodes end after a seed-dependent number of steps, by success (even seeds) or by time
    limit (odd ones); the observation is the running sum of the actions and the steps left."""

    def reset(self, seed: int):
        self.seed, self.left, self.x = seed, 2 + (seed * 5) % 9, float(seed)
        return np.array([self.x, self.left], dtype=np.float32), {}

    def step(self, action):
        self.left -= 1
        self.x += float(np.sum(action))
        over = self.left <= 0
        done = over and self.seed % 2 == 0
        obs = np.array([self.x, self.left], dtype=np.float32)
        return obs, self.x, done, over and not done, {"success": float(done)}


class InlinePool:
    """The worker pool's interface (call, send, receive) stepping the environments in this process; it records how
    many requests were outstanding at once."""

    def __init__(self) -> None:
        self.envs: dict[int, CountdownEnv] = {}
        self.outstanding: list[int] = []
        self.most_outstanding = 0

    def call(self, cmd, items):
        return self.receive(self.send(cmd, items), len(items))

    def send(self, cmd, items):
        if cmd == "reset":
            result = [self.envs.setdefault(slot, CountdownEnv()).reset(seed)[0] for slot, seed in items]
        else:
            result = [evaluation.run_chunk(self.envs[slot], actions, ret) for slot, actions, ret in items]
        self.outstanding.append(id(result))
        self.most_outstanding = max(self.most_outstanding, len(self.outstanding))
        return result

    def receive(self, handle, n):
        assert len(handle) == n
        self.outstanding.remove(id(handle))
        return handle


def test_worker_schedule_overlaps_policy_and_physics_with_the_same_calls_as_in_process():
    # The workers' schedule issues a group's policy call while the other group's chunks are being stepped (two
    # requests outstanding), and still makes exactly the in-process sequence of policy calls (same inputs, same
    # order) when the groups' environments finish at different times: 7 episodes, waves of 5 (groups 3 + 2) and 2.
    kwargs = dict(horizon=2, action_dim=1, num_episodes=7, num_envs=5, seed=0)

    def recording(seen):
        def act(obs):
            seen.append(obs.clone())
            return (obs[:, :1] * 0.1 + 1.0).repeat(1, 2)

        return act

    local_seen, pooled_seen = [], []
    local = RolloutEvaluator(CountdownEnv, **kwargs).evaluate(recording(local_seen))
    ev = RolloutEvaluator(CountdownEnv, workers=2, **kwargs)
    ev._pool = pool = InlinePool()
    pooled = ev.evaluate(recording(pooled_seen))
    assert len(set(local["length"].tolist())) > 3 and 0 < local["success"].sum() < 7  # uneven ends, both kinds
    assert len(pooled_seen) == len(local_seen) > 10
    assert all(torch.equal(a, b) for a, b in zip(pooled_seen, local_seen, strict=True))
    for key in ("success", "return", "length"):
        assert torch.equal(pooled[key], local[key]), key
    assert pool.most_outstanding == 2 and not pool.outstanding


def test_a_failing_evaluation_worker_raises_with_its_traceback():
    missing = ogbench("cube-single-play-singletask-task99-v0")
    ev = RolloutEvaluator(missing, horizon=2, action_dim=CUBE_ACT, num_episodes=1, num_envs=1, workers=1)
    try:
        with pytest.raises(RuntimeError, match=r"(?s)evaluation worker 0 failed:.*Traceback"):
            ev.evaluate(lambda obs: observation_policy(obs, 2 * CUBE_ACT))
    finally:
        ev.close()
    with pytest.raises(ValueError, match="workers must be >= 0"):
        RolloutEvaluator(ogbench(CUBE), horizon=2, action_dim=CUBE_ACT, workers=-1)


def test_a_killed_evaluation_worker_is_reported_and_the_evaluator_still_closes():
    # A worker killed from outside (the OOM killer, a stray signal) between evaluations: the next evaluation raises
    # a clear error naming the worker and its exit code (not a bare BrokenPipeError from the pipe), and close() works.
    ev = RolloutEvaluator(ogbench(CUBE), horizon=2, action_dim=CUBE_ACT, num_episodes=2, num_envs=2, workers=2)
    try:
        ev.evaluate(lambda obs: observation_policy(obs, 2 * CUBE_ACT))
        victim = ev._pool.procs[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=10)
        with pytest.raises(RuntimeError, match=r"evaluation worker 1 died \(exit code -9\)"):
            ev.evaluate(lambda obs: observation_policy(obs, 2 * CUBE_ACT))
    finally:
        ev.close()
    assert ev._pool is None
