"""CGQL-L: classifier-guided Q-learning in its LINEX mode (the QAM repository's ``agents/cgql.py``, ``mode="linex"``).

The critic is time-conditioned, Q(s, a, t), with t = 1 for clean actions. It is trained by TD at t = 1 and, on noisy
actions a_t = (1 - t) z + t a, towards the target critic's value of the clean action with a clipped LINEX loss. v_bc
is trained by flow matching alone: the policy improves only when sampling, where the Euler ODE of v_base (the polyak
copy of v_bc) is guided at every step i >= 1 by the critic's action gradient at the flow time t_i. That guided
sampler acts and gives the TD target's next action. L = L_Q + noisy_coef * L_linex + L_BC.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from trqam_lit.agents.base import FlowAgent
from trqam_lit.math.flow import ACTION_CLIP, VelocityFn, sample_actions
from trqam_lit.math.nets import CriticEnsemble

TimeQFn = Callable[..., Tensor]  # (s, a, t) -> Q_j(s, a, t), (E, B)


def guidance_score(critic: TimeQFn, s: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
    """score = grad_x sum_b mean_j Q_j(s, x, t): each sample's action gradient of the ensemble mean at flow time t.

    Only ``x`` is differentiated, so the critic's parameters never receive a gradient (they are the current weights
    held fixed, the reference's stored params). Works under ``no_grad`` and under inference mode (evaluation). A
    :class:`CriticEnsemble` computes it with its written-out backward pass (no autograd graph: ``torch.export``
    traces it, and it costs less); any other critic goes through autograd.
    """
    if isinstance(critic, CriticEnsemble) and not torch.is_tensor(t):
        return critic.action_gradient(s, x.detach(), t)
    with torch.inference_mode(False), torch.enable_grad():
        s = s.clone()  # a normal tensor even if it was made under inference mode
        x = x.detach().float().clone().requires_grad_(True)
        q = critic(s, x, t).float().mean(dim=0).sum()
        (score,) = torch.autograd.grad(q, x)
    return score


def guided_velocity(v: Tensor, score: Tensor, x: Tensor, t: float, inv_temp: float, guidance_coef: float) -> Tensor:
    """v + (inv_temp (1 - t) score + x) guidance_coef / t: the base velocity plus classifier guidance (t > 0)."""
    return v.float() + (score.float() * (1.0 - t) * inv_temp + x.float()) * guidance_coef / t


def guided_euler_actions(
    v_base: VelocityFn,
    critic: TimeQFn,
    s: Tensor,
    noise: Tensor,
    num_steps: int,
    inv_temp: float,
    guidance_coef: float,
) -> Tensor:
    """The guided sampler: x_{i+1} = x_i + h v_i from x_0 = ``noise``, clipped to [-1, 1] at the end.

    v_0 = v_base(s, x_0, 0) (step 0 is plain: the guidance divides by t); for i >= 1, v_i is :func:`guided_velocity`
    with the :func:`guidance_score` of ``critic`` at (s, x_i, t_i), t_i = i h. With ``inv_temp`` <= 0 there is no
    guidance at all (the reference's switch), and the sampler is v_base's plain ODE.
    """
    h = 1.0 / num_steps
    x = noise
    for i in range(num_steps):
        t = i * h
        vel = v_base(s, x, t)
        if i > 0 and inv_temp > 0:
            vel = guided_velocity(vel, guidance_score(critic, s, x, t), x, t, inv_temp, guidance_coef)
        x = x + h * vel
    return x.clamp(-ACTION_CLIP, ACTION_CLIP)


def linex_loss(q: Tensor, target: Tensor, valid: Tensor, inv_temp: float, isd_clip: float) -> tuple[Tensor, Tensor]:
    """(L_linex, delta): delta = inv_temp (target - q) per member and sample, (E, B); the loss is
    mean_{j, b} valid * (delta where delta > isd_clip, else exp(delta) + inv_temp q).

    Above the clip the loss is linear (gradient -inv_temp on q). The exponential is taken of the clipped delta, as in
    the reference: an exp that overflowed on the linear branch would turn that branch's gradient into NaN (0 * inf)
    even though where() discards its value. ``target`` is held fixed.
    """
    q = q.float()
    delta = (target.detach().float() - q) * inv_temp
    linear = delta > isd_clip
    exp_branch = torch.exp(torch.where(linear, torch.full_like(delta, isd_clip), delta)) + q * inv_temp
    per_member = torch.where(linear, delta, exp_branch)
    return (per_member * valid.float()).mean(), delta.detach()


def linex_exp_bias(q: Tensor, target: Tensor, inv_temp: float) -> Tensor:
    """mean_{j, b} exp(inv_temp q) - exp(inv_temp target): the reference's ``exp_bias`` diagnostic (may overflow)."""
    return (torch.exp(q.detach().float() * inv_temp) - torch.exp(target.detach().float() * inv_temp)).mean()


class NoisyCritic(NamedTuple):
    loss: Tensor  # L_linex, trains the online critic only
    q: Tensor  # Q_j(s, a_t, t) of the online critic, (E, B), detached
    target: Tensor  # Q_targ_j(s, a, 1) of the target critic at the clean (dataset) action, (E, B)
    delta: Tensor  # inv_temp (target - q), (E, B)


def noisy_critic_loss(
    critic: TimeQFn,
    target_critic: TimeQFn,
    s: Tensor,
    a: Tensor,
    noise: Tensor,
    t: Tensor,
    valid: Tensor,
    inv_temp: float,
    isd_clip: float,
) -> NoisyCritic:
    """The noisy critic's LINEX loss at a_t = (1 - t) noise + t a (draws ``noise`` (B, A), ``t`` (B, 1) passed in):
    Q(s, a_t, t) of ``critic`` towards Q_targ(s, a, 1) of ``target_critic``, member by member (:func:`linex_loss`)."""
    a_t = (1.0 - t) * noise + t * a
    with torch.no_grad():
        target = target_critic(s, a, 1.0).float()
    q = critic(s, a_t, t)
    loss, delta = linex_loss(q, target, valid, inv_temp, isd_clip)
    return NoisyCritic(loss, q.detach().float(), target, delta)


class CGQL(FlowAgent):
    """Classifier-guided Q-learning, LINEX mode (spec baselines.md, CGQL-L): one Adam, no gradient clip (the
    reference's plain ``optax.adam``).

    Networks: v_bc (trained by L_BC only), its polyak copy v_base (the reference's ``target_actor``, which the guided
    sampler integrates), the time-conditioned critic ensemble Q(s, a, t) and its polyak target. A BC warm-up or
    ``init_from`` sets v_base from v_bc; during a warm-up v_bc acts with its plain ODE (the critic is untrained).
    """

    label = "CGQL-L"
    scalars = (
        "critic/critic_loss",
        "critic/q_mean",
        "critic/q_min",
        "critic/q_max",
        "critic/noisy_critic_loss",
        "critic/exp_bias",
    )

    def __init__(
        self,
        inv_temp: float = 10.0,
        guidance_coef: float = 0.1,
        noisy_coef: float = 0.001,
        isd_clip: float = 5.0,
        grad_clip_norm: float | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            inv_temp: inverse temperature tau on the guidance score and in the LINEX loss (10 in every paper run).
            guidance_coef: guidance coefficient vartheta, the weight of the guidance term in the sampler's velocity.
            noisy_coef: weight of the noisy critic's LINEX loss in the total loss.
            isd_clip: delta above which the LINEX loss is linear (the reference's clip of the exponential).
            grad_clip_norm: global gradient-norm clip; None (the reference's CGQL has no clip).
        """
        if kwargs.get("analytic_critic"):
            raise ValueError("CGQL trains a time-conditioned critic Q(s, a, t); analytic_critic=True is not supported")
        super().__init__(grad_clip_norm=grad_clip_norm, **kwargs)

    def build_policy(self) -> None:
        self.v_base = self._frozen_copy(self.v_bc)

    def build_critic(self) -> nn.Module:
        hp = self.hparams
        return CriticEnsemble(hp.obs_dim, hp.action_dim, hp.num_critics, hp.critic_hidden_dims, hp.critic_layer_norm,
                              time_input=True)  # fmt: skip

    def target_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [*super().target_pairs(), (self.v_base, self.v_bc)]

    @torch.no_grad()
    def copy_bc_into_policy(self) -> None:
        self.v_base.load_state_dict(self.v_bc.state_dict())
        super().copy_bc_into_policy()

    def guided_actions(self, s: Tensor, noise: Tensor) -> Tensor:
        """v_base's ODE guided by the ONLINE critic's score (the reference's ``target_guidance``), clipped."""
        hp = self.hparams
        return guided_euler_actions(self.v_base, self.critic, s, noise, self.flow_steps, hp.inv_temp, hp.guidance_coef)

    def next_actions(self, s_next: Tensor, noise: Tensor) -> Tensor:
        return self.guided_actions(s_next, noise)

    @property
    def policy_net(self) -> nn.Module:
        # the guided sampler integrates v_base once fine-tuning started; during a BC warm-up v_bc acts
        return self.v_base if bool(self.policy_from_bc) else self.v_bc

    def policy_actions(self, s: Tensor, noise: Tensor) -> Tensor:
        if not bool(self.policy_from_bc):
            return sample_actions(self.v_bc, s, noise, self.flow_steps)
        return self.guided_actions(s, noise)

    def noisy_critic_loss(self, batch: dict[str, Tensor]) -> NoisyCritic:
        """L_linex from the draws t (B, 1) and the noise (B, A), in the reference's order (after the next action's)."""
        s, a = batch["observations"], batch["actions"]
        t = self.draw("noisy/t", a.shape[0], 1, uniform=True)
        noise = self.draw("noisy/noise", *a.shape)
        hp = self.hparams
        return noisy_critic_loss(self.critic, self.target_critic, s, a, noise, t, batch["valid"], hp.inv_temp,
                                 hp.isd_clip)  # fmt: skip

    def fine_tune_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        # the reference's draw order: the next action's noise, the noisy critic's t and noise, then BC's x_0 and t
        q_loss, q = self.critic_loss(batch)
        noisy = self.noisy_critic_loss(batch)
        bc = self.bc_loss(batch)
        return q_loss + self.hparams.noisy_coef * noisy.loss + bc, {
            "actor/bc_loss": bc, "critic/critic_loss": q_loss, "critic/q_mean": q.mean(), "critic/q_min": q.min(),
            "critic/q_max": q.max(), "critic/noisy_critic_loss": noisy.loss,
            "critic/exp_bias": linex_exp_bias(noisy.q, noisy.target, self.hparams.inv_temp),
        }  # fmt: skip
