"""The reward an agent trains on, from an environment's reward: the one transformation the offline data, the online
replay buffer and the evaluator's discounted return share."""

from __future__ import annotations


def training_reward(reward: float, offset: float = 0.0, sparse: bool = False) -> float:
    """``reward + offset`` (Robomimic: -1, the reference's ``r - 1``), then, if ``sparse``, ``-1 * (reward != 0)``
    (QAM's setting on scene and puzzle), in the reference's order."""
    reward = float(reward) + offset
    return -float(reward != 0) if sparse else reward
