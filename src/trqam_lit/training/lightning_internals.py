"""Every use of a private Lightning attribute, in one place, each behind a function that says what it asks.

Lightning has no public API for these three questions. The package pins Lightning's minor version
(pyproject.toml), and ``tests/test_lightning_internals.py`` checks each answer against what a real Trainer then
does, so a release that moves an attribute fails that test instead of silently changing log throttling, checkpoint
order or the online phase's log steps.
"""

from __future__ import annotations

import lightning.pytorch as pl


def logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning's loggers write the scalars logged during the current training step (every
    ``log_every_n_steps`` steps, and when the run stops)."""
    return bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs


def validates_after_this_batch(trainer: pl.Trainer) -> bool:
    """Whether Lightning's loop runs the validation right after the current training batch (its own predicate)."""
    if not trainer.enable_validation:
        return False
    fit_loop = trainer.fit_loop
    return bool(fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher))


def logged_step(trainer: pl.Trainer) -> int:
    """The x value Lightning gives its own scalars at this point (after update g it is g - 1 for train/* and
    eval/*), so scalars logged by hand line up with them."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))
