"""Shared step of the adjoint-matching agents (TRQAM, QAM): critic + BC + adjoint-matching losses."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from ..adjoint import AMOutput, adjoint_matching_objective
from ..callbacks import DualDescentStep
from ..sde import Solver
from .base import FlowAgent


class AdjointMatchingAgent(FlowAgent):
    """L = L_Q + L_BC + L_AM with one optimizer; subclasses set ``lam_eff`` (sigma = g / sqrt(lam_eff)) and
    ``adj_scale`` (the factor on the terminal adjoint)."""

    def __init__(self, sde_solver: Solver = "torchsde", **kwargs: Any) -> None:
        """
        Args:
            sde_solver: forward rollout solver, "torchsde" (torchsde.sdeint) or "fused" (the same Euler-Maruyama steps
                in a plain loop, identical states); the CPU-sized configs choose "fused" (docs/performance.md).
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
        if self.in_bc_warmup:
            self.log_step({"actor/bc_loss": bc}, prog_bar=["actor/bc_loss"])
            self.record(bc_loss=bc)
            return self.touch_unused(bc, self.v_ft, self.critic)
        q_loss, q = self.critic_loss(batch)
        am = self.actor_objective(batch["observations"], batch["actions"].shape[0])
        if self.logging_this_step:
            self.log_step({
                "actor/bc_loss": bc, "critic/critic_loss": q_loss, "critic/q_mean": q.mean(), "critic/q_min": q.min(),
                "actor/am_loss": am.loss.detach(), "actor/adj_max": am.adj_final.abs().max(),
            }, prog_bar=["actor/bc_loss"])  # fmt: skip
        loss = q_loss + bc + am.loss
        # checked for NaN/inf before the optimizer step; the KL feeds the dual step once the update is applied
        self.record(critic_loss=q_loss, bc_loss=bc, am_loss=am.loss, kl=am.path_kl)
        if self.analytic_q is not None:
            loss = self.touch_unused(loss, self.critic)
        return loss

    def configure_callbacks(self) -> list[pl.Callback]:
        return [DualDescentStep()]
