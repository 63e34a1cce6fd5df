"""The GRPO learning rate as a function of run progress (0 at the first RL step, 1 at the last).

Progress is a fraction rather than a step count because a run can end by its wall budget before
`total_steps`; `run_progress` takes whichever of the two is further along. The trainer
(deploy/train.py) and scripts/tune_inprocess.py both use it.
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
    """`cfg.lr` decayed to `cfg.lr * cfg.lr_final_ratio` as `progress` goes from 0 to 1; with
    `cfg.lr_warmup` > 0 the lr first rises linearly from that final value to `cfg.lr` over the
    first `lr_warmup` of the run, and the decay takes the rest."""
    p = min(max(progress, 0.0), 1.0)
    floor = cfg.lr * cfg.lr_final_ratio
    if p < cfg.lr_warmup:
        return floor + (cfg.lr - floor) * p / cfg.lr_warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    q = (p - cfg.lr_warmup) / (1.0 - cfg.lr_warmup)
    if cfg.lr_schedule == "linear":
        shape = 1.0 - q
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * q))
    return floor + (cfg.lr - floor) * shape
