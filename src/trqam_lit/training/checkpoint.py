"""Checkpoint files: written atomically (a run killed while saving leaves the previous file intact), and checked
before loading (a damaged or foreign file stops with a message naming it, not a pickle traceback)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from trqam_lit.training.atomic import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint writer, made atomic (``training.atomic.atomic_write``): ``<name>.partial-<pid>``
    is written, flushed and renamed over ``<name>``, so ``last.ckpt`` is always a complete checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        with atomic_write(path) as partial:
            super().save_checkpoint(checkpoint, partial, storage_options)


def check_checkpoint_file(path: str | Path | None, lightning: bool = False) -> None:
    """Fail with the path, before Lightning loads it, on a checkpoint that is missing, truncated or not a
    checkpoint at all (torch's own error for a truncated file is ``OSError: [Errno 22] Invalid argument``)."""
    if path is None or str(path) in ("last", "best", "hpc", "registry") or "://" in str(path):
        return  # resolved by Lightning itself
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            pickles = [name for name in zf.namelist() if name.endswith("data.pkl")]
            if not pickles:
                raise zipfile.BadZipFile("no data.pkl inside")
            # the pickle holds the dict's keys (tensors are stored beside it), so this reads a few kB at most
            if lightning and b"pytorch-lightning_version" not in zf.read(pickles[0]):
                raise zipfile.BadZipFile("a torch file, but not one saved by Lightning")
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(
            f"checkpoint {path} is damaged or not a Lightning checkpoint ({err}); a truncated copy, or a run killed "
            "while writing it? Use the checkpoint saved before it (checkpoints/*step=*.ckpt)"
        ) from None
