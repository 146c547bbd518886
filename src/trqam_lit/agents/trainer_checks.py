"""Trainer settings the agents refuse or warn about, checked when a fit, validate or test sets up."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from .. import hardware


def check_trainer(trainer: pl.Trainer, device: torch.device, stage: str) -> None:
    """Warn about emulated bf16 on a CPU; refuse gradient accumulation in a fit.

    Raises:
        ValueError: ``accumulate_grad_batches`` is not 1 (targets, the dual step and the draws are per update).
    """
    precision = str(trainer.precision)
    if "bf16" in precision and device.type == "cpu" and not hardware.cpu_has_bf16_gemm():
        rank_zero_warn(
            f"precision={precision} on a CPU without native bf16 (AVX512-BF16 or AMX): its bf16 matmuls are "
            "emulated, several times slower than float32 (docs/performance.md, 'Reduced precision'); use 32-true"
        )
    if stage == "fit" and trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} is not supported: target "
            "updates, the dual step and the random streams are per update; raise data.init_args.batch_size "
            "(or use more devices) instead"
        )
