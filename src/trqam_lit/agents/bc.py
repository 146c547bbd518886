"""BC: the pretraining stage, v_bc trained with the flow-matching loss only; its checkpoint seeds fine-tuning."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import FlowAgent


class BC(FlowAgent):
    """Behaviour cloning of the action-chunk flow policy (spec method.md section 1)."""

    uses_critic = False

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.bc_loss(batch)
        self.log("train/bc_loss", loss, on_step=True, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("train/grad_norm", self.grad_norm, on_step=True)
