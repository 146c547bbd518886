"""The Robomimic low-dim environment: a robosuite task built from a dataset's metadata, seen as the reference sees it.

Mirrors robomimic's ``EnvRobosuite`` (how it turns ``env_args`` into ``robosuite.make`` arguments) and the
reference's ``RobomimicLowdimWrapper`` (observation keys and normalisation, success = reward > 0 ends the episode,
a step limit truncates it), written here because the robomimic package on the index does not run with robosuite 1.5
(it imports mujoco_py unconditionally). One difference, on purpose: ``reset(seed=s)`` reseeds robosuite's own
generator, so evaluation episodes start from reproducible object placements (the reference seeds numpy's global
generator, which robosuite 1.5 no longer reads).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import gymnasium as gym
import numpy as np

from trqam_lit.data.robomimic import ACTION_DIM, LOW_DIM_KEYS, normalize_observations
from trqam_lit.data.robosuite_compat import import_robosuite

# What robomimic's EnvRobosuite forces whatever the metadata says: no rendering, no camera observations, the
# object observations on, and robosuite's own horizon off (the wrapper's step limit ends episodes).
FORCED_KWARGS = {
    "has_renderer": False,
    "has_offscreen_renderer": False,
    "ignore_done": True,
    "use_object_obs": True,
    "use_camera_obs": False,
    "camera_depths": False,
}
_DROPPED_KWARGS = ("env_name", "env_lang", "lang", "render_gpu_device_id")


def robosuite_robomimic() -> Any:
    """``import_robosuite()`` with robosuite's import-time warnings and per-env INFO lines kept out of the log."""
    logger = logging.getLogger("robosuite_logs")
    if _quiet not in logger.filters:  # a filter, not a level: robosuite sets the level when it creates the logger
        logger.addFilter(_quiet)
    return import_robosuite()


def _quiet(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def robosuite_kwargs(env_meta: dict[str, Any]) -> dict[str, Any]:
    """``robosuite.make`` keyword arguments from a dataset's ``env_args`` (as robomimic's EnvRobosuite builds them).

    An old-style controller config (robosuite < 1.5: ``{"type": "OSC_POSE", ...}``) is converted with robosuite's
    own ``refactor_composite_controller_config``, as robomimic does for older files.
    """
    kwargs = copy.deepcopy(env_meta.get("env_kwargs", {}))
    for key in _DROPPED_KWARGS:
        kwargs.pop(key, None)
    kwargs.update(FORCED_KWARGS)
    controller = kwargs.get("controller_configs")
    if isinstance(controller, dict) and "body_parts" not in controller and "body_part" not in controller:
        from robosuite.controllers.composite.composite_controller_factory import (
            refactor_composite_controller_config,
        )

        robots = kwargs.get("robots", ["Panda"])
        robot = robots[0] if isinstance(robots, list | tuple) else robots
        kwargs["controller_configs"] = refactor_composite_controller_config(controller, robot, ["right"])
    return kwargs


class RobomimicLowDimEnv(gym.Env):
    """A robosuite task with the low-dim observation, normalised with the dataset's statistics.

    Args:
        env_meta: the dataset's environment metadata (``env_name``, ``env_kwargs``).
        obs_min: per-dimension minimum of the dataset's observations (float32).
        obs_max: per-dimension maximum.
        max_episode_steps: steps after which an episode is truncated (300 lift and can, 400 square).
        seed: seed of robosuite's generator until the first ``reset(seed=...)``.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        env_meta: dict[str, Any],
        obs_min: np.ndarray,
        obs_max: np.ndarray,
        max_episode_steps: int,
        seed: int = 0,
    ) -> None:
        rs = robosuite_robomimic()
        self.env_meta = env_meta
        self.env = rs.make(env_meta["env_name"], **robosuite_kwargs(env_meta), seed=seed)
        self.obs_min = np.asarray(obs_min, dtype=np.float32)
        self.obs_max = np.asarray(obs_max, dtype=np.float32)
        self.max_episode_steps = int(max_episode_steps)
        self.t = 0
        low, high = -np.ones(ACTION_DIM, dtype=np.float32), np.ones(ACTION_DIM, dtype=np.float32)
        self.action_space = gym.spaces.Box(low, high, dtype=np.float32)
        obs_shape = self.obs_min.shape
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=obs_shape, dtype=np.float32)

    def low_dim(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        """The four low-dim keys of a robosuite observation dict, concatenated (``object`` is ``object-state``)."""
        named = {**raw, "object": raw["object-state"]}
        return np.concatenate([np.asarray(named[k], dtype=np.float64) for k in LOW_DIM_KEYS])

    def observe(self, raw: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The normalised float32 observation (robosuite's reset dict has stale object states: read afresh then)."""
        if raw is None:
            raw = self.env._get_observations(force_update=True)
        return normalize_observations(self.low_dim(raw), self.obs_min, self.obs_max).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        if seed is not None:
            # In place: robosuite's placement samplers hold this very generator.
            self.env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        self.env.reset()
        self.t = 0
        return self.observe(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        raw, reward, _, info = self.env.step(np.asarray(action, dtype=np.float64))
        self.t += 1
        success = reward > 0.0  # the reference's rule: sparse rewards are positive only at success
        info = {**info, "success": float(success)}
        truncated = not success and self.t >= self.max_episode_steps
        return self.observe(raw), float(reward), bool(success), bool(truncated), info

    def get_state(self) -> np.ndarray:
        """The flattened simulator state (time, qpos, qvel), as robomimic stores it in ``states``."""
        return np.array(self.env.sim.get_state().flatten())

    def reset_to(self, state: np.ndarray, *, model_file: str | None = None, seed: int | None = None) -> np.ndarray:
        """Reset to a stored demo's model and flattened state; returns the observation there.

        The model comes from ``model_file`` (the demo's MJCF XML, as robomimic's ``reset_to`` loads it) or, without
        one, from a reset with the demo's ``seed`` (robosuite draws model randomisation, such as Lift's cube size,
        at reset); with neither, the current model is kept.
        """
        if model_file is not None:
            self.env.reset()
            self.env.reset_from_xml_string(self.env.edit_model_xml(model_file))
            self.env.sim.reset()
        elif seed is not None:
            self.reset(seed=seed)
        self.t = 0
        self.env.sim.set_state_from_flattened(np.asarray(state))
        self.env.sim.forward()
        return self.observe()

    def close(self) -> None:
        self.env.close()


def env_meta_for(task: str) -> dict[str, Any]:
    """The metadata our generator writes for a task (robosuite 1.5's default Panda OSC_POSE controller at 20 Hz,
    sparse rewards), in the layout of robomimic's v1.5 files (``type`` 1 is robomimic's EnvType.ROBOSUITE_TYPE)."""
    from trqam_lit.data.robomimic import TASKS

    rs = robosuite_robomimic()
    from robosuite.controllers import load_composite_controller_config

    return {
        "env_name": TASKS[task],
        "env_version": rs.__version__,
        "type": 1,
        "env_kwargs": {
            "robots": ["Panda"],
            "controller_configs": load_composite_controller_config(controller="BASIC", robot="Panda"),
            "control_freq": 20,
            "reward_shaping": False,
            "reward_scale": 1.0,
            **FORCED_KWARGS,
        },
    }
