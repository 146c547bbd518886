"""Tanh-Gaussian policies and their learned temperature (QAM-E's edit policy; SAC-style): the reparameterised sample,
its log-density and the temperature loss. The standard-normal draws are arguments, so tests can feed recorded ones.
"""

from __future__ import annotations

from torch import Tensor
from torch.distributions import Independent, Normal, TransformedDistribution
from torch.distributions.transforms import TanhTransform


def tanh_gaussian_sample(mean: Tensor, log_std: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """(tanh(x), x) with x = mean + exp(log_std) * eps: the reparameterised sample and its pre-tanh value.

    ``eps`` (.., A) is standard normal with the action axis LAST; tfp draws it action axis first (the golden
    records store (A, B)), so a recorded draw is moved there first: ``eps = moveaxis(draw, 0, -1)``.
    """
    x = mean + log_std.exp() * eps
    return x.tanh(), x


def tanh_gaussian_log_prob(mean: Tensor, log_std: Tensor, x: Tensor) -> Tensor:
    """log pi(tanh(x)) (..,): sum_d log N(x_d; mean_d, std_d) - sum_d log(1 - tanh(x_d)^2), at the PRE-tanh x.

    torch.distributions' tanh-transformed diagonal normal: its ``TanhTransform`` caches x with tanh(x) (as tfp does),
    so the Jacobian term is 2 (log 2 - x - softplus(-2 x)) at the sample's own x, finite for every x; taking x back as
    atanh(tanh(x)) is not (inf once tanh(x) rounds to +-1 in float32), which is why the sample's x is passed.
    """
    tanh = TanhTransform(cache_size=1)
    # No argument validation: its data-dependent checks (scale > 0, |y| <= 1) would stop torch.export and cost a sync.
    normal = Independent(Normal(mean, log_std.exp(), validate_args=False), 1, validate_args=False)
    return TransformedDistribution(normal, [tanh], validate_args=False).log_prob(tanh(x))


def temperature_loss(alpha: Tensor, log_prob: Tensor, target_entropy: float) -> Tensor:
    """alpha * (H - target_entropy) with the entropy estimate H = -mean log pi held fixed: the gradient reaches only
    alpha (the temperature rises while H is below the target, falls above it)."""
    entropy = -log_prob.detach().float().mean()
    return alpha * (entropy - target_entropy)
