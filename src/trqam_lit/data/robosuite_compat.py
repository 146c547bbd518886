"""robosuite 1.5.2 on MuJoCo 4: the two places where it breaks, replaced at import (``import_robosuite``).

Measured (docs/data.md, "Robomimic and the MuJoCo version"): under mujoco 4 (1) ``MjModel.get_joint_qpos_addr`` and
``get_joint_qvel_addr`` assert on ``joint_type in (mjJNT_HINGE, mjJNT_SLIDE)``, which is False for every joint because
``enum == np.int32`` no longer compares equal (``np.int32 == enum`` still does); (2) ``Controller.update`` builds the
mass matrix from ``MjData.qM``, which mujoco 4 removed, with the old ``mj_fullM`` signature. Nothing else in robosuite's
use of the mujoco API changed (an AST scan of its 63 ``mujoco.*`` names against both versions). The replacements read
the joint type as an int and build the mass matrix with ``mj_fullM(model, data, out)``; the project pins
robosuite==1.5.2, whose ``Controller.update`` the second one mirrors. Under mujoco 3 nothing is replaced.
"""

from __future__ import annotations

import os
from typing import Any

import mujoco
import numpy as np

MUJOCO_MAJOR = int(mujoco.__version__.split(".")[0])
_J = mujoco.mjtJoint
QPOS_WIDTH = {int(_J.mjJNT_FREE): 7, int(_J.mjJNT_BALL): 4, int(_J.mjJNT_SLIDE): 1, int(_J.mjJNT_HINGE): 1}
QVEL_WIDTH = {int(_J.mjJNT_FREE): 6, int(_J.mjJNT_BALL): 3, int(_J.mjJNT_SLIDE): 1, int(_J.mjJNT_HINGE): 1}


def _address(start: Any, width: int) -> Any:
    """robosuite's convention: an int for a one-dimensional joint, else (start, end)."""
    return start if width == 1 else (start, start + width)


def get_joint_qpos_addr(self, name: str) -> Any:
    joint = self.joint_name2id(name)
    return _address(self.jnt_qposadr[joint], QPOS_WIDTH[int(self.jnt_type[joint])])


def get_joint_qvel_addr(self, name: str) -> Any:
    joint = self.joint_name2id(name)
    return _address(self.jnt_dofadr[joint], QVEL_WIDTH[int(self.jnt_type[joint])])


def full_mass_matrix(model: Any, data: Any) -> np.ndarray:
    """The dense (nv, nv) joint-space inertia matrix with mujoco 4's ``mj_fullM(model, data, out)``."""
    out = np.zeros((model.nv, model.nv), dtype=np.float64)
    mujoco.mj_fullM(model, data, out)
    return out


def controller_update(self, force: bool = False) -> None:
    """robosuite 1.5.2's ``Controller.update`` with the mass matrix from :func:`full_mass_matrix`."""
    if not (self.new_update or force):
        return
    if force or not self.lite_physics:
        self.sim.forward()
    if self.ref_name is not None:
        self.update_reference_data()
    self.joint_pos = np.array(self.sim.data.qpos[self.qpos_index])
    self.joint_vel = np.array(self.sim.data.qvel[self.qvel_index])
    mass = full_mass_matrix(self.sim.model._model, self.sim.data._data)
    self.mass_matrix = mass[self.qvel_index, :][:, self.qvel_index]
    self.new_update = False


def import_robosuite() -> Any:
    """``robosuite``, patched for the installed MuJoCo (idempotent), without a renderer."""
    os.environ.setdefault("MUJOCO_GL", "disable")
    import robosuite
    from robosuite.controllers.parts import controller
    from robosuite.utils import binding_utils

    if MUJOCO_MAJOR >= 4:
        binding_utils.MjModel.get_joint_qpos_addr = get_joint_qpos_addr
        binding_utils.MjModel.get_joint_qvel_addr = get_joint_qvel_addr
        controller.Controller.update = controller_update
    return robosuite
