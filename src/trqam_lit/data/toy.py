"""A one-step bandit with an analytic reward: the built-in domain for checks and demos.

It also supports the online phase (``trqam_lit.training.online``): the environment is the bandit itself (every step one
episode), and the replay buffer starts from the offline samples.

Offline actions come from a Gaussian or Gaussian-mixture behaviour policy (one constant observation, H = 1,
every step a whole episode). The reward is linear, Q(a) = c . a, or quadratic, Q(a) = -k/2 |a - target|^2;
with ``analytic_critic=True`` on the model the reward itself is the (fixed) critic, so the tilted policy
has a closed form: for the linear reward and a Gaussian behaviour N(mu, s^2), the mean mu + s^2 c / lambda_eff.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from trqam_lit.data.chunks import ChunkTable
from trqam_lit.data.loading import DATASET_ACTION_LIMIT
from trqam_lit.data.online_data import OnlineDataModule
from trqam_lit.data.replay import (
    ReplayBuffer,
    batch_rng,
    deferred_batch,
    draw_batch,
)
from trqam_lit.training.evaluation import evaluation_dataloader
from trqam_lit.training.rng import DATA, fold_seed


class AnalyticReward(torch.nn.Module):
    """r(a) = c . a (linear) or -k/2 |a - target|^2 (quadratic), returned as a one-member ensemble (1, B)."""

    def __init__(self, kind: str, c: float, k: float, target: float) -> None:
        super().__init__()
        if kind not in ("linear", "quadratic"):
            raise ValueError(f"unknown reward {kind!r}; choose 'linear' or 'quadratic'")
        self.kind, self.c, self.k, self.target = kind, c, k, target

    def reward(self, a: Tensor) -> Tensor:
        a = a.float()
        if self.kind == "linear":
            return self.c * a.sum(dim=-1)
        return -0.5 * self.k * (a - self.target).pow(2).sum(dim=-1)

    def forward(self, s: Tensor, a: Tensor) -> Tensor:
        return self.reward(a)[None]


class PerturbedReward(torch.nn.Module):
    """The analytic reward plus a smooth random-feature error whose gradient has RMS size ``delta`` per axis.

    e(a) = delta sqrt(2 / M) sum_j cos(w_j . a + b_j) / f, w_j ~ N(0, f^2 I), b_j ~ U(0, 2 pi): a fixed random
    function (seeded) whose gradient, averaged over the features, has root-mean-square delta along each axis. It
    models a learned critic's error: spurious local slopes and bumps rather than a constant offset (which would
    not change the adjoint at all) or a rescaling (which is only a change of temperature).
    """

    def __init__(self, reward: AnalyticReward, dim: int, delta: float, features: int = 32, frequency: float = 3.0,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.reward_fn, self.delta, self.frequency = reward, float(delta), float(frequency)
        self.register_buffer("w", torch.randn(features, dim, generator=gen) * frequency)
        self.register_buffer("b", torch.rand(features, generator=gen) * 2 * torch.pi)

    def error(self, a: Tensor) -> Tensor:
        phase = a.float() @ self.w.T.to(a.device) + self.b.to(a.device)
        return self.delta * (2.0 / self.w.shape[0]) ** 0.5 * torch.cos(phase).sum(dim=-1) / self.frequency

    def forward(self, s: Tensor, a: Tensor) -> Tensor:
        return (self.reward_fn.reward(a) + self.error(a))[None]


class _InfiniteBatches(IterableDataset):
    """Offline batches; from global step ``defer_from()`` on, placeholders drawn from the replay buffer later."""

    def __init__(
        self,
        sample: Callable[[torch.Generator], dict[str, Tensor]],
        seed: int,
        rank: int = 0,
        start_step: int = 0,
        defer_from: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.sample, self.seed, self.rank, self.start_step = sample, seed, rank, start_step
        self.defer_from = defer_from

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        gen = torch.Generator()
        step = self.start_step
        while True:
            defer = self.defer_from()
            if defer is not None and step >= defer:
                yield deferred_batch(step)
            else:
                # one stream per (seed, rank, step): a resumed run draws the batches of an uninterrupted one
                yield self.sample(gen.manual_seed(fold_seed(self.seed, self.rank, step, DATA)))
            step += 1


class BanditEnv:
    """The bandit as an environment for the online phase: every step is a whole episode with reward r(a)."""

    def __init__(self, reward: AnalyticReward, obs_dim: int) -> None:
        self.reward, self.obs_dim = reward, obs_dim

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict]:
        return np.zeros(self.obs_dim, dtype=np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        r = float(self.reward.reward(torch.as_tensor(action, dtype=torch.float32)[None])[0])
        return np.zeros(self.obs_dim, dtype=np.float32), r, True, False, {}


class ToyEvaluator:
    """Samples actions from the policy at the constant observation and scores them with the reward."""

    def __init__(self, reward: AnalyticReward, obs_dim: int, num_samples: int) -> None:
        self.reward, self.obs_dim, self.num_samples = reward, obs_dim, num_samples

    def evaluate(self, act, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
        n = len(range(rank, self.num_samples, world_size))
        a = act(torch.zeros(n, self.obs_dim)).float().cpu()
        return {"action_mean": a.mean(dim=-1), "return": self.reward.reward(a), "length": torch.ones(n)}


class ToyBanditDataModule(OnlineDataModule):
    """Offline data of a one-step bandit; provides the analytic reward and an evaluator."""

    def __init__(
        self,
        action_dim: int = 1,
        behavior: Literal["gaussian", "mixture"] = "gaussian",
        mu: float = 0.0,
        std: float = 0.3,
        mixture_means: Sequence[float] = (-0.5, 0.5),
        mixture_weights: Sequence[float] | None = None,
        reward: Literal["linear", "quadratic"] = "linear",
        c: float = 1.0,
        k: float = 1.0,
        target: float = 0.5,
        num_samples: int = 10_000,
        batch_size: int = 256,
        discount: float = 0.99,
        eval_samples: int = 2000,
        seed: int = 0,
        critic_error: float = 0.0,
        critic_error_seed: int = 0,
    ) -> None:
        """
        Args:
            action_dim: action dimension (H = 1, so also the chunk dimension).
            behavior: behaviour policy, "gaussian" N(mu, std^2 I) or "mixture" of N(m_i, std^2 I).
            mu: Gaussian behaviour mean (every axis).
            std: behaviour standard deviation (every axis, also of each mixture component).
            mixture_means: component means of the mixture behaviour.
            mixture_weights: component weights (uniform when omitted).
            reward: "linear" c . a or "quadratic" -k/2 |a - target|^2.
            c: slope of the linear reward (every axis).
            k: curvature of the quadratic reward.
            target: optimum of the quadratic reward (every axis).
            num_samples: size of the offline dataset.
            batch_size: batch size B.
            discount: discount (no bootstrap happens: every step ends its episode).
            eval_samples: policy samples per evaluation.
            seed: seed of the dataset and of the batch stream (offset by rank under DDP).
            critic_error: size delta of the error added to the analytic critic (RMS of its gradient per axis; see
                ``PerturbedReward``); the evaluation always scores with the true reward.
            critic_error_seed: seed of the error's random features.
        """
        super().__init__()
        if std <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.save_hyperparameters()
        self.obs_dim, self.action_dim, self.chunk_dim, self.horizon = 1, action_dim, action_dim, 1
        self.discount, self.batch_size = discount, batch_size
        self.reward_fn = AnalyticReward(reward, c, k, target)
        self.actions = self._behaviour_actions()
        self.rewards = self.reward_fn.reward(self.actions)
        self._defer_from: int | None = None

    def _behaviour_actions(self) -> Tensor:
        hp = self.hparams
        gen = torch.Generator().manual_seed(hp.seed)
        noise = torch.randn(hp.num_samples, hp.action_dim, generator=gen) * hp.std
        if hp.behavior == "gaussian":
            centres = torch.full((hp.num_samples, 1), float(hp.mu))
        elif hp.behavior == "mixture":
            means = torch.tensor(list(hp.mixture_means), dtype=torch.float32)
            weights = torch.tensor(list(hp.mixture_weights or [1.0] * len(means)), dtype=torch.float32)
            comp = torch.multinomial(weights / weights.sum(), hp.num_samples, replacement=True, generator=gen)
            centres = means[comp][:, None]
        else:
            raise ValueError(f"unknown behavior {hp.behavior!r}; choose 'gaussian' or 'mixture'")
        return (centres + noise).clamp(-DATASET_ACTION_LIMIT, DATASET_ACTION_LIMIT)

    def analytic_q(self) -> torch.nn.Module:
        """The critic an ``analytic_critic`` agent uses: the reward, plus the controlled error when ``critic_error``."""
        if self.hparams.critic_error:
            hp = self.hparams
            return PerturbedReward(self.reward_fn, self.action_dim, hp.critic_error, seed=hp.critic_error_seed)
        return self.reward_fn

    def make_evaluator(self) -> ToyEvaluator:
        return ToyEvaluator(self.reward_fn, self.obs_dim, self.hparams.eval_samples)

    def sample(self, gen: torch.Generator) -> dict[str, Tensor]:
        idx = torch.randint(0, self.actions.shape[0], (self.batch_size,), generator=gen)
        b = self.batch_size
        return {
            "observations": torch.zeros(b, self.obs_dim),
            "actions": self.actions[idx],
            "rewards": self.rewards[idx],
            "masks": torch.zeros(b),  # every step ends the episode: no bootstrap
            "valid": torch.ones(b),
            "next_observations": torch.zeros(b, self.obs_dim),
        }

    def val_dataloader(self) -> DataLoader:
        return evaluation_dataloader()

    def test_dataloader(self) -> DataLoader:
        return evaluation_dataloader()

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        step = self.trainer.global_step if self.trainer is not None else 0
        stream = _InfiniteBatches(self.sample, self.hparams.seed, rank, step, lambda: self._defer_from)
        return DataLoader(stream, batch_size=None)

    # ---- online phase (training.online.OnlinePhase): each environment step is one episode -----------------------
    def offline_table(self) -> ChunkTable:
        """The offline data as transitions: constant observation, every step terminal, masks 0 (no bootstrap)."""
        n = self.actions.shape[0]
        obs = np.zeros((n, self.obs_dim), dtype=np.float32)
        return ChunkTable(
            observations=obs,
            actions=self.actions.numpy().astype(np.float32),
            rewards=self.rewards.numpy().astype(np.float32),
            masks=np.zeros(n, dtype=np.float32),
            terminals=np.ones(n, dtype=np.float32),
            next_observations=obs.copy(),
        )

    def make_online_env(self) -> BanditEnv:
        return BanditEnv(self.reward_fn, self.obs_dim)

    def defer_sampling_from(self, step: int) -> None:
        self._defer_from = int(step)

    def _new_replay_buffer(self, capacity_extra: int) -> ReplayBuffer:
        """The offline samples plus room for ``capacity_extra`` online ones; batches come from it from now on."""
        return ReplayBuffer(self.offline_table(), capacity_extra=capacity_extra)

    def _draw_deferred(self, step: int) -> dict[str, Any]:
        if self.replay_buffer is None:
            raise RuntimeError("deferred batch before the replay buffer exists: call make_replay_buffer() first")
        rank = self.trainer.global_rank if self.trainer is not None else 0
        rng = batch_rng(self.hparams.seed, rank, step)
        return draw_batch(self.replay_buffer, rng, self.batch_size, 1, self.discount)
