"""Shared step of the adjoint-matching agents (TRQAM, QAM, QAM-F, QAM-E): critic + BC + adjoint-matching losses (+ a
variant's policy loss)."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from ..adjoint import AMOutput, adjoint_matching_objective
from ..callbacks import DualDescentStep
from ..flow import sample_actions
from ..nets import VelocityField
from ..sde import Solver
from .base import FlowAgent


class AdjointMatchingAgent(FlowAgent):
    """L = L_Q + L_BC + L_AM with one optimizer; subclasses set ``lam_eff`` (sigma = g / sqrt(lam_eff)) and
    ``adj_scale`` (the factor on the terminal adjoint).

    Networks besides v_bc and the critics: the fine-tuned field v_ft (it acts and gives the TD target's next action)
    and its prior v_base, the polyak copy of v_bc.
    """

    # Whether v_ft starts equal to v_bc (and v_base) when neither a BC warm-up nor init_from sets it: TRQAM's trust
    # region is measured from the prior, so it must start there; QAM's reference trains v_ft from its own init.
    ft_starts_at_prior: bool = False

    def __init__(self, sde_solver: Solver = "torchsde", **kwargs: Any) -> None:
        """
        Args:
            sde_solver: forward rollout solver, "torchsde" (torchsde.sdeint) or "fused" (the same Euler-Maruyama steps
                in a plain loop, identical states); the CPU-sized configs choose "fused" (docs/performance.md).
        """
        super().__init__(**kwargs)

    def build_policy(self) -> None:
        hp = self.hparams
        if self.ft_starts_at_prior:
            self.v_ft = copy.deepcopy(self.v_bc)
        else:
            self.v_ft = VelocityField(hp.obs_dim, hp.action_dim, hp.actor_hidden_dims, hp.actor_layer_norm)
        self.v_base = self._frozen_copy(self.v_bc)

    def target_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [*super().target_pairs(), (self.v_base, self.v_bc)]

    def next_actions(self, s_next: Tensor, noise: Tensor) -> Tensor:
        return sample_actions(self.v_ft, s_next, noise, self.flow_steps)  # the current v_ft, as the reference

    @torch.no_grad()
    def copy_bc_into_policy(self) -> None:
        self.v_base.load_state_dict(self.v_bc.state_dict())
        self.v_ft.load_state_dict(self.v_bc.state_dict())
        super().copy_bc_into_policy()

    @property
    def policy_net(self) -> nn.Module:
        # Until v_ft has been set from v_bc (during the BC warm-up) the policy being built is v_bc.
        return self.v_ft if bool(self.policy_from_bc) else self.v_bc

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

    def policy_loss(self, s: Tensor) -> tuple[Tensor, dict[str, Tensor]] | None:
        """The loss a variant adds to L_Q + L_BC + L_AM and its terms by scalar name (logged, and checked for NaN/inf
        before the step): QAM-F's one-step policy, QAM-E's edit policy. TRQAM and QAM: None."""
        return None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        bc = self.bc_loss(batch)
        if self.in_bc_warmup:
            self.log_step({"actor/bc_loss": bc}, prog_bar=["actor/bc_loss"])
            self.record(bc_loss=bc)
            idle = [m for m in self.children() if m is not self.v_bc]  # v_ft, the critic, a variant's networks
            return self.touch_unused(bc, *idle)
        q_loss, q = self.critic_loss(batch)
        am = self.actor_objective(batch["observations"], batch["actions"].shape[0])
        extra = self.policy_loss(batch["observations"])
        terms = extra[1] if extra is not None else {}
        if self.logging_this_step:
            self.log_step({
                "actor/bc_loss": bc, "critic/critic_loss": q_loss, "critic/q_mean": q.mean(), "critic/q_min": q.min(),
                "actor/am_loss": am.loss.detach(), "actor/adj_max": am.adj_final.abs().max(),
                **{name: value.detach() for name, value in terms.items()},
            }, prog_bar=["actor/bc_loss"])  # fmt: skip
        loss = q_loss + bc + am.loss
        if extra is not None:
            loss = loss + extra[0]
        # checked for NaN/inf before the optimizer step; the KL feeds the dual step once the update is applied
        self.record(critic_loss=q_loss, bc_loss=bc, am_loss=am.loss, kl=am.path_kl, **terms)
        if self.analytic_q is not None:
            loss = self.touch_unused(loss, self.critic)
        return loss

    def configure_callbacks(self) -> list[pl.Callback]:
        return [DualDescentStep()]
