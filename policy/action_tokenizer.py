"""OpenVLA's action tokenizer: 256 uniform bins over [-1, 1] mapped onto the LAST 256 ids of the
Llama-2 vocabulary (31744..31999), plus q01/q99 un-normalisation from dataset statistics.

Token id -> bin index `clip(vocab - id - 1, 0, 254)` -> one of 255 bin centers; so the highest
id (31999) is the lowest value (-1 + 1/255), exactly as the released checkpoints decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ActionStats:
    """Per-dim statistics of one dataset (one unnorm key of `dataset_statistics.json`)."""

    q01: np.ndarray  # [D]
    q99: np.ndarray  # [D]
    mask: np.ndarray  # [D] bool: False = leave the dim as is (the gripper)

    @classmethod
    def from_json(cls, stats: dict) -> "ActionStats":
        action = stats["action"]
        q01 = np.asarray(action["q01"], dtype=np.float64)
        mask = np.asarray(action.get("mask", [True] * len(q01)), dtype=bool)
        return cls(q01=q01, q99=np.asarray(action["q99"], dtype=np.float64), mask=mask)


def select_unnorm_key(norm_stats: dict, unnorm_key: str | None) -> str:
    """Pick the statistics of one dataset; never guess between several."""
    keys = sorted(norm_stats)
    if unnorm_key is None:
        if len(keys) == 1:
            return keys[0]
        raise KeyError(f"the checkpoint has statistics for several datasets; set policy.unnorm_key to one of: {keys}")
    if unnorm_key not in norm_stats:
        raise KeyError(f"unnorm key {unnorm_key!r} not in the checkpoint's dataset statistics; it has: {keys}")
    return unnorm_key


class ActionTokenizer:
    def __init__(self, vocab_size: int = 32000, n_bins: int = 256):
        self.vocab_size = vocab_size
        self.n_bins = n_bins
        self.bins = np.linspace(-1.0, 1.0, n_bins)  # [256] edges
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0  # [255]
        self.first_id = vocab_size - n_bins  # 31744: the action ids are first_id .. vocab_size - 1

    # --- normalised value <-> token id -------------------------------------------------------
    def encode(self, normalized: np.ndarray) -> np.ndarray:
        """Normalised actions in [-1, 1] (clipped) -> token ids in [first_id, vocab_size)."""
        digitized = np.digitize(np.clip(normalized, -1.0, 1.0), self.bins)  # 1..256
        return (self.vocab_size - digitized).astype(np.int64)

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        """Token ids -> normalised bin centers. Ids outside the 256 action ids are an error."""
        ids = np.asarray(token_ids, dtype=np.int64)
        bad = (ids < self.first_id) | (ids >= self.vocab_size)
        if bad.any():
            raise ValueError(
                f"token ids {sorted(set(ids[bad].tolist()))[:8]} are not action tokens "
                f"(valid: {self.first_id}..{self.vocab_size - 1})"
            )
        idx = np.clip(self.vocab_size - ids - 1, 0, self.bin_centers.shape[0] - 1)
        return self.bin_centers[idx]

    # --- index within the 256 action logits <-> token id ------------------------------------
    def index_to_id(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(index, dtype=np.int64) + self.first_id

    def id_to_index(self, token_ids: np.ndarray) -> np.ndarray:
        self.decode(token_ids)  # validates the range
        return np.asarray(token_ids, dtype=np.int64) - self.first_id

    # --- env units <-> normalised -------------------------------------------------------------
    @staticmethod
    def unnormalize(normalized: np.ndarray, stats: ActionStats) -> np.ndarray:
        """[..., D] in [-1, 1] -> env units: 0.5 * (x + 1) * (q99 - q01 + 1e-8) + q01 on masked dims."""
        scaled = 0.5 * (normalized + 1.0) * (stats.q99 - stats.q01 + 1e-8) + stats.q01
        return np.where(stats.mask, scaled, normalized)

    @staticmethod
    def normalize(actions: np.ndarray, stats: ActionStats) -> np.ndarray:
        """Inverse of `unnormalize` (clipped to [-1, 1]); used to tokenise demonstrations."""
        scaled = 2.0 * (actions - stats.q01) / (stats.q99 - stats.q01 + 1e-8) - 1.0
        return np.clip(np.where(stats.mask, scaled, actions), -1.0, 1.0)

    def tokens_to_actions(self, token_ids: np.ndarray, stats: ActionStats) -> np.ndarray:
        return self.unnormalize(self.decode(token_ids), stats)

    def actions_to_tokens(self, actions: np.ndarray, stats: ActionStats) -> np.ndarray:
        return self.encode(self.normalize(actions, stats))


def postprocess_gripper(actions: np.ndarray, binarize: bool = True, invert: bool = False) -> np.ndarray:
    """LIBERO convention: the last dim becomes sign(g) in {-1, +1}, optionally with inverted sign."""
    out = np.array(actions, dtype=np.float32, copy=True)
    if binarize:
        out[..., -1] = np.where(out[..., -1] >= 0.0, 1.0, -1.0)
    if invert:
        out[..., -1] *= -1.0
    return out
