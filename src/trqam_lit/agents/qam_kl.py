"""QAM-KL: QAM with the path-KL budget enforced as a penalty in the loss (the alternative TRQAM argues against).

QAM's memoryless SDE at a fixed lambda_eff = 1 and its inverse temperature on the terminal adjoint; the actor
minimises L_AM + lambda * D_hat(theta), where D_hat is the path-KL estimate as a differentiable function of the
fine-tuned velocity at the rollout's (detached) states, and lambda >= 0 is moved by the same projected dual descent
on the measured KL as TRQAM's (docs/method.md, "Loss-level KL penalty: QAM-KL").
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from trqam_lit.agents.qam import QAM
from trqam_lit.math.adjoint import AMOutput
from trqam_lit.math.dual import DualDescent
from trqam_lit.math.sde import flow_time_grid, memoryless_g, path_kl_estimate


def kl_penalty(v_ft: Tensor, v_base: Tensor, num_steps: int, horizon: int) -> Tensor:
    """D_hat(theta) = mean_b sum_i (2h / g_i^2) |v_ft - v_base|^2 / H over the K x B points (``v_ft`` with its graph,
    ``v_base`` without): the path-KL estimate TRQAM measures, differentiable in the fine-tuned field."""
    h = 1.0 / num_steps
    g = memoryless_g(flow_time_grid(num_steps, device=v_ft.device), h)
    return path_kl_estimate(v_ft, v_base, g, h, horizon)


class QAMKL(QAM):
    """QAM + lambda * D_hat(theta); lambda a non-gradient buffer (``self.dual.lam``) stepped after each applied update
    by the reference form of TRQAM's dual descent, projected onto [0, lam_max] (no lam_scale: lambda is the weight)."""

    label = "QAM-KL"
    scalars = ("actor/kl_penalty", "dual/kl_clipped", "dual/kl_ema", "dual/lambda")

    ft_starts_at_prior = True  # the penalty is measured from the prior, as TRQAM's trust region

    def __init__(
        self,
        eps_kl: float = 1.0,
        eta: float = 0.01,
        lam_init: float = 1.0,
        lam_max: float = 100.0,
        dual_update: bool = True,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            eps_kl: the path-KL budget (per chunk step, after dividing by H, as TRQAM's).
            eta: dual step size on lambda (TRQAM's KL clip at 2 eps_kl and KL average weight 0.1 are kept).
            lam_init: the penalty weight lambda at the start of fine-tuning.
            lam_max: upper bound of lambda (the lower bound is 0).
            dual_update: step lambda by dual descent; False keeps the penalty weight fixed at lam_init.
        """
        super().__init__(**kwargs)
        self.dual = DualDescent(eps_kl, eta, lam_init=lam_init, lam_min=0.0, lam_max=lam_max, lam_scale=1.0)
        self._penalty: Tensor | None = None

    def actor_objective(self, s: Tensor, x0: Tensor, eps: Tensor, xs: Tensor | None = None) -> AMOutput:
        """QAM's adjoint-matching pass, and D_hat(theta) from a second v_ft pass at its (detached) states: the AM
        pass keeps its own v_ft graph inside ``math.adjoint``."""
        am = super().actor_objective(s, x0, eps, xs)
        K = self.flow_steps
        t = flow_time_grid(K, device=s.device).reshape(K, 1, 1)
        self._penalty = kl_penalty(self.v_ft(s, am.xs[:K], t).float(), am.v_base, K, self.hparams.horizon)
        return am

    def fine_tune_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        loss, info = super().fine_tune_loss(batch)
        penalty, self._penalty = self._penalty, None
        return loss + self.dual.lam * penalty, {**info, "actor/kl_penalty": penalty}

    def after_update(self, kl: Tensor) -> dict[str, Tensor]:
        """The dual step on lambda with the applied update's rank-averaged KL estimate (as TRQAM's)."""
        values = super().after_update(kl)
        if self.hparams.dual_update:
            values["dual/kl_clipped"] = self.dual.step(kl)
        return {**values, "dual/kl_ema": self.dual.kl_ema, "dual/lambda": self.dual.lam}
