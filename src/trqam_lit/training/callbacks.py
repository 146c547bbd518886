"""Trainer callbacks the CLI installs by default."""

from __future__ import annotations

import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from trqam_lit.training import hardware
from trqam_lit.training.lightning_internals import validates_after_this_batch


class FinalEvaluation(pl.Callback):
    """Evaluates once more when ``max_steps`` is reached off the ``val_check_interval`` grid.

    Setting ``trainer.should_stop`` on the last step makes Lightning's loop run its validation before it stops.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        interval = trainer.val_check_interval
        if trainer.max_steps is None or trainer.max_steps < 0 or trainer.limit_val_batches == 0:
            return
        if trainer.global_step >= trainer.max_steps and (
            not isinstance(interval, int) or trainer.global_step % interval != 0
        ):
            trainer.should_stop = True


class Checkpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (the CLI's ``checkpoint`` group), except that a save due at a step that also
    evaluates is written after that evaluation instead of before it.

    Lightning saves in ``on_train_batch_end``, before the step's validation, and a resume from such a file skips
    that validation (the loop counts it as done). A run killed during the evaluation therefore lost it for good: the
    resumed run went on without it. Written after the evaluation, a checkpoint resumes past an evaluation that did
    happen, and a run killed during one resumes from the checkpoint before and evaluates that step again.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._after_evaluation: int | None = None  # the step whose save waits for its evaluation

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if self._after_evaluation is not None:  # the loop did not evaluate after all: say so, save as usual
            rank_zero_warn(f"no evaluation ran at step {self._after_evaluation}: its checkpoint was not written")
            self._after_evaluation = None
        if not trainer.sanity_checking and validates_after_this_batch(trainer):
            self._after_evaluation = trainer.global_step
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._after_evaluation is not None and self._after_evaluation == trainer.global_step:
            self._after_evaluation = None
            super().on_train_batch_end(trainer, pl_module, None, None, 0)  # the same criteria, after the evaluation


class EvaluationSummary(pl.Callback):
    """Keeps the last evaluation of each policy of a fit (step, success, return) for the closing summary.

    The policy is "BC" while v_ft has not been set from v_bc yet (a BC run, or an evaluation at the end of the BC
    warm-up) and "fine-tuned" after, so a run with a warm-up shows the prior next to the fine-tuned policy.
    """

    def __init__(self) -> None:
        self.last: dict[str, dict] = {}  # "BC" / "fine-tuned" -> its last evaluation

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        if "eval/return" not in metrics:
            return
        policy = "BC" if getattr(pl_module, "policy_net", None) is getattr(pl_module, "v_bc", None) else "fine-tuned"
        row = {"step": trainer.global_step}
        row.update({k.split("/")[1]: float(metrics[k]) for k in ("eval/success", "eval/return") if k in metrics})
        self.last[policy] = row

    def summary(self) -> list[str]:
        """The last evaluation of the BC policy and of the fine-tuned one (whichever exist), one line each."""
        lines = []
        for policy in ("BC", "fine-tuned"):
            if (row := self.last.get(policy)) is not None:
                values = ", ".join(f"{k} {row[k]:.4g}" for k in ("success", "return") if k in row)
                lines.append(f"  {policy + ' policy':<20}{values}  (step {row['step']})")
        return lines


class StepsPerSecond(pl.Callback):
    """Logs ``perf/steps_per_sec``: optimizer steps per wall-clock second over each logging window."""

    def __init__(self) -> None:
        self._t0, self._step0 = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_validation_start(self, trainer, pl_module) -> None:
        self._t0 = None  # evaluation time is not training time

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        steps = trainer.global_step - self._step0
        if self._t0 is None or steps < max(1, trainer.log_every_n_steps):
            return
        rate = steps / (time.perf_counter() - self._t0)
        pl_module.log("perf/steps_per_sec", rate, on_step=True, prog_bar=True)
        self._t0, self._step0 = time.perf_counter(), trainer.global_step


class MatmulPrecision(pl.Callback):
    """Opt-in reduced internal precision of float32 matrix multiplications (off by default): every tensor, the SDE
    states, the adjoints, the KL and the optimizer stay float32; only the products inside matmuls are rounded.

    - ``"tf32"`` (CUDA): TF32 tensor-core matmuls (``torch.backends.cuda.matmul.fp32_precision``).
    - ``"bf16"`` (CPU with AMX): oneDNN's bf16 math mode for float32 matmuls
      (``torch.backends.mkldnn.matmul.fp32_precision``), the CPU analogue of TF32. Raises on a CPU without AMX: on an
      AVX512-BF16 CPU without it the mode was measured to change nothing, and on an AVX2 CPU bf16 is emulated several
      times slower. On CPUs with AVX512-BF16, ``trainer.precision=bf16-mixed`` is what is faster (docs/performance.md).
    - ``"ieee"``: full float32 (the default).

    Set in ``setup`` (before a compiled step is traced), restored in ``teardown``; the flags are process-wide. In a
    config:
    ``trainer.callbacks: [{class_path: trqam_lit.training.callbacks.MatmulPrecision, init_args: {precision: tf32}}]``.
    """

    def __init__(self, precision: Literal["ieee", "bf16", "tf32"] = "ieee") -> None:
        if precision not in ("ieee", "bf16", "tf32"):
            raise ValueError(f"precision must be 'ieee', 'bf16' (CPU with AMX) or 'tf32' (CUDA), got {precision!r}")
        self.precision = precision
        self._saved: list[tuple[Any, str]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        cuda = trainer.strategy.root_device.type == "cuda"
        if self.precision == "bf16" and cuda:
            raise ValueError("MatmulPrecision('bf16') is the CPU setting; on CUDA use 'tf32' (or precision=bf16-mixed)")
        if self.precision == "tf32" and not cuda:
            raise ValueError("MatmulPrecision('tf32') is the CUDA setting; on CPU use 'bf16' (AMX) or 'ieee'")
        if self.precision == "bf16" and not hardware.cpu_has_amx():
            raise ValueError(
                "MatmulPrecision('bf16') needs a CPU with AMX: without it oneDNN's bf16 math mode is no faster (AVX512-"
                "BF16) or emulated several times slower (AVX2); leave it at 'ieee', or on an AVX512-BF16 CPU use "
                "trainer.precision=bf16-mixed (docs/performance.md)"
            )
        backend = torch.backends.cuda.matmul if cuda else torch.backends.mkldnn.matmul
        self._saved.append((backend, backend.fp32_precision))
        backend.fp32_precision = self.precision

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        while self._saved:
            backend, value = self._saved.pop()
            backend.fp32_precision = value
