"""Per-step scalars handed to Lightning only on the steps its loggers write."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor

from trqam_lit.training.lightning_internals import logs_this_step


class StepLogging:
    """Mixin of :class:`~trqam_lit.agents.base.FlowAgent` (a LightningModule).

    Each agent class names the per-step scalars it adds to its parents' in ``scalars``; ``logged_scalars()`` is
    the whole set a fine-tuning step logs (tests check it against a real run's event file).
    """

    label: ClassVar[str] = ""  # the agent's name in the paper's tables
    scalars: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def logged_scalars(cls) -> tuple[str, ...]:
        """Every per-step scalar a fine-tuning step logs (after any BC warm-up), sorted."""
        return tuple(sorted({name for c in cls.__mro__ for name in vars(c).get("scalars", ())}))

    @property
    def logging_this_step(self) -> bool:
        """Whether Lightning writes this step's scalars (every ``trainer.log_every_n_steps`` steps).

        Each ``self.log`` costs about 1 ms of Lightning bookkeeping (a fifth of a small step on CPU), so per-step
        scalars are computed and handed to Lightning only on the steps its loggers write; the progress bar shows
        them at that rate too.
        """
        return self._trainer is not None and logs_this_step(self.trainer)

    def log_step(self, values: dict[str, Tensor], prog_bar: Sequence[str] = ()) -> None:
        """Log per-step scalars (on a logging step; see :attr:`logging_this_step`)."""
        if self.logging_this_step:
            for name, value in values.items():
                self.log(name, value, on_step=True, on_epoch=False, prog_bar=name in prog_bar)
