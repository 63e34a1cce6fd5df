"""Observation processor: uint8 images + instructions -> model inputs, as Prismatic/OpenVLA do it.

Images: resize to the model size (bicubic, antialias), scale to [0, 1], normalise once per vision
tower and stack the results channel-wise (DINOv2 first). The constants are part of the
checkpoint (`preprocessor_config.json`), never hard-coded at the call site.
Prompt: `In: What action should the robot take to {instruction}?\nOut:` + "▁" (Llama-2 id 29871).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Published normalisation of each tower family (Prismatic `tvf_normalize_params`).
TOWER_NORMS = {
    "dinov2": ([0.484375, 0.455078125, 0.40625], [0.228515625, 0.2236328125, 0.224609375]),
    "siglip": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
}

PROMPT = "In: What action should the robot take to {instruction}?\nOut:"


@dataclass
class ImageProcessor:
    image_size: int
    means: list[list[float]] = field(default_factory=list)  # one [3] per tower
    stds: list[list[float]] = field(default_factory=list)

    @classmethod
    def for_towers(cls, tower_names: list[str], image_size: int) -> "ImageProcessor":
        return cls(image_size, [TOWER_NORMS[t][0] for t in tower_names], [TOWER_NORMS[t][1] for t in tower_names])

    def __call__(self, images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
        """[B, H, W, 3] uint8 -> [B, 3 * towers, S, S] float32."""
        x = torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
            x = x.clamp(0.0, 1.0)
        parts = [(x - torch.tensor(m).view(1, 3, 1, 1)) / torch.tensor(s).view(1, 3, 1, 1) for m, s in zip(self.means, self.stds)]
        return torch.cat(parts, dim=1)

    def save(self, folder: Path) -> None:
        cfg = {
            "image_processor_type": "PrismaticImageProcessor",
            "image_resize_strategy": "resize-naive",
            "input_sizes": [[3, self.image_size, self.image_size]] * len(self.means),
            "tvf_normalize_params": [{"mean": m, "std": s, "inplace": False} for m, s in zip(self.means, self.stds)],
        }
        (folder / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))

    @classmethod
    def load(cls, folder: Path) -> "ImageProcessor":
        cfg = json.loads((folder / "preprocessor_config.json").read_text())
        norms = cfg["tvf_normalize_params"]
        return cls(int(cfg["input_sizes"][0][-1]), [n["mean"] for n in norms], [n["std"] for n in norms])


class PromptBuilder:
    """Tokenises instructions into right-padded prompt ids ending with the "▁" token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        self.space_id = tokenizer.convert_tokens_to_ids("▁")  # 29871 in Llama-2
        self._cache: dict[str, list[int]] = {}

    def ids(self, instruction: str) -> list[int]:
        if instruction not in self._cache:
            ids = self.tokenizer(PROMPT.format(instruction=instruction.lower()), add_special_tokens=False).input_ids
            ids = [self.bos] + list(ids)
            if ids[-1] != self.space_id:
                ids.append(self.space_id)
            self._cache[instruction] = ids
        return self._cache[instruction]

    def __call__(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> prompt_ids [B, S] int64 (right-padded with 0), prompt_lengths [B]."""
        rows = [self.ids(s) for s in instructions]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        out = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out, lengths
