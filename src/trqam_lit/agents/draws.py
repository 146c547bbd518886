"""The random draws of a training step: every one goes through ``draw`` (by name, so tests feed recorded draws), from
a generator seeded by (seed, rank, global step) (training.rng): a resumed run repeats an uninterrupted one's draws,
and every DDP rank draws its own."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from trqam_lit.training.rng import TRAIN_NOISE, fold_seed

DrawSource = Callable[[str, tuple[int, ...], bool], Tensor]


class RandomStreams:
    """Mixin of :class:`~trqam_lit.agents.base.FlowAgent` (a LightningModule): the seed buffer and the step's draws.

    Attributes:
        draw_source: ``None`` (the default): ``draw`` takes every draw from the seeded generator. Set to a callable
            ``(name, shape, uniform) -> Tensor``, it hands out every draw instead (tests feed recorded draws this way,
            on the real agent class); it is not saved in checkpoints.
    """

    draw_source: DrawSource | None

    def init_random_streams(self) -> None:
        # Seed of every random stream of the run (set from seed_everything at the start of a fit, then restored from
        # checkpoints): a step's draws are a pure function of (seed, rank, global step), see trqam_lit.training.rng.
        self.register_buffer("rng_seed", torch.tensor(-1, dtype=torch.int64))
        self._gen: torch.Generator | None = None
        self._gen_step = -1
        self.draw_source = None

    def seed_of(self, purpose: int, step: int | None = None) -> int:
        """Seed of this rank's stream ``purpose`` (training.rng) at a global step (default: the current one)."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return fold_seed(max(int(self.rng_seed), 0), rank, self.global_step if step is None else step, purpose)

    def draw(self, name: str, *shape: int, uniform: bool = False) -> Tensor:
        """Every random draw of a training step goes through here (tests feed recorded draws by name).

        Names: ``bc/x0``, ``bc/t`` (uniform), ``critic/next_noise``, ``am/x0``, ``am/eps``, ``actor/noise`` (the
        one-step policy's z). Draws come from ``draw_source(name, shape, uniform)`` when it is set; otherwise, in this
        order, from a generator seeded with (seed, rank, global step): a resumed run repeats an uninterrupted one's
        draws, and every DDP rank draws its own.
        """
        if self.draw_source is not None:
            return self.draw_source(name, tuple(shape), uniform)
        if self._gen is None or self._gen.device != self.device:
            self._gen = torch.Generator(device=self.device)
            self._gen_step = -1
        if self._gen_step != self.global_step:
            self._gen.manual_seed(self.seed_of(TRAIN_NOISE))
            self._gen_step = self.global_step
        fn = torch.rand if uniform else torch.randn
        return fn(*shape, device=self.device, dtype=torch.float32, generator=self._gen)
