"""Robomimic low-dim data (lift, can, square) in the official file layout, read as the reference reads it.

An env name ``<task>-<type>-low_dim`` (``can-mh-low_dim``) reads ``<dir>/<task>/<type>/low_dim_v15.hdf5``, the path
robomimic's download script and the reference use (``~/.robomimic`` by default). The file holds ``data`` (attribute
``env_args``: the environment's metadata as JSON) with groups ``demo_<i>``, each with ``actions`` (T, 7),
``rewards`` (T,), ``dones`` (T,), ``states`` (T, S) and ``obs/<key>``, ``next_obs/<key>`` (T, d); and ``mask/<name>``
lists of demo names (filter keys). What the reference's ``envs/robomimic_utils.py`` and ``main.py`` do with it, and
this module does the same way:

- observations are ``robot0_eef_pos`` (3), ``robot0_eef_quat`` (4), ``robot0_gripper_qpos`` (2), ``object``
  (10 lift, 14 can and square), concatenated in that order, demos in numeric order;
- normalised to about [-1, 1] by ``2 ((x - min) / (max - min + 1e-6) - 0.5)`` with the min and max over every
  observation and next observation of the file (:func:`normalization_stats`, :func:`normalize_observations`);
- rewards ``r - 1`` (0/1 success rewards become -1 per step until success), ``terminals = dones``,
  ``masks = 1 - dones``; actions clipped to +-(1 - 1e-5) as every dataset.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trqam_lit.data.chunks import ChunkTable
from trqam_lit.data.datamodule import ChunkDataModule
from trqam_lit.data.errors import DatasetFormatError, DatasetNotFoundError
from trqam_lit.data.loading import DATASET_ACTION_LIMIT
from trqam_lit.data.paths import FIXTURE_SENTINEL, fixture_dir

TASKS = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare"}
MAX_EPISODE_STEPS = {"lift": 300, "can": 300, "square": 400}
OBJECT_DIM = {"lift": 10, "can": 14, "square": 14}
DATASET_TYPES = ("mh", "ph")
LOW_DIM_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")
ROBOT_KEY_DIMS = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}
ACTION_DIM = 7
NORMALIZATION_EPS = 1e-6
REWARD_OFFSET = -1.0  # the reference's main.py: rewards - 1 for Robomimic, offline and online
FILE_NAME = "low_dim_v15.hdf5"
DEFAULT_ROBOMIMIC_DIR = "~/.robomimic"
ROBOMIMIC_DIR_ENV = "TRQAM_ROBOMIMIC_DIR"


@dataclass(frozen=True)
class RobomimicName:
    """A parsed Robomimic env name: ``can-mh-low_dim`` -> task ``can``, dataset type ``mh``."""

    task: str
    dataset_type: str

    @property
    def env_name(self) -> str:
        return f"{self.task}-{self.dataset_type}-low_dim"

    @property
    def obs_dim(self) -> int:
        return sum(ROBOT_KEY_DIMS.values()) + OBJECT_DIM[self.task]

    @property
    def max_episode_steps(self) -> int:
        return MAX_EPISODE_STEPS[self.task]

    @property
    def robosuite_env(self) -> str:
        return TASKS[self.task]


def is_robomimic_name(env_name: str) -> bool:
    """Whether ``env_name`` names a Robomimic low-dim task (as the reference's ``is_robomimic_env``)."""
    parts = env_name.split("-")
    return len(parts) == 3 and parts[2] == "low_dim" and parts[0] in TASKS


def parse_robomimic_name(env_name: str) -> RobomimicName:
    """``<task>-<type>-low_dim`` with task in lift/can/square and type mh or ph.

    Raises:
        ValueError: naming the accepted tasks and types.
    """
    parts = env_name.split("-")
    if len(parts) != 3 or parts[0] not in TASKS or parts[1] not in DATASET_TYPES or parts[2] != "low_dim":
        names = ", ".join(f"{t}-{d}-low_dim" for t in TASKS for d in DATASET_TYPES)
        raise ValueError(f"{env_name!r} is not a Robomimic low-dim env name; expected one of: {names}")
    return RobomimicName(parts[0], parts[1])


def resolve_robomimic_dir(dataset_dir: str | os.PathLike | None = None) -> Path:
    """The argument, else $TRQAM_ROBOMIMIC_DIR, else ~/.robomimic; ``fixture``: the files shipped in the package."""
    if dataset_dir is None or str(dataset_dir) == "":
        dataset_dir = os.environ.get(ROBOMIMIC_DIR_ENV) or DEFAULT_ROBOMIMIC_DIR
    if str(dataset_dir) == FIXTURE_SENTINEL:
        return fixture_dir() / "robomimic"
    return Path(os.path.expandvars(str(dataset_dir))).expanduser()


def robomimic_file(env_name: str, dataset_dir: str | os.PathLike | None = None) -> Path:
    """``<dir>/<task>/<type>/low_dim_v15.hdf5``, the layout of robomimic's downloads."""
    name = parse_robomimic_name(env_name)
    return resolve_robomimic_dir(dataset_dir) / name.task / name.dataset_type / FILE_NAME


def missing_file_message(env_name: str, path: Path) -> str:
    """What was looked for, where, and the two ways to get it."""
    name = parse_robomimic_name(env_name)
    root = path.parent.parent.parent
    return "\n".join(
        [
            f"Robomimic dataset for {env_name!r} not found; expected {path}",
            "Nothing is downloaded automatically. Either:",
            "  (1) copy the official file from a machine with internet (robomimic's download_datasets.py,",
            f"      --tasks {name.task} --dataset_types {name.dataset_type} --hdf5_types low_dim) to {path}",
            f"      (or point dataset_dir / ${ROBOMIMIC_DIR_ENV} at the directory that holds {name.task}/); or",
            "  (2) generate scripted demonstrations locally in the same layout (see docs/data.md; not human data):",
            f"      trqam-lit-data generate --env {env_name} --num-episodes 300 --workers 2 --seed 0 "
            f"--dataset-dir {shlex.quote(str(root))}",
        ]
    )


def _demo_order(names: list[str]) -> list[str]:
    """``demo_<i>`` in numeric order (``demo_10`` after ``demo_9``), as the reference sorts them."""
    bad = [n for n in names if not (n.startswith("demo_") and n[5:].isdigit())]
    if bad:
        raise DatasetFormatError(f"data/ holds groups that are not demo_<i>: {bad[:5]}")
    return sorted(names, key=lambda n: int(n[5:]))


def read_env_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The environment metadata (``data.attrs["env_args"]``) of a Robomimic file."""
    with _open(path) as f:
        if "env_args" not in f["data"].attrs:
            raise DatasetFormatError(f"{path}: data/ has no 'env_args' attribute (the environment metadata)")
        return json.loads(f["data"].attrs["env_args"])


def _open(path: str | os.PathLike) -> Any:
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"Robomimic dataset file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DatasetFormatError(f"{path} is not a readable HDF5 file ({e}); truncated or damaged?") from e
    if "data" not in f:
        f.close()
        raise DatasetFormatError(f"{path} has no 'data' group: not a robomimic dataset file")
    return f


def read_robomimic(path: str | os.PathLike, env_name: str) -> dict[str, np.ndarray]:
    """Every demo of the file, concatenated in numeric order, as the reference's ``get_dataset`` reads it.

    Returns float32 ``observations`` and ``next_observations`` (N, obs_dim), not normalised; ``actions`` (N, 7),
    ``rewards``, ``dones`` (N,) float32 as stored; ``lengths`` (num_demos,) int64.

    Raises:
        DatasetNotFoundError: no file at ``path``.
        DatasetFormatError: a missing group, key or attribute, or a shape that does not fit the task (each naming
            the demo and key).
    """
    name = parse_robomimic_name(env_name)
    dims = {**ROBOT_KEY_DIMS, "object": OBJECT_DIM[name.task]}
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("observations", "next_observations", "actions", "rewards")}
    out["dones"], lengths = [], []
    with _open(path) as f:
        demos = _demo_order(list(f["data"].keys()))
        if not demos:
            raise DatasetFormatError(f"{path}: data/ holds no demos")
        for demo in demos:
            group = f["data"][demo]
            where = f"{path}: data/{demo}"
            for key in ("actions", "rewards", "dones", "obs", "next_obs"):
                if key not in group:
                    raise DatasetFormatError(f"{where} lacks '{key}' (has {sorted(group.keys())})")
            actions = np.asarray(group["actions"])
            steps = actions.shape[0]
            if actions.ndim != 2 or actions.shape[1] != ACTION_DIM or steps < 1:
                raise DatasetFormatError(f"{where}/actions has shape {actions.shape}; expected (T >= 1, {ACTION_DIM})")
            for key in ("rewards", "dones"):
                if group[key].shape != (steps,):
                    raise DatasetFormatError(f"{where}/{key} has shape {group[key].shape}; expected ({steps},)")
            for part, dest in (("obs", "observations"), ("next_obs", "next_observations")):
                pieces = []
                for key in LOW_DIM_KEYS:
                    if key not in group[part]:
                        raise DatasetFormatError(
                            f"{where}/{part} lacks '{key}' (has {sorted(group[part].keys())}); the low-dim "
                            f"observation is {list(LOW_DIM_KEYS)}"
                        )
                    arr = np.asarray(group[part][key])
                    if arr.shape != (steps, dims[key]):
                        raise DatasetFormatError(
                            f"{where}/{part}/{key} has shape {arr.shape}; {name.task} needs ({steps}, {dims[key]}): "
                            f"is the file from another task?"
                        )
                    pieces.append(arr)
                out[dest].append(np.concatenate(pieces, axis=-1).astype(np.float32))
            out["actions"].append(actions.astype(np.float32))
            out["rewards"].append(np.asarray(group["rewards"]).astype(np.float32))
            out["dones"].append(np.asarray(group["dones"]).astype(np.float32))
            lengths.append(steps)
    data = {k: np.concatenate(v, axis=0) for k, v in out.items()}
    for key in ("observations", "next_observations", "actions"):
        if not np.isfinite(data[key]).all():
            raise DatasetFormatError(f"{path}: {key} contain NaN or infinite values")
    data["lengths"] = np.asarray(lengths, dtype=np.int64)
    return data


def normalization_stats(observations: np.ndarray, next_observations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension float32 min and max over every observation and next observation (the reference's
    ``compute_normalization_stats``; min of the float32 values equals float32 of the float64 min)."""
    both = np.concatenate([observations, next_observations], axis=0)
    return both.min(axis=0).astype(np.float32), both.max(axis=0).astype(np.float32)


def normalize_observations(x: np.ndarray, obs_min: np.ndarray, obs_max: np.ndarray) -> np.ndarray:
    """``2 ((x - min) / (max - min + 1e-6) - 0.5)``, in the dtype numpy gives ``x`` with float32 stats."""
    return 2 * ((x - obs_min) / (obs_max - obs_min + NORMALIZATION_EPS) - 0.5)


def process_robomimic(data: dict[str, np.ndarray]) -> tuple[ChunkTable, tuple[np.ndarray, np.ndarray]]:
    """The chunk table the agents train on, and the normalisation statistics the environment must use."""
    stats = normalization_stats(data["observations"], data["next_observations"])
    dones = data["dones"]
    table = ChunkTable(
        observations=normalize_observations(data["observations"], *stats).astype(np.float32),
        actions=np.clip(data["actions"], -DATASET_ACTION_LIMIT, DATASET_ACTION_LIMIT),
        rewards=(data["rewards"] + np.float32(REWARD_OFFSET)).astype(np.float32),
        masks=(1.0 - dones).astype(np.float32),
        terminals=dones.astype(np.float32),
        next_observations=normalize_observations(data["next_observations"], *stats).astype(np.float32),
    )
    return table, stats


def write_robomimic(
    path: str | os.PathLike,
    env_meta: dict[str, Any],
    demos: list[dict[str, Any]],
    masks: dict[str, list[str]] | None = None,
    compression: str | None = "gzip",
) -> None:
    """Write demos in the official layout (callers make it atomic).

    Args:
        path: the ``.hdf5`` to create.
        env_meta: ``{"env_name", "env_version", "type", "env_kwargs"}``, stored as ``data.attrs["env_args"]``.
        demos: per demo: ``actions``, ``rewards``, ``dones``, ``states`` arrays, ``obs`` and ``next_obs`` dicts of
            arrays, and optionally ``model_file`` (the MJCF XML, for replay) and ``attrs`` (more demo attributes).
        masks: filter key -> demo names (``demo_<i>``), written under ``mask/``.
        compression: HDF5 filter of every dataset.
    """
    import h5py

    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        total = 0
        for i, demo in enumerate(demos):
            g = data.create_group(f"demo_{i}")
            steps = len(demo["actions"])
            g.attrs["num_samples"] = steps
            if demo.get("model_file") is not None:
                g.attrs["model_file"] = demo["model_file"]
            for key, value in demo.get("attrs", {}).items():
                g.attrs[key] = value
            for key in ("actions", "rewards", "dones", "states"):
                g.create_dataset(key, data=np.asarray(demo[key]), compression=compression)
            for part in ("obs", "next_obs"):
                for key, value in demo[part].items():
                    g.create_dataset(f"{part}/{key}", data=np.asarray(value), compression=compression)
            total += steps
        data.attrs["total"] = total
        data.attrs["env_args"] = json.dumps(env_meta)
        for key, names in (masks or {}).items():
            f.create_dataset(f"mask/{key}", data=np.array(sorted(names, key=lambda n: int(n[5:])), dtype="S"))


class RobomimicDataModule(ChunkDataModule):
    """Robomimic low-dim data (lift, can, square) as an infinite stream of action-chunk batches, and the task's
    environment (:mod:`trqam_lit.data.robomimic_env`) for evaluation and the online phase.

    ``obs_dim``, ``action_dim`` and ``chunk_dim`` are known right after ``__init__``.
    """

    def __init__(
        self,
        env_name: str = "can-mh-low_dim",
        dataset_dir: str | None = None,
        dataset_path: str | None = None,
        horizon: int = 5,
        discount: float = 0.995,
        batch_size: int = 256,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        eval_episodes: int = 50,
        eval_envs: int = 10,
        eval_workers: int = 0,
    ) -> None:
        """
        Args:
            env_name: ``lift-mh-low_dim``, ``can-mh-low_dim`` or ``square-mh-low_dim`` (``ph`` for the proficient-human
                files).
            dataset_dir: directory holding ``<task>/<type>/low_dim_v15.hdf5``; None reads $TRQAM_ROBOMIMIC_DIR, else
                ~/.robomimic; ``fixture`` uses the small files shipped inside the package.
            dataset_path: explicit ``.hdf5`` file; wins over dataset_dir.
            horizon: action chunk length H (the reference uses 5; run open loop).
            discount: discount gamma of the H-step return.
            batch_size: chunks per batch.
            seed: base seed of the batch stream and of the evaluation episodes' initial states.
            num_workers: DataLoader worker processes (0: sample in the training process; the replay buffer needs 0).
            pin_memory: pin batches for faster host-to-GPU copies.
            eval_episodes: episodes per evaluation, sharded over ranks.
            eval_envs: environments stepped at once during evaluation.
            eval_workers: step the evaluation environments in this many worker processes (robosuite steps are slow:
                worth it whenever cores are idle).
        """
        super().__init__(
            horizon=horizon,
            discount=discount,
            batch_size=batch_size,
            seed=seed,
            num_workers=num_workers,
            pin_memory=pin_memory,
            eval_episodes=eval_episodes,
            eval_envs=eval_envs,
            eval_workers=eval_workers,
        )
        self.save_hyperparameters()
        self.env_name = env_name
        self.name = parse_robomimic_name(env_name)
        self.dataset_dir, self.dataset_path = dataset_dir, dataset_path
        self.obs_dim, self.action_dim = self.name.obs_dim, ACTION_DIM
        self.stats: tuple[np.ndarray, np.ndarray] | None = None

    def dataset_file(self) -> Path:
        """The file this DataModule reads, checked to exist.

        Raises:
            DatasetNotFoundError: naming the exact expected file and how to obtain it.
        """
        path = (
            Path(self.dataset_path).expanduser()
            if self.dataset_path is not None
            else robomimic_file(self.env_name, self.dataset_dir)
        )
        if not path.is_file():
            raise DatasetNotFoundError(missing_file_message(self.env_name, path))
        return path

    def _load_source(self) -> ChunkTable:
        table, self.stats = process_robomimic(read_robomimic(self.dataset_file(), self.env_name))
        return table

    def env_factory(self) -> Callable[[], Any]:
        """The task's environment, built from the file's metadata and normalised with its statistics."""
        import functools

        from trqam_lit.data.robomimic_env import RobomimicLowDimEnv

        path = self.dataset_file()
        if self.stats is None:  # validate / test / export: no table was loaded
            data = read_robomimic(path, self.env_name)
            self.stats = normalization_stats(data["observations"], data["next_observations"])
        return functools.partial(
            RobomimicLowDimEnv, read_env_meta(path), *self.stats, max_episode_steps=self.name.max_episode_steps
        )

    def _replay_buffer_options(self) -> dict[str, Any]:
        return {"reward_offset": REWARD_OFFSET}

    def state_dict(self) -> dict[str, Any]:
        """The online phase's buffers, and the observation normalisation the policy was trained under (so
        ``trqam-lit export`` can tell a deployment how to normalise without the dataset file)."""
        state = super().state_dict()
        if self.stats is not None:
            state["observation_normalization"] = normalization_entry(*self.stats)
        return state


def normalization_entry(obs_min: np.ndarray, obs_max: np.ndarray) -> dict[str, Any]:
    """The statistics and the formula, as plain lists (a checkpoint entry and export's description)."""
    return {
        "formula": "2 * ((obs - obs_min) / (obs_max - obs_min + 1e-6) - 0.5)",
        "keys": list(LOW_DIM_KEYS),
        "obs_min": [float(x) for x in obs_min],
        "obs_max": [float(x) for x in obs_max],
    }
