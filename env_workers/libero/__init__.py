"""LIBERO (robosuite 1.4 / MuJoCo) behind the episode API, offline and with OpenVLA's conventions.

Nothing here imports `libero` or robosuite at import time: `bootstrap.ensure_libero` does, once per
process, after writing LIBERO's config and verifying the assets. See docs/libero.md.
"""

from env_workers.libero.env import LiberoEnv
from env_workers.libero.suites import EVAL_MAX_STEPS, RL_MAX_STEPS, SUITES, max_steps

__all__ = ["LiberoEnv", "SUITES", "EVAL_MAX_STEPS", "RL_MAX_STEPS", "max_steps"]
