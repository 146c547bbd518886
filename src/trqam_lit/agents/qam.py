"""QAM: the fixed-temperature baseline (sigma = g, inverse temperature on the terminal adjoint, no dual step)."""

from __future__ import annotations

from typing import Any

from trqam_lit.agents.adjoint_matching import AdjointMatchingAgent


class QAM(AdjointMatchingAgent):
    """Q-learning with Adjoint Matching (spec method.md section 6): lambda_eff = 1, adj_K scaled by inv_temp."""

    label = "QAM"
    scalars = ()

    def __init__(self, inv_temp: float = 1.0, **kwargs: Any) -> None:
        """
        Args:
            inv_temp: inverse temperature beta multiplying the terminal adjoint.
        """
        super().__init__(**kwargs)

    @property
    def lam_eff(self) -> float:
        return 1.0

    @property
    def adj_scale(self) -> float:
        return self.hparams.inv_temp
