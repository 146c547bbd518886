"""Load an OGBench dataset file with ogbench's own loader and relabelling, checking it first.

Pipeline (data.md section 2): existence and format checks -> ``ogbench.load_dataset(..., add_info=True)`` ->
``ogbench.relabel_utils.relabel_dataset`` -> clip actions to +-(1 - 1e-5) -> optional ``sparse`` rewards.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from trqam_lit.data.chunks import ChunkTable
from trqam_lit.data.errors import DatasetFormatError, DatasetNotFoundError
from trqam_lit.data.ogbench_env import env_spaces, make_env, quiet_box_warning
from trqam_lit.data.paths import env_id_for

# Dataset actions are clipped to this bound (as OGBench and the reference do); the policy clip is flow.ACTION_CLIP.
DATASET_ACTION_LIMIT = 1.0 - 1e-5
REQUIRED_KEYS = ("observations", "actions", "terminals", "qpos", "qvel")


def needs_button_states(env_name: str) -> bool:
    """Whether ogbench's relabelling of this domain reads ``button_states`` (scene and puzzle)."""
    return "scene" in env_name or "puzzle" in env_name


def inspect_npz(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of the arrays in an ``.npz`` from their headers, without decompressing the data."""
    header_readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    continue
                with zf.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    if version not in header_readers:
                        raise ValueError(f"unsupported .npy format version {version}")
                    shape, _, dtype = header_readers[version](f)
                out[member[: -len(".npy")]] = (tuple(shape), np.dtype(dtype))
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError) as e:
        raise DatasetFormatError(_damaged(path, e)) from e
    return out


def _damaged(path: str | os.PathLike, err: BaseException) -> str:
    return (
        f"{path} is not a readable OGBench .npz ({type(err).__name__}: {err}); it is probably truncated or damaged "
        f"(an interrupted copy?). Delete it and copy or generate it again."
    )


def check_dataset_file(path: str | os.PathLike, env_name: str) -> int:
    """Check an OGBench file against the env it is meant for; returns its raw row count.

    Raises:
        DatasetNotFoundError: the file does not exist.
        DatasetFormatError: missing keys, inconsistent lengths, wrong observation/action dimension, or damage.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"OGBench dataset file not found: {path}")
    arrays = inspect_npz(path)
    required = REQUIRED_KEYS + (("button_states",) if needs_button_states(env_name) else ())
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DatasetFormatError(
            f"{path} lacks {missing} (has {sorted(arrays)}); OGBench files for {env_name} need {list(required)}. "
            f"Is it a file from another benchmark, or a goal-conditioned file without qpos?"
        )
    n = arrays["observations"][0][0] if arrays["observations"][0] else 0
    bad = [k for k in required if not arrays[k][0] or arrays[k][0][0] != n]
    if bad or n < 2:
        raise DatasetFormatError(f"{path}: arrays {bad or required} do not all have the same >= 2 rows ({n})")
    obs_dim, action_dim = env_spaces(env_name)
    got_obs = arrays["observations"][0][1:]
    got_act = arrays["actions"][0][1:]
    if got_obs != (obs_dim,) or got_act != (action_dim,):
        raise DatasetFormatError(
            f"{path} holds observations {got_obs} and actions {got_act}, but {env_name} has observations "
            f"({obs_dim},) and actions ({action_dim},): the file belongs to another environment or domain"
        )
    return int(n)


def decompress_npz(path: str | os.PathLike) -> io.BytesIO:
    """The ``.npz`` at ``path`` decompressed into memory, as an uncompressed archive that ``np.load`` reads.

    The slow part of reading a compressed file (disk and zlib), done with ``zipfile`` alone: nothing here parses
    an ``.npy`` header, so no ``ast`` call. That makes it safe in a background thread (the shard prefetcher) on
    CPython 3.11.0-3.11.7 and 3.12.0-3.12.1, where two threads building ASTs at once can make one of them raise
    ``SystemError: AST constructor recursion depth mismatch`` (gh-106905), and ``np.load`` parses every header
    with ``ast.literal_eval``.

    Raises:
        DatasetNotFoundError: no file at ``path``.
        DatasetFormatError: the file is not a readable archive.
    """
    if not Path(path).is_file():
        raise DatasetNotFoundError(f"OGBench dataset file not found: {path}")
    out = io.BytesIO()
    try:
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
            for name in src.namelist():
                dst.writestr(name, src.read(name))
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        raise DatasetFormatError(_damaged(path, e)) from e
    out.seek(0)
    return out


def read_dataset(
    path: str | os.PathLike, env_name: str, *, compact: bool = False, data: io.BytesIO | None = None
) -> dict[str, np.ndarray]:
    """Check a file and read it with ``ogbench.load_dataset(..., add_info=True)``.

    Args:
        path: the ``.npz``; its headers are checked against ``env_name``.
        env_name: single-task env name.
        compact: the compact layout (``valids`` instead of ``next_observations``).
        data: the file's content from :func:`decompress_npz`, read instead of the file (the shard prefetcher
            decompresses in the background and calls this in the sampling thread: it parses ``.npy`` headers).
    """
    import ogbench

    check_dataset_file(path, env_name)
    source = path if data is None else data
    try:
        with np.load(source) as f:
            raw_terminals = f["terminals"]
        if not raw_terminals[-1]:
            raise DatasetFormatError(f"{path}: the last row is not a trajectory end (terminals[-1] == 0); truncated?")
        if data is not None:
            data.seek(0)
        ds = ogbench.load_dataset(str(path) if data is None else data, compact_dataset=compact, add_info=True)
    except DatasetFormatError:
        raise
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError) as e:
        raise DatasetFormatError(_damaged(path, e)) from e
    if not np.isfinite(ds["observations"]).all() or not np.isfinite(ds["actions"]).all():
        raise DatasetFormatError(f"{path} contains NaN or infinite observations or actions")
    return ds


def process_dataset(
    ds: dict[str, np.ndarray], env_name: str, *, sparse: bool = False, source: str = "dataset"
) -> ChunkTable:
    """Relabel with ogbench's own function, clip actions, apply ``sparse``; keeps the layout of ``ds``.
    ``source`` names the file in errors."""
    from ogbench.relabel_utils import relabel_dataset

    try:
        with quiet_box_warning():  # relabelling resets the env, which samples from a freshly built action space
            relabel_dataset(env_id_for(env_name), make_env(env_name), ds)
    except (IndexError, ValueError) as e:
        raise DatasetFormatError(f"{source}: ogbench could not relabel it for {env_name} ({e})") from e

    actions = np.clip(ds["actions"], -DATASET_ACTION_LIMIT, DATASET_ACTION_LIMIT).astype(np.float32, copy=False)
    rewards = ds["rewards"].astype(np.float32)
    if sparse:
        rewards = -(rewards != 0).astype(np.float32)
    common = dict(
        observations=ds["observations"],
        actions=actions,
        rewards=rewards,
        masks=ds["masks"].astype(np.float32),
        terminals=ds["terminals"].astype(np.float32),
    )
    if "valids" in ds:
        return ChunkTable(**common, rows=np.flatnonzero(ds["valids"] > 0).astype(np.int64))
    return ChunkTable(**common, next_observations=ds["next_observations"])


def load_table(path: str | os.PathLike, env_name: str, *, compact: bool = False, sparse: bool = False) -> ChunkTable:
    """Load, relabel and post-process one OGBench file into a :class:`ChunkTable`.

    Args:
        path: the ``.npz`` file (official or generated by ``trqam-lit-data generate``).
        env_name: single-task env name, e.g. ``cube-double-play-singletask-task2-v0``.
        compact: keep every raw row plus an index map instead of materialising ``next_observations``.
        sparse: replace rewards by ``-1 * (reward != 0)``.
    """
    return process_dataset(read_dataset(path, env_name, compact=compact), env_name, sparse=sparse, source=str(path))
