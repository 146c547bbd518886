"""Batched evaluation rollouts: many environments stepped in lockstep with one batched policy call.

Action chunks are executed open loop (H environment steps per policy call); an episode ends at success
(single-task OGBench environments terminate at the goal) or at the time limit. Episodes are sharded over
ranks; each episode's seed depends only on its index, so a rank count does not change which episodes run.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

ActFn = Callable[[Tensor], Tensor]


def evaluation_dataloader() -> DataLoader:
    """One item per rank: an evaluation is a batch of environment rollouts, not a pass over a dataset."""
    return DataLoader([0], batch_size=1)


def make_ogbench_env(env_name: str):
    """A single-task OGBench environment with no dataset (never downloads anything)."""
    os.environ.setdefault("MUJOCO_GL", "disable")  # state observations need no renderer
    import ogbench

    return ogbench.make_env_and_datasets(env_name, env_only=True)


class OGBenchEvaluator:
    """Runs ``num_episodes`` episodes of one environment, ``num_envs`` at a time, returns per-episode values."""

    def __init__(
        self, env_name: str, horizon: int, action_dim: int, num_episodes: int = 50, num_envs: int = 10, seed: int = 0
    ) -> None:
        if num_episodes < 1 or num_envs < 1:
            raise ValueError(f"num_episodes and num_envs must be >= 1, got {num_episodes}, {num_envs}")
        self.env_name, self.horizon, self.action_dim = env_name, horizon, action_dim
        self.num_episodes, self.num_envs, self.seed = num_episodes, num_envs, seed
        self._envs: list = []

    def envs(self, n: int) -> list:
        while len(self._envs) < n:  # created once, reused by every evaluation
            self._envs.append(make_ogbench_env(self.env_name))
        return self._envs[:n]

    def evaluate(self, act: ActFn, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
        episodes = list(range(rank, self.num_episodes, world_size))
        out = {"success": [], "return": [], "length": []}
        for start in range(0, len(episodes), self.num_envs):
            wave = episodes[start : start + self.num_envs]
            for key, values in self._run_wave(act, wave).items():
                out[key].extend(values)
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}

    def _run_wave(self, act: ActFn, wave: list[int]) -> dict[str, list[float]]:
        envs = self.envs(len(wave))
        n = len(wave)
        obs = [env.reset(seed=self.seed + e)[0] for env, e in zip(envs, wave, strict=True)]
        queues: list[list[np.ndarray]] = [[] for _ in range(n)]
        active = [True] * n
        ret, length, success = [0.0] * n, [0] * n, [0.0] * n
        while any(active):
            need = [i for i in range(n) if active[i] and not queues[i]]
            if need:
                batch = torch.as_tensor(np.stack([obs[i] for i in need]), dtype=torch.float32)
                chunks = act(batch).float().cpu().numpy().reshape(len(need), self.horizon, self.action_dim)
                for j, i in enumerate(need):
                    queues[i] = list(chunks[j])
            for i in range(n):
                if not active[i]:
                    continue
                obs[i], reward, terminated, truncated, info = envs[i].step(queues[i].pop(0))
                ret[i] += float(reward)
                length[i] += 1
                if terminated or truncated:
                    active[i] = False
                    success[i] = float(info.get("success", 0.0))
        return {"success": success, "return": ret, "length": [float(x) for x in length]}
