"""Extra loss terms of a GRPO mini-batch (`learner.loss_terms`): each is a name, a weight, and a
set of labelled samples it draws `batch_size` of per mini-batch and scores by action-token
cross-entropy. The engine adds weight x that loss to the GRPO loss, split over the micro-batches,
and logs it as `train/{name}_loss`.

Terms (the driver builds each one's samples once, `deploy/sft.py: loss_term_samples`):
- `demo_bc`: the run's SFT demonstrations with SFT's augmentation, as DAPG does. It keeps every task
  near its demonstration even while dynamic sampling filters all of that task's groups out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from learner.sft_data import DemoSamples
from policy.vla import VLAPolicy


@dataclass
class TermBatch:
    """What a term scores in one mini-batch: images [N, H, W, 3], token ids [N, A], proprio [N, P]."""

    name: str
    weight: float
    images: np.ndarray
    instructions: list[str]
    tokens: np.ndarray
    proprio: np.ndarray | None

    def part(self, index: np.ndarray) -> tuple:
        """(images, instructions, tokens, proprio) of the samples `index`, for one micro-batch."""
        return (self.images[index], [self.instructions[j] for j in index], self.tokens[index],
                None if self.proprio is None else self.proprio[index])


@dataclass
class LossTerm:
    name: str
    weight: float
    batch_size: int
    samples: DemoSamples

    def draw(self, policy: VLAPolicy, rng: np.random.Generator) -> TermBatch:
        images, instructions, tokens, proprio = self.samples.batch(self.batch_size, policy.stats,
                                                                   policy.action_tokenizer, rng)
        return TermBatch(self.name, self.weight, images, instructions, tokens,
                         proprio if policy.uses_proprio else None)
