"""BC: the pretraining stage, v_bc trained with the flow-matching loss only; its checkpoint seeds fine-tuning."""

from __future__ import annotations

from torch import Tensor

from .base import FlowAgent


class BC(FlowAgent):
    """Behaviour cloning of the action-chunk flow policy (spec method.md section 1)."""

    label = "BC"
    scalars = ()

    uses_critic = False

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.bc_loss(batch)
        self.log_step({"actor/bc_loss": loss}, prog_bar=["actor/bc_loss"])
        self.record(bc_loss=loss)
        return loss
