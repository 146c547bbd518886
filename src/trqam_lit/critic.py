"""Critic side: the chunked TD target and the ensemble regression loss (spec section 5)."""

from __future__ import annotations

from torch import Tensor


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
