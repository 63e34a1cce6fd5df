"""ManiSkill3 (SAPIEN) behind the episode API: CPU simulation, LIBERO's action conventions, offline.

tasks.py holds the suites (plain data), bootstrap.py imports ManiSkill and checks its renderer,
conventions.py maps LIBERO's actions and proprio onto ManiSkill's Panda, env.py is the `EpisodeEnv`;
batched_env.py holds N scenes of one task stepped as one batch (the GPU-parallel worker's env),
scene_episodes.py their per-scene episode bookkeeping.
Nothing here imports mani_skill or sapien at import time. See docs/maniskill.md.
"""

from env_workers.maniskill.env import ManiSkillEnv
from env_workers.maniskill.tasks import SUITE, SUITES, TASKS, ManiSkillTask

__all__ = ["ManiSkillEnv", "SUITE", "SUITES", "TASKS", "ManiSkillTask"]
