"""`ManiSkillEnv`: ManiSkill3 tabletop tasks behind the `EpisodeEnv` API (env_workers/api.py), on the
CPU: PhysX CPU simulation of one scene (`num_envs=1`), SAPIEN rendering through Vulkan (lavapipe on
machines without a GPU).

- Actions: LIBERO's 7 dims per arm (14 for the bimanual suite), mapped onto ManiSkill's
  `pd_ee_delta_pose` + gripper of each arm (conventions.py).
- Observation: the task's third-person camera (`base_camera`) at `env.image_size`, upright as
  rendered, plus LIBERO's 8-dim proprio. ManiSkill's own observation pipeline is off
  (`obs_mode="none"`): it would render every camera at every step, while the policy reads one image
  per action chunk, so `step_chunk` steps the physics k times (3-7 ms each) and renders once (~35 ms).
- Success: the task's own `evaluate()` (`info["success"]`); the episode ends at the first success
  or at `env.step_limit(task)`. ManiSkill's dense rewards are not computed (`reward_mode="none"`).
- Initial states: init state i of a task is ManiSkill's `reset(seed=i)`, which places every object
  (and for PegInsertionSide also draws the peg and box sizes) from that seed alone, whatever ran
  before; `env.init_states` splits the indices as for the other backends.
- `num_steps_wait` no-op steps (gripper open, not counted) follow every reset, as on LIBERO; objects
  start at rest here, so the configs use 0.
- One ManiSkill env lives at a time; an episode of another task builds that task's (0.2-0.5 s).
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np

from common.config import EnvConfig
from common.records import ChunkResult, Observation, StepResult
from env_workers.api import Split, apply_chunk, configured_tasks, split_init_states
from env_workers.maniskill import conventions
from env_workers.maniskill.bootstrap import check_offline, ensure_maniskill
from env_workers.maniskill.tasks import CAMERA, ManiSkillTask, get_task, robot_uids, suite_arms, suite_tasks


class ManiSkillEnv:
    action_dim = conventions.ARM_ACTION_DIM  # per instance: 7 x the suite's arms

    def __init__(self, cfg: EnvConfig):
        names = configured_tasks(cfg, "maniskill", suite_tasks, lambda n: get_task(cfg.suite, n))
        self.arms = suite_arms(cfg.suite)
        self.action_dim = conventions.ARM_ACTION_DIM * self.arms
        self.render_backend = ensure_maniskill()
        self.cfg = cfg
        self._names = names
        self._gym = None  # the gymnasium env of `task` (wrappers unused: the step limit is ours)
        self.sim = None  # its unwrapped ManiSkill BaseEnv
        self.task: ManiSkillTask | None = None
        self.init_state: int | None = None
        self.steps = 0
        self.success = False
        self._done = True
        self._grippers = [conventions.GRIPPER_OPEN] * self.arms

    # --- EpisodeEnv API ---
    @property
    def task_names(self) -> list[str]:
        return list(self._names)

    def instruction(self, task: str) -> str:
        return get_task(self.cfg.suite, task).instruction

    def init_states(self, task: str, split: Split) -> list[int]:
        get_task(self.cfg.suite, task)
        return split_init_states(self.cfg.init_states, split)

    def reset(self, task: str, init_state: int) -> Observation:
        if int(init_state) < 0:
            raise ValueError(f"init_state must be >= 0 (it is the reset seed), got {init_state}")
        sim = self._build(get_task(self.cfg.suite, task))
        with quiet_maniskill():  # PegInsertionSide rebuilds its scene at every reset (new peg and box sizes)
            sim.reset(seed=int(init_state))
        self._grippers = [conventions.GRIPPER_OPEN] * self.arms
        for _ in range(self.cfg.num_steps_wait):
            self._physics(np.tile(conventions.OPEN_ACTION, self.arms))
        self.init_state = int(init_state)
        self.steps, self.success, self._done = 0, False, False
        return self.observe()

    def step(self, action: np.ndarray) -> StepResult:
        self._apply(action)
        return StepResult(observation=self.observe(), success=self.success, done=self._done)

    def step_chunk(self, actions: np.ndarray, keep_frames: bool = False) -> ChunkResult:
        """Physics for every action, rendering only after the last one (or after each for videos)."""
        steps, frames = apply_chunk(actions, self.action_dim, self._apply, self.render if keep_frames else None,
                                    lambda: self._done)
        obs = self.observe(frames[-1] if frames else None)  # a video's last frame is the observation
        return ChunkResult(observation=obs, success=self.success, done=self._done, steps=steps, frames=frames)

    def close(self) -> None:
        if self._gym is not None:
            with contextlib.suppress(Exception):
                self._gym.close()
        self._gym, self.sim, self.task, self._done = None, None, None, True

    # --- helpers (tests use them too) ---
    def observe(self, image: np.ndarray | None = None) -> Observation:
        """The current observation; `image` if this state was already rendered."""
        return Observation(image=self.render() if image is None else image, instruction=self.task.instruction,
                           proprio=self.proprio())

    def proprio(self) -> np.ndarray:
        return np.concatenate([conventions.proprio(agent.tcp.pose.raw_pose[0].numpy(), agent.robot.get_qpos()[0, -2:].numpy())
                               for agent in self._agents()])

    def _agents(self) -> list:
        """The env's Panda agents in action order (ManiSkill's MultiAgent keeps them in `agents`)."""
        agent = self.sim.agent
        return list(agent.agents) if self.arms > 1 else [agent]

    def render(self) -> np.ndarray:
        """The third-person camera's RGB image [H, W, 3] uint8 (camera_rgb)."""
        return np.ascontiguousarray(camera_rgb(self.sim, self.task)[0].cpu().numpy())

    @property
    def episode_over(self) -> bool:
        return self._done

    def apply_action(self, action: np.ndarray) -> None:
        """`step` without the observation: physics and the success check only (expert measurements)."""
        self._apply(action)

    def sim_state(self) -> np.ndarray:
        """ManiSkill's flat sim state (every actor and articulation), for the demo files' `states`."""
        return self.sim.get_state()[0].cpu().numpy().astype(np.float64)

    def check_success(self) -> bool:
        """Re-evaluate the task's success now (after tests edit the sim state)."""
        return bool(self.sim.evaluate()["success"][0])

    def _apply(self, action: np.ndarray) -> None:
        """One control step of physics and the success check; no rendering."""
        if self._done:
            raise RuntimeError("episode is over (success or step limit): call reset() first")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (self.action_dim,):
            raise ValueError(f"action must have {self.action_dim} values, got shape {np.shape(action)}")
        if np.isnan(a).any():
            raise ValueError(f"action has NaN: {action}")
        info = self._physics(a)
        self.steps += 1
        self.success = bool(info["success"][0])
        self._done = self.success or self.steps >= self.cfg.step_limit(self.task.name)

    def _physics(self, action: np.ndarray) -> dict:
        import torch

        per_arm = np.asarray(action).reshape(self.arms, conventions.ARM_ACTION_DIM)
        ms_actions = [conventions.libero_to_maniskill(a, g) for a, g in zip(per_arm, self._grippers)]
        self._grippers = [float(a[6]) for a in ms_actions]
        if self.arms == 1:
            ms_action = torch.from_numpy(ms_actions[0])
        else:  # ManiSkill's multi-agent action: one entry per agent uid ("panda-0", "panda-1")
            ms_action = {uid: torch.from_numpy(a) for uid, a in zip(self.sim.agent.agents_dict, ms_actions)}
        _, _, _, _, info = self.sim.step(ms_action)
        return info

    def _build(self, task: ManiSkillTask):
        if self.task is None or self.task.name != task.name:
            self.close()
            self._gym = make_maniskill(task, 1, "physx_cpu", self.render_backend, self.cfg.image_size)
            self.sim = self._gym.unwrapped
            self.task = task
        return self.sim

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_maniskill(task: ManiSkillTask, num_envs: int, sim_backend: str, render_backend: str, image_size: int):
    """The gymnasium env of `task` with `num_envs` scenes: our robot, end-effector control, the sensor
    camera at `image_size`; ManiSkill's observations and rewards off (we render and judge ourselves)."""
    import gymnasium as gym

    check_offline(task.name)
    with quiet_maniskill():
        return gym.make(task.name, num_envs=num_envs, sim_backend=sim_backend, render_backend=render_backend,
                        obs_mode="none", reward_mode="none", control_mode="pd_ee_delta_pose", robot_uids=robot_uids(task),
                        sensor_configs=dict(width=image_size, height=image_size))


def camera_rgb(sim, task: ManiSkillTask):
    """The third-person camera's RGB images of every scene of `sim`, [num_envs, H, W, 3] uint8 (a torch
    tensor on the sim's device). Objects the task hides from cameras stay hidden, except those the
    policy must see (tasks.py: show_hidden)."""
    shown = [getattr(sim, name) for name in task.show_hidden]
    for obj in sim._hidden_objects:
        if not any(obj is s for s in shown):
            obj.hide_visual()
    sim.scene.update_render(update_sensors=True, update_human_render_cameras=False)
    camera = sim.scene.sensors[CAMERA]
    camera.capture()
    return camera.get_obs(rgb=True, depth=False, position=False, segmentation=False)["rgb"]


@contextlib.contextmanager
def quiet_maniskill():
    """Silence ManiSkill's warnings while it builds a scene: that PegInsertionSide's default robot is
    another (tasks.py: ROBOT) and that some tasks build objects without an initial pose (they are
    placed at every reset)."""
    from mani_skill.utils.logging_utils import logger

    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
