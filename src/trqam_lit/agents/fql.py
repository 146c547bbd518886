"""FQL: flow Q-learning with action chunks (Q-chunking's ACFQL, as in the QAM repository's ``agents/fql.py``).

A BC flow v_bc (flow matching) and a one-step policy mu(s, z) distilled from v_bc's K-step ODE and pushed up the
critic: L = L_Q + L_BC + alpha * L_distill + L_pi^Q. mu acts and gives the TD target's next action.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from trqam_lit.agents.base import FlowAgent
from trqam_lit.math.critic import actor_q_loss
from trqam_lit.math.flow import ACTION_CLIP, distillation_loss, onestep_actions, sample_actions
from trqam_lit.math.nets import OneStepPolicy


class FQLActorLosses(NamedTuple):
    distill: Tensor  # mean (mu(s, z) - clip(ODE_bc(s, z)))^2, trains mu only
    q: Tensor  # -mean_b mean_j Q_j(s, clip(mu(s, z))), trains mu only


class FQL(FlowAgent):
    """Flow Q-learning (spec baselines.md): one Adam, no gradient clip (the reference's plain ``optax.adam``).

    Networks: v_bc, the one-step policy ``mu`` (same widths as v_bc, input concat(s, z)), the critic ensemble and
    its polyak target (the only target: there is no v_ft and no v_base). A BC warm-up or ``init_from`` sets v_bc
    only: mu has no time input, so it cannot start as a copy of v_bc; it is trained from its own init.
    """

    label = "FQL"
    scalars = (
        "critic/critic_loss",
        "critic/q_mean",
        "critic/q_min",
        "critic/q_max",
        "actor/distill_loss",
        "actor/q_loss",
    )

    def __init__(self, alpha: float = 100.0, grad_clip_norm: float | None = None, **kwargs: Any) -> None:
        """
        Args:
            alpha: weight of the distillation loss that keeps mu near the BC flow (the reference's BC coefficient).
            grad_clip_norm: global gradient-norm clip; None (the reference's FQL has no clip).
        """
        super().__init__(grad_clip_norm=grad_clip_norm, **kwargs)

    def build_policy(self) -> None:
        hp = self.hparams
        self.mu = OneStepPolicy(hp.obs_dim, hp.action_dim, hp.actor_hidden_dims, hp.actor_layer_norm)

    def next_actions(self, s_next: Tensor, noise: Tensor) -> Tensor:
        return onestep_actions(self.mu, s_next, noise)

    @property
    def policy_net(self) -> nn.Module:
        # mu acts once fine-tuning started; during a BC warm-up the policy being built is v_bc
        return self.mu if bool(self.policy_from_bc) else self.v_bc

    def policy_actions(self, s: Tensor, noise: Tensor) -> Tensor:
        net = self.policy_net
        return onestep_actions(net, s, noise) if net is self.mu else sample_actions(net, s, noise, self.flow_steps)

    def actor_losses(self, s: Tensor) -> FQLActorLosses:
        """The distillation and Q terms from one noise draw z (B, A), shared by both, as in the reference."""
        z = self.draw("actor/noise", s.shape[0], self.hparams.action_dim)
        distill, mu_out = distillation_loss(self.mu, self.v_bc, s, z, self.flow_steps)
        q = actor_q_loss(self.q_fn(target=False), s, mu_out.clamp(-ACTION_CLIP, ACTION_CLIP))
        return FQLActorLosses(distill, q)

    def fine_tune_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        # the reference's draw order: the critic's z', the BC x_0 and t, then the actor's z
        critic_loss, q = self.critic_loss(batch)
        bc = self.bc_loss(batch)
        actor = self.actor_losses(batch["observations"])
        loss = critic_loss + bc + self.hparams.alpha * actor.distill + actor.q
        return loss, {
            "actor/bc_loss": bc, "critic/critic_loss": critic_loss, "critic/q_mean": q.mean(), "critic/q_min": q.min(),
            "critic/q_max": q.max(), "actor/distill_loss": actor.distill, "actor/q_loss": actor.q,
        }  # fmt: skip
