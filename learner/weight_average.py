"""An exponential moving average of a module's floating-point weights (`learner.ema_decay`), kept
in float32 beside the module. No Ray or DeepSpeed here: the learner ranks (learner/group.py) and the
in-process tuning loop (scripts/tune_inprocess.py) share it."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch


class WeightAverage:
    def __init__(self, module: torch.nn.Module, decay: float):
        """Starts at the module's current weights."""
        self.decay = decay
        self.tensors = {k: v.detach().float().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """average = decay * average + (1 - decay) * weights"""
        for k, v in module.state_dict().items():
            if k in self.tensors:
                self.tensors[k].lerp_(v.float(), 1.0 - self.decay)

    @torch.no_grad()
    def load_into(self, module: torch.nn.Module) -> None:
        module.load_state_dict(self.tensors, strict=False)

    @contextmanager
    def swapped_into(self, module: torch.nn.Module):
        """The module holds the average inside the block, its own weights again after it."""
        live = {k: v.detach().clone() for k, v in module.state_dict().items() if k in self.tensors}
        self.load_into(module)
        try:
            yield
        finally:
            with torch.no_grad():
                module.load_state_dict(live, strict=False)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file(self.tensors, str(path))

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        self.tensors = load_file(str(path))
