"""Counter-based random streams: every draw of a run is a pure function of (seed, rank, step, purpose).

As JAX's ``fold_in``: a training step's noise, a batch of data, an evaluation's acting noise are each drawn
from a generator seeded with a hash of the integers that identify them. So a resumed run continues with exactly
the draws of an uninterrupted one (nothing to save in the checkpoint), and each DDP rank draws its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

# Purposes: the last integer folded into a seed, so two streams of the same (seed, rank, step) never coincide.
TRAIN_NOISE, DATA, EVAL_NOISE, ONLINE_RESET, ONLINE_ACT = 0, 1, 2, 3, 4


def fold_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the integers ``parts`` (numpy's SeedSequence hash)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def numpy_rng(*parts: int) -> np.random.Generator:
    """A numpy generator of the stream identified by ``parts``."""
    return np.random.default_rng([int(p) for p in parts])


@contextlib.contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the CPU generator and ``device``'s for the block, then restore both (the caller's stream is untouched)."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
