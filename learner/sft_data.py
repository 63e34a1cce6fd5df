"""Demonstrations -> SFT samples: at every step t, the image, the instruction and the next `chunk`
actions (the last action repeats past the end of the demo, so every step of a short demo still
yields a full chunk); and the per-batch augmentation, which shifts images and, where the env says
its labels follow the scene (`SceneShift`), the position targets and proprio with them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.records import SceneShift
from policy.action_tokenizer import ActionStats, ActionTokenizer


def chunk_targets(actions: np.ndarray, chunk: int) -> np.ndarray:
    """[T, D] -> [T, chunk, D]: row t holds actions t .. t+chunk-1."""
    T = len(actions)
    idx = np.minimum(np.arange(T)[:, None] + np.arange(chunk)[None, :], T - 1)
    return actions[idx]


def build_sft_samples(demos, chunk: int):
    """-> images [N, H, W, 3] uint8, instructions [N], raw action chunks [N, chunk, D] float64,
    proprio [N, P] float32 or None. Chunks are tokenised per batch (`sft_batch`), after any label shift."""
    images, instructions, chunks, proprio = [], [], [], []
    for demo in demos:
        targets = chunk_targets(np.asarray(demo.actions, dtype=np.float64), chunk)  # [T, chunk, D]
        chunks.append(targets)
        images.append(np.asarray(demo.images, dtype=np.uint8))
        instructions.extend([demo.instruction] * len(targets))
        proprio.append(None if demo.proprio is None else np.asarray(demo.proprio, dtype=np.float32))
    stacked = None if any(p is None for p in proprio) else np.concatenate(proprio)
    return np.concatenate(images), instructions, np.concatenate(chunks), stacked


def random_shift(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Shift every image [N, H, W, C] by its own random offset of up to `max_shift` pixels per axis,
    filling with the edge pixels; -> (shifted images, content shift [N, 2] as (rows, cols), + = down /
    right). With one demonstration per task this keeps the policy from keying its actions on exact
    pixel positions; without it, small init-state offsets send a from-scratch policy off its demo."""
    n, h, w = images.shape[:3]
    if max_shift <= 0:
        return images, np.zeros((n, 2), dtype=np.int64)
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
    rows = dy[:, None] + np.arange(h)[None, :]  # [N, H]
    cols = dx[:, None] + np.arange(w)[None, :]  # [N, W]
    shifted = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return shifted, np.stack([max_shift - dy, max_shift - dx], axis=1)  # output row r shows input row r + dy - m


def shift_labels(chunks: np.ndarray, proprio: np.ndarray | None, content_shift: np.ndarray, scene: SceneShift):
    """Move raw action chunks [N, chunk, D] and proprio [N, P] as if the scene had translated on the
    table by the images' content shift [N, 2] (rows, cols) -> new (chunks, proprio); inputs are kept."""
    world = np.stack([content_shift[:, 1] * scene.metres_per_col, content_shift[:, 0] * scene.metres_per_row], axis=1)
    chunks = np.array(chunks, dtype=np.float64, copy=True)
    for k, dim in enumerate(scene.action_dims):
        chunks[:, :, dim] += world[:, k, None] * scene.action_per_metre[k]
    if proprio is not None:
        proprio = np.array(proprio, dtype=np.float32, copy=True)
        for k, dim in enumerate(scene.proprio_dims):
            proprio[:, dim] += world[:, k]
    return chunks, proprio


def sft_batch(images, chunks, proprio, idx: np.ndarray, max_shift: int, scene: SceneShift | None,
              stats: ActionStats, tokenizer: ActionTokenizer, rng: np.random.Generator):
    """One augmented SFT batch of the samples `idx` -> (images, token ids [B, chunk * D], proprio or None)."""
    batch_images, content_shift = random_shift(images[idx], max_shift, rng)
    batch_chunks, batch_proprio = chunks[idx], None if proprio is None else proprio[idx]
    if scene is not None and max_shift > 0:
        batch_chunks, batch_proprio = shift_labels(batch_chunks, batch_proprio, content_shift, scene)
    tokens = tokenizer.actions_to_tokens(batch_chunks, stats).reshape(len(idx), -1)
    return batch_images, tokens, batch_proprio


@dataclass
class DemoSamples:
    """The SFT samples of a run's demonstrations (`build_sft_samples`) with the augmentation that
    goes with them; what a GRPO learner keeps for `learner.demo_bc_coef`."""

    images: np.ndarray
    instructions: list[str]
    chunks: np.ndarray
    proprio: np.ndarray | None
    max_shift: int
    scene: SceneShift | None

    def batch(self, size: int, stats: ActionStats, tokenizer: ActionTokenizer, rng: np.random.Generator):
        """`size` random augmented samples -> (images, instructions, token ids [B, chunk * D], proprio or None)."""
        idx = rng.choice(len(self.images), size=size, replace=len(self.images) < size)
        images, tokens, proprio = sft_batch(self.images, self.chunks, self.proprio, idx, self.max_shift, self.scene,
                                            stats, tokenizer, rng)
        return images, [self.instructions[i] for i in idx], tokens, proprio
