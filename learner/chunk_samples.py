"""A rank's trajectories as chunk samples: one policy query each (an observation and the action
chunk sampled for it), carrying its trajectory's advantage, old log-probs and loss weight.

The learner forwards and backwards these in micro-batches of at most `learner.micro_batch_chunks`
samples, so its activation memory is bounded by that knob whatever the episode lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.records import Trajectory
from learner.grpo import token_mask


def micro_batches(n: int, count: int) -> list[np.ndarray]:
    """Sample indices 0..n-1 in `count` contiguous micro-batches of near-equal size (some empty when n < count)."""
    return np.array_split(np.arange(n), count)


@dataclass
class ChunkSamples:
    trajs: list[Trajectory]
    traj: np.ndarray  # [S] the sample's trajectory
    chunk: np.ndarray  # [S] its chunk within that trajectory

    @classmethod
    def of(cls, trajs: list[Trajectory]) -> ChunkSamples:
        sizes = [t.num_chunks for t in trajs]
        traj = np.repeat(np.arange(len(trajs)), sizes)
        chunk = np.concatenate([np.arange(n) for n in sizes]) if trajs else np.zeros(0, np.int64)
        return cls(trajs, traj, chunk)

    def __len__(self) -> int:
        return len(self.traj)

    def inputs(self, idx: np.ndarray, uses_proprio: bool) -> tuple:
        """(images [s, H, W, 3], instructions, token ids [s, A], proprio [s, P] or None) of samples `idx`."""
        pairs = [(self.trajs[i], c) for i, c in zip(self.traj[idx], self.chunk[idx])]
        images = np.stack([t.images[c] for t, c in pairs])
        tokens = torch.from_numpy(np.stack([np.asarray(t.tokens[c], dtype=np.int64).reshape(-1) for t, c in pairs]))
        proprio = np.stack([t.proprio[c] for t, c in pairs]) if uses_proprio else None
        return images, [t.instruction for t, _ in pairs], tokens, proprio

    def targets(self, idx: np.ndarray, advantages: np.ndarray, weights: np.ndarray, old_logprobs=None) -> tuple:
        """(old log-probs [s, A], mask [s, A], advantages [s], weights [s]) of samples `idx`: the
        rollout's log-probs unless `old_logprobs` (one [T, chunk, dims] array per trajectory) are given."""
        old_src = old_logprobs if old_logprobs is not None else [t.logprobs for t in self.trajs]
        old = np.stack([np.asarray(old_src[i][c], dtype=np.float32).reshape(-1) for i, c in zip(self.traj[idx], self.chunk[idx])])
        dims = self.trajs[0].tokens.shape[-1]
        executed = np.stack([self.trajs[i].executed[c] for i, c in zip(self.traj[idx], self.chunk[idx])])  # [s, chunk]
        mask = token_mask(torch.from_numpy(executed), dims)  # [s, A]
        sel = self.traj[idx]
        return (torch.from_numpy(old), mask, torch.as_tensor(advantages[sel], dtype=torch.float32),
                torch.as_tensor(weights[sel], dtype=torch.float32))

    def valid_tokens(self) -> np.ndarray:
        """[B] action tokens each trajectory executed: its token-mean's denominator (at least 1)."""
        dims = self.trajs[0].tokens.shape[-1] if self.trajs else 0
        return np.array([max(int(t.executed.sum()) * dims, 1) for t in self.trajs], dtype=np.float64)
