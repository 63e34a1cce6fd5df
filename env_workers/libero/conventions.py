"""OpenVLA's LIBERO conventions, in one place (openvla and openvla-oft `experiments/robot/`).

- Actions the env takes are LIBERO's: 7 dims [dx, dy, dz, droll, dpitch, dyaw, gripper] in [-1, 1]
  (delta OSC pose), gripper -1 = open, +1 = close.
- A policy trained on OpenVLA's LIBERO RLDS data emits the gripper in the dataset convention:
  [0, 1] with 0 = close, 1 = open (the RLDS transform clips LIBERO's gripper to [0, 1] and flips it;
  the gripper dim is not q01/q99-normalised, mask = False). `openvla_to_libero` undoes that exactly
  as `normalize_gripper_action(binarize=True)` then `invert_gripper_action` do: 2g - 1, sign, negate.
- Settle: `num_steps_wait` (10) no-op steps with the gripper open after every reset, not counted.
- Image: agentview rendered square (256 px in OpenVLA) and rotated 180 degrees (`img[::-1, ::-1]`),
  because robosuite returns OpenGL's bottom-up rows and the training data were flipped the same way.
- Proprio (OpenVLA-OFT, 8 dims): eef position (3), eef orientation as axis-angle (3), the two
  finger joint positions (2).
"""

from __future__ import annotations

import numpy as np

DUMMY_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)  # `get_libero_dummy_action`
PROPRIO_DIM = 8


def openvla_to_libero(actions: np.ndarray) -> np.ndarray:
    """[..., 7] policy actions (gripper in [0, 1], 1 = open) -> LIBERO env actions (gripper
    -1 = open, +1 = close). np.sign keeps OpenVLA's edge case: exactly 0.5 maps to 0 (no change)."""
    out = np.array(actions, dtype=np.float32, copy=True)
    out[..., -1] = -np.sign(2.0 * out[..., -1] - 1.0)
    return out


def libero_to_openvla(actions: np.ndarray) -> np.ndarray:
    """[..., 7] LIBERO demo actions (gripper -1 = open, +1 = close) -> OpenVLA's dataset convention
    (gripper in [0, 1], 1 = open), as OpenVLA's LIBERO RLDS transform does: 1 - clip(g, 0, 1).
    SFT on LIBERO HDF5 files goes through this, so the trained policy speaks what
    `openvla_to_libero` expects at rollout time."""
    out = np.array(actions, dtype=np.float32, copy=True)
    out[..., -1] = 1.0 - np.clip(out[..., -1], 0.0, 1.0)
    return out


def agentview_image(obs: dict) -> np.ndarray:
    """robosuite observation -> upright uint8 [H, W, 3] image, as OpenVLA feeds it."""
    return np.ascontiguousarray(obs["agentview_image"][::-1, ::-1])


def proprio(obs: dict) -> np.ndarray:
    from robosuite.utils.transform_utils import quat2axisangle

    quat = np.array(obs["robot0_eef_quat"], dtype=np.float64)  # copy: quat2axisangle clips in place
    return np.concatenate([obs["robot0_eef_pos"], quat2axisangle(quat), obs["robot0_gripper_qpos"]]).astype(np.float32)
