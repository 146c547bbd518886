"""Action-chunk batches with discounted H-step returns (data.md section 4), vectorised over the batch.

Transition index space: ``t = 0 .. N-1`` are the regular-layout rows of ``ogbench.load_dataset`` (each
trajectory's last raw row dropped). The compact layout keeps every raw row; ``rows[t]`` maps transition ``t`` to
its storage row, and its next observation is the storage row after it, so both layouts give identical batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BATCH_KEYS = ("observations", "actions", "rewards", "masks", "valid", "next_observations")


@dataclass
class ChunkTable:
    """Processed transitions in the regular layout (``next_observations``) or the compact one (``rows``).

    Args:
        observations: (M, obs) float32 storage rows.
        actions: (M, act) float32, clipped.
        rewards: (M,) float32 single-task rewards (after ``sparse`` if requested).
        masks: (M,) float32, 0 only where the task is solved.
        terminals: (M,) float32, 1 on the last transition of each trajectory.
        next_observations: (M, obs) float32 in the regular layout, None in the compact one.
        rows: (N,) int64 transition -> storage row in the compact layout, None in the regular one.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    masks: np.ndarray
    terminals: np.ndarray
    next_observations: np.ndarray | None = None
    rows: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.next_observations is None) == (self.rows is None):
            raise ValueError("a ChunkTable needs exactly one of next_observations (regular) or rows (compact)")

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.observations)

    @property
    def compact(self) -> bool:
        """Whether the table uses the compact (all raw rows + index map) layout."""
        return self.rows is not None

    def sample(self, idx: np.ndarray, horizon: int, discount: float) -> dict[str, np.ndarray]:
        """Chunk batch for start transitions ``idx`` (see :func:`sample_chunks`)."""
        return sample_chunks(self, idx, horizon, discount)

    def to_regular(self, extra_rows: int = 0) -> ChunkTable:
        """Regular-layout copy with ``extra_rows`` uninitialised rows appended (room for online transitions)."""
        store = self.rows  # None: already regular, copy rows as they are
        n = len(self)

        def grow(src: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
            out = np.empty((n + extra_rows,) + src.shape[1:], dtype=src.dtype)
            if rows is None:
                out[:n] = src[:n]
            else:
                np.take(src, rows, axis=0, out=out[:n])
            return out

        if store is None:
            next_obs = grow(self.next_observations, None)
        else:
            next_obs = grow(self.observations, store + 1)
        return ChunkTable(
            observations=grow(self.observations, store),
            actions=grow(self.actions, store),
            rewards=grow(self.rewards, store),
            masks=grow(self.masks, store),
            terminals=grow(self.terminals, store),
            next_observations=next_obs,
        )


def sample_chunks(
    table: ChunkTable, idx: np.ndarray, horizon: int, discount: float, cut: int | None = None
) -> dict[str, np.ndarray]:
    """Batch of H-step chunks starting at transitions ``idx`` (B,), each in ``[0, len(table) - horizon]``.

    Returns float32 arrays: ``observations`` (B, obs) = s, ``actions`` (B, H*act) row-major, ``rewards`` (B,) =
    R_H, ``masks`` (B,) = m_H, ``valid`` (B,) = valid_H, ``next_observations`` (B, obs) = s'. ``cut`` is a
    transition index treated as a trajectory end (the replay buffer's write head once it wraps).
    """
    idx = np.asarray(idx, dtype=np.int64)
    batch = idx.shape[0]
    steps = idx[:, None] + np.arange(horizon, dtype=np.int64)  # (B, H) transition indices
    store = steps if table.rows is None else table.rows[steps]  # (B, H) storage rows

    ended = table.terminals[store[:, :-1]] > 0
    if cut is not None:
        ended |= steps[:, :-1] == cut
    # valid_j = prod_{k<j} (1 - terminal_k): once the trajectory ended the rest of the chunk is invalid.
    valid = np.ones((batch, horizon), dtype=np.float32)
    valid[:, 1:] = np.cumprod(~ended, axis=1)

    gammas = discount ** np.arange(horizon, dtype=np.float64)
    rewards = (table.rewards[store].astype(np.float64) * valid) @ gammas
    masks = np.where(valid > 0, table.masks[store], np.float32(1.0)).min(axis=1)

    last = store[np.arange(batch), valid.sum(axis=1).astype(np.int64) - 1]  # storage row of the last valid step
    if table.rows is None:
        next_obs = table.next_observations[last]
    else:
        next_obs = table.observations[last + 1]

    return {
        "observations": table.observations[store[:, 0]],
        "actions": table.actions[store].reshape(batch, -1),
        "rewards": rewards.astype(np.float32),
        "masks": masks.astype(np.float32, copy=False),
        "valid": valid[:, -1].copy(),
        "next_observations": next_obs,
    }
