"""LIBERO's action and proprio conventions on ManiSkill's Panda, in one place.

Env actions (what `ManiSkillEnv.step` takes) are LIBERO's, so everything that drives LIBERO drives
these tasks too: 7 dims [dx, dy, dz, droll, dpitch, dyaw, gripper] in [-1, 1], gripper -1 = open,
+1 = close. Policies speak OpenVLA's RLDS gripper ([0, 1], 1 = open) and the env worker converts
it with `openvla_to_libero`, exactly as for LIBERO (env_workers/worker.py: to_env_actions).

ManiSkill's `pd_ee_delta_pose` controller, as it reads those dims:
- position: a target of the current TCP position + 0.1 m x action[:3], in the robot's root frame
  (its axes are the world's in every task here: x forward, y left, z up), like LIBERO's OSC
  (there 0.05 m x action).
- rotation: the current TCP orientation turned by the axis-angle 0.1 rad x action[3:6] about
  root-aligned axes at the TCP (LIBERO's OSC: 0.5 rad x action, world axes).
  Scales are ManiSkill's own: its demos converted to this control mode and its published results use
  them, and a policy trained here never sees LIBERO's.
- gripper: ManiSkill's is an absolute finger target (+1 = open 0.04 m, -1 = closed). robosuite's
  Panda gripper reads only the sign of LIBERO's command and moves toward open or closed, so the
  sign decides here too: > 0 closes, < 0 opens, exactly 0 keeps the last command (OpenVLA maps a
  policy gripper of exactly 0.5 to 0, "no change").

Bimanual tasks take these 7 dims per arm, arms in ManiSkill's agent order (14 for two), each arm's
position and rotation deltas in its own root frame (the two Pandas face each other, so their frames
are turned by 180 degrees), and report 8 proprio dims per arm in the same order.

Proprio (OpenVLA-OFT's 8 LIBERO dims): TCP position in the world frame (3), TCP orientation as
axis-angle (3, robosuite's `quat2axisangle` of the same rotation), the two finger joint positions
with LIBERO's signs (2: +q1, -q2; robosuite's right finger joint is negative when open).
"""

from __future__ import annotations

import math

import numpy as np

ARM_ACTION_DIM = 7  # per arm; a bimanual task's action is the arms' actions one after the other (14)
PROPRIO_DIM = 8  # per arm, concatenated in the same order
GRIPPER_OPEN, GRIPPER_CLOSED = 1.0, -1.0  # ManiSkill's normalised finger targets
OPEN_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float32)  # LIBERO's no-op: hold the pose, gripper open


def libero_to_maniskill(action: np.ndarray, last_gripper: float) -> np.ndarray:
    """One LIBERO env action [7] -> ManiSkill's `pd_ee_delta_pose` + gripper action [7] (float32).
    `last_gripper` is ManiSkill's previous finger target, kept when the command is exactly 0."""
    a = np.asarray(action, dtype=np.float32).reshape(1, -1)
    return libero_to_maniskill_batch(a, np.array([last_gripper], dtype=np.float32))[0]


def libero_to_maniskill_batch(actions: np.ndarray, last_gripper: np.ndarray) -> np.ndarray:
    """`libero_to_maniskill` on a batch: actions [n, 7], last_gripper [n] -> [n, 7] float32."""
    out = np.clip(np.asarray(actions, dtype=np.float32), -1.0, 1.0)
    g = out[:, 6].copy()
    out[:, 6] = np.where(g > 0, GRIPPER_CLOSED, np.where(g < 0, GRIPPER_OPEN, last_gripper))
    return out


def openvla_to_env(actions: np.ndarray) -> np.ndarray:
    """Policy actions [..., 7 x arms] (OpenVLA's gripper per arm) -> env actions: LIBERO's conversion
    applied to every arm's 7 dims."""
    from env_workers.libero.conventions import openvla_to_libero

    a = np.asarray(actions)
    return openvla_to_libero(a.reshape(*a.shape[:-1], -1, ARM_ACTION_DIM)).reshape(a.shape)


def env_to_openvla(actions: np.ndarray) -> np.ndarray:
    """Demo env actions [..., 7 x arms] -> OpenVLA's dataset convention, every arm's gripper (SFT)."""
    from env_workers.libero.conventions import libero_to_openvla

    a = np.asarray(actions)
    return libero_to_openvla(a.reshape(*a.shape[:-1], -1, ARM_ACTION_DIM)).reshape(a.shape)


def gripper_dims(action_dim: int) -> tuple[int, ...]:
    """The gripper dim of every arm: 6, or 6 and 13."""
    return tuple(range(ARM_ACTION_DIM - 1, action_dim, ARM_ACTION_DIM))


def quat_wxyz_to_axisangle(q: np.ndarray) -> np.ndarray:
    """robosuite's `quat2axisangle` (OpenVLA-OFT's LIBERO proprio) on SAPIEN's (w, x, y, z) order."""
    w = min(max(float(q[0]), -1.0), 1.0)
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return np.asarray(q[1:4], dtype=np.float64) * 2.0 * math.acos(w) / den


def proprio(tcp_pose: np.ndarray, finger_qpos: np.ndarray) -> np.ndarray:
    """tcp_pose [7] (position, wxyz quaternion; world frame), finger_qpos [2] -> [8] float32."""
    return np.concatenate([tcp_pose[:3], quat_wxyz_to_axisangle(tcp_pose[3:7]),
                           [finger_qpos[0], -finger_qpos[1]]]).astype(np.float32)
