"""The OGBench environment factory: every environment the package steps or inspects is built here (evaluation and
the online phase get fresh ones; the file checks and relabelling share one cached per process)."""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from trqam_lit.data.paths import env_id_for


@contextlib.contextmanager
def quiet_box_warning() -> Iterator[None]:
    """Silence gymnasium's warning that float64 action bounds are cast to float32 (harmless for [-1, 1])."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*precision lowered by casting.*")
        yield


def make_ogbench_env(env_name: str) -> Any:
    """A new single-task OGBench environment with no dataset (never downloads anything): the one environment
    factory (evaluation, the online phase; ``make_env`` caches one for checks and relabelling)."""
    os.environ.setdefault("MUJOCO_GL", "disable")  # state observations need no renderer
    import ogbench

    with quiet_box_warning():
        return ogbench.make_env_and_datasets(env_name, env_only=True)


@functools.lru_cache(maxsize=8)
def make_env(env_name: str) -> Any:
    """``make_ogbench_env``, cached per process (building the MuJoCo model costs ~1 s): shared by the file checks and
    relabelling, which reset it; never step it where another user could."""
    return make_ogbench_env(env_name)


@functools.lru_cache(maxsize=64)
def env_spaces(env_name: str) -> tuple[int, int]:
    """(obs_dim, action_dim) of a single-task env, read from its gymnasium spaces."""
    env_id_for(env_name)  # fails early with a readable message on non-single-task names
    env = make_env(env_name)
    with quiet_box_warning():  # the manipulation envs build a new Box on every action_space access
        return int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))
