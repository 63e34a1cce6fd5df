"""`SceneEpisodes`: the episode bookkeeping of N scenes stepped as one batch (batched_env.py), plain
numpy: which scenes a physics step counts for, their steps, success and end.

The physics steps every scene at once, so within a chunk a scene is "live" only while it has an
episode, actions left in its chunk and has not ended (success or the step limit) at an earlier
step; steps of the other scenes do not count, and nothing they do after their end changes the
episode's outcome.
"""

from __future__ import annotations

import numpy as np


class SceneEpisodes:
    def __init__(self, num_envs: int, step_limit: int):
        self.step_limit = step_limit
        self.steps = np.zeros(num_envs, dtype=np.int64)  # steps of the current episode
        self.success = np.zeros(num_envs, dtype=bool)  # latched at the step it first holds
        self.done = np.ones(num_envs, dtype=bool)  # no episode yet counts as ended

    def start(self, env_idx) -> None:
        idx = np.asarray(env_idx, dtype=np.int64)
        self.steps[idx], self.success[idx], self.done[idx] = 0, False, False

    def chunk_start(self, lengths: np.ndarray) -> np.ndarray:
        """The scenes a chunk of per-scene `lengths` (0 = none) steps; refuses a chunk for an ended episode."""
        live = np.asarray(lengths) > 0
        if (live & self.done).any():
            raise RuntimeError(f"scenes {np.flatnonzero(live & self.done).tolist()} have no episode (success or "
                               "step limit): reset them first")
        return live

    def record(self, live: np.ndarray, success: np.ndarray) -> None:
        """One physics step happened; it counts for the `live` scenes, with `success` from evaluate()."""
        self.steps[live] += 1
        self.success[live] = success[live]
        self.done[live] = success[live] | (self.steps[live] >= self.step_limit)

    def still_live(self, live: np.ndarray, step: int, lengths: np.ndarray) -> np.ndarray:
        """The scenes that take chunk step `step` (0-based): live so far, not ended, actions left."""
        return live & ~self.done & (step < np.asarray(lengths))
