"""ManiSkill's own motion-planning solutions (mplib, shipped in the mani-skill wheel) as a source of
TCP waypoints.

A solution plans joint-space paths for the Panda and executes them in `pd_joint_pos` control. It runs
here in a second, camera-less env of the same task, reset with the same seed, so it sees exactly the
scene our env shows for that init state. After every one of its control steps we keep the TCP pose
(in the robot's root frame) and the gripper command; experts.py follows those waypoints in our
end-effector delta control.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from env_workers.demos import ExpertFailed
from env_workers.maniskill.tasks import ROBOT

SOLUTIONS = "mani_skill.examples.motionplanning.panda.solutions"


@dataclass
class Waypoints:
    """What the planner did, one row per control step it took."""

    tcp_poses: np.ndarray  # [N, 7] position + wxyz quaternion, robot root frame
    closed: np.ndarray  # [N] bool: the gripper command at that step was "close"
    planner_success: bool  # the task's success at the planner's last step (in joint control)

    def __len__(self) -> int:
        return len(self.closed)


def solution(task: str):
    """ManiSkill's `solve(env, seed, debug, vis)` for a task id, e.g. solvePickCube for PickCube-v1."""
    module = importlib.import_module(SOLUTIONS)
    name = "solve" + task.rsplit("-", 1)[0]
    if not hasattr(module, name):
        raise ValueError(f"ManiSkill has no motion-planning solution {name} for {task}")
    return getattr(module, name)


class PlannerRun:
    """One joint-control env of a task for the planner; reused across seeds of that task."""

    def __init__(self, task: str, render_backend: str):
        self.task = task
        self._solve = solution(task)
        self._env = _Recorder(gym.make(task, num_envs=1, sim_backend="physx_cpu", render_backend=render_backend,
                                       obs_mode="none", reward_mode="none", control_mode="pd_joint_pos",
                                       robot_uids=ROBOT))

    def waypoints(self, seed: int) -> Waypoints:
        """Run the solution from `reset(seed=seed)`; raises when mplib finds no path."""
        rec = self._env
        result = self._solve(rec, seed=int(seed), debug=False, vis=False)
        if isinstance(result, int) or not rec.poses:  # the solutions return -1 when a plan fails
            raise PlanningFailed(f"{self.task} seed {seed}: the motion planner found no path")
        return Waypoints(tcp_poses=np.stack(rec.poses), closed=np.asarray(rec.closed, dtype=bool),
                         planner_success=bool(rec.success))

    def close(self) -> None:
        self._env.close()


class PlanningFailed(ExpertFailed):
    """mplib found no collision-free path for one of the solution's moves."""


class _Recorder(gym.Wrapper):
    """Keeps the TCP pose and gripper command after each step the solution takes."""

    def reset(self, **kwargs):
        self.poses, self.closed, self.success = [], [], False
        return super().reset(**kwargs)

    def step(self, action):
        out = super().step(action)
        agent = self.unwrapped.agent
        at_base = agent.robot.pose.inv() * agent.tcp.pose
        self.poses.append(at_base.raw_pose[0].cpu().numpy().astype(np.float64))
        # closing is any negative target: the solutions close to -1 (the planner's CLOSED), LiftPegUpright's to -0.6
        self.closed.append(float(np.asarray(action).reshape(-1)[-1]) < 0)
        self.success = bool(out[-1]["success"][0])
        return out
