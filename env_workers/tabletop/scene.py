"""The tabletop scene: MJCF built in Python, plus a thin `Sim` wrapper with named state accessors.

One model per layout (only the objects a layout uses exist, so no parked distractors). The robot
is a Cartesian gripper: three world-axis slide joints under stiff position servos (gravity
compensated) carry a palm with two slide-joint fingers. That is cheaper and steadier than a mocap
weld, cannot tunnel through the table, and its state is plain qpos, so resets are exact.
Rendering is tuned for software GL: no multisampling, textures or reflections, and one small
shadow map (an overhead light's shadow tells a low-res policy where the gripper is above the table).
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless default; must be set before mujoco is imported
import mujoco  # noqa: E402
import numpy as np  # noqa: E402

# Bold, mutually distinct colours: a tiny policy sees 64-128 px images.
COLORS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.15),
    "blue": (0.1, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "magenta": (0.85, 0.15, 0.85),
}
TABLE_RGB = (0.55, 0.45, 0.35)
BOWL_RGB = (0.95, 0.95, 0.95)
GRIPPER_RGB = (0.15, 0.15, 0.15)

BLOCK_HALF = 0.025  # 5 cm cubes: several pixels wide even at 64 px
BOWL_INNER_R = 0.075  # room for two blocks side by side and the open fingers
BOWL_WALL = 0.01
BOWL_HEIGHT = 0.04
BOWL_BASE = 0.006  # base plate thickness
ZONE_HALF = 0.06

FINGER_OPEN = 0.04  # inner-face distance from the centre line when open (8 cm gap)
FINGER_HALF = (0.006, 0.015, 0.03)  # x (thickness: fingers close along x, seen by the camera), y, z
FINGER_Z = 0.01  # finger centre above the ee point: tips sit 2 cm below the grasp centre
EE_HOME = (0.0, 0.0, 0.18)
# Ee point limits: tips stay 5 mm above the table; the box keeps the gripper in view.
EE_LOW = np.array([-0.25, -0.2, FINGER_HALF[2] - FINGER_Z + 0.005])
EE_HIGH = np.array([0.25, 0.2, 0.25])

TIMESTEP = 0.002
CONTROL_DT = 0.05  # 20 Hz like LIBERO
SHADOW = 256
CAM_POS, CAM_TARGET, CAM_FOVY = (0.0, -0.36, 0.84), (0.0, 0.05, 0.0), 30  # fits the workspace, ~63 deg down


def table_pixel_scale(image_size: int) -> tuple[float, float]:
    """(world x per image column, world y per image row) in metres on the blocks' centre plane at
    the workspace's centre, from the pinhole model MuJoCo renders with (rows grow downwards, so y
    per row is negative). Perspective changes it by up to ~10 % where the scenes put objects."""
    pos, aim = np.asarray(CAM_POS, float), np.array([0.0, 0.0, BLOCK_HALF])
    fwd, right, up = _camera_frame(CAM_POS, CAM_TARGET)
    focal = (image_size / 2) / math.tan(math.radians(CAM_FOVY) / 2)

    def pixel(p: np.ndarray) -> np.ndarray:  # (col, row)
        d = p - pos
        return np.array([focal * (d @ right), -focal * (d @ up)]) / (d @ fwd)

    eps = 1e-4
    cols_per_m = (pixel(aim + [eps, 0, 0]) - pixel(aim))[0] / eps
    rows_per_m = (pixel(aim + [0, eps, 0]) - pixel(aim))[1] / eps
    return 1.0 / cols_per_m, 1.0 / rows_per_m


def _f(v) -> str:
    return " ".join(f"{x:.6g}" for x in np.atleast_1d(v))


def _camera_frame(pos, target) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(forward, image right, image up) unit vectors of a camera at `pos` looking at `target`
    with the world z axis up in the image."""
    fwd = np.asarray(target, float) - np.asarray(pos, float)
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    return fwd, right, np.cross(right, fwd)


def _camera_axes(pos, target) -> str:
    """MJCF xyaxes (image right, image up) for a camera at `pos` looking at `target`."""
    _, right, up = _camera_frame(pos, target)
    return _f(np.concatenate([right, up]))


def _bowl_xml() -> str:
    """An octagonal ring of walls on a base plate: reads as a bowl, collides like one, is static."""
    geoms = [
        f'<geom name="bowl_base" type="cylinder" size="{BOWL_INNER_R + BOWL_WALL:.4f} {BOWL_BASE / 2:.4f}" '
        f'pos="0 0 {BOWL_BASE / 2:.4f}" rgba="{_f(BOWL_RGB)} 1"/>'
    ]
    side = 2 * (BOWL_INNER_R + BOWL_WALL / 2) * math.tan(math.pi / 8)
    r = BOWL_INNER_R + BOWL_WALL / 2
    for k in range(8):
        a = k * math.pi / 4
        geoms.append(
            f'<geom name="bowl_wall{k}" type="box" size="{BOWL_WALL / 2:.4f} {side / 2 + 0.002:.4f} {BOWL_HEIGHT / 2:.4f}" '
            f'pos="{r * math.cos(a):.5f} {r * math.sin(a):.5f} {BOWL_HEIGHT / 2:.4f}" euler="0 0 {a:.5f}" '
            f'rgba="{_f(BOWL_RGB)} 1"/>'
        )
    return '<body name="bowl" pos="0 0 0">' + "".join(geoms) + "</body>"


def _finger_xml(side: str, sign: int) -> str:
    hx, hy, hz = FINGER_HALF
    return (
        f'<body name="finger_{side}" pos="0 0 0">'
        f'<joint name="finger_{side}" type="slide" axis="{sign} 0 0" range="0 {FINGER_OPEN + 0.005}" damping="4"/>'
        f'<geom name="finger_{side}" type="box" size="{hx} {hy} {hz}" pos="{sign * hx} 0 {FINGER_Z}" mass="0.05" '
        f'friction="1.5 0.02 0.001" condim="4" rgba="{_f(GRIPPER_RGB)} 1"/>'
        "</body>"
    )


def build_xml(blocks: tuple[str, ...], bowl: bool, zones: tuple[str, ...]) -> str:
    """MJCF text of one layout: table, gripper, the named blocks, optionally the bowl, and zones."""
    cam_pos, cam_target = CAM_POS, CAM_TARGET
    block_bodies = "".join(
        f'<body name="block_{c}" pos="0 0 {BLOCK_HALF}"><freejoint name="block_{c}"/>'
        f'<geom name="block_{c}" type="box" size="{BLOCK_HALF} {BLOCK_HALF} {BLOCK_HALF}" mass="0.05" '
        f'friction="1 0.02 0.001" rgba="{_f(COLORS[c])} 1"/></body>'
        for c in blocks
    )
    # Zones are flat, visual-only squares: they never disturb the physics.
    zone_bodies = "".join(
        f'<body name="zone_{c}" pos="0 0 0"><geom name="zone_{c}" type="box" size="{ZONE_HALF} {ZONE_HALF} 0.001" '
        f'pos="0 0 0.001" contype="0" conaffinity="0" rgba="{_f(COLORS[c])} 1"/></body>'
        for c in zones
    )
    servo = 'kp="3000" ctrllimited="false"'
    return f"""<mujoco model="tabletop">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{TIMESTEP}" integrator="implicitfast" cone="elliptic" impratio="5"/>
  <visual>
    <quality shadowsize="{SHADOW}" offsamples="0"/>
    <global offwidth="512" offheight="512"/>
    <headlight ambient="0.45 0.45 0.45" diffuse="0.5 0.5 0.5" specular="0 0 0"/>
    <rgba haze="0 0 0 0"/>
  </visual>
  <default><geom solref="0.004 1" solimp="0.95 0.99 0.001"/></default>
  <worldbody>
    <light directional="true" pos="0 0 1" dir="0 0 -1" diffuse="0.35 0.35 0.35" specular="0 0 0" castshadow="{str(SHADOW > 0).lower()}"/>
    <geom name="table" type="box" size="0.6 0.6 0.02" pos="0 0.1 -0.02" rgba="{_f(TABLE_RGB)} 1"/>
    <camera name="agentview" pos="{_f(cam_pos)}" xyaxes="{_camera_axes(cam_pos, cam_target)}" fovy="{CAM_FOVY}"/>
    {_bowl_xml() if bowl else ""}
    {zone_bodies}
    {block_bodies}
    <body name="ee" pos="0 0 0" gravcomp="1">
      <joint name="ee_x" type="slide" axis="1 0 0" damping="80"/>
      <joint name="ee_y" type="slide" axis="0 1 0" damping="80"/>
      <joint name="ee_z" type="slide" axis="0 0 1" damping="80"/>
      <geom name="palm" type="box" size="0.068 0.02 0.012" pos="0 0 {FINGER_Z + FINGER_HALF[2] + 0.012}" mass="0.4"
            rgba="{_f(GRIPPER_RGB)} 1"/>
      <site name="ee" pos="0 0 0" size="0.005" rgba="0 0 0 0"/>
      {_finger_xml("l", 1)}
      {_finger_xml("r", -1)}
    </body>
  </worldbody>
  <contact><exclude body1="finger_l" body2="finger_r"/></contact>
  <actuator>
    <position name="ee_x" joint="ee_x" {servo}/>
    <position name="ee_y" joint="ee_y" {servo}/>
    <position name="ee_z" joint="ee_z" {servo}/>
    <position name="finger_l" joint="finger_l" kp="400" forcerange="-15 15"/>
    <position name="finger_r" joint="finger_r" kp="400" forcerange="-15 15"/>
  </actuator>
</mujoco>"""


class Sim:
    """A model + data of one layout with named accessors; owns no policy or task logic."""

    def __init__(self, blocks: tuple[str, ...], bowl: bool, zones: tuple[str, ...]):
        self.blocks, self.has_bowl, self.zones = tuple(blocks), bool(bowl), tuple(zones)
        self.model = mujoco.MjModel.from_xml_string(build_xml(self.blocks, self.has_bowl, self.zones))
        self.data = mujoco.MjData(self.model)
        self.substeps = int(round(CONTROL_DT / TIMESTEP))
        m = self.model
        name2id = lambda kind, n: mujoco.mj_name2id(m, kind, n)  # noqa: E731
        self._ee_qadr = [m.jnt_qposadr[name2id(mujoco.mjtObj.mjOBJ_JOINT, f"ee_{a}")] for a in "xyz"]
        self._finger_qadr = [m.jnt_qposadr[name2id(mujoco.mjtObj.mjOBJ_JOINT, f"finger_{s}")] for s in "lr"]
        self._block_qadr = {c: m.jnt_qposadr[name2id(mujoco.mjtObj.mjOBJ_JOINT, f"block_{c}")] for c in self.blocks}
        self._block_dofadr = {c: m.jnt_dofadr[name2id(mujoco.mjtObj.mjOBJ_JOINT, f"block_{c}")] for c in self.blocks}
        self._block_geom = {c: name2id(mujoco.mjtObj.mjOBJ_GEOM, f"block_{c}") for c in self.blocks}
        self._fixture_body = {n: name2id(mujoco.mjtObj.mjOBJ_BODY, n) for n in (["bowl"] if bowl else [])}
        self._fixture_body.update({f"zone_{c}": name2id(mujoco.mjtObj.mjOBJ_BODY, f"zone_{c}") for c in self.zones})
        self._finger_dofadr = [m.jnt_dofadr[name2id(mujoco.mjtObj.mjOBJ_JOINT, f"finger_{s}")] for s in "lr"]
        self._gripper_geoms = np.array([name2id(mujoco.mjtObj.mjOBJ_GEOM, n) for n in ("palm", "finger_l", "finger_r")])

    # --- state setting (used by reset and by tests) ---
    def reset(self, placements: dict[str, tuple[float, ...]]) -> None:
        """Zero the sim, put fixtures and blocks where `placements` says, gripper home and open."""
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        for name, (x, y) in ((n, p[:2]) for n, p in placements.items() if n in self._fixture_body):
            m.body_pos[self._fixture_body[name]] = (x, y, 0.0)
        for c in self.blocks:
            x, y, yaw = placements[c]
            self.set_block(c, (x, y, BLOCK_HALF), yaw)
        d.qpos[self._ee_qadr] = EE_HOME
        d.qpos[self._finger_qadr] = FINGER_OPEN
        d.ctrl[:3] = EE_HOME
        d.ctrl[3:5] = FINGER_OPEN
        mujoco.mj_forward(m, d)

    def set_block(self, color: str, pos, yaw: float = 0.0) -> None:
        a = self._block_qadr[color]
        self.data.qpos[a : a + 3] = pos
        self.data.qpos[a + 3 : a + 7] = (math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2))
        self.data.qvel[self._block_dofadr[color] : self._block_dofadr[color] + 6] = 0.0
        mujoco.mj_forward(self.model, self.data)

    def step(self, ee_target: np.ndarray, close: bool) -> None:
        """Hold the servo targets for one control period (CONTROL_DT of physics)."""
        self.data.ctrl[:3] = ee_target
        self.data.ctrl[3:5] = 0.0 if close else FINGER_OPEN
        mujoco.mj_step(self.model, self.data, nstep=self.substeps)

    # --- state reading ---
    @property
    def ee_pos(self) -> np.ndarray:
        return self.data.qpos[self._ee_qadr].copy()

    @property
    def ee_target(self) -> np.ndarray:
        return self.data.ctrl[:3].copy()

    @property
    def finger_q(self) -> np.ndarray:
        """Each finger's inner-face distance from the centre line [left, right], metres."""
        return self.data.qpos[self._finger_qadr].copy()

    def block_pos(self, color: str) -> np.ndarray:
        a = self._block_qadr[color]
        return self.data.qpos[a : a + 3].copy()

    def fixture_pos(self, name: str) -> np.ndarray:
        return self.model.body_pos[self._fixture_body[name]].copy()

    @property
    def finger_speed(self) -> float:
        return float(np.abs(self.data.qvel[self._finger_dofadr]).max())

    def touching_gripper(self, color: str) -> bool:
        pairs = self.data.contact.geom[: self.data.ncon]
        g = self._block_geom[color]
        other = np.where(pairs[:, 0] == g, pairs[:, 1], np.where(pairs[:, 1] == g, pairs[:, 0], -1))
        return bool(np.isin(other, self._gripper_geoms).any())
