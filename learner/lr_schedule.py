"""The GRPO learning rate as a function of run progress (0 at the first RL step, 1 at the last).

Progress is a fraction rather than a step count because a run can end by its wall budget before
`total_steps`; `run_progress` takes whichever of the two is further along (deploy/train.py).
"""

from __future__ import annotations

import math

from common.config import LearnerConfig


def run_progress(steps_done: int, total_steps: int, elapsed_s: float | None = None, budget_s: float | None = None) -> float:
    """How far a run is, 0 to 1: by steps, or by the clock when a time budget would end it first."""
    done = steps_done / total_steps
    if budget_s is not None:
        done = max(done, elapsed_s / max(budget_s, 1e-6))
    return min(done, 1.0)


def scheduled_lr(cfg: LearnerConfig, progress: float) -> float:
    """`cfg.lr` decayed to `cfg.lr * cfg.lr_final_ratio` as `progress` goes from 0 to 1."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    p = min(max(progress, 0.0), 1.0)
    shape = 1.0 - p if cfg.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
    floor = cfg.lr * cfg.lr_final_ratio
    return floor + (cfg.lr - floor) * shape
