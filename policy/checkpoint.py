"""Policy folders in Hugging Face layout, read from local disk only (never a hub, never pickle).

    config.json                  model_type "openvla", architecture, norm_stats, text_config
    model.safetensors            weights (Prismatic parameter names for projector / language model)
    tokenizer files              as written by the tokenizer's save_pretrained
    preprocessor_config.json     image size + per-tower normalisation
    dataset_statistics.json      {unnorm_key: {"action": {q01, q99, mask, ...}, ...}}
Writes are atomic: everything goes to a temporary sibling folder that is renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_file
import transformers

from common.config import PolicyConfig
from common.files import reading
from policy.modeling import OpenVLAOFTPolicy, VLAConfig
from policy.openvla_layout import is_official_layout, load_official, refuse_pickles
from policy.processor import ImageProcessor
from policy.tiny import default_norm_stats, llama_tokenizer
from policy.vla import VLAPolicy
from policy.weights import Shards, identity_plan, load_sharded, materialize

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def arch_from_config(cfg: PolicyConfig) -> VLAConfig:
    llm = cfg.llm
    text = dict(
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads or llm.num_heads,
        max_position_embeddings=2048,
        pad_token_id=32000,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    def tower(v):
        return dict(hidden_size=v.hidden_size, num_layers=v.num_layers, num_heads=v.num_heads, intermediate_size=v.intermediate_size)

    return VLAConfig(
        vision_backbone=cfg.vision_backbone,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        vision=tower(cfg.vision),
        fused_vision=tower(cfg.fused_vision) if cfg.fused_vision is not None else None,
        text_config=text,
        n_action_bins=cfg.action_bins,
        action_chunk=cfg.action_chunk,
        action_dims=cfg.action_dims,
        attention=cfg.attention,
        action_queries=cfg.action_queries,
        proprio_dim=cfg.proprio_dim if cfg.use_proprio else 0,
    )


def actor_device(cfg: PolicyConfig | None) -> str:
    """Where a Ray actor runs the policy: the GPU Ray granted it (Ray hides GPUs from actors that asked
    for none, so one visible here is this actor's), else `policy.device`."""
    return "cuda" if torch.cuda.is_available() else (cfg.device if cfg is not None else "cpu")


def build_policy(cfg: PolicyConfig, norm_stats: dict | None = None, seed: int = 0) -> VLAPolicy:
    """A randomly initialised policy of the configured size (tests, SFT from scratch, benchmarks),
    built on the meta device and initialised on `cfg.device` in `cfg.dtype` (policy/weights.py)."""
    arch = arch_from_config(cfg)
    with torch.device("meta"):
        model = OpenVLAOFTPolicy(arch)
    materialize(model, cfg.device, DTYPES[cfg.dtype], seed)
    processor = ImageProcessor.for_towers(arch.tower_names, arch.image_size, cfg.center_crop)
    stats = norm_stats or default_norm_stats(arch.action_dims)
    return VLAPolicy(model, llama_tokenizer(), processor, stats, cfg.unnorm_key)


def initial_policy(cfg: PolicyConfig, norm_stats: dict, seed: int = 0) -> VLAPolicy:
    """The policy SFT starts from, given the demos' statistics {key: stats}: `cfg.path`'s checkpoint,
    which under a named `cfg.unnorm_key` gets them where it has none for that dataset (OpenVLA's
    convention for fine-tuning a base on a new dataset), or a fresh one keyed like them."""
    if cfg.path is not None:
        return load_policy(cfg.path, dtype=cfg.dtype, unnorm_key=cfg.unnorm_key, policy=cfg,
                           fill_norm_stats=norm_stats if cfg.unnorm_key else None)
    (key,) = norm_stats
    return build_policy(cfg.model_copy(update={"unnorm_key": key}), norm_stats, seed=seed)


def save_policy(policy: VLAPolicy, folder: str | Path, tensors: Iterable[tuple[str, torch.Tensor]] | None = None) -> Path:
    """The policy folder; `tensors`: (name, tensor) pairs to write instead of the model's state dict
    (a LoRA learner's merged weights, learner/lora.py)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arch = policy.model.config
    config = {
        "model_type": "openvla",
        "architectures": ["OpenVLAOFTPolicy"],
        "vla_grpo_arch": arch.to_dict(),
        "n_action_bins": arch.n_action_bins,
        "pad_to_multiple_of": arch.pad_to_multiple_of,
        "text_config": arch.text_config,
        "norm_stats": policy.norm_stats,
        "prompt_end_id": policy.prompts.end_id,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    pairs = policy.model.state_dict().items() if tensors is None else tensors
    state = {k: v.detach().contiguous().cpu() for k, v in pairs}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    policy.tokenizer.save_pretrained(str(tmp))
    policy.image_processor.save(tmp)
    (tmp / "dataset_statistics.json").write_text(json.dumps(policy.norm_stats, indent=2))
    install_folder(tmp, folder)
    return folder


def install_folder(tmp: Path, folder: Path) -> None:
    """Put the complete folder `tmp` in place of `folder`: the old one is renamed aside first and
    removed only once the new one is there, so a crash never leaves neither."""
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def copy_policy(source: str | Path, folder: str | Path) -> Path:
    """A copy of the policy folder `source` at `folder`, replacing it whole (as save_policy does)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    install_folder(tmp, folder)
    return folder


def load_policy(
    folder: str | Path, unnorm_key: str | None = None, dtype: str = "float32", policy: PolicyConfig | None = None,
    fill_norm_stats: dict | None = None, device: str | None = None,
) -> VLAPolicy:
    """Our own folder, or an official OpenVLA / OpenVLA-OFT one (docs/checkpoints.md). `policy` gives what
    official folders do not record (action_chunk, action_dims, attention) and `center_crop`, which
    overrides the folder's when set. `fill_norm_stats` adds statistics for datasets the checkpoint has
    none for (fine-tuning a base on a new dataset, as OpenVLA does); the checkpoint's own win. Weights
    go file by file straight to `device` (None = `policy.device`) in `dtype`, into a meta-built model."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a policy folder (no config.json); checkpoints load from local disk only")
    refuse_pickles(folder)
    with reading(folder / "config.json", "policy config file"):
        config = json.loads((folder / "config.json").read_text())
    policy = policy or PolicyConfig()
    device = device or policy.device
    if is_official_layout(config):
        model, processor, norm_stats = load_official(folder, config, policy, unnorm_key, device, DTYPES[dtype])
        norm_stats = {**(fill_norm_stats or {}), **norm_stats}
        return VLAPolicy(model, _load_tokenizer(folder), processor, norm_stats, unnorm_key)
    if "vla_grpo_arch" not in config:
        raise ValueError(f"{folder}/config.json is neither a vla-grpo policy nor an official OpenVLA one (no timm_model_ids); "
                         f"see docs/checkpoints.md")
    with torch.device("meta"):  # no random init, no float32 copy: the files' tensors become the parameters
        model = OpenVLAOFTPolicy(VLAConfig(**config["vla_grpo_arch"]))
    with Shards(folder, device) as shards:
        load_sharded(model, shards, identity_plan(model, shards), DTYPES[dtype])
    model.rebuild_buffers()
    stats_file = folder / "dataset_statistics.json"
    norm_stats = json.loads(stats_file.read_text()) if stats_file.is_file() else config.get("norm_stats", {})
    norm_stats = {**(fill_norm_stats or {}), **norm_stats}
    tokenizer = _load_tokenizer(folder)
    processor = ImageProcessor.load(folder)
    if policy.center_crop is not None:
        processor.center_crop = policy.center_crop
    # folders written before the key existed ended prompts with their tokenizer's "▁", and their
    # weights were trained on that id
    end_id = config.get("prompt_end_id", tokenizer.convert_tokens_to_ids("▁"))
    return VLAPolicy(model, tokenizer, processor, norm_stats, unnorm_key, prompt_end_id=end_id)


def upscale_images(policy: VLAPolicy, factor: int) -> VLAPolicy:
    """The same policy for images `factor` times larger with patches `factor` times larger: the same
    patch grid (so every token, position embedding and later weight carries over) with each patch
    kernel weight spread evenly over factor x factor pixels. On a nearest-upscaled image it computes
    what the original does on the small one; trained further, it can read the finer detail of a real
    larger render at the same sequence length (scripts/pretrain_base.py --init)."""
    arch = policy.model.config
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"upscale factor must be a positive integer, got {factor!r}")
    if factor == 1:
        return policy
    bigger = VLAConfig(**{**arch.to_dict(), "image_size": arch.image_size * factor, "patch_size": arch.patch_size * factor})
    model = OpenVLAOFTPolicy(bigger)
    state = policy.model.state_dict()
    patchify = (arch.patch_size, arch.patch_size)  # every tower's patch embedding: a conv of kernel = stride = patch
    kernels = [f"{name}.weight" for name, m in policy.model.named_modules()
               if isinstance(m, torch.nn.Conv2d) and m.kernel_size == patchify and m.stride == patchify]
    if not kernels:
        raise ValueError("upscale_images: the policy has no patch-embedding kernel")
    for k in kernels:  # [out, 3, p, p] -> [out, 3, p * f, p * f], each weight over f x f pixels
        state[k] = state[k].repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3) / factor**2
    model.load_state_dict(state, strict=True)
    model.to(next(policy.model.parameters()).dtype)
    processor = dataclasses.replace(policy.image_processor, image_size=bigger.image_size)
    return VLAPolicy(model, policy.tokenizer, processor, policy.norm_stats, policy.unnorm_key,
                     prompt_end_id=policy.prompts.end_id)


def _load_tokenizer(folder: Path):
    """The class named in tokenizer_config.json (AutoTokenizer would read config.json's model_type)."""
    meta_file = folder / "tokenizer_config.json"
    name = json.loads(meta_file.read_text()).get("tokenizer_class") if meta_file.is_file() else None
    cls = getattr(transformers, name or "", None) or transformers.LlamaTokenizer
    return cls.from_pretrained(str(folder), local_files_only=True)
