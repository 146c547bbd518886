"""What the agents refuse or warn about: hyperparameters (at construction) and Trainer settings (at set-up)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from trqam_lit.math import gemm
from trqam_lit.training import hardware


def check_hparams(
    obs_dim: int,
    action_dim: int,
    flow_steps: int,
    max_nonfinite_steps: int,
    grad_clip_norm: float | None,
    gemm_backend: str = "auto",
) -> None:
    """Raises ValueError naming the first impossible setting of FlowAgent's constructor."""
    if obs_dim <= 0 or action_dim <= 0:
        raise ValueError(
            f"obs_dim and action_dim must be positive (got {obs_dim}, {action_dim}); they are linked from the "
            "DataModule by `trqam-lit`, or pass them explicitly when building the model in Python"
        )
    if flow_steps < 2:
        raise ValueError(f"flow_steps must be at least 2, got {flow_steps}")
    if max_nonfinite_steps < 1:
        raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
    if grad_clip_norm is not None and not grad_clip_norm > 0:
        raise ValueError(f"grad_clip_norm must be positive or None (no clip), got {grad_clip_norm}")
    if gemm_backend not in gemm.BACKENDS:
        raise ValueError(f"gemm_backend must be one of {gemm.BACKENDS}, got {gemm_backend!r}")


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
