"""Observation processor: uint8 images + instructions -> model inputs, as Prismatic/OpenVLA do it.

Images: optionally center-crop on uint8 exactly as OpenVLA's TensorFlow code does (`center_crop`, for
checkpoints trained with OpenVLA's random-crop augmentation), scale to [0, 1], resize to the model
size (bicubic, antialias), normalise once per vision tower and stack the results channel-wise
(DINOv2 first). The constants are part of the checkpoint (`preprocessor_config.json`), never
hard-coded at the call site.
Prompt: `In: What action should the robot take to {instruction}?\nOut:` + id 29871 ("▁" in Llama-2), or the
id a policy folder records (`prompt_end_id`; earlier folders: their tokenizer's "▁").
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
RESIZE_STRATEGIES = ("resize-naive",)  # Prismatic's letterbox / resize-crop are not what OpenVLA uses


def center_crop(images: torch.Tensor, area: float, size: int) -> torch.Tensor:
    """[B, 3, H, W] uint8 -> [B, 3, size, size] uint8: the central box holding `area` of the image
    (side sqrt(area)), exactly as OpenVLA's eval code makes it with TensorFlow (to the uint8 level;
    tests/fixtures/crop_reference.npz holds TensorFlow's own outputs). Its steps, in float32 and
    TensorFlow's operation order, since a different order moves values across a level boundary:
    `convert_image_dtype` (x * float32(1/255)), `tf.image.crop_and_resize` (bilinear, corners aligned:
    output row i samples y1 (H - 1) + i scale), clip to [0, 1], `convert_image_dtype` back (x 255.5,
    saturated, truncated)."""
    f32, device = torch.float32, images.device
    x = images.to(f32) * torch.tensor(1.0 / 255.0, dtype=f32, device=device)
    # the box on the CPU, in float32 with IEEE-exact sqrt (numpy's): torch's CPU sqrt can be one ulp
    # off on some processors, which moves every sample position and flips pixels across a level
    side = np.clip(np.sqrt(np.float32(area)), np.float32(0), np.float32(1))
    lo = torch.tensor((np.float32(1) - side) / np.float32(2), dtype=f32)
    hi = lo + torch.tensor(side, dtype=f32)
    rows, top, bottom = (t.to(device) for t in _sample_points(lo, hi, x.shape[-2], size))
    cols, left, right = (t.to(device) for t in _sample_points(lo, hi, x.shape[-1], size))
    y_lerp = (rows - top.to(f32)).view(1, 1, size, 1)
    x_lerp = (cols - left.to(f32)).view(1, 1, 1, size)
    upper, lower = x.index_select(2, top), x.index_select(2, bottom)
    tl, tr = upper.index_select(3, left), upper.index_select(3, right)
    bl, br = lower.index_select(3, left), lower.index_select(3, right)
    t = tl + (tr - tl) * x_lerp
    b = bl + (br - bl) * x_lerp
    out = (t + (b - t) * y_lerp).clamp(0.0, 1.0)
    return (out * torch.tensor(255.5, dtype=f32, device=device)).clamp(0.0, 255.0).to(torch.uint8)  # to uint8 truncates


def _sample_points(lo: torch.Tensor, hi: torch.Tensor, n: int, size: int) -> tuple[torch.Tensor, ...]:
    """Where crop_and_resize samples one axis (float32, as its kernel computes it), and the pixel
    indices either side."""
    scale = (hi - lo) * float(n - 1) / float(size - 1)
    pos = lo * float(n - 1) + torch.arange(size, dtype=torch.float32) * scale
    return pos, torch.floor(pos).long(), torch.ceil(pos).long().clamp(max=n - 1)


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
        x = torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2)
        if self.center_crop is not None:  # uint8 -> uint8, as OpenVLA hands the processor a cropped uint8 image
            x = center_crop(x, self.center_crop, self.image_size)
        x = x.float() / 255.0  # torchvision's to_tensor, which the official processor applies
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
            x = x.clamp(0.0, 1.0)
        parts = [(x - torch.tensor(m).view(1, 3, 1, 1)) / torch.tensor(s).view(1, 3, 1, 1) for m, s in zip(self.means, self.stds)]
        return torch.cat(parts, dim=1)

    def on_device(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[B, H, W, 3] uint8 on any device -> [B, 3 * towers, S, S] in `dtype` on that device: what
        `__call__` computes, for images that travel to the GPU as uint8 (a quarter of float32's bytes)
        and are cropped, resized and normalised there. The crop is the same uint8 code; resizing runs
        on 0..255 values (interpolation is linear, so the /255 moves after it) and each tower's
        normalisation is one multiply-add, x * 1/(255 std) - mean/std, in float32: the floats differ
        from `__call__`'s by rounding only, far below one uint8 level (tests/test_gpu_inference.py)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected [B, H, W, 3] uint8 images, got {images.dtype} {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2)
        if self.center_crop is not None:
            x = center_crop(x, self.center_crop, self.image_size)
        x = x.float()
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True).clamp(0.0, 255.0)
        mean, std = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in (self.means, self.stds))
        scale = (1.0 / (255.0 * std)).to(device=x.device, dtype=torch.float32).reshape(1, -1, 3, 1, 1)
        shift = (-mean / std).to(device=x.device, dtype=torch.float32).reshape(1, -1, 3, 1, 1)
        out = torch.addcmul(shift, x[:, None], scale)  # [B, towers, 3, S, S]
        return out.flatten(1, 2).to(dtype)

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


# OpenVLA's `predict_action` appends this literal id (Llama-2's "▁") whatever tokenizer it is given;
# asking the tokenizer for "▁" gives another id with another vocabulary (28705 in Mistral's).
PROMPT_END_ID = 29871


class PromptBuilder:
    """Tokenises instructions into right-padded prompt ids ending with `end_id` (PROMPT_END_ID unless
    the policy folder records the id its weights were trained with)."""

    def __init__(self, tokenizer, end_id: int = PROMPT_END_ID):
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        self.end_id = end_id
        self._cache: dict[str, list[int]] = {}

    def ids(self, instruction: str) -> list[int]:
        if instruction not in self._cache:
            ids = self.tokenizer(PROMPT.format(instruction=instruction.lower()), add_special_tokens=False).input_ids
            ids = [self.bos] + list(ids)
            if ids[-1] != self.end_id:  # appended only when missing, as OpenVLA does
                ids.append(self.end_id)
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
