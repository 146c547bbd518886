"""Acting and evaluation of every agent: the acting policy from fresh or given noise, and the DataModule's evaluator
run in ``validate``/``test`` with the episodes sharded over ranks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from trqam_lit.math.flow import sample_actions
from trqam_lit.training.rng import EVAL_NOISE, seeded

EVAL_METRICS = ("success", "return", "length", "action_mean", "discounted_return", "q_initial", "over_optimism")


class Evaluating:
    """Mixin of :class:`~trqam_lit.agents.base.FlowAgent` (a LightningModule)."""

    def init_evaluation(self) -> None:
        self.eval_metrics = nn.ModuleDict({name: MeanMetric() for name in EVAL_METRICS})

    @property
    def policy_net(self) -> nn.Module:
        """The acting network; v_bc here (BC) and, in every agent, until fine-tuning starts (the BC warm-up)."""
        return self.v_bc

    def policy_actions(self, s: Tensor, noise: Tensor) -> Tensor:
        """The acting policy's action chunk from the given noise: here the Euler ODE of ``policy_net``, clipped."""
        return sample_actions(self.policy_net, s, noise, self.flow_steps)

    def acting_noise_shape(self, batch: int) -> tuple[int, ...]:
        """The shape of the noise ``policy_actions`` takes for ``batch`` observations: (B, A) here."""
        return (batch, self.hparams.action_dim)

    @torch.no_grad()
    def act(self, obs: Tensor, noise: Tensor | None = None) -> Tensor:
        """The acting policy (``policy_actions``) from fresh noise, clipped: (B, H * act_dim)."""
        obs = obs.to(self.device, torch.float32)
        if noise is None:
            noise = torch.randn(self.acting_noise_shape(obs.shape[0]), device=self.device)
        return self.policy_actions(obs, noise)

    @torch.no_grad()
    def predicted_value(self, s: Tensor, a: Tensor) -> Tensor | None:
        """The critic ensemble's mean Q of each (observation, action chunk), (B,): what the agent expects an episode
        from its first state and chunk to return. None without a learned critic (BC, an analytic critic)."""
        if not getattr(self, "uses_critic", False) or getattr(self, "analytic_q", None) is not None:
            return None
        q = self.critic(s.to(self.device, torch.float32), a.to(self.device, torch.float32))
        return q.float().mean(dim=0).cpu()

    def on_validation_epoch_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "make_evaluator"):
            raise ValueError("evaluation needs a DataModule with make_evaluator() (OGBenchDataModule, ToyBandit...)")
        self._evaluator = dm.make_evaluator()

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)  # `trqam-lit test` runs the same evaluation

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        # Episodes are sharded over ranks; torchmetrics averages the per-episode values across ranks. The acting
        # noise is its own stream, so an evaluation neither depends on nor disturbs the training draws.
        with seeded(self.device, self.seed_of(EVAL_NOISE)):
            values = self._evaluator.evaluate(self.act, rank=rank, world_size=world)
        initial_obs, first_chunk = values.pop("initial_obs", None), values.pop("first_chunk", None)
        if initial_obs is not None and (q := self.predicted_value(initial_obs, first_chunk)) is not None:
            values["q_initial"] = q
            values["over_optimism"] = q - values["discounted_return"].to(q.device)
        for name, per_episode in values.items():
            metric = self.eval_metrics[name]
            metric.update(torch.as_tensor(per_episode, dtype=torch.float32, device=self.device))
            self.log(f"eval/{name}", metric, on_step=False, on_epoch=True, prog_bar=name in ("success", "return"))
