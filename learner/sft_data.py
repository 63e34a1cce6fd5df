"""Demonstrations -> SFT samples: at every step t, the image, the instruction and the tokens of
the next `chunk` actions (the last action repeats past the end of the demo, so every step of a
short demo still yields a full chunk)."""

from __future__ import annotations

import numpy as np

from policy.action_tokenizer import ActionStats, ActionTokenizer


def chunk_targets(actions: np.ndarray, chunk: int) -> np.ndarray:
    """[T, D] -> [T, chunk, D]: row t holds actions t .. t+chunk-1."""
    T = len(actions)
    idx = np.minimum(np.arange(T)[:, None] + np.arange(chunk)[None, :], T - 1)
    return actions[idx]


def build_sft_samples(demos, stats: ActionStats, tokenizer: ActionTokenizer, chunk: int):
    """-> images [N, H, W, 3] uint8, instructions [N], token ids [N, chunk * D], proprio [N, P] or None."""
    images, instructions, tokens, proprio = [], [], [], []
    for demo in demos:
        targets = chunk_targets(np.asarray(demo.actions, dtype=np.float64), chunk)  # [T, chunk, D]
        tokens.append(tokenizer.actions_to_tokens(targets, stats).reshape(len(targets), -1))
        images.append(np.asarray(demo.images, dtype=np.uint8))
        instructions.extend([demo.instruction] * len(targets))
        proprio.append(None if demo.proprio is None else np.asarray(demo.proprio, dtype=np.float32))
    stacked = None if any(p is None for p in proprio) else np.concatenate(proprio)
    return np.concatenate(images), instructions, np.concatenate(tokens), stacked


def random_shift(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Shift every image [N, H, W, C] by its own random (dy, dx) in [-max_shift, max_shift], filling
    with the edge pixels. With one demonstration per task, this keeps the policy from keying its
    actions on exact pixel positions (actions are deltas, so a shifted view asks for the same
    action); without it, small init-state offsets send a from-scratch policy off its demo."""
    if max_shift <= 0:
        return images
    n, h, w = images.shape[:3]
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
    rows = dy[:, None] + np.arange(h)[None, :]  # [N, H]
    cols = dx[:, None] + np.arange(w)[None, :]  # [N, W]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
