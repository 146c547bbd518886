"""Dataset names, directories and the shipped fixtures.

A single-task env name such as ``cube-double-play-singletask-task3-v0`` reads the dataset files
``cube-double-play-v0.npz`` and ``cube-double-play-v0-val.npz`` (OGBench drops ``singletask`` and ``taskN``).
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from trqam_lit.data.errors import DatasetNotFoundError

DEFAULT_DATASET_DIR = "~/.ogbench/data"
DATASET_DIR_ENV = "TRQAM_DATA_DIR"
FIXTURE_SENTINEL = "fixture"

_TASK = re.compile(r"task\d+")


def dataset_name_for(env_name: str) -> str:
    """Dataset name of a single-task env name (``cube-double-play-singletask-task2-v0`` -> ``cube-double-play-v0``)."""
    parts = env_name.split("-")
    if "singletask" not in parts:
        return env_name
    pos = parts.index("singletask")
    return "-".join(parts[:pos] + parts[-1:])


def env_id_for(env_name: str) -> str:
    """Gymnasium id of a single-task env name, i.e. without the dataset type (what ogbench's relabelling expects)."""
    parts = env_name.split("-")
    if "singletask" not in parts:
        raise ValueError(
            f"{env_name!r} is not a single-task env name; rewards are relabelled for one fixed task, so use e.g. "
            f"'cube-double-play-singletask-task2-v0' ('-singletask-v0' alone means the domain's default task)"
        )
    pos = parts.index("singletask")
    if pos < 2:
        raise ValueError(f"{env_name!r} has no dataset type before 'singletask' (e.g. 'scene-play-singletask-v0')")
    return "-".join(parts[: pos - 1] + parts[pos:])


def fixture_dir() -> Path:
    """Directory of the tiny real datasets shipped inside the package."""
    return Path(__file__).resolve().parent / "fixtures"


def fixture_path(name: str) -> Path:
    """Shipped fixture for a dataset name or single-task env name (``puzzle-3x3-play-singletask-task1-v0`` works)."""
    path = fixture_dir() / f"{dataset_name_for(name)}.npz"
    if not path.is_file():
        shipped = sorted(p.stem for p in fixture_dir().glob("*.npz") if not p.stem.endswith("-val"))
        raise DatasetNotFoundError(f"no shipped fixture {path.name}; the package ships: {', '.join(shipped)}")
    return path


def resolve_dataset_dir(dataset_dir: str | os.PathLike | None = None) -> Path:
    """Directory to read datasets from: the argument, else $TRQAM_DATA_DIR, else ~/.ogbench/data.

    The sentinel ``"fixture"`` selects the fixtures shipped inside the package.
    """
    if dataset_dir is None or str(dataset_dir) == "":
        dataset_dir = os.environ.get(DATASET_DIR_ENV) or DEFAULT_DATASET_DIR
    if str(dataset_dir) == FIXTURE_SENTINEL:
        return fixture_dir()
    return Path(os.path.expandvars(str(dataset_dir))).expanduser()


def expected_files(env_name: str, dataset_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The train and ``-val`` files an env name reads from a dataset directory."""
    root = resolve_dataset_dir(dataset_dir)
    name = dataset_name_for(env_name)
    return root / f"{name}.npz", root / f"{name}-val.npz"


def missing_dataset_message(env_name: str, train: Path, val: Path | None, dataset_dir_flag: str | None) -> str:
    """The one error message for a missing dataset: the exact files and both ways to get them."""
    name = dataset_name_for(env_name)
    files = f"  {train}" + (f"\n  {val}" if val is not None else "")
    root = str(train.parent)
    domain_type = name.rsplit("-", 1)[0]
    locomotion = any(name.startswith(p) for p in ("antmaze", "humanoidmaze", "antsoccer", "pointmaze"))
    lines = [
        f"OGBench dataset for {env_name!r} not found; expected:",
        files,
        "Nothing is downloaded automatically. Either:",
        "  (1) copy the official files from a machine with internet, where",
        f"      python -c \"import ogbench; ogbench.download_datasets(['{name}'], dataset_dir='DIR')\"",
        f"      fetches {name}.npz and {name}-val.npz into DIR; put both under {root}",
        f"      (or point dataset_dir / ${DATASET_DIR_ENV} at where they are); or",
    ]
    if locomotion:
        lines.append(f"  (2) no local generator exists for {domain_type}: locomotion data needs the official files.")
    else:
        flag = f" --dataset-dir {shlex.quote(dataset_dir_flag)}" if dataset_dir_flag else ""
        lines += [
            "  (2) generate real data locally with OGBench's own oracles (see docs/data.md; not the released file):",
            f"      trqam-lit-data generate --env {name} --num-episodes 1000 --workers 2 --seed 0{flag}",
        ]
    return "\n".join(lines)
