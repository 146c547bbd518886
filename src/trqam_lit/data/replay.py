"""Replay buffer for the online phase (data.md section 5): offline data first, online transitions after it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trqam_lit.data.chunks import ChunkTable, sample_chunks
from trqam_lit.data.loading import ACTION_CLIP

_ONLINE_KEYS = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")


class ReplayBuffer:
    """The whole processed offline dataset plus room for ``capacity_extra`` online transitions.

    Sampling is uniform over every stored transition and yields the same chunk batches as the offline
    DataModule. Offline rows are never evicted: once the online part is full, the oldest ONLINE transitions
    are overwritten, and chunks never run across the write head. ``state_dict`` holds the online part only;
    the offline rows are reloaded from the dataset file.

    Args:
        offline: processed offline transitions (either layout; stored in the regular layout here).
        capacity_extra: number of online transitions to keep room for.
        sparse: apply ``reward <- -1 * (reward != 0)`` to added transitions, as for the offline data.
    """

    def __init__(self, offline: ChunkTable, capacity_extra: int, sparse: bool = False) -> None:
        if capacity_extra < 1:
            raise ValueError(f"capacity_extra must be >= 1, got {capacity_extra}")
        self.offline_size = len(offline)
        self.capacity_extra = int(capacity_extra)
        self.sparse = sparse
        self._table = offline.to_regular(extra_rows=self.capacity_extra)
        self._online = 0  # online transitions stored (<= capacity_extra)
        self._head = 0  # next online slot to write

    def __len__(self) -> int:
        return self.offline_size + self._online

    @property
    def online_size(self) -> int:
        """Number of online transitions currently stored."""
        return self._online

    def add(
        self,
        observation: np.ndarray,
        action: np.ndarray,
        reward: float,
        terminal: bool,
        mask: float,
        next_observation: np.ndarray,
    ) -> None:
        """Store one environment step; ``terminal`` marks the episode end (terminated or truncated) and
        ``mask`` is 0 only when the task was solved (``1 - terminated``)."""
        row = self.offline_size + self._head
        t = self._table
        t.observations[row] = observation
        t.actions[row] = np.clip(action, -ACTION_CLIP, ACTION_CLIP)
        t.rewards[row] = -float(reward != 0) if self.sparse else reward
        t.masks[row] = mask
        t.terminals[row] = float(terminal)
        t.next_observations[row] = next_observation
        self._head = (self._head + 1) % self.capacity_extra
        self._online = min(self._online + 1, self.capacity_extra)

    def sample(self, idx: np.ndarray, horizon: int, discount: float) -> dict[str, np.ndarray]:
        """Chunk batch for start transitions ``idx`` in ``[0, len(self) - horizon]``."""
        wrapped = self._online == self.capacity_extra and self._head != 0
        # After wrapping, the newest row sits right before the oldest one: no chunk may continue across it.
        cut = self.offline_size + self._head - 1 if wrapped else None
        return sample_chunks(self._table, idx, horizon, discount, cut=cut)

    def state_dict(self) -> dict[str, Any]:
        """Online transitions only, oldest first (tensors, so ``torch.load(weights_only=True)`` accepts them)."""
        start = self._head if self._online == self.capacity_extra else 0
        rows = self.offline_size + (start + np.arange(self._online)) % self.capacity_extra
        return {
            "offline_size": self.offline_size,
            "online": {k: torch.from_numpy(getattr(self._table, k)[rows]) for k in _ONLINE_KEYS},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the online part saved by :meth:`state_dict` on top of the reloaded offline data."""
        if state["offline_size"] != self.offline_size:
            raise ValueError(
                f"replay buffer state was saved over {state['offline_size']} offline transitions but "
                f"{self.offline_size} are loaded now: a different dataset file?"
            )
        n = len(state["online"]["rewards"])
        if n > self.capacity_extra:
            raise ValueError(f"the state holds {n} online transitions, more than capacity_extra={self.capacity_extra}")
        for k in _ONLINE_KEYS:
            getattr(self._table, k)[self.offline_size : self.offline_size + n] = state["online"][k].numpy()
        self._online = n
        self._head = n % self.capacity_extra
