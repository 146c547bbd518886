"""The losses every RL agent shares, with their draws: v_bc's flow-matching loss L_BC and the critic's TD loss L_Q;
and the zero-weighted term that keeps DDP's gradient all-reduce complete while a phase leaves networks idle."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trqam_lit.math.critic import critic_loss, ensemble_pessimistic_value, td_target
from trqam_lit.math.flow import bc_flow_loss


class SharedLosses:
    """Mixin of :class:`~trqam_lit.agents.base.FlowAgent` (a LightningModule)."""

    def bc_loss(self, batch: dict[str, Tensor], x0: Tensor | None = None, t: Tensor | None = None) -> Tensor:
        """L_BC of v_bc with the draws ``x0`` (B, A) and ``t`` (B, 1), drawn here (``bc/x0``, ``bc/t``) if not given."""
        s, a = batch["observations"], batch["actions"]
        if x0 is None:
            x0 = self.draw("bc/x0", *a.shape)
        if t is None:
            t = self.draw("bc/t", a.shape[0], 1, uniform=True)
        return bc_flow_loss(self.v_bc, s, a, x0, t, batch["valid"])

    def critic_loss(
        self, batch: dict[str, Tensor], next_noise: Tensor | None = None, a_next: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(L_Q, Q(s, a) of every member, detached) with the next action ``a_next``, or from ``next_actions`` (the AM
        agents: the current v_ft ODE) from ``next_noise`` (drawn here, ``critic/next_noise``, if not given); zero loss
        for an analytic critic."""
        s, a = batch["observations"], batch["actions"]
        if self.analytic_q is not None:
            with torch.no_grad():
                return torch.zeros((), device=a.device), self.analytic_q(s, a).float()
        with torch.no_grad():
            s_next = batch["next_observations"]
            if a_next is None:
                if next_noise is None:
                    next_noise = self.draw("critic/next_noise", *a.shape)
                a_next = self.next_actions(s_next, next_noise)
            next_q = ensemble_pessimistic_value(self.target_critic(s_next, a_next), self.hparams.rho_q)
            y = td_target(batch["rewards"], batch["masks"], next_q, self.hparams.discount, self.hparams.horizon)
        q = self.critic(s, a)
        return critic_loss(q, y, batch["valid"]), q.detach().float()

    def touch_unused(self, loss: Tensor, *modules: nn.Module) -> Tensor:
        """Adds 0 * params so DDP sees a gradient for networks a phase leaves idle (BC warm-up)."""
        zero = sum(p.sum() for m in modules for p in m.parameters() if p.requires_grad)
        return loss + 0.0 * zero
