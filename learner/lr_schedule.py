"""The GRPO learning rate as a function of run progress (0 at the first RL step, 1 at the last).

Progress is a fraction rather than a step count because a run can end by its wall budget before
`total_steps`; the trainer passes whichever of the two is further along (deploy/train.py).
"""

from __future__ import annotations

import math

from common.config import LearnerConfig


def scheduled_lr(cfg: LearnerConfig, progress: float) -> float:
    """`cfg.lr` decayed to `cfg.lr * cfg.lr_final_ratio` as `progress` goes from 0 to 1."""
    p = min(max(progress, 0.0), 1.0)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "linear":
        shape = 1.0 - p
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * p))
    return cfg.lr * (cfg.lr_final_ratio + (1.0 - cfg.lr_final_ratio) * shape)
