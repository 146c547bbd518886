"""Terminal adjoint, lean adjoint recursion and the adjoint-matching loss (spec section 3).

The composite :func:`adjoint_matching_objective` sequences the pieces for one batch: forward rollout
(no gradients), terminal adjoint from the target critics, lean adjoint through v_base, then one batched
call of v_ft (with gradients) and v_base over the K x B stored points for the loss and the path-KL estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from trqam_lit.math.flow import ACTION_CLIP, VelocityFn
from trqam_lit.math.nets import VelocityField
from trqam_lit.math.sde import (
    FlowSDE,
    Solver,
    flow_time_grid,
    memoryless_drift,
    memoryless_g,
    path_kl_estimate,
    rollout,
)

QFn = Callable[[Tensor, Tensor], Tensor]  # (s, a) -> Q values, (E, B) for an ensemble or (B,)


def terminal_adjoint(q_fn: QFn, s: Tensor, x_final: Tensor, scale: float = 1.0, clip: bool = True) -> Tensor:
    """adj_K = -scale * grad_a mean_j Q_j(s, clip(a, -1, 1)) at a = x_K, per sample.

    The gradient flows through the clip (zero outside [-1, 1]); only ``a`` is differentiated, so the
    critic's parameters never receive gradients from here. ``scale`` is QAM's inverse temperature (1 for
    TRQAM). ``clip=False`` is for analytic rewards whose closed forms assume no clip.
    """

    def mean_q(a: Tensor) -> Tensor:
        q = q_fn(s, a.clamp(-ACTION_CLIP, ACTION_CLIP) if clip else a).float()
        if q.dim() == 2:  # ensemble (E, B): mean over members
            q = q.mean(dim=0)
        return q.sum()

    # torch.func.grad rather than autograd.grad on a requires_grad_ leaf: torch.compile traces it (the fast path)
    with torch.enable_grad():
        grad = torch.func.grad(mean_q)(x_final.detach().float())
    # detached: func.grad's result stays differentiable in a critic's parameters when they require grad
    return -scale * grad.detach()


def lean_adjoint(v_base: VelocityFn, s: Tensor, xs: Tensor, adj_final: Tensor) -> Tensor:
    """Backward recursion adj_i = adj_{i+1} + h J_i^T adj_{i+1}, i = K-1..0; returns adj_0..adj_{K-1}, (K, B, A).

    J_i = d/dx [2 v_base(s, x, t_i + h) - x / (t_i + h)] at x = x_i (state x_i, time one step later), one
    vector-Jacobian product per step (for a :class:`VelocityField`, matmuls through its linearisation at all K
    points, computed in one batched pass; any other callable goes through autograd). ``xs`` is the rollout's K+1
    states x_0..x_K (K is read from its length; x_K itself is not used).
    """
    K = xs.shape[0] - 1
    h = 1.0 / K
    t_shift = flow_time_grid(K, device=xs.device) + h
    adj = adj_final.float()
    adjs = [None] * K
    if isinstance(v_base, VelocityField):
        # The Jacobians do not depend on the adjoint: linearise v_base at all K points in one batched forward pass,
        # then each step's VJP is a chain of matmuls (no per-step forward, no autograd graph).
        jac = v_base.linearize(s, xs[:K].detach().float(), t_shift.reshape(K, 1, 1))
        for i in range(K - 1, -1, -1):
            jt_adj = 2.0 * jac.vjp(i, adj).float() - adj / t_shift[i]
            adj = adj + h * jt_adj
            adjs[i] = adj
        return torch.stack(adjs)
    for i in range(K - 1, -1, -1):
        with torch.enable_grad():
            x = xs[i].detach().float().requires_grad_(True)
            drift = memoryless_drift(v_base(s, x, t_shift[i]), x, t_shift[i])
            (jt_adj,) = torch.autograd.grad(drift, x, grad_outputs=adj)
        adj = adj + h * jt_adj
        adjs[i] = adj
    return torch.stack(adjs)


def am_sigmas(g: Tensor, lam_eff: Tensor | float) -> Tensor:
    """sigma_i = g_i / sqrt(lambda_eff) (floored at 1e-8 as the reference does); lambda_eff = 1 gives QAM."""
    if torch.is_tensor(lam_eff):
        return g * torch.rsqrt(lam_eff.float().clamp_min(1e-8))
    return g / math.sqrt(max(float(lam_eff), 1e-8))


def adjoint_matching_terms(v_ft: Tensor, v_base: Tensor, adjs: Tensor, sigmas: Tensor) -> Tensor:
    """Per step and sample: sum_dims (2 (v_ft - v_base) / sigma_i + sigma_i adj_i)^2, shape (K, B)."""
    sig = sigmas.float().reshape(-1, 1, 1)
    r = 2.0 * (v_ft.float() - v_base.float()) / sig + sig * adjs.float()
    return r.pow(2).sum(dim=-1)


def adjoint_matching_loss(v_ft: Tensor, v_base: Tensor, adjs: Tensor, sigmas: Tensor) -> Tensor:
    """L_AM = mean_batch sum_i sum_dims (...)^2: no valid mask, no h factor. Only ``v_ft`` should carry grad."""
    return adjoint_matching_terms(v_ft, v_base, adjs, sigmas).sum(dim=0).mean()


@dataclass
class AMOutput:
    """What one adjoint-matching pass produces (all but ``loss`` are detached)."""

    loss: Tensor
    path_kl: Tensor
    xs: Tensor
    adj_final: Tensor
    adjs: Tensor
    v_ft: Tensor
    v_base: Tensor
    sigmas: Tensor


def adjoint_matching_objective(
    v_ft: VelocityFn,
    v_base: VelocityFn,
    q_fn: QFn,
    s: Tensor,
    x0: Tensor,
    eps: Tensor,
    num_steps: int,
    horizon: int,
    lam_eff: Tensor | float = 1.0,
    adj_scale: float = 1.0,
    solver: Solver = "fused",
    clip_action: bool = True,
    xs: Tensor | None = None,
) -> AMOutput:
    """One adjoint-matching pass: rollout, terminal and lean adjoints, L_AM and the path-KL estimate.

    TRQAM: ``lam_eff = lam_scale * lambda``, ``adj_scale = 1``. QAM: ``lam_eff = 1``, ``adj_scale = inv_temp``.
    ``x0`` (B, A) and ``eps`` (K-1 or K, B, A) are the rollout's standard-normal draws; ``xs`` (K+1, B, A), when
    given, are the rollout's states from them, already computed (``sde.rollout_fused_with_ode``).
    """
    K, h = num_steps, 1.0 / num_steps
    if xs is None:
        with torch.no_grad():
            xs = rollout(FlowSDE(v_ft, v_base, s, K), x0, eps, solver)
    adj_final = terminal_adjoint(q_fn, s, xs[-1], scale=adj_scale, clip=clip_action)
    adjs = lean_adjoint(v_base, s, xs, adj_final)
    t = flow_time_grid(K, device=x0.device)
    g = memoryless_g(t, h)
    t_col = t.reshape(K, 1, 1)
    x_steps = xs[:K]
    vf = v_ft(s, x_steps, t_col).float()  # one batched call over the K x B points
    with torch.no_grad():
        vb = v_base(s, x_steps, t_col).float()
    sigmas = am_sigmas(g, lam_eff)
    loss = adjoint_matching_loss(vf, vb, adjs, sigmas)
    with torch.no_grad():
        path_kl = path_kl_estimate(vf.detach(), vb, g, h, horizon)
    return AMOutput(loss, path_kl, xs, adj_final, adjs, vf.detach(), vb, sigmas)
