"""Weights straight onto the device they run on, in their dtype: a model is built on the meta device
(shapes only, no memory), then either random-initialised in place (`materialize`) or filled from
safetensors files one file at a time (`load_sharded`). A 7B policy thus never exists as a float32
CPU copy: at most one file's tensors are in flight besides the model itself.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import safe_open

from common.files import reading

INDEX_FILE = "model.safetensors.index.json"

# one entry of a load plan: the checkpoint tensors a parameter is made of, and how
Make = Callable[[list[torch.Tensor]], torch.Tensor]
Plan = dict[str, tuple[tuple[str, ...], Make]]


def _few(names: list[str], n: int = 12) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def resolve_device(device: str | torch.device) -> torch.device:
    """'cuda' -> 'cuda:<current>': safetensors and CUDA events want an index."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class Shards:
    """The tensors of a folder's safetensors files, memory-mapped: names, shapes and the file of each
    are read from the headers; a tensor's data only when it is asked for. The files are those named
    by `model.safetensors.index.json` when there is one (a missing file, a tensor in another file
    than the index says, or a listed tensor no file holds is an error), else every `*.safetensors`."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        folder = Path(folder)
        index = folder / INDEX_FILE
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
        files = sorted(set(weight_map.values())) if weight_map else sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder} has no .safetensors weights (pickle checkpoints are not loaded)")
        self.device = resolve_device(device)
        self.folder = folder
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        self.file_of: dict[str, str] = {}
        for name in files:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / INDEX_FILE} names shard {name}, which is missing")
            with reading(folder / name, "policy weights file"):  # a truncated header: safetensors' own error names no file
                handle = self._stack.enter_context(safe_open(str(folder / name), framework="pt", device=str(self.device)))
                keys = handle.keys()
            self._handles[name] = handle
            for key in keys:
                if weight_map and weight_map.get(key) != name:
                    raise ValueError(f"{folder / name} holds {key}, which {INDEX_FILE} places in {weight_map.get(key)}")
                if key in self.file_of:
                    raise ValueError(f"{key} is in both {self.file_of[key]} and {name}")
                self.file_of[key] = name
        absent = sorted(set(weight_map) - set(self.file_of))
        if absent:
            raise ValueError(f"{INDEX_FILE} lists tensors that no shard holds: {_few(absent)}")

    def __enter__(self) -> "Shards":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def keys(self) -> list[str]:
        return list(self.file_of)

    def meta(self) -> dict[str, torch.Tensor]:
        """Every tensor as a meta tensor of its shape: architecture and name checks read no data."""
        return {k: torch.empty(self._handles[f].get_slice(k).get_shape(), device="meta") for k, f in self.file_of.items()}

    def read(self, name: str) -> torch.Tensor:
        file = self.file_of[name]
        with reading(self.folder / file, "policy weights file"):  # data cut short after a whole header
            return self._handles[file].get_tensor(name)


def load_sharded(model: nn.Module, shards: Shards, plan: Plan, dtype: torch.dtype) -> None:
    """Fill the meta-built `model` from `shards` as `plan` says ({parameter: (sources, make)}), one
    file at a time: its tensors are read onto the shards' device, transformed, cast to `dtype` and
    assigned as the parameters themselves (no second copy). Every parameter must be in the plan."""
    targets = model.state_dict()
    left = sorted(set(targets) - set(plan))
    if left:
        raise ValueError(f"no checkpoint tensor for: {_few(left)}")
    by_file: dict[str | None, list[str]] = defaultdict(list)
    for target, (sources, _) in plan.items():
        by_file[shards.file_of[sources[0]] if sources else None].append(target)
    for names in by_file.values():
        uses = Counter(s for target in names for s in plan[target][0])
        cache: dict[str, torch.Tensor] = {}  # tensors several parameters are cut from (timm's packed qkv)

        def read(source: str) -> torch.Tensor:
            tensor = cache.get(source)
            if tensor is None:
                tensor = shards.read(source)
                if uses[source] > 1:
                    cache[source] = tensor
            uses[source] -= 1
            if not uses[source]:
                cache.pop(source, None)
            return tensor

        part = {}
        for target in names:
            sources, make = plan[target]
            tensor = make([read(s) for s in sources]).to(shards.device)
            part[target] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            if tuple(part[target].shape) != tuple(targets[target].shape):
                raise ValueError(f"{'+'.join(sources)} -> {target}: shape {tuple(part[target].shape)}, "
                                 f"the model needs {tuple(targets[target].shape)}")
        model.load_state_dict(part, strict=False, assign=True)
        del part


def identity_plan(model: nn.Module, shards: Shards) -> Plan:
    """Our own folders: every parameter under its own name. Checked against the headers before any
    data is read, like a strict load_state_dict."""
    targets = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in shards.meta().items()}
    missing, unexpected = sorted(set(targets) - set(shapes)), sorted(set(shapes) - set(targets))
    wrong = [f"{k} {shapes[k]} (model: {targets[k]})" for k in targets if k in shapes and shapes[k] != targets[k]]
    errors = [f"{what}: {_few(names)}" for what, names in
              (("missing tensors", missing), ("unexpected tensors", unexpected), ("shape mismatches", wrong)) if names]
    if errors:
        raise ValueError("checkpoint does not match the policy: " + "; ".join(errors))
    return {k: ((k,), _first) for k in targets}


def _first(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def materialize(model: nn.Module, device: str | torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """Random-initialise a meta-built model where it will run: storage allocated on `device` in
    `dtype` (uninitialised), then every parameter drawn by the model's own init (`init_weights`) from
    `seed`, and the derived buffers rebuilt. On the meta device only the dtype changes."""
    model.to(dtype=dtype)  # on meta: no memory, so the storage below is allocated in dtype at once
    device = resolve_device(device)
    if device.type == "meta":
        return model
    model.to_empty(device=device)
    torch.manual_seed(seed)  # seeds the CPU and every CUDA generator
    model.init_weights()
    model.rebuild_buffers()
    return model
