"""DSRL: diffusion steering by RL over the base flow's noise space (the QAM repository's ``agents/dsrl.py``).

A noise policy pi(w | s), a tanh-Gaussian over the latent space, steers the frozen-in-the-loop base flow: the action
is clip(ODE_base(s, clip(w) * noise_scale)), with the base flow v_base the polyak target of the BC flow v_bc. The
noise policy is trained SAC-style (reparameterised, learned temperature alpha) against a latent critic Q_z(s, w),
itself distilled from the action critic: Q_z,j(s, z) -> Q_j(s, clip(ODE_base(s, z))). The action critic is trained
by TD as usual. L = L_Q + L_z + L_BC + L_pi + L_alpha. The steered action acts and gives the TD target's next action.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from trqam_lit.agents.base import FlowAgent
from trqam_lit.math.critic import actor_q_loss
from trqam_lit.math.flow import VelocityFn, sample_actions
from trqam_lit.math.nets import CriticEnsemble, LogParam, TanhGaussianPolicy
from trqam_lit.math.tanh_gaussian import tanh_gaussian_log_prob, tanh_gaussian_sample, temperature_loss

LATENT_CLIP = 1.0


def steered_actions(base: VelocityFn, s: Tensor, w: Tensor, noise_scale: float, num_steps: int) -> Tensor:
    """The base flow's clipped K-step ODE action started at clip(w, -1, 1) * noise_scale (w the noise policy's)."""
    return sample_actions(base, s, w.clamp(-LATENT_CLIP, LATENT_CLIP) * noise_scale, num_steps)


def latent_distillation_loss(
    z_critic: nn.Module, critic: nn.Module, base: VelocityFn, s: Tensor, z: Tensor, num_steps: int
) -> tuple[Tensor, Tensor]:
    """(L_z, the target Q_j(s, clip(ODE_base(s, z))) (E, B)): L_z = mean_{j, b} (Q_z,j(s, z) - Q_j(s, a_z))^2.

    Member by member; the target (critic and base flow at their current weights) has no gradient: L_z trains Q_z
    only. ``z`` (B, A) is N(0, I), NOT scaled by noise_scale (the reference's). No valid mask.
    """
    with torch.no_grad():
        target = critic(s, sample_actions(base, s, z, num_steps)).float()
    return (z_critic(s, z).float() - target).pow(2).mean(), target


def latent_actor_loss(
    z_critic: nn.Module, s: Tensor, w: Tensor, log_prob: Tensor, alpha: Tensor, noise_scale: float
) -> Tensor:
    """L_pi = mean_b (alpha log pi(w | s) - mean_j Q_z,j(s, noise_scale * w)) with Q_z and alpha held fixed: the
    gradient reaches the noise policy only (through w and log pi). w is NOT clipped here (the reference's)."""
    return (log_prob.float() * alpha.detach()).mean() + actor_q_loss(z_critic, s, w * noise_scale)


class Latent(NamedTuple):
    w: Tensor  # tanh(x) (B, A), x = mean + std * eps
    log_prob: Tensor  # log pi(w | s) (B,), at the pre-tanh x
    std: Tensor  # the Gaussian's std (B, A) (logged: the reference's actor/action_std)


class DSRLActorLosses(NamedTuple):
    actor: Tensor  # L_pi, trains the noise policy only
    alpha: Tensor  # the temperature loss, trains alpha only
    entropy: Tensor  # -mean log pi (detached)
    std: Tensor  # mean pre-tanh std (detached)


class DSRL(FlowAgent):
    """Diffusion steering (spec baselines.md, DSRL): one Adam over everything (alpha included), no gradient clip (the
    reference's plain ``optax.adam``).

    Networks: v_bc and its polyak target ``v_base`` (the base flow that is steered), the noise policy ``actor`` (a
    tanh-Gaussian over the flattened noise space, input s, the velocity fields' widths), the latent critic
    ``z_critic`` (an ensemble like the critic's, input concat(s, w), no target), the temperature ``alpha``
    (alpha = exp(log_value), a parameter: in the checkpoint and Adam), the critic ensemble and its polyak target. A BC
    warm-up or ``init_from`` sets v_base from v_bc; the noise policy and Q_z train from their own init.
    """

    label = "DSRL"
    scalars = (
        "critic/critic_loss",
        "critic/q_mean",
        "critic/q_min",
        "critic/q_max",
        "critic/distill_loss",
        "actor/actor_loss",
        "actor/alpha",
        "actor/alpha_loss",
        "actor/entropy",
        "actor/action_std",
    )

    def __init__(
        self,
        noise_scale: float = 1.0,
        target_entropy_multiplier: float = 0.5,
        grad_clip_norm: float | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            noise_scale: the base ODE starts at clip(w) * noise_scale (the spec's per-domain value; > 0).
            target_entropy_multiplier: the temperature's target entropy is -multiplier * action_dim (H x A).
            grad_clip_norm: global gradient-norm clip; None (the reference's DSRL has no clip).
        """
        if not noise_scale > 0:
            raise ValueError(f"noise_scale must be > 0, got {noise_scale}")
        super().__init__(grad_clip_norm=grad_clip_norm, **kwargs)

    def build_policy(self) -> None:
        hp = self.hparams
        self.v_base = self._frozen_copy(self.v_bc)  # the reference's use_target_latent: the TARGET BC flow is steered
        self.actor = TanhGaussianPolicy(hp.obs_dim, hp.action_dim, hp.actor_hidden_dims)
        self.z_critic = CriticEnsemble(
            hp.obs_dim, hp.action_dim, hp.num_critics, hp.critic_hidden_dims, hp.critic_layer_norm
        )
        self.alpha = LogParam()

    def target_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [*super().target_pairs(), (self.v_base, self.v_bc)]

    @torch.no_grad()
    def copy_bc_into_policy(self) -> None:
        self.v_base.load_state_dict(self.v_bc.state_dict())
        super().copy_bc_into_policy()

    @property
    def target_entropy(self) -> float:
        return -self.hparams.target_entropy_multiplier * self.hparams.action_dim

    def latent(self, s: Tensor, eps: Tensor) -> Latent:
        """The noise policy's reparameterised sample w = tanh(mean + std eps) from the standard normal eps (B, A)."""
        mean, log_std = self.actor(s)
        w, x = tanh_gaussian_sample(mean, log_std, eps)
        return Latent(w, tanh_gaussian_log_prob(mean, log_std, x), log_std.exp())

    def steer(self, s: Tensor, eps: Tensor) -> Tensor:
        """The steered action chunk: clip(ODE_base(s, clip(w) * noise_scale)), w = tanh(mean + std eps)."""
        return steered_actions(self.v_base, s, self.latent(s, eps).w, self.hparams.noise_scale, self.flow_steps)

    def next_actions(self, s_next: Tensor, noise: Tensor) -> Tensor:
        return self.steer(s_next, noise)  # noise: the noise policy's eps' at s' (draw critic/next_noise)

    @property
    def policy_net(self) -> nn.Module:
        # the noise policy acts once fine-tuning started; during a BC warm-up the policy being built is v_bc
        return self.actor if bool(self.policy_from_bc) else self.v_bc

    def policy_actions(self, s: Tensor, noise: Tensor) -> Tensor:
        """A SAMPLE of the noise policy (eps = ``noise``), as the reference's sample_actions, through the base ODE;
        v_bc's plain ODE from ``noise`` during a BC warm-up."""
        if self.policy_net is self.v_bc:
            return sample_actions(self.v_bc, s, noise, self.flow_steps)
        return self.steer(s, noise)

    def distill_loss(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """L_z from one draw z ~ N(0, I) (B, A); the target from the online critic (or the analytic Q) and v_base."""
        z = self.draw("distill/noise", s.shape[0], self.hparams.action_dim)
        return latent_distillation_loss(self.z_critic, self.q_fn(target=False), self.v_base, s, z, self.flow_steps)

    def actor_losses(self, s: Tensor) -> DSRLActorLosses:
        """L_pi and the temperature loss from one draw eps (B, A), shared by both, as the reference."""
        latent = self.latent(s, self.draw("actor/eps", s.shape[0], self.hparams.action_dim))
        alpha = self.alpha()
        actor = latent_actor_loss(self.z_critic, s, latent.w, latent.log_prob, alpha, self.hparams.noise_scale)
        alpha_loss = temperature_loss(alpha, latent.log_prob, self.target_entropy)
        return DSRLActorLosses(actor, alpha_loss, -latent.log_prob.detach().mean(), latent.std.detach().mean())

    def fine_tune_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        # the reference's draw order: the critic's eps', the distillation's z, the BC x_0 and t, then the actor's eps
        s = batch["observations"]
        critic_loss, q = self.critic_loss(batch)
        distill, _ = self.distill_loss(s)
        bc = self.bc_loss(batch)
        actor = self.actor_losses(s)
        return critic_loss + distill + bc + actor.actor + actor.alpha, {
            "actor/bc_loss": bc, "critic/critic_loss": critic_loss, "critic/q_mean": q.mean(), "critic/q_min": q.min(),
            "critic/q_max": q.max(), "critic/distill_loss": distill, "actor/actor_loss": actor.actor,
            "actor/alpha_loss": actor.alpha, "actor/alpha": self.alpha(), "actor/entropy": actor.entropy,
            "actor/action_std": actor.std,
        }  # fmt: skip
