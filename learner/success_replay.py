"""Self-imitation on the run's own successes (`learner.success_replay_coef`).

Each learner rank keeps the successful trajectories of the GRPO mini-batches it trained on, the
latest `success_replay_capacity` per task, and every later mini-batch adds a cross-entropy on
chunks drawn from them (tasks drawn uniformly, so a task with rare successes weighs as much as
one that succeeds always). GRPO uses each episode once; this replays the rare successes of hard
tasks, as self-imitation learning (Oh et al., 2018) and filtered behaviour cloning do. Only
executed actions are targets: the tokens of a chunk after the episode ended are masked.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np

from common.records import Trajectory
from learner.checkpoints import load_trajectories, save_trajectories
from learner.grpo import token_mask


class SuccessReplay:
    def __init__(self, capacity_per_task: int):
        if capacity_per_task <= 0:
            raise ValueError(f"capacity_per_task must be > 0, got {capacity_per_task}")
        self.capacity = capacity_per_task
        self.buffers: dict[str, deque[Trajectory]] = {}

    def add(self, trajs: list[Trajectory]) -> int:
        """Keep the successful ones (the oldest of a full task buffer goes); -> how many were kept."""
        kept = 0
        for t in trajs:
            if t.success:
                self.buffers.setdefault(t.task, deque(maxlen=self.capacity)).append(t)
                kept += 1
        return kept

    def __len__(self) -> int:
        return sum(len(b) for b in self.buffers.values())

    def batch(self, size: int, rng: np.random.Generator):
        """`size` chunks -> (images [B, H, W, 3], instructions, token ids [B, chunk * D], proprio [B, P] or
        None, mask [B, chunk * D] float: 1 where the action was executed); None while empty."""
        tasks = sorted(t for t, b in self.buffers.items() if b)
        if not tasks:
            return None
        picks = []
        for task in rng.choice(tasks, size=size):
            buffer = self.buffers[str(task)]
            traj = buffer[int(rng.integers(len(buffer)))]
            picks.append((traj, int(rng.integers(traj.num_chunks))))
        dims = picks[0][0].tokens.shape[-1]
        images = np.stack([t.images[c] for t, c in picks])
        tokens = np.stack([t.tokens[c].reshape(-1) for t, c in picks])
        mask = token_mask(np.stack([t.executed[c] for t, c in picks]), dims).numpy()  # the GRPO loss's token order
        proprio = None if picks[0][0].proprio is None else np.stack([t.proprio[c] for t, c in picks]).astype(np.float32)
        return images, [t.instruction for t, _ in picks], tokens, proprio, mask

    # --- checkpoints: the buffers in order, as npz (no pickle) ---------------------------------
    def save(self, folder: Path) -> None:
        save_trajectories([t for task in sorted(self.buffers) for t in self.buffers[task]], Path(folder))

    def load(self, folder: Path) -> None:
        self.buffers = {}
        for t in load_trajectories(Path(folder)):
            self.buffers.setdefault(t.task, deque(maxlen=self.capacity)).append(t)
