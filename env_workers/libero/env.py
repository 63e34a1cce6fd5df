"""`LiberoEnv`: the LIBERO suites (robosuite 1.4 / MuJoCo) behind the `EpisodeEnv` API.

One robosuite env is alive per `LiberoEnv` (a LIBERO scene takes 1.5-2.5 GB with its render context),
built for the task of the current episode and rebuilt (2-4 s) when the task changes.

An episode is reproducible from (task, init_state) alone, whatever ran before in the process:
- soft reset (no MJCF rebuild: 0.04 s instead of 1.5-4 s), plus the one piece of state it
  misses: the gripper's internal command, which a hard reset recreates at zero;
- LIBERO re-places fixed furniture (e.g. the cabinet) at every reset from the global numpy RNG and
  the init state (qpos/qvel only) does not cover it. The reset draws from `np.random.seed(0)`, which
  is OpenVLA's first episode per task (`env.seed(0)` then `reset`); the caller's RNG is restored.
  Soft and hard resets give bit-identical states and images this way (checked in the tests).
Observations are robosuite's own (sampled during the step as its observables do), so they match
the data OpenVLA checkpoints were trained on.
"""

from __future__ import annotations

import atexit
import contextlib
import time
import weakref

import numpy as np

from common.config import EnvConfig
from common.records import ChunkResult, Observation, StepResult
from env_workers.api import Split, split_init_states, step_each
from env_workers.libero import conventions
from env_workers.libero.bootstrap import ensure_libero
from env_workers.libero.suites import SuiteCatalog

CAMERA = "agentview"
FIXTURE_SEED = 0


class LiberoEnv:
    action_dim = 7

    def __init__(self, cfg: EnvConfig):
        if cfg.backend != "libero":
            raise ValueError(f"LiberoEnv needs env.backend 'libero', got {cfg.backend!r}")
        self.gl = ensure_libero(msaa=cfg.msaa)["gl"]
        self.catalog = SuiteCatalog(cfg.suite)
        names = list(cfg.tasks) if cfg.tasks else self.catalog.names
        for n in [*names, *cfg.task_max_steps]:
            self.catalog.task(n)  # fail at construction on a typo, naming the known tasks
        self.cfg = cfg
        self.max_steps = cfg.max_steps
        self._names = names
        self._env = None  # libero OffScreenRenderEnv of `_env_task`
        self._env_task: str | None = None
        self.task: str | None = None
        self.init_state: int | None = None
        self.steps = 0
        self.success = False
        self._done = True
        self._obs: dict | None = None
        self._exit_hook = False
        self.render_seconds = 0.0  # wall time of the camera renders so far (benchmarks read it)

    # --- EpisodeEnv API ---
    @property
    def task_names(self) -> list[str]:
        return list(self._names)

    def instruction(self, task: str) -> str:
        return self.catalog.task(task).instruction

    def init_states(self, task: str, split: Split) -> list[int]:
        self.catalog.task(task)
        return split_init_states(self.cfg.init_states, split)

    def reset(self, task: str, init_state: int) -> Observation:
        states = self.catalog.init_states(task)
        if not 0 <= int(init_state) < len(states):
            raise ValueError(f"init_state {init_state} out of range: task {task!r} has {len(states)} initial states")
        env = self._robosuite_env(task)
        blank = _BlankCamera(env.env._observables[f"{CAMERA}_image"])
        wait = self.cfg.num_steps_wait
        with _seeded_numpy(FIXTURE_SEED), blank:
            _reset(env.env)
            for robot in env.env.robots:  # a hard reset would rebuild the gripper with a zero command
                robot.gripper.current_action = np.zeros(robot.gripper.dof)
            if wait == 0:
                blank.restore()
            obs = env.set_init_state(states[int(init_state)])
            for i in range(wait):
                if i == wait - 1:
                    blank.restore()  # render only the observation the policy will see
                obs, _, _, _ = env.step(conventions.DUMMY_ACTION)
        self.task, self.init_state = task, int(init_state)
        self.steps, self.success, self._done = 0, False, False
        self._obs = obs
        return self.observe()

    def step(self, action: np.ndarray) -> StepResult:
        if self._done:
            raise RuntimeError("episode is over (success or step limit): call reset() first")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (self.action_dim,):
            raise ValueError(f"action must have {self.action_dim} values, got shape {np.shape(action)}")
        if np.isnan(a).any():
            raise ValueError(f"action has NaN: {action}")
        obs, _, done, _ = self._env.step(np.clip(a, -1.0, 1.0))
        self._obs = obs
        self.steps += 1
        self.success = bool(done)  # LIBERO's step returns done = the task's goal predicate
        self._done = self.success or self.steps >= self.cfg.step_limit(self.task)
        return StepResult(observation=self.observe(), success=self.success, done=self._done)

    def step_chunk(self, actions: np.ndarray, keep_frames: bool = False) -> ChunkResult:
        """robosuite renders the camera inside every step; the policy reads only the chunk's last
        image, so the steps before it get a blank one: the same physics, proprio and last image as
        `step` by `step`, one render per chunk instead of one per action (a render costs more than
        the physics of a step). A chunk that ends the episode midway renders where it ended (no
        policy reads that image). Videos render every step."""
        actions = np.asarray(actions)
        if keep_frames or len(actions) < 2:
            return step_each(self, actions, keep_frames)
        blank = _BlankCamera(self._env.env._observables[f"{CAMERA}_image"])
        with blank:
            for i, action in enumerate(actions):
                if i == len(actions) - 1:
                    blank.restore()
                result = self.step(action)
                if result.done:
                    break
        if i < len(actions) - 1:  # ended early: the image of where it ended
            self._obs = {**self._obs, f"{CAMERA}_image": blank.real({})}
            result = StepResult(observation=self.observe(), success=result.success, done=result.done)
        return ChunkResult(observation=result.observation, success=result.success, done=result.done, steps=i + 1)

    def close(self) -> None:
        if self._env is not None:
            with contextlib.suppress(Exception):
                self._env.close()
        self._env, self._env_task, self._done = None, None, True

    # --- helpers (tests and benchmarks use them too) ---
    def observe(self) -> Observation:
        return Observation(image=conventions.agentview_image(self._obs), instruction=self.instruction(self.task),
                           proprio=conventions.proprio(self._obs))

    def sim_state(self) -> np.ndarray:
        """Flattened (time, qpos, qvel), the layout of LIBERO's init states."""
        return self._env.get_sim_state()

    def check_success(self) -> bool:
        """Re-evaluate the goal predicate now (after tests edit the sim state)."""
        self._env.env.sim.forward()
        return bool(self._env.check_success())

    @property
    def robosuite_env(self):
        return self._env

    def _robosuite_env(self, task: str):
        if self._env_task != task:
            self.close()
            from libero.libero.envs import OffScreenRenderEnv

            size = self.cfg.image_size
            with _seeded_numpy(FIXTURE_SEED):
                # ignore_done: the step limit is ours (robosuite would stop at its own horizon)
                self._env = OffScreenRenderEnv(bddl_file_name=str(self.catalog.task(task).bddl_file), camera_names=[CAMERA],
                                               camera_heights=size, camera_widths=size, hard_reset=False, ignore_done=True)
            self._env_task = task
            camera = self._env.env._observables[f"{CAMERA}_image"]
            camera._sensor = _timed_sensor(camera._sensor, self)
            if not self._exit_hook:
                # Registered after robosuite's eglTerminate hook (added with the first GL context), so it
                # runs first: contexts freed after eglTerminate print tracebacks at interpreter exit.
                atexit.register(_close_if_alive, weakref.ref(self))
                self._exit_hook = True
        return self._env

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _timed_sensor(sensor, env: LiberoEnv):
    """The camera's sensor, adding its wall time to `env.render_seconds`: a render waits for the
    GPU, which it shares with the policy's forwards on one box."""
    def timed(obs_cache):
        start = time.perf_counter()
        try:
            return sensor(obs_cache)
        finally:
            env.render_seconds += time.perf_counter() - start

    timed.__modality__ = sensor.__modality__
    return timed


@contextlib.contextmanager
def _seeded_numpy(seed: int):
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


class _BlankCamera(contextlib.AbstractContextManager):
    """Swap the camera observable's sensor for a blank image: the observable keeps its sampling
    clock (so the next real image is exactly the one robosuite would return) but skips the ~65 ms
    renders of frames nobody looks at (reset, set_init_state, all but the last settle step)."""

    def __init__(self, observable):
        self.observable = observable
        self.real = observable._sensor
        blank = np.zeros(observable._data_shape, dtype=np.uint8)
        self.blank = lambda obs_cache: blank
        self.blank.__modality__ = self.real.__modality__

    def __enter__(self):
        self.observable._sensor = self.blank
        return self

    def restore(self) -> None:
        self.observable._sensor = self.real

    def __exit__(self, *exc):
        self.restore()
        return False


def _reset(env, attempts: int = 20) -> None:
    """LIBERO's own `ControlEnv.reset` retries forever and its `finally: continue` swallows every
    exception; retry only a failed object placement, a bounded number of times."""
    from robosuite.utils.errors import RandomizationError

    for _ in range(attempts - 1):
        try:
            env.reset()
            return
        except RandomizationError:
            continue
    env.reset()


def _close_if_alive(ref: weakref.ref) -> None:
    env = ref()
    if env is not None:
        env.close()
