"""A DataModule's side of the online phase (``training.online.OnlineData``), written once for every domain.

A domain's DataModule inherits :class:`OnlineDataModule` and supplies three things: ``make_online_env()`` (a fresh
environment), ``_new_replay_buffer(capacity_extra)`` (the buffer over its offline data) and ``_draw_deferred(step)``
(the batch of a global step whose drawing was deferred). The buffer's lifetime, its checkpoint entry (each rank's
online transitions) and the deferred-batch hand-off are here.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from trqam_lit.data.replay import DEFERRED_KEY, ReplayBuffer, is_deferred, rank_states, state_for_rank


class OnlineDataModule(pl.LightningDataModule):
    """Base of the DataModules that take part in the online phase (OGBench, the toy bandit)."""

    def __init__(self) -> None:
        super().__init__()
        self.replay_buffer: ReplayBuffer | None = None
        self._pending_buffer_state: dict[str, Any] | None = None

    # ---- what a domain supplies ------------------------------------------------------------------------------
    def make_online_env(self) -> Any:
        """A fresh environment for online interaction (never one used for relabelling or evaluation)."""
        raise NotImplementedError

    def defer_sampling_from(self, step: int) -> None:
        """Batches of global steps >= ``step`` are drawn in :meth:`on_before_batch_transfer`, i.e. after the
        environment steps that precede their gradient step (Lightning fetches one batch ahead)."""
        raise NotImplementedError

    def _new_replay_buffer(self, capacity_extra: int) -> ReplayBuffer:
        """A replay buffer over the offline data with room for ``capacity_extra`` online transitions."""
        raise NotImplementedError

    def _draw_deferred(self, step: int) -> dict[str, Any]:
        """The batch of global step ``step``, drawn now (from the replay buffer once it exists)."""
        raise NotImplementedError

    # ---- written once ----------------------------------------------------------------------------------------
    def make_replay_buffer(self, capacity_extra: int) -> ReplayBuffer:
        """Start the online phase: the buffer batches come from from now on (created once; a checkpoint's online
        transitions restored into it)."""
        if self.replay_buffer is None:
            buffer = self._new_replay_buffer(capacity_extra)
            if self._pending_buffer_state is not None:
                buffer.load_state_dict(self._pending_buffer_state)
                self._pending_buffer_state = None
            self.replay_buffer = buffer
        return self.replay_buffer

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self._draw_deferred(int(batch[DEFERRED_KEY])) if is_deferred(batch) else batch

    def state_dict(self) -> dict[str, Any]:
        """Online transitions of each rank's replay buffer, if the online phase started (offline rows come from
        the data). Under DDP every rank must call it (Lightning does, when it saves a checkpoint)."""
        return rank_states(self.replay_buffer, getattr(self, "trainer", None))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore this rank's online transitions now, or when :meth:`make_replay_buffer` creates the buffer."""
        state = state_for_rank(state_dict, getattr(self, "trainer", None))
        if state is None:
            return
        if self.replay_buffer is not None:
            self.replay_buffer.load_state_dict(state)
        else:
            self._pending_buffer_state = state
