"""The online phase of `trqam-lit fit` (spec data.md section 5): interaction with the environment, one agent-agnostic
Lightning callback.

After ``offline_steps`` gradient steps the DataModule's batch stream switches to a replay buffer (the offline data
plus room for ``online_steps`` transitions). Before each gradient step the callback runs the environment steps the
schedule asks for, with ``pl_module.act(obs)`` (the deterministic action chunk of the current policy; its H actions
are queued and executed one per step), and stores single-step transitions. Updates themselves are the agent's usual
Lightning training step (optimizer step, target updates, the dual step on lambda), so BC, QAM, TRQAM and later agents
run online unchanged.

Schedule: online update k (0-based, global step ``offline_steps + k``) happens after environment step
``max(start_training, 1) + k // utd_ratio``; so no update before ``start_training`` environment steps, then
``utd_ratio`` updates per environment step, and the run ends after ``online_steps`` environment steps, at global step
``offline_steps + utd_ratio * (online_steps - max(start_training, 1) + 1)``. The callback sets ``trainer.max_steps``
to that. A DataModule takes part by meeting :class:`OnlineData` (``data.online_data.OnlineDataModule`` implements it
for every domain).
"""

from __future__ import annotations

import time
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import numpy as np
import torch

from trqam_lit.training.checkpoint import check_checkpoint_file  # noqa: F401 (re-exported: its old home)
from trqam_lit.training.lightning_internals import logged_step
from trqam_lit.training.ranks import gather_from_ranks
from trqam_lit.training.rng import ONLINE_ACT, ONLINE_RESET, fold_seed, seeded


@runtime_checkable
class OnlineData(Protocol):
    """What the online phase needs from the DataModule: the one contract every domain's DataModule meets."""

    horizon: int  # actions per policy call (the chunk executed open loop, one per environment step)
    action_dim: int  # per environment step

    def make_replay_buffer(self, capacity_extra: int) -> Any:
        """The buffer over the offline data (room for ``capacity_extra`` transitions) that batches now come from."""

    def make_online_env(self) -> Any:
        """A fresh environment (gymnasium API) for online interaction."""

    def defer_sampling_from(self, step: int) -> None:
        """Draw the batches of global steps >= ``step`` only after the environment steps preceding them."""

    def state_dict(self) -> dict[str, Any]:
        """Each rank's online transitions (a checkpoint entry)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore them (now, or when the buffer is made)."""


_STATE_KEYS = ("env_id", "env_steps", "episodes", "offline_steps", "utd_ratio", "start_training")
# Checkpoints since 0.1 also hold "progress": each rank's episode in progress (its actions, the rest of the chunk).


class OnlinePhase(pl.Callback):
    """Offline-to-online fine-tuning: environment interaction between the gradient steps of the online phase.

    Args:
        online_steps: environment steps of the online phase; 0 trains offline only.
        utd_ratio: gradient updates per environment step once ``start_training`` steps were taken.
        start_training: environment steps taken before the first online update.
        offline_steps: global step at which the online phase starts; None: ``trainer.max_steps`` as configured
            (the offline budget). ``trainer.max_steps`` is then set to the end of the online phase.
        seed: base seed of the online episodes (with the rank and the episode index) and of the acting noise (with
            the rank and the environment step), so every DDP rank collects different data.
    """

    def __init__(
        self,
        online_steps: int = 0,
        utd_ratio: int = 1,
        start_training: int = 5000,
        offline_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        if online_steps < 0 or utd_ratio < 1 or start_training < 0:
            raise ValueError(
                f"need online_steps >= 0, utd_ratio >= 1, start_training >= 0; got {online_steps}, {utd_ratio}, "
                f"{start_training}"
            )
        if online_steps and max(start_training, 1) > online_steps:
            raise ValueError(f"start_training={start_training} leaves no update within online_steps={online_steps}")
        if offline_steps is not None and offline_steps < 0:
            raise ValueError(f"offline_steps must be >= 0, got {offline_steps}")
        self.online_steps, self.utd_ratio, self.start_training = online_steps, utd_ratio, start_training
        self.offline_steps, self.seed = offline_steps, seed
        self.env_steps = 0  # environment steps taken so far (the same on every rank)
        self.episodes = 0  # episodes started on this rank (seeds each reset)
        self.buffer: Any = None
        self._env: Any = None
        self._obs: np.ndarray | None = None
        self._queue: list[np.ndarray] = []
        self._episode = [0.0, 0]  # return, length of the episode in progress
        self._actions: list[np.ndarray] = []  # actions of the episode in progress (replayed on resume)
        self._progress: dict[str, Any] | None = None  # this rank's episode in progress, from a checkpoint
        self._finished: list[tuple[int, float, float | None, int]] = []  # (log step, return, success, length)
        self._loaded: dict[str, Any] | None = None
        self._window = (time.perf_counter(), 0)
        self._trainer: pl.Trainer | None = None
        self.timers = {"env": 0.0, "act": 0.0}  # seconds in env.step / reset and in pl_module.act

    # ---- schedule --------------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.online_steps > 0

    @property
    def num_updates(self) -> int:
        """Gradient updates of the online phase."""
        return self.utd_ratio * (self.online_steps - max(self.start_training, 1) + 1) if self.enabled else 0

    def env_steps_before_update(self, k: int) -> int:
        """Environment steps taken before online update ``k`` (0-based)."""
        return min(max(self.start_training, 1) + k // self.utd_ratio, self.online_steps)

    # ---- set-up ----------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage != "fit" or not self.enabled:
            return
        dm = trainer.datamodule
        if not isinstance(dm, OnlineData):
            members = [
                *OnlineData.__annotations__,
                *(k for k, v in vars(OnlineData).items() if k[0] != "_" and callable(v)),
            ]
            missing = [m for m in members if not hasattr(dm, m)]
            raise ValueError(
                "the online phase needs a DataModule that meets training.online.OnlineData (make_replay_buffer, "
                "make_online_env, defer_sampling_from, state_dict, load_state_dict, horizon, action_dim; "
                f"data.online_data.OnlineDataModule implements them); {type(dm).__name__} lacks {sorted(missing)}"
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError("the online phase schedules one batch per gradient step: use accumulate_grad_batches=1")
        if self.offline_steps is None:
            if trainer.max_steps is None or trainer.max_steps < 0:
                raise ValueError("set trainer.max_steps (the offline budget) or online.offline_steps")
            self.offline_steps = int(trainer.max_steps)
        total = self.offline_steps + self.num_updates
        if trainer.max_steps not in (self.offline_steps, total):
            raise ValueError(
                f"trainer.max_steps={trainer.max_steps} contradicts the online schedule: online.offline_steps="
                f"{self.offline_steps} + {self.num_updates} online updates (utd_ratio * (online_steps - "
                f"start_training + 1)) = {total}. Set trainer.max_steps to {self.offline_steps} or {total}, or drop "
                "online.offline_steps (then trainer.max_steps is the offline budget)"
            )
        trainer.fit_loop.epoch_loop.max_steps = total
        dm.defer_sampling_from(self.offline_steps)
        if trainer.is_global_zero:
            print(
                f"trqam-lit: online phase after {self.offline_steps} offline steps: {self.online_steps} environment "
                f"steps, {self.num_updates} updates (utd_ratio={self.utd_ratio}, start_training="
                f"{self.start_training}); trainer.max_steps = {total}",
                flush=True,
            )

    def _env_id(self, trainer: pl.Trainer) -> str:
        dm = trainer.datamodule
        return str(getattr(dm, "env_name", type(dm).__name__))

    def _start(self, trainer: pl.Trainer) -> None:
        """Create the replay buffer (restoring a checkpoint's transitions) and this rank's environment."""
        dm = trainer.datamodule
        self.buffer = dm.make_replay_buffer(self.online_steps)
        expected = min(self.env_steps, self.online_steps)
        if self.buffer.online_size != expected:
            raise ValueError(
                f"checkpoint inconsistent: it counts {self.env_steps} environment steps but its replay buffer holds "
                f"{self.buffer.online_size} online transitions (expected {expected}); a damaged or mixed checkpoint?"
            )
        self._env = dm.make_online_env()
        if self._progress is not None:
            self._replay(trainer, self._progress)
        else:
            self._reset(trainer)
        self._progress = None

    def _replay(self, trainer: pl.Trainer, progress: dict[str, Any]) -> None:
        """Bring the environment back to the checkpoint's state: the episode's reset seed, then its actions again
        (the simulation is deterministic), so a resumed run continues exactly as an uninterrupted one."""
        t = time.perf_counter()
        self._obs, _ = self._env.reset(seed=self._episode_seed(trainer, self.episodes - 1))
        ret = 0.0
        actions = [np.asarray(a, dtype=np.float32) for a in progress["actions"]]
        for action in actions:
            self._obs, reward, terminated, truncated, _ = self._env.step(action)
            ret += float(reward)
            if terminated or truncated:
                raise ValueError("checkpoint inconsistent: its episode in progress ends before its last action")
        self.timers["env"] += time.perf_counter() - t
        self._actions = actions
        self._queue = [np.asarray(a, dtype=np.float32) for a in progress["queue"]]
        self._episode = [ret, len(self._actions)]

    def _restore(self, trainer: pl.Trainer, state: dict[str, Any]) -> None:
        if not state["env_steps"]:
            return  # an offline checkpoint: the online phase has not started
        if state["env_id"] != self._env_id(trainer):
            raise ValueError(
                f"the checkpoint's online data come from {state['env_id']!r} but this run uses "
                f"{self._env_id(trainer)!r}: resume with the same environment"
            )
        for key in ("offline_steps", "utd_ratio", "start_training"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"online.{key}={getattr(self, key)} but the checkpoint's online phase ran with {state[key]}: "
                    "an exact resume needs the same schedule"
                )
        episodes = state["episodes"]
        if len(episodes) != trainer.world_size:
            raise ValueError(
                f"the checkpoint's online phase ran on {len(episodes)} rank(s), this run has {trainer.world_size}"
            )
        self.env_steps, self.episodes = int(state["env_steps"]), int(episodes[trainer.global_rank])
        if "progress" in state:  # else (an older checkpoint) the interrupted episode restarts as a new one
            self._progress = state["progress"][trainer.global_rank]

    # ---- interaction -----------------------------------------------------------------------------------------
    def _episode_seed(self, trainer: pl.Trainer, episode: int) -> int:
        return fold_seed(self.seed, trainer.global_rank, episode, ONLINE_RESET) % 2**31

    def _reset(self, trainer: pl.Trainer) -> None:
        t = time.perf_counter()
        self._obs, _ = self._env.reset(seed=self._episode_seed(trainer, self.episodes))
        self.timers["env"] += time.perf_counter() - t
        self.episodes += 1
        self._queue, self._episode, self._actions = [], [0.0, 0], []

    def _act(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        t = time.perf_counter()
        obs = torch.as_tensor(np.asarray(self._obs), dtype=torch.float32)[None]
        # A private, reproducible noise stream per (rank, env step); the training RNG stream is left untouched.
        with seeded(pl_module.device, fold_seed(self.seed, trainer.global_rank, self.env_steps, ONLINE_ACT)):
            chunk = pl_module.act(obs)
        self._queue = list(chunk.float().cpu().numpy().reshape(dm.horizon, dm.action_dim))
        self.timers["act"] += time.perf_counter() - t

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: int) -> None:
        """Step the environment until ``target`` environment steps were taken in total."""
        while self.env_steps < target:
            if not self._queue:
                self._act(trainer, pl_module)
            action = self._queue.pop(0)
            t = time.perf_counter()
            next_obs, reward, terminated, truncated, info = self._env.step(action)
            self.timers["env"] += time.perf_counter() - t
            done = bool(terminated or truncated)
            self.buffer.add(self._obs, action, float(reward), done, 1.0 - float(terminated), next_obs)
            self._actions.append(action)
            self.env_steps += 1
            self._episode[0] += float(reward)
            self._episode[1] += 1
            self._obs = next_obs
            if done:
                success = float(info["success"]) if "success" in info else None
                self._finished.append((logged_step(trainer), self._episode[0], success, self._episode[1]))
                self._reset(trainer)

    def _catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not self.enabled or step < self.offline_steps or step >= trainer.max_steps:
            return
        if self.buffer is None:
            if step > self.offline_steps and self.env_steps == 0:
                raise ValueError(
                    f"resumed at global step {step}, past the online phase's start ({self.offline_steps}), from a "
                    f"checkpoint without online data: set trainer.max_steps (or online.offline_steps) to {step} to "
                    "start the online phase there"
                )
            self._start(trainer)
            self._collect(trainer, pl_module, self.env_steps_before_update(step - self.offline_steps))
            self._window = (time.perf_counter(), self.env_steps)  # the rate measures the phase, not the burst
        else:
            self._collect(trainer, pl_module, self.env_steps_before_update(step - self.offline_steps))

    # ---- hooks -----------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is not None:
            if self._loaded["env_steps"] and not self.enabled:
                raise ValueError(
                    "the checkpoint is inside an online phase but online.online_steps=0: resume with the online "
                    "settings it was trained with"
                )
            if self.enabled:
                self._restore(trainer, self._loaded)
            self._loaded = None
        self._catch_up(trainer, pl_module)  # resumed inside, or right at the start of, the online phase

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, idx) -> None:
        # Runs after the optimizer step and before ModelCheckpoint: a checkpoint holds the env steps of the next
        # update, so a resume continues at exactly that point.
        if not self.enabled:
            return
        self._catch_up(trainer, pl_module)
        if self.buffer is not None and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._flush(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window = (time.perf_counter(), self.env_steps)  # evaluation time is not online-phase time

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.buffer is not None:
            self._flush(trainer)

    def _flush(self, trainer: pl.Trainer) -> None:
        """Log every finished episode (of every rank, at the step it ended) and the phase's counters."""
        episodes = sorted((e for rank in gather_from_ranks(self._finished, trainer) for e in rank), key=lambda e: e[0])
        self._finished = []
        now, (t0, n0) = time.perf_counter(), self._window
        rate = (self.env_steps - n0) / max(now - t0, 1e-9)
        self._window = (now, self.env_steps)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            for step, ret, success, length in episodes:
                metrics = {"online/return": ret, "online/length": float(length)}
                if success is not None:
                    metrics["online/success"] = success
                logger.log_metrics(metrics, step=step)
            counters = {"online/env_steps": float(self.env_steps), "online/buffer_size": float(len(self.buffer))}
            if self.env_steps > n0:
                counters["online/env_steps_per_sec"] = rate
            logger.log_metrics(counters, step=logged_step(trainer))

    # ---- checkpoint ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Called on every rank when Lightning saves a checkpoint: gather each rank's episode counter.
        trainer = self._trainer
        return {
            "env_id": self._env_id(trainer) if trainer is not None else "",
            "env_steps": self.env_steps,
            "episodes": gather_from_ranks(self.episodes, trainer),
            "progress": gather_from_ranks(self._progress_state(), trainer),
            "offline_steps": self.offline_steps,
            "utd_ratio": self.utd_ratio,
            "start_training": self.start_training,
        }

    def _progress_state(self) -> dict[str, Any]:
        """This rank's episode in progress: its actions so far and the rest of the current action chunk."""
        if self._progress is not None:  # saved before the environment was rebuilt: keep the checkpoint's
            return self._progress
        dim = getattr(self._trainer.datamodule, "action_dim", 0) if self._trainer is not None else 0

        def stack(rows: list[np.ndarray]) -> torch.Tensor:  # tensors: checkpoints stay loadable with weights_only
            return torch.from_numpy(np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32))

        return {"actions": stack(self._actions), "queue": stack(self._queue)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = [k for k in _STATE_KEYS if k not in state_dict]
        if missing:
            raise ValueError(f"the checkpoint's online-phase state is damaged: it lacks {missing}")
        self._loaded = dict(state_dict)  # applied in on_train_start, where the rank and DataModule are known
