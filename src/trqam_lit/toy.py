"""A one-step bandit with an analytic reward: the built-in domain for checks and demos.

Offline actions come from a Gaussian or Gaussian-mixture behaviour policy (one constant observation, H = 1,
every step a whole episode). The reward is linear, Q(a) = c . a, or quadratic, Q(a) = -k/2 |a - target|^2;
with ``analytic_critic=True`` on the model the reward itself is the (fixed) critic, so the tilted policy
has a closed form: for the linear reward and a Gaussian behaviour N(mu, s^2), the mean mu + s^2 c / lambda_eff.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from .evaluation import evaluation_dataloader

ACTION_LIMIT = 1.0 - 1e-5


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


class _InfiniteBatches(IterableDataset):
    def __init__(self, sample: Callable[[torch.Generator], dict[str, Tensor]], seed: int) -> None:
        self.sample, self.seed = sample, seed

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            yield self.sample(gen)


class ToyEvaluator:
    """Samples actions from the policy at the constant observation and scores them with the reward."""

    def __init__(self, reward: AnalyticReward, obs_dim: int, num_samples: int) -> None:
        self.reward, self.obs_dim, self.num_samples = reward, obs_dim, num_samples

    def evaluate(self, act, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
        n = len(range(rank, self.num_samples, world_size))
        a = act(torch.zeros(n, self.obs_dim)).float().cpu()
        return {"action_mean": a.mean(dim=-1), "return": self.reward.reward(a), "length": torch.ones(n)}


class ToyBanditDataModule(pl.LightningDataModule):
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
        return (centres + noise).clamp(-ACTION_LIMIT, ACTION_LIMIT)

    def analytic_q(self) -> AnalyticReward:
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

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return DataLoader(_InfiniteBatches(self.sample, self.hparams.seed + 1 + 7919 * rank), batch_size=None)
