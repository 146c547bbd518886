"""Collecting a value from every DDP rank (checkpoint entries, online episodes)."""

from __future__ import annotations

from typing import Any

import torch


def gather_from_ranks(obj: Any, trainer: Any = None) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group). Every rank must call it."""
    world = 1 if trainer is None else int(trainer.world_size)
    if world <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out
