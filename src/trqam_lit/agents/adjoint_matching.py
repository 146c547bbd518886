"""Shared step of the adjoint-matching agents (TRQAM, QAM): critic + BC + adjoint-matching losses."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..adjoint import AMOutput, adjoint_matching_objective
from ..sde import Solver
from .base import FlowAgent


class AdjointMatchingAgent(FlowAgent):
    """L = L_Q + L_BC + L_AM with one optimizer; subclasses set ``lam_eff`` (sigma = g / sqrt(lam_eff)) and
    ``adj_scale`` (the factor on the terminal adjoint)."""

    def __init__(self, sde_solver: Solver = "fused", **kwargs: Any) -> None:
        """
        Args:
            sde_solver: forward rollout solver, "fused" (fast loop) or "torchsde" (torchsde.sdeint).
        """
        super().__init__(**kwargs)

    @property
    def lam_eff(self) -> Tensor | float:
        raise NotImplementedError

    @property
    def adj_scale(self) -> float:
        raise NotImplementedError

    def actor_objective(self, s: Tensor, batch_size: int) -> AMOutput:
        x0 = self.draw("am/x0", batch_size, self.hparams.action_dim)
        eps = self.draw("am/eps", self.flow_steps - 1, batch_size, self.hparams.action_dim)
        return adjoint_matching_objective(
            self.v_ft, self.v_base, self.q_fn(target=True), s, x0, eps, self.flow_steps, self.hparams.horizon,
            lam_eff=self.lam_eff, adj_scale=self.adj_scale, solver=self.hparams.sde_solver,
        )  # fmt: skip

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        bc = self.bc_loss(batch)
        self.log("train/bc_loss", bc, on_step=True, prog_bar=True)
        if self.in_bc_warmup:
            return self.touch_unused(bc, self.v_ft, self.critic)
        q_loss, q_mean = self.critic_loss(batch)
        am = self.actor_objective(batch["observations"], batch["actions"].shape[0])
        self.log_dict({"train/critic_loss": q_loss, "train/am_loss": am.loss.detach(), "train/q_mean": q_mean})
        self._last_kl = am.path_kl  # handed to after_optimizer_step once the optimizer has stepped
        loss = q_loss + bc + am.loss
        if self.analytic_q is not None:
            loss = self.touch_unused(loss, self.critic)
        return loss
