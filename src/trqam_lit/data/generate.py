"""Generate real OGBench manipulation datasets locally with OGBench's own scripted oracles (data.md section 3).

    trqam-lit-data generate --env cube-double-play-v0 --num-episodes 1000 --workers 2 --seed 0

writes ``<dir>/cube-double-play-v0.npz`` and ``-val.npz`` in the official format (plus a provenance JSON beside
each) into the directory the DataModule reads by default. The output follows the official distribution but is
not the released file; results on it must say so.

Seeding: episode ``e`` (validation episodes continue after the training ones) runs with its own seed derived
from ``(seed, e)``, so the output is bit-identical for the same seed and versions whatever ``--workers`` is.
"""

# OGBench's oracles draw from numpy's global generator, so collection seeds and uses it too.
# ruff: noqa: NPY002

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trqam_lit.data.errors import UnsupportedDomainError
from trqam_lit.data.ogbench_env import quiet_box_warning
from trqam_lit.data.paths import DATASET_DIR_ENV, DEFAULT_DATASET_DIR, resolve_dataset_dir
from trqam_lit.training.atomic import atomic_write

# domain -> (p_random_action for noisy data, p_stack range or fixed value drawn per episode)
DOMAINS: dict[str, tuple[float, tuple[float, float] | float]] = {
    "cube-single": (0.1, 0.0),
    "cube-double": (0.1, (0.0, 0.25)),
    "cube-triple": (0.1, (0.05, 0.35)),
    "cube-quadruple": (0.1, (0.1, 0.5)),
    "scene": (0.1, 0.5),
    "puzzle-3x3": (0.2, 0.5),
    "puzzle-4x4": (0.2, 0.5),
}
DATASET_TYPES = ("play", "noisy")
LOCOMOTION = ("antmaze", "humanoidmaze", "antsoccer", "pointmaze")
_OTHER_TYPES = ("navigate", "stitch", "explore", "teleport", "arena", "medium", "large", "giant")


@dataclass(frozen=True)
class GenerationConfig:
    """Everything that determines a generated dataset.

    Args:
        domain: manipulation domain, one of ``DOMAINS``.
        dataset_type: ``play`` (plan oracles with smoothed noise) or ``noisy`` (Markov oracles, Gaussian noise).
        num_episodes: training episodes; ``max(1, num_episodes // 10)`` more go to the ``-val`` file.
        max_episode_steps: rows per episode (official: 1001).
        seed: base seed.
        version: env version suffix.
        noise: play: plan noise; noisy: upper bound of the per-episode action-noise scale xi.
        noise_smoothing: play: temporal smoothing of the plan noise.
        min_norm: noisy: minimum norm of the Markov oracles' position command.
        p_random_action: noisy: probability of a uniform random action (None: 0.1 cube/scene, 0.2 puzzle).
    """

    domain: str
    dataset_type: str = "play"
    num_episodes: int = 1000
    max_episode_steps: int = 1001
    seed: int = 0
    version: str = "v0"
    noise: float = 0.1
    noise_smoothing: float = 0.5
    min_norm: float = 0.4
    p_random_action: float | None = field(default=None)

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise UnsupportedDomainError(f"unknown domain {self.domain!r}; supported: {', '.join(DOMAINS)}")
        if self.dataset_type not in DATASET_TYPES:
            raise UnsupportedDomainError(f"dataset type {self.dataset_type!r} is not one of {DATASET_TYPES}")
        if self.num_episodes < 1 or self.max_episode_steps < 2:
            raise ValueError("need num_episodes >= 1 and max_episode_steps >= 2")
        if self.p_random_action is None:
            p = DOMAINS[self.domain][0] if self.dataset_type == "noisy" else 0.0
            object.__setattr__(self, "p_random_action", p)

    @property
    def dataset_name(self) -> str:
        """Official dataset name, e.g. ``cube-double-play-v0``."""
        return f"{self.domain}-{self.dataset_type}-{self.version}"

    @property
    def env_id(self) -> str:
        """Gymnasium id of the goal-conditioned env used for collection, e.g. ``cube-double-v0``."""
        return f"{self.domain}-{self.version}"

    @property
    def num_val_episodes(self) -> int:
        """Validation episodes (at least one: an empty ``-val`` file breaks ogbench's loader)."""
        return max(1, self.num_episodes // 10)


def parse_dataset_name(name: str, dataset_type: str | None = None) -> tuple[str, str, str]:
    """``(domain, dataset_type, version)`` from ``cube-double-play-v0``, ``cube-double-v0`` (+ type) or a
    single-task env name; refuses locomotion and other domains with a clear message."""
    parts = [p for p in name.split("-") if p != "singletask" and not re.fullmatch(r"task\d+", p)]
    if not parts or not re.fullmatch(r"v\d+", parts[-1]):
        raise ValueError(f"{name!r} does not end with a version such as '-v0' (e.g. 'cube-double-play-v0')")
    version, body = parts[-1], parts[:-1]
    if body and body[0] == "visual":
        raise UnsupportedDomainError(f"{name}: pixel-based datasets are not generated here (state observations only)")
    if body and body[0] in LOCOMOTION:
        raise UnsupportedDomainError(
            f"{name}: locomotion datasets ({', '.join(LOCOMOTION)}) are collected with expert policies whose "
            f"checkpoints exist only on the OGBench authors' server, so they cannot be generated locally. Copy the "
            f"official files from a machine with internet (ogbench.download_datasets([...], dataset_dir=...)) into "
            f"the dataset directory ({DEFAULT_DATASET_DIR} or ${DATASET_DIR_ENV}); see docs/data.md."
        )
    found = [p for p in body if p in DATASET_TYPES + _OTHER_TYPES]
    if found and found[-1] in DATASET_TYPES:
        typ = found[-1]
        body = body[: body.index(typ)]
    elif found:
        raise UnsupportedDomainError(f"{name}: only {DATASET_TYPES} datasets can be generated, not {found[-1]!r}")
    else:
        typ = dataset_type or "play"
    if dataset_type is not None and dataset_type != typ:
        raise ValueError(f"{name} names dataset type {typ!r} but --dataset-type is {dataset_type!r}")
    domain = "-".join(body)
    if domain not in DOMAINS:
        raise UnsupportedDomainError(f"{name}: unknown manipulation domain {domain!r}; supported: {', '.join(DOMAINS)}")
    return domain, typ, version


def episode_seed(seed: int, episode: int) -> int:
    """Seed of one episode, independent of how episodes are spread over workers."""
    return int(np.random.SeedSequence([seed, episode]).generate_state(1, dtype=np.uint32)[0])


class _Collector:
    """One environment plus OGBench's oracles for its sub-tasks, collecting whole episodes."""

    def __init__(self, cfg: GenerationConfig) -> None:
        import gymnasium
        import ogbench  # noqa: F401  (registers the environments)

        self.cfg = cfg
        with quiet_box_warning():
            self.env = gymnasium.make(
                cfg.env_id, terminate_at_goal=False, mode="data_collection", max_episode_steps=cfg.max_episode_steps
            )
            # The env builds a new, unseeded Box on every access: keep one so random actions are reproducible.
            self.action_space = self.env.action_space
        self.oracles = self._make_oracles()
        self.has_buttons = hasattr(self.env.unwrapped, "_cur_button_states")

    def _make_oracles(self) -> dict[str, Any]:
        from ogbench.manipspace.oracles.markov.button_markov import ButtonMarkovOracle
        from ogbench.manipspace.oracles.markov.cube_markov import CubeMarkovOracle
        from ogbench.manipspace.oracles.markov.drawer_markov import DrawerMarkovOracle
        from ogbench.manipspace.oracles.markov.window_markov import WindowMarkovOracle
        from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
        from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
        from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
        from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle

        cfg, env = self.cfg, self.env
        if cfg.dataset_type == "play":
            kw = dict(env=env, noise=cfg.noise, noise_smoothing=cfg.noise_smoothing)
            if cfg.domain.startswith("cube"):
                return {"cube": CubePlanOracle(**kw)}
            if cfg.domain == "scene":
                return {
                    "cube": CubePlanOracle(**kw),
                    "button": ButtonPlanOracle(**kw),
                    "drawer": DrawerPlanOracle(**kw),
                    "window": WindowPlanOracle(**kw),
                }
            return {"button": ButtonPlanOracle(**kw, gripper_always_closed=True)}
        kw = dict(env=env, min_norm=cfg.min_norm)
        if cfg.domain.startswith("cube"):
            return {"cube": CubeMarkovOracle(**kw)}
        if cfg.domain == "scene":
            return {
                "cube": CubeMarkovOracle(**kw, max_step=100),
                "button": ButtonMarkovOracle(**kw),
                "drawer": DrawerMarkovOracle(**kw),
                "window": WindowMarkovOracle(**kw),
            }
        return {"button": ButtonMarkovOracle(**kw, gripper_always_closed=True)}

    def _p_stack(self) -> float:
        spec = DOMAINS[self.cfg.domain][1]
        return float(np.random.uniform(*spec)) if isinstance(spec, tuple) else spec

    def episode(self, index: int) -> dict[str, np.ndarray]:
        """Collect episode ``index`` (redone while a scene cube leaves the table, as the official generator does)."""
        s = episode_seed(self.cfg.seed, index)
        np.random.seed(s)  # the oracles draw from numpy's global generator
        self.action_space.seed(s)
        reset_seed: int | None = s
        while True:
            with quiet_box_warning():
                ep = self._try_episode(reset_seed)
            reset_seed = None  # a redo continues the random streams instead of replaying the same episode
            if self.cfg.domain != "scene" or _scene_healthy(ep["qpos"]):
                return ep

    def _try_episode(self, reset_seed: int | None) -> dict[str, np.ndarray]:
        cfg, env = self.cfg, self.env
        ob, info = env.reset(seed=reset_seed)
        p_stack = self._p_stack()
        markov = cfg.dataset_type == "noisy"
        xi = np.random.uniform(0, cfg.noise) if markov else 0.0
        oracle = self.oracles[info["privileged/target_task"]]
        oracle.reset(ob, info)
        rows: dict[str, list[np.ndarray]] = {k: [] for k in ("observations", "actions", "terminals", "qpos", "qvel")}
        if self.has_buttons:
            rows["button_states"] = []
        done = False
        while not done:
            if np.random.rand() < cfg.p_random_action:
                action = self.action_space.sample()
            else:
                action = np.asarray(oracle.select_action(ob, info))
                if markov:
                    action = action + np.random.normal(0, [xi, xi, xi, 3 * xi, 10 * xi], action.shape)
            action = np.clip(action, -1, 1)
            next_ob, _, terminated, truncated, info = env.step(action)
            done = bool(terminated or truncated)
            if oracle.done:
                task_ob, task_info = env.unwrapped.set_new_target(p_stack=p_stack)
                oracle = self.oracles[task_info["privileged/target_task"]]
                oracle.reset(task_ob, task_info)
            # Store the pre-step observation with the state it came from (info holds the pre-step qpos/qvel).
            rows["observations"].append(ob)
            rows["actions"].append(action)
            rows["terminals"].append(done)
            rows["qpos"].append(info["prev_qpos"])
            rows["qvel"].append(info["prev_qvel"])
            if self.has_buttons:
                rows["button_states"].append(info["prev_button_states"])
            ob = next_ob
        return {k: np.asarray(v, dtype=_DTYPES[k]) for k, v in rows.items()}


_DTYPES = {
    "observations": np.float32,
    "actions": np.float32,
    "terminals": bool,
    "qpos": np.float32,
    "qvel": np.float32,
    "button_states": np.int64,
}


def _scene_healthy(qpos: np.ndarray) -> bool:
    """The official health check: the cube stays visible on the table unless it is in the drawer."""
    xyz = qpos[:, 14:17]
    too_right = (xyz[:, 1] >= 0.29).any()
    too_left = ((xyz[:, 1] <= -0.3) & ((xyz[:, 2] < 0.06) | (xyz[:, 2] > 0.08))).any()
    return not (too_right or too_left)


_WORKER: _Collector | None = None


def _worker_init(cfg: GenerationConfig) -> None:
    global _WORKER
    _WORKER = _Collector(cfg)


def _worker_episode(index: int) -> dict[str, np.ndarray]:
    assert _WORKER is not None
    return _WORKER.episode(index)


class _Progress:
    """A tqdm bar on stderr (tqdm comes with Lightning) with the rows generated and their rate; ``enabled`` False:
    silent."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        from tqdm import tqdm

        self.rows, self.start = 0, time.perf_counter()
        self._bar = tqdm(total=total, desc=desc, unit="ep", file=sys.stderr, disable=not enabled)

    def update(self, rows: int) -> None:
        self.rows += rows
        rate = self.rows / max(time.perf_counter() - self.start, 1e-9)
        self._bar.set_postfix(rows=self.rows, rows_per_s=f"{rate:.0f}", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def _collect(cfg: GenerationConfig, workers: int, progress: bool) -> tuple[list[dict[str, np.ndarray]], float]:
    """All episodes (train then val) in order, with the wall time it took."""
    total = cfg.num_episodes + cfg.num_val_episodes
    bar = _Progress(total, cfg.dataset_name, progress)
    episodes: list[dict[str, np.ndarray]] = []
    start = time.perf_counter()
    try:
        if workers <= 1:
            collector = _Collector(cfg)
            for e in range(total):
                episodes.append(collector.episode(e))
                bar.update(len(episodes[-1]["terminals"]))
        else:
            # spawn, not fork: the parent may hold OpenMP/torch threads and MuJoCo state that fork would copy.
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(workers, total), initializer=_worker_init, initargs=(cfg,)) as pool:
                for ep in pool.imap(_worker_episode, range(total)):  # imap keeps episode order
                    episodes.append(ep)
                    bar.update(len(ep["terminals"]))
    finally:
        bar.close()
    return episodes, time.perf_counter() - start


def _concat(episodes: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([ep[k] for ep in episodes]) for k in episodes[0]}


def versions(packages: tuple[str, ...] = ("ogbench", "mujoco", "numpy", "gymnasium", "trqam-lit")) -> dict[str, str]:
    """Python, platform and ``packages``' versions, for a generated file's provenance."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def generate_dataset(
    cfg: GenerationConfig,
    dataset_dir: str | os.PathLike | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Collect ``cfg`` and write ``<name>.npz``, ``<name>-val.npz`` and their provenance JSONs.

    Args:
        cfg: what to generate.
        dataset_dir: output directory; None uses the DataModule's default ($TRQAM_DATA_DIR or ~/.ogbench/data).
        workers: processes collecting episodes in parallel (the output does not depend on it).
        overwrite: replace existing files instead of refusing.
        progress: show a progress bar on stderr.

    Returns:
        Paths of the written files: keys ``train``, ``val``, ``train_json``, ``val_json``.
    """
    out_dir = resolve_dataset_dir(dataset_dir)
    train = out_dir / f"{cfg.dataset_name}.npz"
    val = out_dir / f"{cfg.dataset_name}-val.npz"
    if train.exists() and not overwrite:
        raise FileExistsError(f"{train} exists; pass --overwrite to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)

    episodes, seconds = _collect(cfg, workers, progress)
    splits = {"val": _concat(episodes[cfg.num_episodes :]), "train": _concat(episodes[: cfg.num_episodes])}
    del episodes
    total_rows = sum(len(s["terminals"]) for s in splits.values())
    paths = {"train": train, "val": val, "train_json": train.with_suffix(".json"), "val_json": val.with_suffix(".json")}
    # The train file goes last: when it exists, the whole dataset is complete.
    for split in ("val", "train"):
        arrays, path = splits[split], paths[split]
        with atomic_write(path) as partial, open(partial, "wb") as f:
            np.savez_compressed(f, **arrays)  # a file object: given a name, numpy would append ".npz"
        first = 0 if split == "train" else cfg.num_episodes
        count = cfg.num_episodes if split == "train" else cfg.num_val_episodes
        provenance = {
            "generated_locally": True,
            "note": (
                "Generated locally with OGBench's scripted oracles by trqam-lit-data; follows the official "
                "distribution but is NOT the released OGBench file. Results on it must say so."
            ),
            "dataset_name": cfg.dataset_name,
            "split": split,
            "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "rows": int(len(arrays["terminals"])),
            "episodes": count,
            "episode_indices": [first, first + count],
            "env_id": cfg.env_id,
            "config": asdict(cfg),
            "seeding": "episode e: np.random.seed, env.reset(seed=), action_space.seed with episode_seed(seed, e)",
            "versions": versions(),
        }
        text = json.dumps(provenance, indent=2, sort_keys=True) + "\n"
        with atomic_write(paths[f"{split}_json"]) as partial:
            partial.write_text(text)
    if progress:
        print(
            f"wrote {train} and {val.name}: {total_rows} rows in {seconds:.1f} s "
            f"({total_rows / max(seconds, 1e-9):.0f} rows/s with {workers} worker(s))",
            file=sys.stderr,
        )
    return paths


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the ``trqam-lit-data`` console script."""
    parser = argparse.ArgumentParser(prog="trqam-lit-data", description="OGBench datasets for trqam-lit.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser(
        "generate",
        help="generate a manipulation dataset locally with OGBench's oracles",
        description=(
            "Generate real OGBench manipulation data (cube-single/double/triple/quadruple, scene, puzzle-3x3/4x4; "
            "play or noisy) with OGBench's own oracles, in the official file format. Locomotion domains need the "
            "official files. Robomimic (lift-mh-low_dim, can-mh-low_dim, square-mh-low_dim): scripted "
            "demonstrations of three operator styles in robomimic's hdf5 layout."
        ),
    )
    g.add_argument("--env", required=True, help="dataset name (cube-double-play-v0), env id, or single-task name")
    g.add_argument("--dataset-type", choices=DATASET_TYPES, default=None, help="play or noisy (default: from --env)")
    g.add_argument(
        "--num-episodes",
        type=int,
        default=None,
        help="OGBench: training episodes, default 1000 (val gets num // 10, >= 1); Robomimic: demos, default 300",
    )
    g.add_argument("--max-episode-steps", type=int, default=1001, help="rows per episode (official: 1001)")
    g.add_argument("--workers", type=int, default=1, help="worker processes (output does not depend on it)")
    g.add_argument("--seed", type=int, default=0, help="base seed")
    g.add_argument(
        "--dataset-dir",
        default=None,
        help=(
            f"output directory (default: ${DATASET_DIR_ENV} or {DEFAULT_DATASET_DIR}, where the DataModule looks; "
            "Robomimic: $TRQAM_ROBOMIMIC_DIR or ~/.robomimic)"
        ),
    )
    g.add_argument("--p-random-action", type=float, default=None, help="override the noisy-data random-action rate")
    g.add_argument(
        "--without-model-file",
        action="store_true",
        help="Robomimic: do not store each demo's MJCF XML (about 50 KB each; replay from states needs none)",
    )
    g.add_argument("--overwrite", action="store_true", help="replace existing files")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``trqam-lit-data``."""
    args = build_parser().parse_args(argv)
    try:
        from trqam_lit.data.robomimic import is_robomimic_name

        if is_robomimic_name(args.env):
            from trqam_lit.data.robomimic_generate import RobomimicGenerationConfig, generate_robomimic

            rcfg = RobomimicGenerationConfig(
                env_name=args.env,
                num_episodes=300 if args.num_episodes is None else args.num_episodes,
                seed=args.seed,
                store_model_file=not args.without_model_file,
            )
            generate_robomimic(rcfg, args.dataset_dir, args.workers, overwrite=args.overwrite, progress=not args.quiet)
            return 0
        domain, typ, version = parse_dataset_name(args.env, args.dataset_type)
        cfg = GenerationConfig(
            domain=domain,
            dataset_type=typ,
            version=version,
            num_episodes=1000 if args.num_episodes is None else args.num_episodes,
            max_episode_steps=args.max_episode_steps,
            seed=args.seed,
            p_random_action=args.p_random_action,
        )
        generate_dataset(cfg, args.dataset_dir, workers=args.workers, overwrite=args.overwrite, progress=not args.quiet)
    except (UnsupportedDomainError, FileExistsError, ValueError, RuntimeError) as e:
        print(f"trqam-lit-data: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "trqam-lit-data: interrupted; no partial file was left under the final names (Robomimic: finished demos "
            "are kept in <file>.parts/ and the same command continues from them)",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
