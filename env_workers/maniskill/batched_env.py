"""`BatchedManiSkillEnv`: ONE ManiSkill env of N scenes of one task, stepped and rendered as one batch.

With `env.sim_backend: physx_cuda` PhysX simulates all N scenes on the GPU and SAPIEN renders their
sensor cameras in one batched pass; ManiSkill's CPU sim (physx_cpu) holds one scene, so there N = 1
and this is the same code path on a machine without a GPU.

- Scene j runs one episode at a time. `reset_envs` starts episodes with ManiSkill's partial reset
  (`reset(seed=s, options={"env_idx": [j]})`), one scene per call: ManiSkill seeds the torch draws
  of a reset with the FIRST seed of the call and numpy's with that seed too, so a scene reset alone
  with seed s gets init state s whatever its index and whatever else resets (one call for several
  scenes would give scene k a state that depends on the others' seeds). The other scenes keep
  their state; the controllers read the next action from the current pose, so they carry nothing over.
- `step_chunks` applies an action chunk per scene, k physics steps of all N scenes at once: the
  physics cannot step a subset, so scenes outside an episode, or whose episode ended earlier in
  the chunk (success or the step limit), get a hold action (no motion, gripper as last
  commanded) and their steps do not count; their state is reset before their next episode.
- The unwrapped ManiSkill env is stepped: its time limit and ManiSkill's auto-reset (a vector-env
  wrapper feature) never apply; episode ends are ours. Success is the task's own `evaluate()`
  (`info["success"]` of each step), latched at the step it first holds.
- Init state i is seed i, as for `ManiSkillEnv`. On the GPU the task draws its random poses with
  torch's CUDA generator, so state i is another scene than on the CPU, the same one every time.
"""

from __future__ import annotations

import contextlib

import numpy as np

from common.config import EnvConfig
from common.records import Observation
from env_workers.api import Split, configured_tasks, split_init_states
from env_workers.maniskill import conventions
from env_workers.maniskill.bootstrap import check_physx_gpu, ensure_maniskill
from env_workers.maniskill.env import camera_rgb, make_maniskill, quiet_maniskill
from env_workers.maniskill.scene_episodes import SceneEpisodes
from env_workers.maniskill.tasks import batch_task, get_task, suite_tasks


class BatchedManiSkillEnv:
    action_dim = 7

    def __init__(self, cfg: EnvConfig, num_envs: int):
        names = configured_tasks(cfg, "maniskill", suite_tasks, lambda n: get_task(cfg.suite, n))
        self.task = batch_task(cfg.suite, names)
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if cfg.sim_backend == "physx_cpu" and num_envs != 1:
            raise ValueError(f"env.sim_backend physx_cpu holds one scene per ManiSkill env, got num_envs={num_envs}")
        self.cfg = cfg
        self.num_envs = num_envs
        self.render_backend = ensure_maniskill()
        if cfg.sim_backend == "physx_cuda":
            check_physx_gpu()
        self._gym = make_maniskill(self.task, num_envs, cfg.sim_backend, self.render_backend, cfg.image_size)
        self.sim = self._gym.unwrapped
        self.episodes = SceneEpisodes(num_envs, cfg.step_limit(self.task.name))
        self.init_state = np.full(num_envs, -1, dtype=np.int64)  # per scene; -1: no episode yet
        self.gripper = np.full(num_envs, conventions.GRIPPER_OPEN, dtype=np.float32)  # last finger targets

    # --- the task's metadata, as EpisodeEnv gives it ---
    @property
    def task_names(self) -> list[str]:
        return [self.task.name]

    def instruction(self, task: str) -> str:
        return get_task(self.cfg.suite, task).instruction

    def init_states(self, task: str, split: Split) -> list[int]:
        get_task(self.cfg.suite, task)
        return split_init_states(self.cfg.init_states, split)

    # --- batched episodes ---
    def reset_envs(self, env_idx: list[int], init_states: list[int]) -> None:
        """Scene env_idx[i] starts an episode from init state (reset seed) init_states[i]; the other
        scenes keep their state."""
        import torch

        if len(env_idx) != len(init_states):
            raise ValueError(f"{len(env_idx)} scenes but {len(init_states)} init states")
        for j, state in zip(env_idx, init_states):
            if not 0 <= int(j) < self.num_envs:
                raise IndexError(f"scene {j} out of range for {self.num_envs} scenes")
            if int(state) < 0:
                raise ValueError(f"init_state must be >= 0 (it is the reset seed), got {state}")
            with quiet_maniskill():
                self.sim.reset(seed=int(state), options={"env_idx": torch.tensor([int(j)], device=self.sim.device)})
        idx = np.asarray(env_idx, dtype=np.int64)
        self.init_state[idx] = np.asarray(init_states, dtype=np.int64)
        self.gripper[idx] = conventions.GRIPPER_OPEN
        self.episodes.start(idx)

    def step_chunks(self, actions: np.ndarray, lengths: np.ndarray, keep_frames: bool = False):
        """Scene j applies actions[j, :lengths[j]] (LIBERO env actions, [N, k, 7]) until its episode
        ends; scenes with length 0 only hold. -> (steps applied per scene [N], the frames after each
        physics step [k' x [N, H, W, 3]] or None)."""
        import torch

        actions = np.asarray(actions, dtype=np.float32)
        lengths = np.asarray(lengths, dtype=np.int64)
        if actions.ndim != 3 or actions.shape[0] != self.num_envs or actions.shape[2] != self.action_dim:
            raise ValueError(f"actions must be [{self.num_envs}, k, {self.action_dim}], got shape {actions.shape}")
        if lengths.shape != (self.num_envs,) or (lengths < 0).any() or (lengths > actions.shape[1]).any():
            raise ValueError(f"lengths must be [{self.num_envs}] within 0..{actions.shape[1]}, got {lengths}")
        live = self.episodes.chunk_start(lengths)
        if np.isnan(actions[live]).any():
            raise ValueError("actions have NaN")
        applied = np.zeros(self.num_envs, dtype=np.int64)
        frames: list[np.ndarray] | None = [] if keep_frames else None
        for k in range(actions.shape[1]):
            live = self.episodes.still_live(live, k, lengths)
            if not live.any():
                break
            ms_actions = np.zeros((self.num_envs, self.action_dim), dtype=np.float32)  # all scenes
            ms_actions[:, 6] = self.gripper  # ended and idle scenes hold: no motion, fingers as they are
            ms_actions[live] = conventions.libero_to_maniskill_batch(actions[live, k], self.gripper[live])
            self.gripper[live] = ms_actions[live, 6]
            _, _, _, _, info = self.sim.step(torch.from_numpy(ms_actions).to(self.sim.device))
            self.episodes.record(live, info["success"].cpu().numpy().astype(bool))
            applied[live] += 1
            if frames is not None:
                frames.append(self.render())
        return applied, frames

    @property
    def success(self) -> np.ndarray:
        return self.episodes.success

    @property
    def done(self) -> np.ndarray:
        return self.episodes.done

    def render(self) -> np.ndarray:
        """Every scene's camera image, [N, H, W, 3] uint8."""
        return np.ascontiguousarray(camera_rgb(self.sim, self.task).cpu().numpy())

    def proprio(self, env_idx: list[int]) -> np.ndarray:
        """LIBERO's 8 proprio dims of the given scenes, [len(env_idx), 8] float32."""
        agent = self.sim.agent
        tcp = agent.tcp.pose.raw_pose[list(env_idx)].cpu().numpy()
        fingers = agent.robot.get_qpos()[list(env_idx), -2:].cpu().numpy()
        return np.stack([conventions.proprio(p, f) for p, f in zip(tcp, fingers)]).reshape(-1, conventions.PROPRIO_DIM)

    def observations(self, env_idx: list[int], images: np.ndarray) -> list[Observation]:
        """Observations of the given scenes from `images` ([N, H, W, 3], one render of all scenes)."""
        return [Observation(image=images[j].copy(), instruction=self.task.instruction, proprio=p)
                for j, p in zip(env_idx, self.proprio(env_idx))]

    def check_success(self) -> np.ndarray:
        """The task's evaluate() now, per scene [N] (after tests edit the sim state)."""
        return self.sim.evaluate()["success"].cpu().numpy().astype(bool)

    def close(self) -> None:
        if self._gym is not None:
            with contextlib.suppress(Exception):
                self._gym.close()
        self._gym = self.sim = None
        self.episodes.done[:] = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
