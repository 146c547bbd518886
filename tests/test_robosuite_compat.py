"""robosuite 1.5.2 under the installed MuJoCo with data.robosuite_compat: the Robomimic tasks build and step, every
joint address and the controller's mass matrix equal what MuJoCo itself says, and OGBench runs in the same process."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest

from trqam_lit.data.ogbench_env import make_ogbench_env
from trqam_lit.data.robosuite_compat import QPOS_WIDTH, QVEL_WIDTH, full_mass_matrix, import_robosuite

TASKS = ("Lift", "PickPlaceCan", "NutAssemblySquare")
FREE_JOINTS = {"Lift": 1, "PickPlaceCan": 4, "NutAssemblySquare": 2}  # the objects


def make(task: str):
    return import_robosuite().make(task, robots="Panda", has_renderer=False, has_offscreen_renderer=False,
                                   use_camera_obs=False, reward_shaping=False, seed=0, ignore_done=True)  # fmt: skip


@pytest.fixture(scope="module", params=TASKS)
def env(request):
    environment = make(request.param)
    yield request.param, environment
    environment.close()


def test_every_joint_address_is_mujocos_own(env):
    task, environment = env
    model = environment.sim.model
    free = 0
    for j in range(model._model.njnt):
        kind = int(model.jnt_type[j])
        free += kind == int(mujoco.mjtJoint.mjJNT_FREE)
        q0, v0 = int(model.jnt_qposadr[j]), int(model.jnt_dofadr[j])
        nq, nv = QPOS_WIDTH[kind], QVEL_WIDTH[kind]
        name = model.joint_id2name(j)
        q, v = model.get_joint_qpos_addr(name), model.get_joint_qvel_addr(name)
        assert (int(q) if nq == 1 else tuple(map(int, q))) == (q0 if nq == 1 else (q0, q0 + nq)), name
        assert (int(v) if nv == 1 else tuple(map(int, v))) == (v0 if nv == 1 else (v0, v0 + nv)), name
    assert free == FREE_JOINTS[task]


def test_the_tasks_step_with_finite_low_dim_observations_and_a_success_check(env):
    task, environment = env
    obs = environment.reset()
    low, high = environment.action_spec
    assert len(low) == 7
    rng = np.random.default_rng(0)
    for _ in range(20):
        obs, reward, _, _ = environment.step(rng.uniform(low, high))
    for key, size in (("robot0_eef_pos", 3), ("robot0_eef_quat", 4), ("robot0_gripper_qpos", 2)):
        assert obs[key].shape == (size,) and np.isfinite(obs[key]).all(), key
    assert obs["object-state"].shape == ({"Lift": 10}.get(task, 14),) and np.isfinite(obs["object-state"]).all()
    assert isinstance(bool(environment._check_success()), bool)


def test_the_controllers_mass_matrix_is_mujocos(env):
    _, environment = env
    environment.reset()
    environment.step(np.zeros(7))
    arm = next(c for c in environment.robots[0].part_controllers.values() if hasattr(c, "mass_matrix"))
    arm.update(force=True)  # forward(): the inertia at the current state, as the columns below
    sim = environment.sim
    model, data = sim.model._model, sim.data._data
    columns = np.zeros((model.nv, model.nv))
    for i in range(model.nv):  # M e_i, column by column
        unit, column = np.zeros(model.nv), np.zeros(model.nv)
        unit[i] = 1.0
        mujoco.mj_mulM(model, data, column, unit)
        columns[:, i] = column
    np.testing.assert_allclose(full_mass_matrix(model, data), columns, rtol=0, atol=1e-12)
    np.testing.assert_allclose(arm.mass_matrix, columns[arm.qvel_index, :][:, arm.qvel_index], rtol=0, atol=1e-12)


def test_ogbench_and_robosuite_step_in_one_process():
    ogbench_env = make_ogbench_env("cube-single-play-singletask-task1-v0")
    lift = make("Lift")
    ogbench_env.reset(seed=0)
    lift.reset()
    for _ in range(10):
        obs, *_ = ogbench_env.step(ogbench_env.action_space.sample() * 0)
        robo, *_ = lift.step(np.zeros(7))
    assert np.isfinite(obs).all() and np.isfinite(robo["robot0_eef_pos"]).all()
    lift.close()
