"""One way to write a file so that it is never seen half-written: checkpoints, generated datasets, exported policies.

Imports nothing beyond the standard library: the dataset generator's worker processes start without torch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write the file to; when the block ends, the file is flushed to
    disk, renamed over ``path`` and the directory entry flushed too.

    A rename within one directory is atomic on POSIX filesystems, so ``path`` is always either its previous complete
    content or the new complete one, whatever moment a SIGKILL strikes; the flushes keep that true across a power cut
    (without them, a rename can reach the disk before the data it names, leaving an empty file after a reboot). On an
    exception (KeyboardInterrupt included) the temporary file is removed and ``path`` is untouched.

    Args:
        path: the file's final name.
        suffix: appended to the temporary name (``<name>.partial-<pid><suffix>``; the process id keeps two writers
            of one file apart), for writers that want an extension.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}{suffix}")
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def fsync(path: Path) -> None:
    """Flush a file's data (or a directory's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
