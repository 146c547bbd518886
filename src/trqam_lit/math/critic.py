"""Critic side: the chunked TD target, the ensemble regression loss (spec section 5), the actor's Q term, and IFQL's
expectile value loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def ensemble_pessimistic_value(q: Tensor, rho_q: float) -> Tensor:
    """mean_j Q_j - rho_q * std_j Q_j over the ensemble axis 0 (population std, ddof 0)."""
    q = q.float()
    return q.mean(dim=0) - rho_q * q.std(dim=0, correction=0)


def td_target(reward: Tensor, mask: Tensor, next_q: Tensor, discount: float, horizon: int) -> Tensor:
    """y = R_H + gamma^H * m_H * next_q, with next_q the pessimistic target value at (s', a')."""
    return reward.float() + (discount**horizon) * mask.float() * next_q


def critic_loss(q: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """L_Q = mean_{j, batch}(valid_H * (Q_j(s, a) - y)^2); ``q`` is (E, B), ``target`` and ``valid`` (B,)."""
    return (valid.float() * (q.float() - target.detach()).pow(2)).mean()


def actor_q_loss(critic: nn.Module | Callable[[Tensor, Tensor], Tensor], s: Tensor, a: Tensor) -> Tensor:
    """L_pi^Q = -mean_b mean_j Q_j(s, a) with the critic at its current weights held fixed: the gradient reaches
    ``a`` (the policy that produced it), never the critic. No 1/|Q| normalisation, no valid mask (FQL's reference).

    ``critic`` is an ensemble (E, B) or a plain function of (s, a) (the toy's analytic reward).
    """
    if isinstance(critic, nn.Module):
        frozen = {name: p.detach() for name, p in critic.named_parameters()}
        q = torch.func.functional_call(critic, frozen, (s, a))
    else:
        q = critic(s, a)
    return -q.float().mean()


def expectile_weight(diff: Tensor, kappa: float) -> Tensor:
    """|kappa - 1(diff < 0)|: kappa where diff = y - v >= 0 (ties included, as the reference), 1 - kappa otherwise."""
    return torch.where(diff >= 0, kappa, 1.0 - kappa)


def expectile_loss(target: Tensor, v: Tensor, kappa: float) -> Tensor:
    """L_V = mean_b expectile_weight(y - v) (y - v)^2 (IFQL's value loss, no valid mask). ``target`` y (B,) is held
    fixed (detached): the gradient reaches ``v`` only."""
    diff = target.detach().float() - v.float()
    return (expectile_weight(diff, kappa) * diff.pow(2)).mean()
