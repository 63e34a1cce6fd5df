"""LoRA adapters (peft) on the policy's language model, and the policy's weights with them merged.

`attach_adapters` injects peft LoRA layers into the LM blocks' Linear layers that
learner.lora.target_modules names and leaves trainable only the adapters and the parts listed in
learner.lora.trainable. Whatever leaves the learner (published weights, policy folders, the
collective broadcast) is in the policy's own layout: `merged_tensors` yields the base names with
W + alpha / rank x B A, one tensor at a time on the model's device, and never changes the model.
DeepSpeed checkpoints keep the adapters as they are (peft's names), so a resume restores them exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import peft
import torch
import torch.nn as nn
from peft.tuners.lora import LoraLayer, LoraModel

from common.config_learner import LoraConfig
from policy.modeling import OpenVLAOFTPolicy

LM_BLOCKS = "language_model.model.layers."
BASE_LAYER = ".base_layer"


def adapter_targets(model: OpenVLAOFTPolicy, target_modules: list[str]) -> list[str]:
    """Full names of the LM blocks' Linear layers called one of `target_modules` in their block.
    Full names, since the towers reuse some of the same short names (SigLIP's q_proj, ...)."""
    targets = [name for name, module in model.named_modules()
               if name.startswith(LM_BLOCKS) and name.rpartition(".")[2] in target_modules and isinstance(module, nn.Linear)]
    if not targets:
        raise ValueError(f"learner.lora.target_modules {target_modules} name no Linear layer of the language model's blocks")
    return targets


def trainable_parts(model: OpenVLAOFTPolicy, names: list[str]) -> list[nn.Parameter]:
    """The parameters of learner.lora.trainable's parts that this policy has (action queries and the
    proprio projector exist only in some policies). The action head is the split one
    (OpenVLAOFTPolicy.split_action_head), not the whole LM head."""
    if "action_head" in names and model.action_head is None:
        raise RuntimeError("split the action head (model.split_action_head()) before attaching adapters")
    parts = {"action_head": model.action_head, "action_queries": model.action_queries,
             "proprio_projector": model.proprio_projector, "projector": model.projector}
    out: list[nn.Parameter] = []
    for name in names:
        part = parts[name]
        if isinstance(part, nn.Parameter):
            out.append(part)
        elif part is not None:
            out.extend(part.parameters())
    return out


def attach_adapters(model: OpenVLAOFTPolicy, cfg: LoraConfig) -> int:
    """Inject the adapters in place (peft.inject_adapter_in_model: the model keeps its class and
    forward) and set requires_grad on the adapters and the `cfg.trainable` parts only. B starts at
    zero (peft's default), so the merged weights start as the base's. Returns the trainable count."""
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                             target_modules=adapter_targets(model, cfg.target_modules))
    peft.inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))
    for param in trainable_parts(model, cfg.trainable):
        param.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def is_adapter(name: str) -> bool:
    """A parameter or state-dict key of an adapter (peft names them lora_A, lora_B, ...)."""
    return any(part.startswith(LoraModel.prefix) for part in name.split("."))


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())


def base_layout(model: nn.Module) -> dict[str, torch.Tensor]:
    """The names, dtypes, shapes and device of `merged_tensors`, without merging: an adapted layer's
    base weight (a view, no copy) stands in for its merged one. For layout checks only."""
    return {key.replace(BASE_LAYER + ".", "."): t for key, t in model.state_dict().items() if not is_adapter(key)}


def merged_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the model's state dict in the base layout, on the model's device: an adapted
    layer's weight as W + its adapters' scale x B A (added in float32, in W's dtype) under W's own
    name, adapter tensors left out. Unadapted tensors are the model's own (no copy); each merged one
    is computed when its turn comes, so at most one extra weight exists at a time. Without adapters:
    the state dict as it is."""
    merge = merger(model)
    for name, tensor in base_layout(model).items():
        yield name, merge(name, tensor)


def merger(model: nn.Module) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """merge(name, tensor): the tensor `merged_tensors` yields for an entry of `base_layout(model)`,
    computed alone (senders that stream the weights bucket by bucket merge each as they pack it)."""
    adapted = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}

    @torch.no_grad()
    def merge(name: str, tensor: torch.Tensor) -> torch.Tensor:
        layer_name, _, leaf = name.rpartition(".")
        layer = adapted.get(layer_name)
        if layer is None or leaf != "weight":
            return tensor
        merged = tensor.float()
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                merged = merged + layer.get_delta_weight(adapter).float()
        return merged.to(tensor.dtype)

    return merge
