"""Replay buffer for the online phase (data.md section 5): offline data first, online transitions after it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trqam_lit.data.chunks import ChunkTable, sample_chunks
from trqam_lit.data.loading import DATASET_ACTION_LIMIT
from trqam_lit.training.ranks import gather_from_ranks
from trqam_lit.training.rewards import training_reward

_ONLINE_KEYS = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")
DEFERRED_KEY = "deferred_step"


def deferred_batch(step: int) -> dict[str, torch.Tensor]:
    """Placeholder a batch stream yields for global step ``step`` when the batch must be drawn later.

    Lightning fetches one batch ahead, so a batch drawn by the stream in the online phase would miss the
    transitions of the environment steps that precede its gradient step. The DataModule replaces the placeholder
    in ``on_before_batch_transfer``, which runs after them.
    """
    return {DEFERRED_KEY: torch.tensor(step, dtype=torch.int64)}


def is_deferred(batch: Any) -> bool:
    """Whether ``batch`` is a :func:`deferred_batch` placeholder."""
    return isinstance(batch, dict) and DEFERRED_KEY in batch


def draw_batch(
    source: Any, rng: np.random.Generator, batch_size: int, horizon: int, discount: float
) -> dict[str, torch.Tensor]:
    """Chunk batch with start indices uniform over ``[0, len(source) - horizon]`` (every transition stored)."""
    high = len(source) - horizon + 1
    if high < 1:
        raise ValueError(f"{len(source)} transitions cannot hold a chunk of horizon {horizon}")
    idx = rng.integers(0, high, size=batch_size)
    return {k: torch.from_numpy(v) for k, v in source.sample(idx, horizon, discount).items()}


def rank_states(buffer: ReplayBuffer | None, trainer: Any = None) -> dict[str, Any]:
    """DataModule checkpoint entry: each rank's online transitions (under DDP every rank has its own buffer)."""
    if buffer is None:
        return {}
    return {"replay_buffer": {"ranks": gather_from_ranks(buffer.state_dict(), trainer)}}


def state_for_rank(state_dict: dict[str, Any], trainer: Any = None) -> dict[str, Any] | None:
    """This rank's buffer state from a :func:`rank_states` entry (None when the checkpoint holds no buffer)."""
    entry = state_dict.get("replay_buffer") if isinstance(state_dict, dict) else None
    if entry is None:
        return None
    if "ranks" not in entry:  # a single buffer (saved without a Trainer)
        entry = {"ranks": [entry]}
    world = 1 if trainer is None else int(trainer.world_size)
    rank = 0 if trainer is None else int(trainer.global_rank)
    if len(entry["ranks"]) != world:
        raise ValueError(
            f"the checkpoint holds the online replay buffers of {len(entry['ranks'])} rank(s) but this run has "
            f"{world}: resume the online phase with the same number of devices"
        )
    return entry["ranks"][rank]


def batch_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """Generator of the batch of one global step: a pure function of seed, rank and step, so a resumed run draws
    the batches of an uninterrupted one, deferred (online) or not."""
    return np.random.default_rng([seed, rank, step, 1])


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
        reward_offset: added to each added transition's reward first, as the domain's offline rewards were shifted
            (Robomimic: -1, the reference's ``r - 1``).
    """

    def __init__(
        self, offline: ChunkTable, capacity_extra: int, sparse: bool = False, reward_offset: float = 0.0
    ) -> None:
        if capacity_extra < 1:
            raise ValueError(f"capacity_extra must be >= 1, got {capacity_extra}")
        self.offline_size = len(offline)
        self.capacity_extra = int(capacity_extra)
        self.sparse, self.reward_offset = sparse, float(reward_offset)
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
        t.actions[row] = np.clip(action, -DATASET_ACTION_LIMIT, DATASET_ACTION_LIMIT)
        t.rewards[row] = training_reward(reward, self.reward_offset, self.sparse)
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
        """Online transitions only, oldest first (tensors, so ``torch.load(weights_only=True)`` accepts them),
        exactly as stored: the online phase replays the episode in progress on resume, so it continues."""
        start = self._head if self._online == self.capacity_extra else 0
        rows = self.offline_size + (start + np.arange(self._online)) % self.capacity_extra
        online = {k: torch.from_numpy(getattr(self._table, k)[rows]) for k in _ONLINE_KEYS}
        return {"offline_size": self.offline_size, "online": online}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the online part saved by :meth:`state_dict` on top of the reloaded offline data.

        Raises:
            ValueError: the state is damaged (missing keys, ragged arrays) or belongs to other data (offline size,
                observation or action dimension).
        """
        online = state.get("online") if isinstance(state, dict) else None
        if not isinstance(online, dict) or "offline_size" not in state or set(_ONLINE_KEYS) - set(online):
            got = sorted(online) if isinstance(online, dict) else sorted(state) if isinstance(state, dict) else state
            raise ValueError(
                f"replay buffer state is damaged: expected offline_size and online {list(_ONLINE_KEYS)}, got {got}"
            )
        if state["offline_size"] != self.offline_size:
            raise ValueError(
                f"replay buffer state was saved over {state['offline_size']} offline transitions but "
                f"{self.offline_size} are loaded now: a different dataset file?"
            )
        n = len(online["rewards"])
        for k in _ONLINE_KEYS:
            want = (n,) + getattr(self._table, k).shape[1:]
            if tuple(online[k].shape) != want:
                raise ValueError(
                    f"replay buffer state: online {k} has shape {tuple(online[k].shape)}, expected {want} "
                    "(another environment, or a damaged checkpoint)"
                )
        if n > self.capacity_extra:
            raise ValueError(f"the state holds {n} online transitions, more than capacity_extra={self.capacity_extra}")
        for k in _ONLINE_KEYS:
            getattr(self._table, k)[self.offline_size : self.offline_size + n] = online[k].numpy()
        self._online = n
        self._head = n % self.capacity_extra
