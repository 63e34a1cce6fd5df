"""`TabletopEnv`: the built-in MuJoCo suite behind the `EpisodeEnv` API (env_workers/api.py).

Actions are LIBERO's 7 dims [dx, dy, dz, droll, dpitch, dyaw, gripper] in [-1, 1]. Under
`env.control: delta` (LIBERO's convention) position dims move the gripper's servo target by up to
POS_SCALE per step; under `absolute` they are the servo target itself, the workspace box
[EE_LOW, EE_HIGH] scaled to [-1, 1] (position control, as Diffusion Policy and ACT use with action
chunks: an error in one step does not carry into the next). Either way the target never leads the
gripper by more than MAX_LEAD. The rotation dims are accepted and ignored (the gripper keeps
pointing down); gripper > 0 closes, <= 0 opens (LIBERO: -1 open, +1 close).

`num_steps_wait` is ignored: LIBERO waits for objects dropped into the scene to settle, but here
blocks start exactly at rest on the table, so there is nothing to wait for (and no step is spent).
"""

from __future__ import annotations

import atexit
import weakref

import mujoco
import numpy as np

from common.config import EnvConfig
from common.records import ChunkResult, Observation, StepResult
from env_workers.api import Split, apply_chunk, configured_tasks, split_init_states
from env_workers.tabletop.scene import EE_HIGH, EE_LOW, Sim
from env_workers.tabletop.tasks import Layout, TaskSpec, get_task, suite_tasks

POS_SCALE = 0.04  # metres per step at |action| = 1: a pick-and-place takes ~30 steps
MAX_LEAD = 0.03  # the servo target never runs further than this ahead of the gripper (no wind-up)
EE_ORI = np.array([np.pi, 0.0, 0.0], np.float32)  # axis-angle of a downward gripper, as LIBERO reports it
PROPRIO_DIM = 8  # ee_pos (3), ee_ori axis-angle (3), gripper_states (2): LIBERO / OpenVLA-OFT's layout


class TabletopEnv:
    action_dim = 7

    def __init__(self, cfg: EnvConfig):
        names = configured_tasks(cfg, "tabletop", suite_tasks, get_task)
        self.cfg = cfg
        self._names = names
        self._sims: dict[str, Sim] = {}  # one per layout, built on first use
        self._renderers: dict[str, mujoco.Renderer] = {}
        self.sim: Sim | None = None
        self.task: TaskSpec | None = None
        self.init_state: int | None = None
        self.steps = 0
        self.success = False
        self._done = True

    # --- EpisodeEnv API ---
    @property
    def task_names(self) -> list[str]:
        return list(self._names)

    def instruction(self, task: str) -> str:
        return get_task(task).instruction

    def init_states(self, task: str, split: Split) -> list[int]:
        get_task(task)
        return split_init_states(self.cfg.init_states, split)

    def reset(self, task: str, init_state: int) -> Observation:
        spec = get_task(task)
        self.task, self.init_state = spec, int(init_state)
        self.sim = self._sim(spec.layout)
        self.sim.reset(spec.layout.sample(self.init_state))
        self.steps, self.success, self._done = 0, False, False
        return self.observe()

    def step(self, action: np.ndarray) -> StepResult:
        self._apply(action)
        return StepResult(observation=self.observe(), success=self.success, done=self._done)

    def step_chunk(self, actions: np.ndarray, keep_frames: bool = False) -> ChunkResult:
        """Physics for every action, rendering only after the last one (or after each for videos):
        a render costs ~3x the physics of a step and the policy reads one image per chunk."""
        steps, frames = apply_chunk(actions, self.action_dim, self._apply, self.render if keep_frames else None,
                                    lambda: self._done)
        obs = self.observe(frames[-1] if frames else None)  # a video's last frame is the observation
        return ChunkResult(observation=obs, success=self.success, done=self._done, steps=steps, frames=frames)

    def _apply(self, action: np.ndarray) -> None:
        """One control step of physics and the success check; no rendering."""
        if self._done:
            raise RuntimeError("episode is over (success or step limit): call reset() first")
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
        if a.shape != (self.action_dim,):
            raise ValueError(f"action must have {self.action_dim} values, got shape {np.shape(action)}")
        if np.isnan(a).any():
            raise ValueError(f"action has NaN: {action}")
        sim = self.sim
        sim.step(self._servo_target(a[:3]), close=bool(a[6] > 0.0))
        self.steps += 1
        self.success = self.task.success(sim)
        self._done = self.success or self.steps >= self.cfg.step_limit(self.task.name)

    def _servo_target(self, move: np.ndarray) -> np.ndarray:
        """The servo target that position dims `move` (clipped to [-1, 1]) ask for in this state."""
        if self.cfg.control == "absolute":
            return self._lead_limited(EE_LOW + (move + 1.0) * 0.5 * (EE_HIGH - EE_LOW))
        return self._delta_target(move)

    def _delta_target(self, move: np.ndarray) -> np.ndarray:
        return self._lead_limited(self.sim.ee_target + move * POS_SCALE)

    def _lead_limited(self, goal: np.ndarray) -> np.ndarray:
        pos = self.sim.ee_pos
        return np.clip(np.clip(goal, pos - MAX_LEAD, pos + MAX_LEAD), EE_LOW, EE_HIGH)

    def from_delta(self, action: np.ndarray) -> np.ndarray:
        """A delta-convention action -> this env's convention, moving the gripper the same way now
        (the scripted experts think in deltas; under absolute control they record targets)."""
        if self.cfg.control == "delta":
            return action
        out = np.array(action, dtype=np.float32, copy=True)
        target = self._delta_target(np.clip(np.asarray(action[:3], dtype=np.float64), -1.0, 1.0))
        out[:3] = 2.0 * (target - EE_LOW) / (EE_HIGH - EE_LOW) - 1.0
        return out

    def close(self) -> None:
        for r in self._renderers.values():
            r.close()
        self._renderers.clear()
        self._sims.clear()
        self.sim = None

    # --- helpers (experts, demos and tests use them too) ---
    def observe(self, image: np.ndarray | None = None) -> Observation:
        """The current observation; `image` if this state was already rendered."""
        return Observation(image=self.render() if image is None else image, instruction=self.task.instruction,
                           proprio=self.proprio())

    def proprio(self) -> np.ndarray:
        q = self.sim.finger_q
        return np.concatenate([self.sim.ee_pos, EE_ORI, [q[0], -q[1]]]).astype(np.float32)

    def render(self) -> np.ndarray:
        r = self._renderers[self.task.layout.name]
        r.update_scene(self.sim.data, camera="agentview")
        image = r.render()
        _release_egl(r)
        return image

    def check_success(self) -> bool:
        """Re-evaluate the success predicate now (after tests edit the sim state)."""
        mujoco.mj_forward(self.sim.model, self.sim.data)
        return self.task.success(self.sim)

    def _sim(self, layout: Layout) -> Sim:
        if layout.name not in self._sims:
            sim = Sim(layout.blocks, layout.bowl, layout.zones)
            size = self.cfg.image_size
            if size > sim.model.vis.global_.offwidth:
                sim.model.vis.global_.offwidth = sim.model.vis.global_.offheight = size
            self._sims[layout.name] = sim
            self._renderers[layout.name] = mujoco.Renderer(sim.model, size, size)
            if len(self._renderers) == 1:
                # Registered after EGL's own exit hook, so it runs first: GL contexts freed after
                # eglTerminate print tracebacks at interpreter exit when an env was not closed.
                atexit.register(_close_if_alive, weakref.ref(self))
        return self._sims[layout.name]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _close_if_alive(ref: weakref.ref) -> None:
    env = ref()
    if env is not None:
        env.close()


def _release_egl(renderer: mujoco.Renderer) -> None:
    """Unbind an EGL context from this thread after rendering. An EGL context can be current in
    one thread only, so without this the next render from another thread (thread pools, tests)
    fails with EGL_BAD_ACCESS. Costs microseconds; other GL backends need nothing."""
    ctx = getattr(renderer, "_gl_context", None)
    if ctx is not None and type(ctx).__module__ == "mujoco.egl":
        import mujoco.egl as egl

        egl.EGL.eglMakeCurrent(egl.EGL_DISPLAY, egl.EGL.EGL_NO_SURFACE, egl.EGL.EGL_NO_SURFACE, egl.EGL.EGL_NO_CONTEXT)
