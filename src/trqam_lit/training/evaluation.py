"""Batched evaluation rollouts: many environments stepped in lockstep with one batched policy call.

Action chunks are executed open loop (H environment steps per policy call); an episode ends at success
(single-task OGBench environments terminate at the goal) or at the time limit. Episodes are sharded over
ranks; each episode's seed depends only on its index, so a rank count does not change which episodes run.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import traceback
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from trqam_lit.training.rewards import training_reward

ActFn = Callable[[Tensor], Tensor]
EnvFactory = Callable[[], Any]  # a new environment; picklable (it is sent to spawned workers)


def evaluation_dataloader() -> DataLoader:
    """One item per rank: an evaluation is a batch of environment rollouts, not a pass over a dataset."""
    return DataLoader([0], batch_size=1)


def run_chunk(env, actions: np.ndarray, ret: float) -> tuple[np.ndarray, float, int, bool, float, list[float]]:
    """Steps ``env`` through an action chunk (H, A) open loop, stopping at the episode's end.

    Returns (last observation, the return so far, steps taken, episode over, success, the chunk's rewards). The
    return keeps accumulating one reward at a time, as a step-by-step loop would (same floating-point sum).
    """
    steps, rewards = 0, []
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        ret += float(reward)
        rewards.append(float(reward))
        steps += 1
        if terminated or truncated:
            return obs, ret, steps, True, float(info.get("success", 0.0)), rewards
    return obs, ret, steps, False, 0.0, rewards


def _env_worker(conn, make_env: EnvFactory) -> None:
    """A worker process's loop: it owns some of the evaluator's environments and runs their chunks."""
    envs: dict[int, object] = {}
    while True:
        try:
            cmd, payload = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if cmd == "close":
            return
        try:
            if cmd == "make":
                for slot in payload:
                    if slot not in envs:
                        envs[slot] = make_env()
                result = None
            elif cmd == "reset":
                for slot, _ in payload:
                    if slot not in envs:
                        envs[slot] = make_env()
                result = [envs[slot].reset(seed=seed)[0] for slot, seed in payload]
            else:  # "chunks"
                result = [run_chunk(envs[slot], actions, ret) for slot, actions, ret in payload]
            conn.send(("ok", result))
        except Exception:  # noqa: BLE001 (handed to the parent, which raises it with the worker's traceback)
            conn.send(("error", traceback.format_exc()))


WAVE_GROUPS = 2  # groups of a wave's environments taking turns (see RolloutEvaluator._run_wave)


class _EnvWorkers:
    """``count`` worker processes (spawned: no forked OpenMP or CUDA state); slot i lives in worker i % count."""

    def __init__(self, make_env: EnvFactory, count: int) -> None:
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_env_worker, args=(child, make_env), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def call(self, cmd: str, items: list[tuple]) -> list:
        """Send each item (slot first) to its slot's worker; results come back in the items' order."""
        return self.receive(self.send(cmd, items), len(items))

    def send(self, cmd: str, items: list[tuple]) -> list[list[int]]:
        """The first half of ``call``: each worker gets its items; returns which items went to which worker, for
        ``receive``. A worker answers its requests in the order they were sent: receive them in that order (the
        evaluator keeps at most two outstanding, whose messages are small enough for the pipes' buffers)."""
        count = len(self.conns)
        parts: list[list[int]] = [[] for _ in range(count)]
        for index, item in enumerate(items):
            parts[item[0] % count].append(index)
        for w, indices in enumerate(parts):
            if indices:
                local = [(items[i][0] // count, *items[i][1:]) for i in indices]
                try:
                    self.conns[w].send((cmd, [x[0] for x in local] if cmd == "make" else local))
                except OSError:  # BrokenPipeError, ConnectionResetError: the worker is gone
                    raise self._died(w) from None
        return parts

    def receive(self, parts: list[list[int]], n: int) -> list:
        """The second half of ``call``: the results of ``send``'s request, in the items' order."""
        results: list = [None] * n
        for w, indices in enumerate(parts):
            if not indices:
                continue
            try:
                status, value = self.conns[w].recv()
            except (EOFError, OSError):
                raise self._died(w) from None
            if status == "error":
                raise RuntimeError(f"evaluation worker {w} failed:\n{value}")
            for i, r in zip(indices, value or [None] * len(indices), strict=True):
                results[i] = r
        return results

    def _died(self, w: int) -> RuntimeError:
        self.procs[w].join(timeout=1)  # reaped, so its exit code is known
        return RuntimeError(f"evaluation worker {w} died (exit code {self.procs[w].exitcode}); see its output above")

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("close", None))
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        self.conns, self.procs = [], []


class RolloutEvaluator:
    """Runs ``num_episodes`` episodes of the environment ``make_env`` builds, ``num_envs`` at a time, returns
    per-episode values. Any domain's environment: ``make_env`` is the domain's factory (OGBench's is
    ``functools.partial(data.ogbench_env.make_ogbench_env, name)``); episode e is reset with seed ``seed + e``.

    ``workers`` > 0 steps the environments in that many worker processes (each runs its environments' action chunks
    and sends back the observations), so evaluation uses several cores; 0 steps them in this process. Both run the
    same episodes with the same policy calls and give identical values.

    With a ``discount``, each episode's realised discounted return in the rewards the agent trains on
    (``training_reward`` of each step's reward: the domain's ``reward_offset`` and ``sparse``) comes back too
    (``discounted_return``), with the episode's first observation and executed action chunk (``initial_obs``,
    ``first_chunk``: what the agent's critic predicted that return from).
    """

    def __init__(
        self,
        make_env: EnvFactory,
        horizon: int,
        action_dim: int,
        num_episodes: int = 50,
        num_envs: int = 10,
        seed: int = 0,
        workers: int = 0,
        discount: float | None = None,
        reward_offset: float = 0.0,
        sparse: bool = False,
    ) -> None:
        if num_episodes < 1 or num_envs < 1:
            raise ValueError(f"num_episodes and num_envs must be >= 1, got {num_episodes}, {num_envs}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0 (0: environments in this process), got {workers}")
        self.make_env, self.horizon, self.action_dim = make_env, horizon, action_dim
        self.num_episodes, self.num_envs, self.seed = num_episodes, num_envs, seed
        self.workers = min(workers, num_envs)
        self.discount, self.reward_offset, self.sparse = discount, float(reward_offset), sparse
        self._envs: list = []
        self._pool: _EnvWorkers | None = None

    def envs(self, n: int) -> list:
        """The first ``n`` environments, created once and reused by every evaluation (in the workers, if any)."""
        if self.workers:
            self._workers().call("make", [(i,) for i in range(n)])
            return []
        while len(self._envs) < n:
            self._envs.append(self.make_env())
        return self._envs[:n]

    def _workers(self) -> _EnvWorkers:
        if self._pool is None:
            self._pool = _EnvWorkers(self.make_env, self.workers)
        return self._pool

    def close(self) -> None:
        """Stop the worker processes (they also end with this process)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def evaluate(self, act: ActFn, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
        episodes = list(range(rank, self.num_episodes, world_size))
        out = {"success": [], "return": [], "length": []}
        if self.discount is not None:
            out.update(discounted_return=[], initial_obs=[], first_chunk=[])
        threads = torch.get_num_threads()
        if self.workers:
            # The policy's CPU threads would spin between calls on the cores the workers step on: one thread while
            # the workers run (docs/performance.md, "Evaluation").
            torch.set_num_threads(1)
        try:
            for start in range(0, len(episodes), self.num_envs):
                wave = episodes[start : start + self.num_envs]
                for key, values in self._run_wave(act, wave).items():
                    out[key].extend(values)
        finally:
            torch.set_num_threads(threads)
        return {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in out.items()}

    def _run_wave(self, act: ActFn, wave: list[int]) -> dict[str, list[float]]:
        """One wave of episodes, its environments in ``WAVE_GROUPS`` groups (contiguous blocks of slots) that take
        turns: a batched policy call for a group's active environments, then their action chunks. With workers the
        next group's policy call runs while the workers step the previous group's chunks (the policy's compute
        overlaps the physics instead of leaving the workers idle); in this process the groups run one after the other.
        Both make the same policy calls in the same order, so they give identical episodes."""
        n = len(wave)
        seeds = [(i, self.seed + e) for i, e in enumerate(wave)]
        if self.workers:
            pool = self._workers()
            obs = pool.call("reset", seeds)
        else:
            envs = self.envs(n)
            obs = [envs[i].reset(seed=seed)[0] for i, seed in seeds]
        size = -(-n // min(WAVE_GROUPS, n))
        active = [list(range(lo, min(lo + size, n))) for lo in range(0, n, size)]
        ret, length, success = [0.0] * n, [0] * n, [0.0] * n
        discounted, initial_obs, first_chunk = [0.0] * n, [np.asarray(o) for o in obs], [None] * n

        def chunk_items(g: int) -> list[tuple]:
            """Every active environment of group g has used up its chunk: one batched policy call for all of them."""
            batch = torch.as_tensor(np.stack([obs[i] for i in active[g]]), dtype=torch.float32)
            chunks = act(batch).float().cpu().numpy().reshape(len(active[g]), self.horizon, self.action_dim)
            for j, i in enumerate(active[g]):
                if first_chunk[i] is None:
                    first_chunk[i] = chunks[j].reshape(-1)
            return [(i, chunks[j], ret[i]) for j, i in enumerate(active[g])]

        def after(g: int, in_flight: Collection[int] = ()) -> int | str | None:
            """The group whose turn follows g's: the next one (cyclically) with active environments; None when every
            group is finished; "wait" when a group in flight comes first (its results decide)."""
            for k in range(1, len(active) + 1):
                h = (g + k) % len(active)
                if h in in_flight:
                    return "wait"
                if active[h]:
                    return h
            return None

        def record(g: int, items: list[tuple], results: list) -> None:
            still = []
            for (i, _, _), (o, r, steps, over, succ, rewards) in zip(items, results, strict=True):
                if self.discount is not None:
                    for k, reward in enumerate(rewards):
                        gamma_t = self.discount ** (length[i] + k)
                        discounted[i] += gamma_t * training_reward(reward, self.reward_offset, self.sparse)
                obs[i], ret[i], length[i] = o, r, length[i] + steps
                if over:
                    success[i] = succ
                else:
                    still.append(i)
            active[g] = still

        if not self.workers:
            g: int | None = 0
            while g is not None:
                items = chunk_items(g)
                record(g, items, [run_chunk(envs[i], actions, r) for i, actions, r in items])
                g = after(g)
        else:
            # The same sequence of calls, each issued as soon as the groups it depends on are recorded: the next
            # group after `last` is known once every group from last+1 up to the first active one has its results.
            flight: collections.deque = collections.deque()  # (group, items, send's handle), oldest first
            last: int | None = None
            while True:
                nxt = 0 if last is None else after(last, in_flight={f[0] for f in flight})
                if nxt == "wait":
                    g, items, handle = flight.popleft()
                    record(g, items, pool.receive(handle, len(items)))
                    continue
                if nxt is None:
                    break  # every group recorded and finished
                items = chunk_items(nxt)
                flight.append((nxt, items, pool.send("chunks", items)))
                last = nxt
        out = {"success": success, "return": ret, "length": [float(x) for x in length]}
        if self.discount is not None:
            out.update(discounted_return=discounted, initial_obs=initial_obs, first_chunk=first_chunk)
        return out
