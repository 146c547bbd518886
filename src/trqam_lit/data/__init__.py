"""The domains layer: data and environments. OGBench (DataModule, dataset files, the environment factory, local
dataset generator, shipped fixtures), Robomimic (hdf5 files, the robosuite environment, scripted demonstrators), the
toy bandit, and what every domain shares (chunk sampler, replay buffer, the base classes ``ChunkDataModule`` and
``OnlineDataModule``). Imports the math and training layers only.

Names are imported lazily so the generator's worker processes and ``trqam-lit-data`` start without
importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "OGBenchDataModule": "trqam_lit.data.datamodule",
    "ChunkDataModule": "trqam_lit.data.datamodule",
    "RobomimicDataModule": "trqam_lit.data.robomimic",
    "ChunkStream": "trqam_lit.data.datamodule",
    "ShardCycler": "trqam_lit.data.datamodule",
    "ReplayBuffer": "trqam_lit.data.replay",
    "OnlineDataModule": "trqam_lit.data.online_data",
    "ToyBanditDataModule": "trqam_lit.data.toy",
    "ChunkTable": "trqam_lit.data.chunks",
    "sample_chunks": "trqam_lit.data.chunks",
    "BATCH_KEYS": "trqam_lit.data.chunks",
    "load_table": "trqam_lit.data.loading",
    "check_dataset_file": "trqam_lit.data.loading",
    "env_spaces": "trqam_lit.data.ogbench_env",
    "DatasetNotFoundError": "trqam_lit.data.errors",
    "DatasetFormatError": "trqam_lit.data.errors",
    "UnsupportedDomainError": "trqam_lit.data.errors",
    "fixture_dir": "trqam_lit.data.paths",
    "fixture_path": "trqam_lit.data.paths",
    "dataset_name_for": "trqam_lit.data.paths",
    "expected_files": "trqam_lit.data.paths",
    "resolve_dataset_dir": "trqam_lit.data.paths",
    "GenerationConfig": "trqam_lit.data.generate",
    "generate_dataset": "trqam_lit.data.generate",
}

__all__ = [
    "BATCH_KEYS",
    "ChunkDataModule",
    "ChunkStream",
    "ChunkTable",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "GenerationConfig",
    "OGBenchDataModule",
    "OnlineDataModule",
    "ReplayBuffer",
    "RobomimicDataModule",
    "ShardCycler",
    "ToyBanditDataModule",
    "UnsupportedDomainError",
    "check_dataset_file",
    "dataset_name_for",
    "env_spaces",
    "expected_files",
    "fixture_dir",
    "fixture_path",
    "generate_dataset",
    "load_table",
    "resolve_dataset_dir",
    "sample_chunks",
]

if TYPE_CHECKING:
    from trqam_lit.data.chunks import BATCH_KEYS, ChunkTable, sample_chunks
    from trqam_lit.data.datamodule import ChunkDataModule, ChunkStream, OGBenchDataModule, ShardCycler
    from trqam_lit.data.errors import DatasetFormatError, DatasetNotFoundError, UnsupportedDomainError
    from trqam_lit.data.generate import GenerationConfig, generate_dataset
    from trqam_lit.data.loading import check_dataset_file, load_table
    from trqam_lit.data.ogbench_env import env_spaces
    from trqam_lit.data.online_data import OnlineDataModule
    from trqam_lit.data.paths import dataset_name_for, expected_files, fixture_dir, fixture_path, resolve_dataset_dir
    from trqam_lit.data.replay import ReplayBuffer
    from trqam_lit.data.robomimic import RobomimicDataModule
    from trqam_lit.data.toy import ToyBanditDataModule


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
