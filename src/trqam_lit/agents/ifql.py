"""IFQL: implicit flow Q-learning, the flow variant of IDQL (the QAM repository's ``agents/ifql.py``).

A state value V(s) by expectile regression onto the pessimistic TARGET ensemble at the dataset chunk, the critic
regressed to r + gamma^H m V(s') (no next action), and v_bc trained by flow matching alone: L = L_V + L_Q + L_BC.
Acting is best-of-N: N flow samples per state, the one with the highest min_j Q_j(s, a) of the online critic.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from trqam_lit.agents.base import FlowAgent
from trqam_lit.math.critic import critic_loss, ensemble_pessimistic_value, expectile_loss, td_target
from trqam_lit.math.flow import best_of_n_actions, sample_actions
from trqam_lit.math.nets import StateValue


class IFQL(FlowAgent):
    """Implicit flow Q-learning (spec baselines.md): one Adam, no gradient clip (the reference's plain ``optax.adam``).

    Networks: v_bc (the only policy network: nothing starts from it, nothing distils it), the state value ``value``
    (one MLP with the critic's widths and LayerNorm, no target), the critic ensemble and its polyak target (the only
    target). During a BC warm-up v_bc acts alone (the plain ODE); from then on best-of-N.
    """

    label = "IFQL"
    scalars = (
        "critic/critic_loss",
        "critic/q_mean",
        "critic/q_min",
        "critic/q_max",
        "value/value_loss",
        "value/v_mean",
        "value/v_min",
        "value/v_max",
    )

    def __init__(
        self, kappa: float = 0.9, best_of_n: int = 32, grad_clip_norm: float | None = None, **kwargs: Any
    ) -> None:
        """
        Args:
            kappa: expectile of the value regression (weight kappa above V, 1 - kappa below; 0.5 is the mean).
            best_of_n: N, flow samples per state when acting (the reference's ``num_samples``); the one with the
                highest min_j Q_j(s, a) of the online critic is taken.
            grad_clip_norm: global gradient-norm clip; None (the reference's IFQL has no clip).
        """
        if not 0.0 <= kappa <= 1.0:
            raise ValueError(f"kappa must be in [0, 1], got {kappa}")
        if best_of_n < 1:
            raise ValueError(f"best_of_n must be at least 1, got {best_of_n}")
        super().__init__(grad_clip_norm=grad_clip_norm, **kwargs)

    def build_policy(self) -> None:
        hp = self.hparams
        self.value = StateValue(hp.obs_dim, hp.critic_hidden_dims, hp.critic_layer_norm)

    def value_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(L_V, V(s) detached): V(s) onto mean - rho std of the TARGET ensemble at the dataset chunk, no valid mask."""
        s, a = batch["observations"], batch["actions"]
        with torch.no_grad():
            q = ensemble_pessimistic_value(self.q_fn(target=True)(s, a), self.hparams.rho_q)
        v = self.value(s)
        return expectile_loss(q, v, self.hparams.kappa), v.detach().float()

    def critic_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(L_Q, the TD target y): every member regresses to y = R + gamma^H m V(s'), V at its current weights held
        fixed (no next action, no pessimism, no target value net); zero loss for an analytic critic."""
        s, a = batch["observations"], batch["actions"]
        with torch.no_grad():
            next_v = self.value(batch["next_observations"]).float()
            y = td_target(batch["rewards"], batch["masks"], next_v, self.hparams.discount, self.hparams.horizon)
        if self.analytic_q is not None:
            return torch.zeros((), device=a.device), y
        return critic_loss(self.critic(s, a), y, batch["valid"]), y

    def acting_noise_shape(self, batch: int) -> tuple[int, ...]:
        """(best_of_n, B, A) once fine-tuning started, else (1, B, A)."""
        return (self.hparams.best_of_n if bool(self.policy_from_bc) else 1, batch, self.hparams.action_dim)

    def policy_actions(self, s: Tensor, noise: Tensor) -> Tensor:
        """Best-of-N over the leading axis of ``noise`` (N, B, A) (a (B, A) noise is N = 1); v_bc's plain ODE from the
        first sample during a BC warm-up (the critic is not trained yet)."""
        noise = noise if noise.dim() == 3 else noise[None]
        if not bool(self.policy_from_bc):
            return sample_actions(self.v_bc, s, noise[0], self.flow_steps)
        return best_of_n_actions(self.v_bc, self.q_fn(target=False), s, noise, self.flow_steps)

    def fine_tune_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        # the reference's order: value, critic, then the BC loss (its only random draws: x_0 and t)
        value_loss, v = self.value_loss(batch)
        critic_loss, y = self.critic_loss(batch)
        bc = self.bc_loss(batch)
        # as the reference's info: critic/q_* describe the TD target y, value/v_* the online V(s)
        return value_loss + critic_loss + bc, {
            "actor/bc_loss": bc, "critic/critic_loss": critic_loss, "critic/q_mean": y.mean(), "critic/q_min": y.min(),
            "critic/q_max": y.max(), "value/value_loss": value_loss, "value/v_mean": v.mean(), "value/v_min": v.min(),
            "value/v_max": v.max(),
        }  # fmt: skip
