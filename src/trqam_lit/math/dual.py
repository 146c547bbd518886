"""Projected dual descent on the trust-region parameter lambda (spec section 4)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

DualForm = Literal["reference", "paper"]


def clip_kl(kl_hat: Tensor, eps_kl: float, kl_clip: float | None) -> Tensor:
    """KL_c = min(KL_hat, kl_clip * eps_kl), the value the KL average takes in (``kl_clip=None``: no clip)."""
    return kl_hat.float() if kl_clip is None else kl_hat.float().clamp(max=kl_clip * eps_kl)


def dual_step(
    lam: Tensor,
    kl_ema: Tensor,
    kl_hat: Tensor,
    eps_kl: float,
    eta: float = 0.01,
    rho: float = 0.1,
    kl_clip: float | None = 2.0,
    lam_min: float = 0.01,
    lam_max: float | None = 100.0,
) -> tuple[Tensor, Tensor]:
    """One projected dual-descent step; returns (new lambda, new KL average).

    KL_c = min(KL_hat, kl_clip * eps_kl); KL_ema <- (1 - rho) KL_ema + rho KL_c;
    lambda <- clip(lambda + eta (KL_ema - eps_kl), lam_min, lam_max). ``kl_clip=None`` skips the KL clip
    and ``lam_max=None`` leaves lambda unbounded above (the paper's plain form uses both with lam_min 0).
    """
    kl_c = clip_kl(kl_hat, eps_kl, kl_clip)
    new_ema = (1.0 - rho) * kl_ema + rho * kl_c
    new_lam = (lam + eta * (new_ema - eps_kl)).clamp(min=lam_min, max=lam_max)
    return new_lam, new_ema


class DualDescent(nn.Module):
    """Holds lambda and the KL average as buffers (checkpointed, moved with the module, never trained).

    ``form="reference"`` (default) is what produced the paper's numbers: KL clipped at ``kl_clip * eps_kl``,
    lambda in [lam_min, lam_max], lambda_eff = lam_scale * lambda with lam_scale 3. ``form="paper"`` is the
    paper's prose: no KL clip, lambda = max(0, .), lam_scale 1.
    """

    def __init__(
        self,
        eps_kl: float = 1.0,
        eta: float = 0.01,
        rho: float = 0.1,
        kl_clip: float = 2.0,
        lam_init: float = 1.0,
        lam_min: float = 0.01,
        lam_max: float = 100.0,
        lam_scale: float = 3.0,
        form: DualForm = "reference",
    ) -> None:
        super().__init__()
        if form not in ("reference", "paper"):
            raise ValueError(f"unknown dual form {form!r}; choose 'reference' or 'paper'")
        if eps_kl <= 0:
            raise ValueError(f"eps_kl must be positive, got {eps_kl}")
        self.form = form
        self.eps_kl, self.eta, self.rho = eps_kl, eta, rho
        if form == "reference":
            self.kl_clip, self.lam_min, self.lam_max, self.lam_scale = kl_clip, lam_min, lam_max, lam_scale
        else:
            self.kl_clip, self.lam_min, self.lam_max, self.lam_scale = None, 0.0, None, 1.0
        self.register_buffer("lam", torch.tensor(float(lam_init)))
        self.register_buffer("kl_ema", torch.tensor(0.0))

    @property
    def lam_eff(self) -> Tensor:
        """lambda_eff = lam_scale * lambda, the value that sets sigma in the adjoint-matching loss."""
        return self.lam_scale * self.lam

    @torch.no_grad()
    def step(self, kl_hat: Tensor) -> Tensor:
        """Update lambda and the KL average in place from this step's (rank-averaged) KL estimate.

        Returns the clipped KL that entered the average. A non-finite estimate is refused (the agents skip such a
        step before it gets here): one NaN would otherwise make lambda NaN for the rest of the run.
        """
        if not bool(torch.isfinite(kl_hat)):
            raise ValueError(f"non-finite path-KL estimate {float(kl_hat)} given to the dual step")
        lam, ema = dual_step(
            self.lam,
            self.kl_ema,
            kl_hat.detach().to(self.lam.device),
            self.eps_kl,
            self.eta,
            self.rho,
            self.kl_clip,
            self.lam_min,
            self.lam_max,
        )
        self.lam.copy_(lam)
        self.kl_ema.copy_(ema)
        return clip_kl(kl_hat.detach(), self.eps_kl, self.kl_clip)
