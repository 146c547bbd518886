"""Flow policy: deterministic Euler ODE sampling and the behaviour-cloning flow-matching loss (spec section 1)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor, Tensor | float], Tensor]

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
