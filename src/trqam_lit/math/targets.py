"""Polyak (EMA) target updates."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def polyak_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- tau * online + (1 - tau) * target, parameter by parameter.

    Call it just BEFORE the optimizer step to mix the pre-step online weights, as the reference does.
    """
    t_params = list(target.parameters())
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError("target and online networks have different parameter lists")
    # Same arithmetic as the reference (tau * online + (1 - tau) * target), not lerp, to match it to the ulp.
    torch._foreach_mul_(t_params, 1.0 - tau)
    torch._foreach_add_(t_params, torch._foreach_mul(o_params, tau))
