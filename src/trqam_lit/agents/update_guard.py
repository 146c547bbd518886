"""The update guard of every agent: the step's losses checked for NaN/inf with one all-reduce, the skip or abort of a
non-finite step, the polyak targets, the one global gradient clip, and the hand-off of an applied update's path-KL
estimate to ``after_update`` (TRQAM's dual step) through the ``AppliedUpdate`` callback.

Lightning runs, within one optimizer step: training_step, backward (DDP all-reduces the gradients), AMP unscale,
on_before_optimizer_step, configure_gradient_clipping, optimizer.step; then on_train_batch_end (callbacks first, in
order: ``AppliedUpdate``, then ModelCheckpoint; the module's own hook last).
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import torch
from torch import Tensor

from trqam_lit.math.targets import polyak_update


class AppliedUpdate(pl.Callback):
    """Calls ``pl_module.after_update(kl)`` in ``on_train_batch_end`` after each applied update of an agent with a
    path-KL estimate, and logs what it returns.

    Lightning runs every callback's ``on_train_batch_end`` after the optimizer step and before the module's, and
    keeps ``ModelCheckpoint`` last, so a checkpoint of step k holds what ``after_update`` changed at step k (TRQAM's
    lambda and KL average). The KL is the rank-averaged estimate of an update that was applied (none after a
    skipped, non-finite step), so what it moves stays identical on every rank.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        kl = pl_module.take_update_kl()
        if kl is not None:
            pl_module.log_step(pl_module.after_update(kl), prog_bar=["dual/kl_ema", "dual/lambda"])


class UpdateGuard:
    """Mixin of :class:`~trqam_lit.agents.base.FlowAgent` (a LightningModule): its optimizer-step hooks."""

    def init_update_guard(self) -> None:
        self.grad_norm = torch.zeros(())
        self.register_buffer("nonfinite_steps", torch.tensor(0, dtype=torch.int64))  # skipped steps in all
        self.register_buffer("nonfinite_run", torch.tensor(0, dtype=torch.int64))  # ... in a row, up to now
        self._step_values: dict[str, Tensor] = {}  # this rank's losses and KL of the current step
        self._update_kl: Tensor | None = None  # rank-averaged KL of an update that was applied

    def record(self, **values: Tensor) -> None:
        """Keep this step's losses and path-KL estimate (``kl``) for the finiteness check before the optimizer step."""
        self._step_values.update({k: v.detach() for k, v in values.items()})

    def after_update(self, kl: Tensor) -> dict[str, Tensor]:
        """Called once per applied update of an agent that records a path-KL estimate ``kl`` (rank-averaged), after
        the optimizer step and before checkpoints; returns the scalars to log. Here: ``dual/kl``."""
        return {"dual/kl": kl}

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        values = self._step_values
        self._step_values = {}
        reduced: dict[str, Tensor] = {}
        if names := sorted(values):
            # One all-reduce: a NaN on any rank makes the mean NaN, so every rank takes the same decision.
            means = self.trainer.strategy.reduce(torch.stack([values[k].float() for k in names]), reduce_op="mean")
            reduced = dict(zip(names, means, strict=True))
        if not bool(torch.isfinite(torch.stack([self.grad_norm.float(), *reduced.values()])).all()):
            self._skip_update(optimizer, values, reduced)
            return
        self.nonfinite_run.zero_()
        self._update_kl = reduced.get("kl")
        # Targets mix the PRE-step online weights (the reference's one-step lag), so update them here.
        if not self.in_bc_warmup:
            for target, online in self.target_pairs():
                polyak_update(target, online, self.hparams.tau)

    def _skip_update(self, optimizer, local: dict[str, Tensor], reduced: dict[str, Tensor]) -> None:
        """No weight, Adam, target or dual update for this step (Adam skips parameters without a gradient)."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self._update_kl = None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and all(bool(torch.isfinite(v)) for v in reduced.values()):
            return  # fp16: an overflow of the scaled gradients; the GradScaler lowers its scale and skips the step
        self.nonfinite_steps += 1
        self.nonfinite_run += 1
        bad = [k for k, v in local.items() if not bool(torch.isfinite(v))]
        if bad:
            what = ", ".join(bad) + " on this rank"
        else:
            what = (
                "gradient norm" if all(bool(torch.isfinite(v)) for v in reduced.values()) else "value on another rank"
            )
        warnings.warn(
            f"step {self.global_step}: non-finite {what}; the update was skipped ({int(self.nonfinite_run)} in a row)",
            stacklevel=2,
        )
        if int(self.nonfinite_run) >= self.hparams.max_nonfinite_steps:
            raise FloatingPointError(
                f"{int(self.nonfinite_run)} consecutive steps with a non-finite value (last: {what}, global step "
                f"{self.global_step}); no weight, target or lambda was changed by them. Check the data for NaN/inf "
                "rows, lower model.init_args.lr or set model.init_args.grad_clip_norm, use precision 32 instead of "
                "16-mixed, or resume from the last checkpoint with another seed; "
                "model.init_args.max_nonfinite_steps sets how many skipped steps in a row are tolerated"
            )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # One global clip over every trained parameter with the norm computed above (grads already all-reduced).
        if gradient_clip_val is not None:
            raise ValueError(
                "trainer.gradient_clip_val is not used by trqam-lit agents: set model.init_args.grad_clip_norm "
                "(one global norm clip over all trained parameters; its default is the agent's reference's)"
            )
        if self.hparams.grad_clip_norm is None:  # agents whose reference has no clip (FQL)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if params:
            torch.nn.utils.clip_grads_with_norm_(params, self.hparams.grad_clip_norm, self.grad_norm)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.log_step({"train/grad_norm": self.grad_norm, "train/nonfinite_steps": self.nonfinite_steps.float()})

    def take_update_kl(self) -> Tensor | None:
        """The rank-averaged path-KL estimate of the update just applied (None: no AM loss, or a skipped step)."""
        kl, self._update_kl = self._update_kl, None
        return kl

    def configure_callbacks(self) -> list[pl.Callback]:
        return [AppliedUpdate()]
