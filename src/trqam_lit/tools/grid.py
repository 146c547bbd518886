"""A grid of trainings (agents x tasks x seeds) as read from its YAML file: ``Grid.load`` and each ``Run``'s
directory, command and state. The runner (``trqam_lit.tools.experiment``) trains them; the report
(``trqam_lit.tools.report``) reads them back. See ``trqam-lit-exp run --help`` for the file's keys."""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DONE = "done.json"
PLACEHOLDERS = ("{agent}", "{task}", "{seed}")


def fill_placeholders(override: str, agent: str, task: str, seed: int) -> str:
    """An override with ``{agent}``, ``{task}`` and ``{seed}`` replaced by the run's (for paired runs: each seed's
    fine-tuning starts from that seed's BC checkpoint, ``--model.init_args.init_from=.../seed{seed}/...``). Only these
    three are replaced; other braces (a JSON value) are left as they are."""
    for key, value in zip(PLACEHOLDERS, (agent, task, str(seed)), strict=True):
        override = override.replace(key, value)
    return override


@dataclass(frozen=True)
class Run:
    """One training of the grid."""

    agent: str
    task: str
    seed: int
    config: tuple[str, ...]  # the config files, composed in this order (``--config`` each)
    overrides: tuple[str, ...]
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.agent}/{self.task}/seed{self.seed}"

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    @property
    def finished(self) -> bool:
        return (self.run_dir / DONE).is_file()

    def recipe(self) -> dict:
        """What makes this run what it is: its ``fit`` arguments (without a resume checkpoint) and its config's hash."""
        return {"fit_args": self.fit_args(resume=False), "config_sha256": _configs_sha256(self.config)}

    def changed_since_finished(self) -> str | None:
        """Why this finished run would not be the same run if started now (None: the same, or not finished)."""
        if not self.finished:
            return None
        try:
            record = json.loads((self.run_dir / DONE).read_text())
        except (OSError, ValueError):
            return f"its {DONE} is unreadable"
        now = self.recipe()
        if "config_sha256" in record and record["config_sha256"] != now["config_sha256"]:
            return f"{', '.join(self.config)} changed since it finished"
        args = record.get("fit_args")
        if args is None and "command" in record:  # records written before the recipe was kept: the command line
            words = shlex.split(record["command"])
            args = words[words.index("fit") :] if "fit" in words else None
            if args and "--ckpt_path" in args:
                i = args.index("--ckpt_path")
                del args[i : i + 2]
        if args is not None and args != now["fit_args"]:
            return "its overrides changed since it finished (the grid file or its task/agent entries)"
        return None

    def fit_args(self, resume: bool = True) -> list[str]:
        """``trqam-lit fit`` arguments: the config, the grid's overrides, then where everything of this run goes."""
        args = [
            "fit",
            *(a for c in self.config for a in ("--config", c)),
            *self.overrides,
            f"--seed_everything={self.seed}",
        ]
        args += [
            "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
            f"--trainer.logger.init_args.save_dir={self.run_dir}",
            "--trainer.logger.init_args.name=",
            "--trainer.logger.init_args.version=",
            "--trainer.logger.init_args.default_hp_metric=false",
            f"--checkpoint.dirpath={self.run_dir / 'checkpoints'}",
        ]
        if resume and self.last_checkpoint.is_file():
            args += ["--ckpt_path", str(self.last_checkpoint)]
        return args


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _configs_sha256(configs: tuple[str, ...]) -> str:
    """One file: its SHA-256 (as recorded before composed configs existed); several: the SHA-256 of their names and
    hashes in order."""
    if len(configs) == 1:
        return _sha256(Path(configs[0]))
    return hashlib.sha256("\n".join(f"{c} {_sha256(Path(c))}" for c in configs).encode()).hexdigest()


@dataclass
class Grid:
    name: str
    root: Path
    runs: list[Run] = field(default_factory=list)

    @property
    def agents(self) -> list[str]:
        """The grid's agents, in the grid file's order."""
        return list(dict.fromkeys(r.agent for r in self.runs))

    @property
    def tasks(self) -> list[str]:
        """The grid's tasks, in the grid file's order."""
        return list(dict.fromkeys(r.task for r in self.runs))

    @classmethod
    def load(cls, path: str | Path) -> Grid:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"grid file not found: {path}")
        spec = yaml.safe_load(path.read_text()) or {}
        unknown = set(spec) - {"name", "runs_dir", "overrides", "agents", "tasks", "seeds"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        for key in ("name", "agents", "seeds"):
            if key not in spec:
                raise ValueError(f"{path}: missing '{key}' (see `trqam-lit-exp run --help`)")
        root = Path(spec.get("runs_dir", "runs")) / spec["name"]
        common = tuple(spec.get("overrides") or ())
        tasks = spec.get("tasks") or {"default": []}
        runs = []
        for agent, entry in spec["agents"].items():
            if not isinstance(entry, dict) or "config" not in entry:
                raise ValueError(f"{path}: agent '{agent}' needs a 'config' (and optional 'overrides')")
            configs = (entry["config"],) if isinstance(entry["config"], str) else tuple(entry["config"])
            if not configs or not all(isinstance(c, str) for c in configs):
                raise ValueError(
                    f"{path}: agent '{agent}': config is a file or a list of files, got {entry['config']!r}"
                )
            for config in configs:
                if not Path(config).is_file():
                    raise FileNotFoundError(f"{path}: config of agent '{agent}' not found: {config}")
            for task, task_overrides in tasks.items():
                for seed in spec["seeds"]:
                    overrides = tuple(
                        fill_placeholders(str(o), agent=agent, task=str(task), seed=int(seed))
                        for o in (*common, *(entry.get("overrides") or ()), *(task_overrides or ()))
                    )
                    run_dir = root / agent / str(task) / f"seed{int(seed)}"
                    runs.append(Run(agent, str(task), int(seed), configs, overrides, run_dir))
        return cls(spec["name"], root, runs)
