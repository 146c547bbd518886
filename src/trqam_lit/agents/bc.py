"""BC: the pretraining stage, v_bc trained with the flow-matching loss only; its checkpoint seeds fine-tuning."""

from __future__ import annotations

from torch import Tensor

from trqam_lit.agents.base import FlowAgent


class BC(FlowAgent):
    """Behaviour cloning of the action-chunk flow policy (spec method.md section 1)."""

    label = "BC"
    scalars = ()

    uses_critic = False

    def fine_tune_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        bc = self.bc_loss(batch)
        return bc, {"actor/bc_loss": bc}
