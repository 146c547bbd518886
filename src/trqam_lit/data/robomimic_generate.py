"""Generate Robomimic-style multi-operator data locally, in the official file layout (docs/data.md).

    trqam-lit-data generate --env can-mh-low_dim --num-episodes 300 --workers 2 --seed 0

writes ``<dir>/can/mh/low_dim_v15.hdf5`` (plus a provenance JSON beside it) into the directory the DataModule reads
by default. The demonstrations are SCRIPTED (:mod:`trqam_lit.data.robomimic_operators`: privileged object poses,
three operator styles), not the human teleoperation of the released files; results on them must say so.

As robomimic's multi-human files: demo ``e`` comes from style ``STYLES[e % 3]`` (careful / hurried / clumsy, filter
keys ``better`` / ``okay`` / ``worse`` and the style names), only successful attempts are kept (the attempts a style
needed are in the provenance), every tenth demo is in the ``valid`` filter key, the rest in ``train``. Each demo
stores ``states``, the reset ``seed`` (which also draws model randomisation such as Lift's cube size) and, unless
``--without-model-file``, the MJCF XML: either restores the model, and then the first state replays the demo.

Seeding: attempt ``a`` of demo ``e`` runs with ``episode_seed(seed, e * 1000 + a)`` (robosuite's placement and the
operator's draws), so the output is the same whatever ``--workers`` is. Finished demos are kept in
``<file>.parts/`` until the file is written, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trqam_lit.data.generate import _Progress, episode_seed, versions
from trqam_lit.data.robomimic import (
    LOW_DIM_KEYS,
    parse_robomimic_name,
    robomimic_file,
    write_robomimic,
)
from trqam_lit.training.atomic import atomic_write

QUALITY = {"careful": "better", "hurried": "okay", "clumsy": "worse"}  # robomimic's mh filter keys per style
MAX_ATTEMPTS = 50
ATTEMPT_STRIDE = 1000


@dataclass(frozen=True)
class RobomimicGenerationConfig:
    """Everything that determines a generated Robomimic file.

    Args:
        env_name: ``lift-mh-low_dim``, ``can-mh-low_dim`` or ``square-mh-low_dim``.
        num_episodes: demos to keep (successful ones).
        seed: base seed.
        store_model_file: keep each demo's MJCF XML (about 50 KB per demo), as robomimic's files do.
    """

    env_name: str
    num_episodes: int = 300
    seed: int = 0
    store_model_file: bool = True

    def __post_init__(self) -> None:
        parse_robomimic_name(self.env_name)
        if self.num_episodes < 1:
            raise ValueError(f"num_episodes must be >= 1, got {self.num_episodes}")


def style_of(episode: int) -> str:
    from trqam_lit.data.robomimic_operators import STYLES

    return STYLES[episode % len(STYLES)]


class _Demonstrator:
    """One environment and the scripted operators, recording successful demos in the official layout."""

    def __init__(self, cfg: RobomimicGenerationConfig) -> None:
        from trqam_lit.data.robomimic_env import RobomimicLowDimEnv, env_meta_for

        self.cfg = cfg
        self.name = parse_robomimic_name(cfg.env_name)
        self.env_meta = env_meta_for(self.name.task)
        dim = self.name.obs_dim  # stats are irrelevant here: raw observations are recorded
        self.env = RobomimicLowDimEnv(self.env_meta, np.zeros(dim), np.ones(dim), self.name.max_episode_steps)

    def demo(self, episode: int) -> dict[str, Any]:
        """Attempts until one succeeds; returns the recorded demo with ``attempts`` (how many it took)."""
        from trqam_lit.data.robomimic_operators import ScriptedOperator

        style = style_of(episode)
        for attempt in range(MAX_ATTEMPTS):
            seed = episode_seed(self.cfg.seed, episode * ATTEMPT_STRIDE + attempt)
            self.env.reset(seed=seed)
            operator = ScriptedOperator(self.name.task, style, np.random.default_rng(seed))
            demo = self._record(operator)
            if demo is not None:
                demo["attempts"], demo["seed"] = attempt + 1, seed
                return demo
        raise RuntimeError(
            f"{self.cfg.env_name}: the {style} operator failed {MAX_ATTEMPTS} attempts in a row for demo {episode}"
        )

    def _record(self, operator: Any) -> dict[str, Any] | None:
        rs_env = self.env.env
        operator.reset(rs_env)
        raw = rs_env._get_observations(force_update=True)
        obs: dict[str, list] = {k: [] for k in LOW_DIM_KEYS}
        next_obs: dict[str, list] = {k: [] for k in LOW_DIM_KEYS}
        states, actions, rewards, dones = [], [], [], []
        model = rs_env.sim.model.get_xml() if self.cfg.store_model_file else None
        for t in range(self.name.max_episode_steps):
            states.append(self.env.get_state())
            action = np.clip(np.asarray(operator.act(rs_env), dtype=np.float64), -1.0, 1.0)
            next_raw, reward, _, _ = rs_env.step(action)
            success = bool(rs_env._check_success())
            for key in LOW_DIM_KEYS:
                source = "object-state" if key == "object" else key
                obs[key].append(np.array(raw[source]))
                next_obs[key].append(np.array(next_raw[source]))
            actions.append(action)
            rewards.append(float(reward))
            # robomimic's done_mode 2: done at a success state and at the end of the demo
            dones.append(int(success or t == self.name.max_episode_steps - 1))
            raw = next_raw
            if success:
                return {
                    "states": np.stack(states),
                    "actions": np.stack(actions),
                    "rewards": np.asarray(rewards, dtype=np.float64),
                    "dones": np.asarray(dones, dtype=np.int64),
                    "obs": {k: np.stack(v) for k, v in obs.items()},
                    "next_obs": {k: np.stack(v) for k, v in next_obs.items()},
                    "model_file": model,
                }
        return None


_WORKER: _Demonstrator | None = None


def _worker_init(cfg: RobomimicGenerationConfig) -> None:
    global _WORKER
    _WORKER = _Demonstrator(cfg)


def _worker_demo(episode: int) -> tuple[int, dict[str, Any]]:
    assert _WORKER is not None
    return episode, _WORKER.demo(episode)


def _part_path(parts: Path, episode: int) -> Path:
    return parts / f"demo_{episode}.npz"


def _save_part(parts: Path, episode: int, demo: dict[str, Any]) -> None:
    flat = {k: v for k, v in demo.items() if isinstance(v, np.ndarray)}
    flat.update({f"obs/{k}": v for k, v in demo["obs"].items()})
    flat.update({f"next_obs/{k}": v for k, v in demo["next_obs"].items()})
    flat["attempts"], flat["seed"] = np.asarray(demo["attempts"]), np.asarray(demo["seed"])
    if demo["model_file"] is not None:
        flat["model_file"] = np.asarray(demo["model_file"])
    with atomic_write(_part_path(parts, episode)) as partial, open(partial, "wb") as f:
        np.savez(f, **flat)


def _load_part(path: Path) -> dict[str, Any]:
    with np.load(path) as z:
        demo: dict[str, Any] = {"obs": {}, "next_obs": {}, "model_file": None}
        for key in z.files:
            if "/" in key:
                part, name = key.split("/", 1)
                demo[part][name] = z[key]
            elif key == "model_file":
                demo["model_file"] = str(z[key])
            elif key in ("attempts", "seed"):
                demo[key] = int(z[key])
            else:
                demo[key] = z[key]
    return demo


def generate_robomimic(
    cfg: RobomimicGenerationConfig,
    dataset_dir: str | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Collect ``cfg`` and write the ``.hdf5`` and its provenance JSON (both atomically; the file appears last).

    Returns:
        ``{"file": ..., "json": ...}``.
    """
    path = robomimic_file(cfg.env_name, dataset_dir)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    parts = path.with_name(path.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    stamp = parts / "config.json"
    config_text = json.dumps(asdict(cfg), sort_keys=True)
    if stamp.exists() and stamp.read_text() != config_text:
        raise ValueError(
            f"{parts} holds demos of another configuration ({stamp.read_text()}); delete it to start afresh"
        )
    stamp.write_text(config_text)

    todo = [e for e in range(cfg.num_episodes) if not _part_path(parts, e).exists()]
    bar = _Progress(cfg.num_episodes, cfg.env_name, progress)
    for _ in range(cfg.num_episodes - len(todo)):
        bar.update(0)
    start = time.perf_counter()
    try:
        if workers <= 1 or len(todo) <= 1:
            demonstrator = _Demonstrator(cfg) if todo else None
            for e in todo:
                demo = demonstrator.demo(e)
                _save_part(parts, e, demo)
                bar.update(len(demo["actions"]))
        else:
            ctx = multiprocessing.get_context("spawn")  # see generate.py: no fork of torch/MuJoCo state
            with ctx.Pool(min(workers, len(todo)), initializer=_worker_init, initargs=(cfg,)) as pool:
                for e, demo in pool.imap_unordered(_worker_demo, todo):
                    _save_part(parts, e, demo)
                    bar.update(len(demo["actions"]))
    finally:
        bar.close()
    seconds = time.perf_counter() - start

    demos = [_load_part(_part_path(parts, e)) for e in range(cfg.num_episodes)]
    names = [f"demo_{e}" for e in range(cfg.num_episodes)]
    masks: dict[str, list[str]] = {"train": [], "valid": []}
    for e, name in enumerate(names):
        style = style_of(e)
        masks.setdefault(style, []).append(name)
        masks.setdefault(QUALITY[style], []).append(name)
        masks["valid" if e % 10 == 9 else "train"].append(name)
    env_meta = _env_meta(cfg)
    for e, demo in enumerate(demos):
        demo["attrs"] = {"style": style_of(e), "attempts": demo["attempts"], "seed": demo["seed"]}
    with atomic_write(path) as partial:
        write_robomimic(partial, env_meta, demos, masks)
    attempts: dict[str, list[int]] = {}
    for e, demo in enumerate(demos):
        attempts.setdefault(style_of(e), []).append(int(demo["attempts"]))
    provenance = {
        "generated_locally": True,
        "note": (
            "Scripted demonstrations (trqam_lit.data.robomimic_operators: privileged object poses, three operator "
            "styles) in robomimic's file layout; NOT the released human data. Results on it must say so."
        ),
        "env_name": cfg.env_name,
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "demos": cfg.num_episodes,
        "steps": int(sum(len(d["actions"]) for d in demos)),
        "attempt_success_rate": {s: len(a) / sum(a) for s, a in attempts.items()},  # kept demos / attempts, per style
        "config": asdict(cfg),
        "seconds": round(seconds, 1),
        "seeding": "attempt a of demo e: robosuite reset and operator rng seeded with episode_seed(seed, e*1000+a)",
        "versions": versions(("robosuite", "mujoco", "numpy", "h5py", "trqam-lit")),
    }
    json_path = path.with_suffix(".json")
    with atomic_write(json_path) as partial:
        partial.write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(parts)
    if progress:
        steps = provenance["steps"]
        print(
            f"wrote {path}: {cfg.num_episodes} demos, {steps} steps in {seconds:.1f} s "
            f"({steps / max(seconds, 1e-9):.0f} kept steps/s with {workers} worker(s))",
            file=sys.stderr,
        )
    return {"file": path, "json": json_path}


def _env_meta(cfg: RobomimicGenerationConfig) -> dict[str, Any]:
    from trqam_lit.data.robomimic_env import env_meta_for

    return env_meta_for(parse_robomimic_name(cfg.env_name).task)
