"""Tanh-Gaussian policies and their learned temperature (QAM-E's edit policy; SAC-style): the reparameterised sample,
its log-density and the temperature loss. The standard-normal draws are arguments, so tests can feed recorded ones.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

_LOG_2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def tanh_gaussian_sample(mean: Tensor, log_std: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """(tanh(x), x) with x = mean + exp(log_std) * eps: the reparameterised sample and its pre-tanh value.

    ``eps`` (.., A) is standard normal with the action axis LAST; tfp draws it action axis first (the golden
    records store (A, B)), so a recorded draw is moved there first: ``eps = moveaxis(draw, 0, -1)``.
    """
    x = mean + log_std.exp() * eps
    return x.tanh(), x


def tanh_gaussian_log_prob(mean: Tensor, log_std: Tensor, x: Tensor) -> Tensor:
    """log pi(tanh(x)) (..,): sum_d log N(x_d; mean_d, std_d) - sum_d log(1 - tanh(x_d)^2), at the PRE-tanh x.

    log(1 - tanh^2 x) = 2 (log 2 - x - softplus(-2 x)) is finite for every x; taking x back as atanh(tanh(x)) is
    not (inf once tanh(x) rounds to +-1 in float32), which is why the sample's x is passed (tfp caches it too).
    """
    z = (x - mean) * (-log_std).exp()
    gauss = -0.5 * z.pow(2) - log_std - _HALF_LOG_2PI
    log_det = 2.0 * (_LOG_2 - x - F.softplus(-2.0 * x))
    return (gauss - log_det).sum(dim=-1)


def temperature_loss(alpha: Tensor, log_prob: Tensor, target_entropy: float) -> Tensor:
    """alpha * (H - target_entropy) with the entropy estimate H = -mean log pi held fixed: the gradient reaches only
    alpha (the temperature rises while H is below the target, falls above it)."""
    entropy = -log_prob.detach().float().mean()
    return alpha * (entropy - target_entropy)
