"""TRQAM: adjoint matching with the trust-region parameter lambda inside the SDE, stepped by dual descent."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from trqam_lit.agents.adjoint_matching import AdjointMatchingAgent
from trqam_lit.math.dual import DualDescent, DualForm


class TRQAM(AdjointMatchingAgent):
    """Trust Region Q-Adjoint Matching; lambda and its KL average are non-gradient buffers (``self.dual``) moved by
    one projected dual-descent step after each applied update (``after_update``, called in ``on_train_batch_end`` by
    the ``AppliedUpdate`` callback, before ModelCheckpoint saves)."""

    label = "TRQAM"
    scalars = ("dual/kl_clipped", "dual/kl_ema", "dual/lambda")  # dual/kl_clipped: while lambda moves (dual_update)

    ft_starts_at_prior = True  # the trust region is measured from the prior: v_ft, v_base and v_bc start equal

    # The dual's arguments repeat dual.DualDescent's signature (a same-shape run for `duplicates`): LightningCLI reads
    # an agent's options, types and defaults from its own __init__, so they are spelt out here once more.
    def __init__(
        self,
        eps_kl: float = 1.0,
        eta: float = 0.01,
        kl_ema_rho: float = 0.1,
        kl_clip: float = 2.0,
        lam_init: float = 1.0,
        lam_min: float = 0.01,
        lam_max: float = 100.0,
        lam_scale: float = 3.0,
        dual_form: DualForm = "reference",
        dual_update: bool = True,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            eps_kl: the path-KL budget epsilon_KL (per chunk step, i.e. after dividing by H).
            eta: dual step size on lambda.
            kl_ema_rho: weight of the new KL estimate in its running average.
            kl_clip: the KL estimate is clipped at kl_clip * eps_kl before averaging (reference form).
            lam_init: lambda at the start of fine-tuning.
            lam_min: lower bound of lambda (reference form).
            lam_max: upper bound of lambda (reference form).
            lam_scale: lambda_eff = lam_scale * lambda sets sigma in the AM loss (reference form; paper form 1).
            dual_form: "reference" (what produced the paper's numbers) or "paper" (the paper's plain form, which
                ignores kl_clip, lam_min, lam_max and lam_scale).
            dual_update: step lambda by dual descent; False keeps it fixed at lam_init.
        """
        super().__init__(**kwargs)
        self.dual = DualDescent(eps_kl, eta, kl_ema_rho, kl_clip, lam_init, lam_min, lam_max, lam_scale, dual_form)

    @property
    def lam_eff(self) -> Tensor:
        return self.dual.lam_eff

    @property
    def adj_scale(self) -> float:
        return 1.0  # TRQAM: no temperature on the terminal adjoint

    def after_update(self, kl: Tensor) -> dict[str, Tensor]:
        """The dual step on lambda with the applied update's rank-averaged path-KL estimate; returns the ``dual/*``
        scalars (``dual/kl_clipped`` only when lambda moves)."""
        values = super().after_update(kl)
        if self.hparams.dual_update:
            values["dual/kl_clipped"] = self.dual.step(kl)
        return {**values, "dual/kl_ema": self.dual.kl_ema, "dual/lambda": self.dual.lam}
