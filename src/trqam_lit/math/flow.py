"""Flow policy: deterministic Euler ODE sampling, the behaviour-cloning flow-matching loss (spec section 1), and the
one-step policy's action and distillation loss (FQL), and best-of-N sampling (IFQL)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor, Tensor | float], Tensor]
OneStepFn = Callable[[Tensor, Tensor], Tensor]

ACTION_CLIP = 1.0


def euler_ode(v: VelocityFn, s: Tensor, x0: Tensor, num_steps: int) -> Tensor:
    """Integrate dx/dt = v(s, x, t) from t = 0 to 1 with K Euler steps: x_{i+1} = x_i + h v(s, x_i, i h)."""
    h = 1.0 / num_steps
    x = x0
    for i in range(num_steps):
        x = x + h * v(s, x, i * h)
    return x


def sample_actions(v: VelocityFn, s: Tensor, noise: Tensor, num_steps: int) -> Tensor:
    """The policy's action chunk: Euler ODE from the given noise, clipped to [-1, 1]."""
    return euler_ode(v, s, noise, num_steps).clamp(-ACTION_CLIP, ACTION_CLIP)


def bc_flow_loss(v_bc: VelocityFn, s: Tensor, a: Tensor, x0: Tensor, t: Tensor, valid: Tensor) -> Tensor:
    """L_BC = mean_batch(valid * mean_dims (v_bc(s, x_t, t) - (a - x0))^2), x_t = (1 - t) x0 + t a.

    ``x0`` (B, A) and ``t`` (B, 1) are the random draws, passed in so tests can feed recorded ones.
    """
    x_t = (1.0 - t) * x0 + t * a
    err = (v_bc(s, x_t, t).float() - (a - x0).float()).pow(2).mean(dim=-1)
    return (valid.float() * err).mean()


def onestep_actions(mu: OneStepFn, s: Tensor, noise: Tensor) -> Tensor:
    """The one-step policy's action chunk: mu(s, z) clipped to [-1, 1]."""
    return mu(s, noise).clamp(-ACTION_CLIP, ACTION_CLIP)


def distillation_loss(
    mu: OneStepFn, teacher: VelocityFn, s: Tensor, z: Tensor, num_steps: int
) -> tuple[Tensor, Tensor]:
    """(L_distill, mu(s, z)): L_distill = mean_{batch, dims} (mu(s, z) - clip(ODE_teacher(s, z)))^2.

    The target is the teacher's clipped K-step Euler ODE from the same noise ``z`` (B, A), under stop-gradient:
    the loss trains mu only, never the teacher. mu's output is compared unclipped and returned for the Q term.
    No valid mask (the reference's).
    """
    with torch.no_grad():
        target = sample_actions(teacher, s, z, num_steps)
    pred = mu(s, z)
    return (pred.float() - target.float()).pow(2).mean(), pred


def best_of_n_actions(
    v: VelocityFn, critic: Callable[[Tensor, Tensor], Tensor], s: Tensor, noise: Tensor, num_steps: int
) -> Tensor:
    """Best-of-N: the N clipped ODE samples per state from ``noise`` (N, B, A), scored by min_j Q_j(s, a) of the
    ``critic`` (E, N * B); the highest-scoring sample of each state, (B, A) (first one on a tie, as jnp.argmax)."""
    n, b = noise.shape[:2]
    actions = sample_actions(v, s, noise, num_steps)  # s (B, O) is broadcast over the N samples
    q = critic(s.expand(n, *s.shape).reshape(n * b, -1), actions.reshape(n * b, -1))
    best = q.float().reshape(-1, n, b).min(dim=0).values.argmax(dim=0)  # (B,)
    return actions[best, torch.arange(b, device=actions.device)]
