"""Scripted teleoperators for robosuite's Lift, PickPlaceCan and NutAssemblySquare (Robomimic "mh"-style data).

Robomimic's multi-human datasets mix demonstrations from operators of different skill; offline RL methods are judged
on how they cope with that mix. We cannot collect human data, so these operators imitate three teleoperation styles
on top of one privileged-state pick-and-place script: every decision reads object poses straight from ``env.sim``
(no learning, no observation noise), and all variation comes from the style, whose parameters are drawn once per
episode from the ``rng`` the caller owns. The same (operator seed, env seed) therefore replays bit-identically.

The script is a small state machine per task (approach, descend, close, lift, then carry/align/lower/release for Can
and Square) with grasp and drop checks that send the operator back to re-grasp, as a human would. The styles differ
in gains and speed limits (hurried overshoots and cuts tolerances), in pauses (careful settles before committing,
clumsy hesitates), in correlated action noise, in grasp aim error (clumsy misses) and in accidental releases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

TASKS = ("lift", "can", "square")
ROBOSUITE_ENV = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare"}
MAX_STEPS = {"lift": 300, "can": 300, "square": 400}
STYLES = ("careful", "hurried", "clumsy")

# The same misjudgement in metres means different things per object: the open Panda hand swallows a 4 cm cube with
# 2 cm to spare, the nut's handle is narrow and next to the nut's wall. Aim errors scale with how forgiving it is.
_AIM_SCALE = {"lift": 2.0, "can": 1.0, "square": 0.4}


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def make_robosuite_env(task: str, seed: int = 0) -> Any:
    """The env every operator was tuned on: Panda, BASIC (OSC_POSE delta) controller, 20 Hz, no rendering."""
    _check("task", task, TASKS)
    from trqam_lit.data.robosuite_compat import import_robosuite

    rs = import_robosuite()
    from robosuite.controllers import load_composite_controller_config

    cc = load_composite_controller_config(controller="BASIC", robot="Panda")
    return rs.make(
        ROBOSUITE_ENV[task],
        robots="Panda",
        controller_configs=cc,
        has_renderer=False,
        has_offscreen_renderer=False,
        use_camera_obs=False,
        use_object_obs=True,
        reward_shaping=False,
        control_freq=20,
        ignore_done=True,
        seed=seed,
    )


@dataclass
class _StyleParams:
    """One episode's operator: drawn from the style's ranges so that a dataset covers a spread, not three points."""

    gain: float  # action units per metre of position error
    speed: float  # cap on the translation action's norm
    rot_gain: float  # action units per radian of orientation error
    pos_tol: float  # metres: when a waypoint counts as reached
    yaw_tol: float  # radians: when the gripper counts as aligned
    align_tol: float  # metres: square nut over the peg / can over the bin before lowering
    settle: int  # steps of stillness before committing to a grasp or a descent
    close_steps: int  # steps the gripper is held closed before lifting
    noise: float  # std of the correlated translation/rotation action noise
    noise_rho: float  # AR(1) coefficient of that noise (hands drift, they do not jitter white)
    hesitate_p: float  # per-step chance of freezing
    hesitate_len: int  # longest freeze, steps
    aim_err: float  # std of the horizontal grasp aim error, metres
    early_close_p: float  # chance of closing before reaching the grasp height
    drop_p: float  # per-step chance of letting go while carrying
    overshoot: float  # fraction by which waypoints are overshot in the direction of travel
    release_height: float  # metres above the nominal release height
    carry_height: float  # clearance over the bin wall / peg top when carrying (hurried operators shave it)
    patience: int  # failed attempts (missed grasp, drop, jam) tolerated before the operator gives up
    fluster: float  # factor on aim error and noise after each failure: a rattled operator gets sloppier


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _i(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.integers(lo, hi + 1))


def _draw_style(style: str, rng: np.random.Generator) -> _StyleParams:
    """Per-episode parameters; the ranges are where each style's success/length targets were met."""
    _check("style", style, STYLES)
    if style == "careful":
        return _StyleParams(
            gain=_u(rng, 12.0, 18.0),
            speed=_u(rng, 0.45, 0.65),
            rot_gain=_u(rng, 2.0, 3.0),
            pos_tol=_u(rng, 0.004, 0.007),
            yaw_tol=_u(rng, 0.04, 0.07),
            align_tol=_u(rng, 0.002, 0.004),
            settle=_i(rng, 3, 8),
            close_steps=_i(rng, 12, 16),
            noise=_u(rng, 0.0, 0.02),
            noise_rho=_u(rng, 0.6, 0.9),
            hesitate_p=0.0,
            hesitate_len=0,
            aim_err=_u(rng, 0.0, 0.002),
            early_close_p=0.0,
            drop_p=0.0,
            overshoot=0.0,
            release_height=_u(rng, 0.0, 0.01),
            carry_height=_u(rng, 0.03, 0.05),
            patience=_i(rng, 6, 9),
            fluster=1.0,
        )
    if style == "hurried":
        return _StyleParams(
            gain=_u(rng, 30.0, 45.0),
            speed=_u(rng, 0.9, 1.0),
            rot_gain=_u(rng, 3.5, 5.0),
            pos_tol=_u(rng, 0.012, 0.02),
            yaw_tol=_u(rng, 0.1, 0.2),
            align_tol=_u(rng, 0.004, 0.008),
            settle=0,
            close_steps=_i(rng, 7, 10),
            noise=_u(rng, 0.02, 0.05),
            noise_rho=_u(rng, 0.5, 0.8),
            hesitate_p=0.0,
            hesitate_len=0,
            aim_err=_u(rng, 0.005, 0.012),
            early_close_p=_u(rng, 0.15, 0.35),
            drop_p=0.0,
            overshoot=_u(rng, 0.1, 0.3),
            release_height=_u(rng, 0.02, 0.06),
            carry_height=_u(rng, 0.005, 0.02),
            patience=_i(rng, 0, 2),
            fluster=_u(rng, 1.2, 1.5),
        )
    return _StyleParams(
        gain=_u(rng, 10.0, 25.0),
        speed=_u(rng, 0.4, 0.8),
        rot_gain=_u(rng, 1.5, 3.0),
        pos_tol=_u(rng, 0.01, 0.015),
        yaw_tol=_u(rng, 0.06, 0.15),
        align_tol=_u(rng, 0.004, 0.008),
        settle=_i(rng, 0, 4),
        close_steps=_i(rng, 8, 14),
        noise=_u(rng, 0.1, 0.2),
        noise_rho=_u(rng, 0.7, 0.9),
        hesitate_p=_u(rng, 0.01, 0.03),
        hesitate_len=_i(rng, 5, 15),
        aim_err=_u(rng, 0.008, 0.018),
        early_close_p=_u(rng, 0.1, 0.3),
        drop_p=_u(rng, 0.003, 0.01),
        overshoot=_u(rng, 0.0, 0.15),
        release_height=_u(rng, 0.0, 0.04),
        carry_height=_u(rng, 0.01, 0.04),
        patience=_i(rng, 1, 4),
        fluster=_u(rng, 1.3, 1.7),
    )


def _wrap(angle: float, period: float) -> float:
    """``angle`` brought into [-period/2, period/2): grasps are symmetric, so the nearest equivalent yaw is the goal."""
    return float((angle + period / 2) % period - period / 2)


def _rotvec(r: np.ndarray) -> np.ndarray:
    """Axis-angle vector of a rotation matrix (the OSC controller's orientation delta)."""
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    angle = float(np.arccos(cos))
    if angle < 1e-8:
        return np.zeros(3)
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    sin = np.linalg.norm(axis) / 2.0
    if sin < 1e-6:  # angle near pi: take the axis from the symmetric part
        axis = np.sqrt(np.clip((np.diag(r) + 1.0) / 2.0, 0.0, None))
        return axis / np.linalg.norm(axis) * angle
    return axis / (2.0 * sin) * angle


def _yaw(quat_wxyz: np.ndarray) -> float:
    w, x, y, z = quat_wxyz
    return float(np.arctan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z)))


def _down_rotation(grip_yaw: float) -> np.ndarray:
    """Gripper pointing down with its finger-closing axis (the site's x axis) at ``grip_yaw`` in the world xy plane."""
    c, s = np.cos(grip_yaw), np.sin(grip_yaw)
    return np.array([[c, s, 0.0], [s, -c, 0.0], [0.0, 0.0, -1.0]])


class ScriptedOperator:
    """A privileged-state teleoperator of one style for one task; ``reset`` starts an episode, ``act`` drives it."""

    def __init__(self, task: str, style: str, rng: np.random.Generator) -> None:
        _check("task", task, TASKS)
        _check("style", style, STYLES)
        self.task = task
        self.style = style
        self.rng = rng
        self.params: _StyleParams | None = None

    # ----------------------------------------------------------------------------------------- episode state
    def reset(self, env: Any) -> None:
        """Draw this episode's operator and locate the object, the target and the gripper in the sim."""
        self.params = _draw_style(self.style, self.rng)
        sim = env.sim
        robot = env.robots[0]
        self._eef = robot.eef_site_id["right"] if isinstance(robot.eef_site_id, dict) else robot.eef_site_id
        self._base_rot = sim.data.body_xmat[sim.model.body_name2id(robot.robot_model.root_body)].reshape(3, 3).copy()
        self._gripper = robot.gripper
        if self.task == "lift":
            self._obj_model = env.cube
            self._obj_body = env.cube_body_id
            self._table_z = float(env.model.mujoco_arena.table_offset[2])
        elif self.task == "can":
            self._obj_model = env.objects[env.object_id]
            self._obj_body = env.obj_body_id[self._obj_model.name]
            # the can's quarter of the bin, entered at the corner nearest the robot: its centre is at the edge of
            # the Panda's reach when carried high
            centre = np.array(env.target_bin_placements[env.object_id], dtype=np.float64)
            self._goal = centre + np.array(
                [-0.05 + self.rng.uniform(-0.01, 0.01), -0.065 + self.rng.uniform(-0.01, 0.01), 0.0]
            )
            self._table_z = float(env.bin1_pos[2])
        else:
            self._obj_model = env.nuts[env.nut_id]
            self._obj_body = env.obj_body_id[self._obj_model.name]
            self._handle = env.object_site_ids[env.nut_id]
            self._goal = np.array(sim.data.body_xpos[env.peg1_body_id if env.nut_id == 0 else env.peg2_body_id])
            self._table_z = float(env.table_offset[2])
        self.phase = "approach"
        self.phase_steps = 0
        self.freeze = 0
        self.grip = -1.0
        self.noise_state = np.zeros(6)
        self.attempts = 0
        self.failures = 0
        self.home = self._eef_pose(env)[0]
        self.aim_err = self.params.aim_err * _AIM_SCALE[self.task]
        self.noise = self.params.noise
        self._new_attempt()

    def _fail(self) -> None:
        """After a miss, drop or jam: retry more sloppily, or give up once patience runs out."""
        p = self.params
        assert p is not None
        self.failures += 1
        self.aim_err *= p.fluster
        self.noise *= p.fluster
        if self.failures > p.patience:
            self._goto("give_up")
        else:
            self._new_attempt()
            self._goto("approach")

    def _new_attempt(self) -> None:
        """A fresh grasp aim: each (re)grasp of a human lands somewhere slightly different."""
        p = self.params
        assert p is not None
        self.aim = np.append(self.rng.normal(0.0, self.aim_err, size=2), 0.0)
        self.close_early = bool(self.rng.random() < p.early_close_p)
        self.attempts += 1

    def _goto(self, phase: str) -> None:
        self.phase = phase
        self.phase_steps = 0

    # ----------------------------------------------------------------------------------------- sim reads
    def _eef_pose(self, env: Any) -> tuple[np.ndarray, np.ndarray]:
        return np.array(env.sim.data.site_xpos[self._eef]), np.array(env.sim.data.site_xmat[self._eef]).reshape(3, 3)

    def _obj_pos(self, env: Any) -> np.ndarray:
        return np.array(env.sim.data.body_xpos[self._obj_body])

    def _obj_yaw(self, env: Any) -> float:
        return _yaw(env.sim.data.body_xquat[self._obj_body])

    def _grasp_point(self, env: Any) -> np.ndarray:
        """Where the finger pads should close: the cube's/can's centre, the nut's handle."""
        if self.task == "square":
            return np.array(env.sim.data.site_xpos[self._handle])
        pos = self._obj_pos(env)
        if self.task == "can":
            pos[2] += 0.01  # the can's body origin sits 4 cm below its top and 6 cm above its bottom
        return pos

    def _grasp_yaw(self, env: Any, grip_yaw: float) -> float:
        """Closing-axis yaw nearest to the current one that grips the object across flat faces."""
        if self.task == "can":
            return grip_yaw  # a cylinder: any yaw
        if self.task == "lift":
            goal, period = self._obj_yaw(env), np.pi / 2
        else:  # close across the handle's width, i.e. along the nut's y axis
            goal, period = self._obj_yaw(env) + np.pi / 2, np.pi
        return grip_yaw + _wrap(goal - grip_yaw, period)

    def _holding(self, env: Any) -> bool:
        return bool(env._check_grasp(gripper=self._gripper, object_geoms=self._obj_model))

    # ----------------------------------------------------------------------------------------- control
    def act(self, env: Any) -> np.ndarray:
        """Next action: phase logic picks a waypoint, a P-controller servos to it, the style adds the human part."""
        p = self.params
        if p is None:
            raise RuntimeError("call reset(env) after env.reset() before act(env)")
        eef, rot = self._eef_pose(env)
        grip_yaw = float(np.arctan2(rot[1, 0], rot[0, 0]))
        target, yaw = self._plan(env, eef, grip_yaw)
        self.phase_steps += 1

        err = target - eef
        if p.overshoot > 0.0 and self.phase in ("approach", "carry"):
            err = err * (1.0 + p.overshoot)
        a_pos = p.gain * err
        norm = np.linalg.norm(a_pos)
        if norm > p.speed:
            a_pos *= p.speed / norm
        a_rot = p.rot_gain * _rotvec(_down_rotation(yaw) @ rot.T)
        a_rot = np.clip(a_rot, -0.6, 0.6)
        action = np.concatenate([self._base_rot.T @ a_pos, self._base_rot.T @ a_rot])

        if self.noise > 0.0:
            shock = self.rng.normal(0.0, self.noise, size=6)
            self.noise_state = p.noise_rho * self.noise_state + np.sqrt(1.0 - p.noise_rho**2) * shock
            action = action + self.noise_state * np.array([1.0, 1.0, 1.0, 0.3, 0.3, 0.3])
        if p.hesitate_p > 0.0:
            if self.freeze == 0 and self.rng.random() < p.hesitate_p:
                self.freeze = int(self.rng.integers(2, p.hesitate_len + 1))
            if self.freeze > 0:
                self.freeze -= 1
                action = 0.1 * action
        return np.append(np.clip(action, -1.0, 1.0), self.grip).astype(np.float64)

    def _reached(self, eef: np.ndarray, target: np.ndarray, tol: float) -> bool:
        return bool(np.linalg.norm(target - eef) < tol)

    def _plan(self, env: Any, eef: np.ndarray, grip_yaw: float) -> tuple[np.ndarray, float]:
        """Advance the state machine and return (eef position target, closing-axis yaw target)."""
        p = self.params
        assert p is not None
        ph = self.phase
        obj = self._obj_pos(env)
        hover = 0.08
        if ph == "approach":
            self.grip = -1.0
            gp = self._grasp_point(env) + self.aim
            yaw = self._grasp_yaw(env, grip_yaw)
            target = gp + np.array([0.0, 0.0, hover])
            xy_ok = np.linalg.norm((target - eef)[:2]) < p.pos_tol and abs(target[2] - eef[2]) < 0.03
            if xy_ok and abs(yaw - grip_yaw) < p.yaw_tol:
                self._goto("settle")
            return target, yaw
        if ph == "settle":
            gp = self._grasp_point(env) + self.aim
            if self.phase_steps >= p.settle:
                self._goto("descend")
            return gp + np.array([0.0, 0.0, hover]), self._grasp_yaw(env, grip_yaw)
        if ph == "descend":
            gp = self._grasp_point(env) + self.aim
            yaw = self._grasp_yaw(env, grip_yaw)
            close_z = gp[2] + (0.05 if self.close_early else 0.0)
            if eef[2] < close_z + p.pos_tol or self.phase_steps > 60:
                self._goto("close")
            return gp, yaw
        if ph == "close":
            self.grip = 1.0
            if self.phase_steps >= p.close_steps:
                self.grasp_z = float(obj[2])
                self._goto("lift")
            return eef.copy() if self.phase_steps > 1 else self._grasp_point(env) + self.aim, grip_yaw
        if ph == "lift":
            target = np.array([eef[0], eef[1], self._carry_obj_z() + eef[2] - obj[2]])
            if self.phase_steps == 1:
                self.lift_xy = eef[:2].copy()
            target[:2] = self.lift_xy
            risen = eef[2] - (self.grasp_z + 0.0)
            if risen > 0.04 and (not self._holding(env) or obj[2] < self.grasp_z + 0.02):
                self._goto("regrasp")
            elif self.task != "lift" and obj[2] > self._carry_obj_z() - 0.015:
                self._goto("carry")
            return target, grip_yaw
        if ph == "give_up":  # let go and withdraw; the episode runs out
            self.grip = -1.0
            return self.home, grip_yaw
        if ph == "regrasp":
            self.grip = -1.0
            if self.phase_steps > 8:
                self._fail()
            return eef + np.array([0.0, 0.0, 0.02]), grip_yaw
        if self.task == "can":
            return self._plan_can(env, eef, grip_yaw, obj)
        return self._plan_square(env, eef, grip_yaw, obj)

    def _carry_obj_z(self) -> float:
        """Object-origin height for carrying: over the bin walls (the can's origin is 6 cm above its bottom) or the
        peg's top (the nut's is 1 cm above its bottom), with the operator's clearance on top."""
        p = self.params
        assert p is not None
        if self.task == "can":
            return self._table_z + 0.1 + 0.06 + p.carry_height
        if self.task == "square":
            return self._goal[2] + 0.1 + 0.01 + p.carry_height
        return self._table_z + 0.1

    def _dropped(self, env: Any, eef: np.ndarray, obj: np.ndarray) -> bool:
        return bool(np.linalg.norm(obj - eef) > 0.08 and not self._holding(env))

    def _maybe_drop(self) -> None:
        p = self.params
        assert p is not None
        if p.drop_p > 0.0 and self.rng.random() < p.drop_p:
            self.grip = -1.0

    def _plan_can(self, env: Any, eef: np.ndarray, grip_yaw: float, obj: np.ndarray) -> tuple[np.ndarray, float]:
        p = self.params
        assert p is not None
        ph = self.phase
        carry_z = self._carry_obj_z() + eef[2] - obj[2]
        if ph in ("carry", "lower") and self._dropped(env, eef, obj):
            self._goto("recover")
        ph = self.phase
        offset = eef - obj  # carry the can, not the hand: its offset in the grasp varies
        goal_obj = self._goal
        if ph == "carry":
            self._maybe_drop()
            target = np.array([goal_obj[0] + offset[0], goal_obj[1] + offset[1], carry_z])
            if obj[2] < self._carry_obj_z() - 0.03:  # still below the wall: rise before crossing
                target[:2] = eef[:2]
            if np.linalg.norm((goal_obj - obj)[:2]) < max(p.align_tol * 5, 0.02):
                self._goto("lower")
            return target, grip_yaw
        if ph == "lower":
            release_obj_z = self._table_z + 0.09 + p.release_height
            target = np.array([goal_obj[0] + offset[0], goal_obj[1] + offset[1], release_obj_z + offset[2]])
            if obj[2] < release_obj_z + p.pos_tol or self.phase_steps > 60:
                self._goto("release")
            return target, grip_yaw
        if ph == "release":
            self.grip = -1.0
            if self.phase_steps > 6:
                self._goto("retreat")
            return eef.copy(), grip_yaw
        if ph == "retreat":
            self.grip = -1.0
            return np.array([eef[0], eef[1], carry_z + 0.05]), grip_yaw
        # recover: open, rise and go for the can again wherever it landed
        self.grip = -1.0
        if self.phase_steps > 6:
            self._fail()
        return eef + np.array([0.0, 0.0, 0.03]), grip_yaw

    @staticmethod
    def _nut_turn(nut_yaw: float) -> float:
        """Turn that squares the nut to the peg with its handle never pointing away from the robot.

        The peg stands near the edge of the Panda's reach; with the handle (where the hand is) pointing away the
        nut's centre cannot get over it, so of the four square orientations only those with the handle towards the
        robot or sideways are allowed, and the smallest turn among them wins.
        """
        turns = [_wrap(goal - nut_yaw, 2 * np.pi) for goal in (np.pi / 2, np.pi, -np.pi / 2)]
        return min(turns, key=abs)

    def _plan_square(self, env: Any, eef: np.ndarray, grip_yaw: float, obj: np.ndarray) -> tuple[np.ndarray, float]:
        p = self.params
        assert p is not None
        ph = self.phase
        if ph in ("carry", "lower") and self._dropped(env, eef, obj):
            self._goto("recover")
        ph = self.phase
        peg_top = self._goal[2] + 0.1
        nut_yaw = self._obj_yaw(env)
        yaw_err = self._nut_turn(nut_yaw)
        yaw = grip_yaw + yaw_err
        offset = eef - obj
        xy_err = (self._goal - obj)[:2]
        if ph == "carry":
            self._maybe_drop()
            target = np.array([self._goal[0] + offset[0], self._goal[1] + offset[1], self._carry_obj_z() + offset[2]])
            if np.linalg.norm(xy_err) < p.align_tol and abs(yaw_err) < p.yaw_tol / 2:
                self._goto("align")
            return target, yaw
        if ph == "align":
            target = np.array([self._goal[0] + offset[0], self._goal[1] + offset[1], eef[2]])
            if np.linalg.norm(xy_err) > 2 * p.align_tol:
                self._goto("carry")
            elif self.phase_steps >= p.settle:
                self._goto("lower")
            return target, yaw
        if ph == "lower":
            release_z = self._table_z + 0.03 + p.release_height
            target = np.array([self._goal[0] + offset[0], self._goal[1] + offset[1], release_z + offset[2] - 0.01])
            if obj[2] < release_z:
                self._goto("release")
            elif self.phase_steps > 40 and obj[2] > peg_top - 0.01:  # jammed on the peg's top: lift and re-align
                self._fail()
                if self.phase != "give_up":
                    self._goto("carry")
            return target, yaw
        if ph == "release":
            self.grip = -1.0
            if self.phase_steps > 6:
                self._goto("retreat")
            return eef.copy(), grip_yaw
        if ph == "retreat":
            self.grip = -1.0
            return np.array([eef[0], eef[1], peg_top + 0.1]), grip_yaw
        self.grip = -1.0
        if self.phase_steps > 6:
            self._fail()
        return eef + np.array([0.0, 0.0, 0.03]), grip_yaw
