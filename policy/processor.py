"""Observation processor: uint8 images + instructions -> model inputs, as Prismatic/OpenVLA do it.

Images: optionally center-crop (`center_crop`, for checkpoints trained with OpenVLA's random-crop
augmentation), resize to the model size (bicubic, antialias), scale to [0, 1], normalise once per
vision tower and stack the results channel-wise (DINOv2 first). The constants are part of the
checkpoint (`preprocessor_config.json`), never hard-coded at the call site.
Prompt: `In: What action should the robot take to {instruction}?\nOut:` + "▁" (Llama-2 id 29871).
"""

from __future__ import annotations

import json
import math
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
RESIZE_STRATEGIES = ("resize-naive",)  # Prismatic's letterbox / resize-crop are not what OpenVLA uses


def center_crop(x: torch.Tensor, area: float, size: int) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> [B, 3, size, size]: the central box holding `area` of the image
    (side sqrt(area)), resampled bilinearly as OpenVLA's `tf.image.crop_and_resize` does (sample i of
    the box edge [a, b] sits at a + i (b - a) / (size - 1) of the image, corners aligned), then put
    back on uint8 levels as the original does (`convert_image_dtype` scales by 255.5 and truncates)."""
    side = min(1.0, math.sqrt(area))
    lo = (1.0 - side) / 2.0
    t = torch.linspace(lo, lo + side, size, dtype=torch.float64) * 2.0 - 1.0  # grid_sample's [-1, 1] coords
    gy, gx = torch.meshgrid(t, t, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).to(x.dtype).expand(x.shape[0], size, size, 2)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return torch.floor(out.clamp(0.0, 1.0) * 255.5) / 255.0


@dataclass
class ImageProcessor:
    image_size: int
    means: list[list[float]] = field(default_factory=list)  # one [3] per tower
    stds: list[list[float]] = field(default_factory=list)
    center_crop: float | None = None  # fraction of the image AREA kept (OpenVLA: 0.9); None = no crop

    @classmethod
    def for_towers(cls, tower_names: list[str], image_size: int, center_crop: float | None = None) -> "ImageProcessor":
        return cls(image_size, [TOWER_NORMS[t][0] for t in tower_names], [TOWER_NORMS[t][1] for t in tower_names], center_crop)

    def __call__(self, images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
        """[B, H, W, 3] uint8 -> [B, 3 * towers, S, S] float32."""
        x = torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2).float() / 255.0
        if self.center_crop is not None:
            x = center_crop(x, self.center_crop, self.image_size)
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
        if self.center_crop is not None:
            cfg["center_crop"] = self.center_crop  # our key: official processors leave cropping to the caller
        (folder / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))

    @classmethod
    def load(cls, folder: Path) -> "ImageProcessor":
        """Our own file or an official `PrismaticImageProcessor` one. Its `tvf_normalize_params` are
        what the official processor applies (they override `means`/`stds` when it is re-loaded)."""
        path = folder / "preprocessor_config.json"
        cfg = json.loads(path.read_text())
        strategy = cfg.get("image_resize_strategy", "resize-naive")
        if strategy not in RESIZE_STRATEGIES:
            raise ValueError(f"{path}: image_resize_strategy {strategy!r} is not supported (only {list(RESIZE_STRATEGIES)})")
        if "tvf_normalize_params" in cfg:
            means, stds = [n["mean"] for n in cfg["tvf_normalize_params"]], [n["std"] for n in cfg["tvf_normalize_params"]]
        else:
            means, stds = cfg["means"], cfg["stds"]
        sizes = {int(s[-1]) for s in cfg["input_sizes"]}
        if len(sizes) != 1:
            raise ValueError(f"{path}: input_sizes {cfg['input_sizes']} differ per tower; one image size is supported")
        return cls(sizes.pop(), means, stds, cfg.get("center_crop"))


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
