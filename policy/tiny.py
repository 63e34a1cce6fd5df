"""Offline ingredients for small random policies: a real 32k Llama-style SentencePiece tokenizer
(shipped inside the `mistral-common` wheel) and neutral action statistics."""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import mistral_common


@functools.lru_cache(maxsize=1)
def _tokenizer_folder() -> str:
    src = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    folder = Path(tempfile.mkdtemp(prefix="vla-tokenizer-"))
    shutil.copy(src, folder / "tokenizer.model")
    return str(folder)


def llama_tokenizer():
    """32000-token SentencePiece tokenizer (same vocabulary size as Llama-2's; the last 256 ids
    become the action tokens). `LlamaTokenizer(vocab_file=...)` silently builds an empty one in
    transformers 5, so load the folder instead."""
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(_tokenizer_folder(), local_files_only=True)


def default_norm_stats(action_dims: int, key: str = "identity") -> dict:
    """q01 = -1, q99 = 1 on every dim: un-normalisation is (almost) the identity."""
    ones = [1.0] * action_dims
    mask = [True] * (action_dims - 1) + [False]
    action = {"q01": [-1.0] * action_dims, "q99": ones, "min": [-1.0] * action_dims, "max": ones,
              "mean": [0.0] * action_dims, "std": ones, "mask": mask}
    return {key: {"action": action, "num_transitions": 0, "num_trajectories": 0}}
