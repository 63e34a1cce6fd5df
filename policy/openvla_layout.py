"""Official OpenVLA checkpoint folders (openvla/openvla-7b layout; SimpleVLA-RL's OpenVLA-OFT SFT/RL
checkpoints that predict discrete action tokens) -> our OpenVLAOFTPolicy.

The folder is what `save_pretrained` of Prismatic's `OpenVLAForActionPrediction` writes:
    config.json                    OpenVLAConfig: timm_model_ids, image_sizes, text_config, norm_stats, ...
    model.safetensors | model-0000i-of-0000n.safetensors + model.safetensors.index.json
    dataset_statistics.json        (fine-tuned checkpoints) {unnorm_key: {"action": {q01, q99, mask}}}
    preprocessor_config.json       PrismaticImageProcessor (per-tower normalisation)
    tokenizer files
Vision towers are timm modules there and transformers modules here, so every tower tensor goes
through the explicit name map below (`DINOV2` / `SIGLIP`); projector and language-model names are
the same on both sides. The load is strict: every checkpoint tensor is used, every parameter filled.
Out of scope: OFT's L1-regression / diffusion action heads, its proprio projector and FiLM (they
come as separate pickle files, which are never opened), multi-image inputs, CLIP / letterbox models.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Callable

import torch
from transformers import LlamaConfig

from common.config import PolicyConfig
from policy.action_tokenizer import select_unnorm_key
from policy.modeling import NUM_DINO_REGISTERS, OpenVLAOFTPolicy, VLAConfig, padded_vocab
from policy.processor import ImageProcessor
from policy.weights import Plan, Shards, load_sharded

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

# timm architecture (tag after "." dropped) -> (our tower kind, attention head dim). The head count is
# not visible in the weights; the head dim is fixed per family, so heads = width / head dim.
TIMM_TOWERS = {
    "vit_large_patch14_reg4_dinov2": ("dinov2", 64),
    "vit_so400m_patch14_siglip_224": ("siglip", 72),
    "vit_so400m_patch14_siglip_384": ("siglip", 72),
}
OUT_OF_SCOPE = ("proprio_projector", "action_head", "noisy_action_projector", "film")

# ---- the name map: our parameter (regex, relative to the tower) <- official timm tensors -----------
Transform = Callable[[list[torch.Tensor], re.Match, tuple], torch.Tensor]


def _copy(ts, m, shape):
    return ts[0]


def _qkv(ts, m, shape):  # timm packs [q; k; v] rows in one Linear; clone: safetensors refuses shared storage
    return ts[0].chunk(3, dim=0)["qkv".index(m["p"])].clone()


def _cls_slot(ts, m, shape):
    """timm's DINOv2 (`no_embed_class`) has position embeddings for patches only and adds none to the
    CLS token; transformers keeps a CLS slot in the same tensor, so it gets zeros."""
    pos = ts[0]
    return torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1) if pos.shape[1] + 1 == shape[1] else pos


def _squeeze(ts, m, shape):  # [1, P, D] -> [P, D] (nn.Embedding)
    return ts[0][0] if ts[0].dim() == 3 and ts[0].shape[0] == 1 else ts[0]


def _cat(ts, m, shape):  # attention pool: q rows then kv rows = nn.MultiheadAttention's in_proj [q; k; v]
    return torch.cat(ts, dim=0)


def _zeros(ts, m, shape):
    return torch.zeros(shape)


_L, _W = r"(?P<i>\d+)", r"(?P<w>weight|bias)"
DINOV2: list[tuple[str, tuple[str, ...], Transform]] = [
    (r"embeddings\.cls_token", ("cls_token",), _copy),
    (r"embeddings\.register_tokens", ("reg_token",), _copy),
    (r"embeddings\.position_embeddings", ("pos_embed",), _cls_slot),
    (r"embeddings\.mask_token", (), _zeros),  # transformers-only (masked pre-training), unused at inference
    (rf"embeddings\.patch_embeddings\.projection\.{_W}", (r"patch_embed.proj.\g<w>",), _copy),
    (rf"encoder\.layer\.{_L}\.norm(?P<n>[12])\.{_W}", (r"blocks.\g<i>.norm\g<n>.\g<w>",), _copy),
    (rf"encoder\.layer\.{_L}\.attention\.(?P<p>[qkv])_proj\.{_W}", (r"blocks.\g<i>.attn.qkv.\g<w>",), _qkv),
    (rf"encoder\.layer\.{_L}\.attention\.o_proj\.{_W}", (r"blocks.\g<i>.attn.proj.\g<w>",), _copy),
    (rf"encoder\.layer\.{_L}\.layer_scale(?P<n>[12])\.lambda1", (r"blocks.\g<i>.ls\g<n>.scale_factor",), _copy),
    (rf"encoder\.layer\.{_L}\.mlp\.(?P<fc>fc[12])\.{_W}", (r"blocks.\g<i>.mlp.\g<fc>.\g<w>",), _copy),
    (rf"layernorm\.{_W}", (r"norm.\g<w>",), _copy),
]
SIGLIP: list[tuple[str, tuple[str, ...], Transform]] = [
    (r"embeddings\.position_embedding\.weight", ("pos_embed",), _squeeze),  # no CLS token in SigLIP
    (rf"embeddings\.patch_embedding\.{_W}", (r"patch_embed.proj.\g<w>",), _copy),
    (rf"encoder\.layers\.{_L}\.layer_norm(?P<n>[12])\.{_W}", (r"blocks.\g<i>.norm\g<n>.\g<w>",), _copy),
    (rf"encoder\.layers\.{_L}\.self_attn\.(?P<p>[qkv])_proj\.{_W}", (r"blocks.\g<i>.attn.qkv.\g<w>",), _qkv),
    (rf"encoder\.layers\.{_L}\.self_attn\.out_proj\.{_W}", (r"blocks.\g<i>.attn.proj.\g<w>",), _copy),
    (rf"encoder\.layers\.{_L}\.mlp\.(?P<fc>fc[12])\.{_W}", (r"blocks.\g<i>.mlp.\g<fc>.\g<w>",), _copy),
    (rf"post_layernorm\.{_W}", (r"norm.\g<w>",), _copy),
    (r"head\.probe", ("attn_pool.latent",), _copy),
    (rf"head\.attention\.in_proj_{_W}", (r"attn_pool.q.\g<w>", r"attn_pool.kv.\g<w>"), _cat),
    (rf"head\.attention\.out_proj\.{_W}", (r"attn_pool.proj.\g<w>",), _copy),
    (rf"head\.layernorm\.{_W}", (r"attn_pool.norm.\g<w>",), _copy),
    (rf"head\.mlp\.(?P<fc>fc[12])\.{_W}", (r"attn_pool.mlp.\g<fc>.\g<w>",), _copy),
]
RULES = {"dinov2": DINOV2, "siglip": SIGLIP}
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # old transformers saved this derived buffer; it is recomputed


def is_official_layout(config: dict) -> bool:
    return "vla_grpo_arch" not in config and "timm_model_ids" in config


def refuse_pickles(folder: Path) -> None:
    """Weights load from safetensors only: a pickle can run code when opened, so it is never touched."""
    found = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if found:
        raise ValueError(
            f"{folder} holds pickle files {found}; only .safetensors weights are loaded and pickles are never "
            f"opened. (OpenVLA-OFT's action_head / proprio_projector .pt files are out of scope: only checkpoints "
            f"that predict discrete action tokens load.) Remove them or convert the weights to safetensors."
        )


def _few(names: list[str], n: int = 12) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


# ---- config.json -> VLAConfig --------------------------------------------------------------------
def _shape(state: dict, name: str) -> tuple[int, ...]:
    if name not in state:
        raise ValueError(f"checkpoint has no {name}: not an OpenVLA checkpoint (timm towers + Llama)")
    return tuple(state[name].shape)


def _depth(state: dict, prefix: str) -> int:
    return 1 + max(int(m[1]) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k)))


def _tower(state: dict, slot: str, timm_id: str) -> tuple[str, dict, int]:
    arch = timm_id.split(".")[0]
    if arch not in TIMM_TOWERS:
        raise ValueError(f"config.json timm_model_ids: {timm_id!r} is not supported (towers: {sorted(TIMM_TOWERS)})")
    kind, head_dim = TIMM_TOWERS[arch]
    p = f"vision_backbone.{slot}."
    hidden, patch = _shape(state, p + "patch_embed.proj.weight")[0], _shape(state, p + "patch_embed.proj.weight")[-1]
    mlp, depth = _shape(state, p + "blocks.0.mlp.fc1.weight")[0], _depth(state, p + "blocks.")
    if hidden % head_dim:
        raise ValueError(f"{p}: width {hidden} is not a multiple of {arch}'s head dim {head_dim}")
    if kind == "dinov2" and state.get(p + "reg_token", torch.empty(1, NUM_DINO_REGISTERS)).shape[1] != NUM_DINO_REGISTERS:
        raise ValueError(f"{p}reg_token: the model supports {NUM_DINO_REGISTERS} DINOv2 registers")
    sizes = dict(hidden_size=hidden, num_layers=depth, num_heads=hidden // head_dim, intermediate_size=mlp,
                 hidden_act="gelu")  # timm's default nn.GELU (exact); `timm_override_act_layers` must be null
    return kind, sizes, patch


def _text_config(text: dict, state: dict) -> dict:
    """Llama kwargs: the file keeps only fields that differ from LlamaConfig's defaults (Llama-2-7B)."""
    if text.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json text_config.model_type {text['model_type']!r}: only Llama backbones load")
    skip = {"model_type", "torch_dtype", "dtype", "architectures", "_name_or_path", "transformers_version"}
    llama = LlamaConfig(**{k: v for k, v in text.items() if k not in skip})
    if llama.tie_word_embeddings:
        raise ValueError("config.json text_config.tie_word_embeddings: tied Llama heads are not supported")
    vocab, hidden = _shape(state, "language_model.model.embed_tokens.weight")
    layer = "language_model.model.layers.0."
    seen = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=_depth(state, "language_model.model.layers."),
                intermediate_size=_shape(state, layer + "mlp.gate_proj.weight")[0],
                num_key_value_heads=_shape(state, layer + "self_attn.k_proj.weight")[0] // llama.head_dim)
    for field, value in seen.items():
        if getattr(llama, field) != value:
            raise ValueError(f"config.json text_config.{field} is {getattr(llama, field)}, the weights say {value}")
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rms_norm_eps", "hidden_act", "attention_bias", "mlp_bias", "rope_parameters",
            "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings")
    return {k: getattr(llama, k) for k in keep}


def official_arch(config: dict, state: dict, policy: PolicyConfig) -> VLAConfig:
    ids = list(config["timm_model_ids"])
    fused = bool(config.get("use_fused_vision_backbone", len(ids) > 1))
    if fused != (len(ids) == 2) or len(ids) not in (1, 2):
        raise ValueError(f"config.json: use_fused_vision_backbone={fused} with timm_model_ids {ids}")
    if any(config.get("timm_override_act_layers") or []):
        raise ValueError(f"config.json timm_override_act_layers {config['timm_override_act_layers']}: only timm's default GELU")
    spec = config.get("arch_specifier", "")
    if not spec.endswith("fused-gelu-mlp" if fused else "gelu-mlp"):
        raise ValueError(f"config.json arch_specifier {spec!r}: the projector must be {'fused-' if fused else ''}gelu-mlp")
    sizes = set(config.get("image_sizes", [224]))
    if len(sizes) != 1:
        raise ValueError(f"config.json image_sizes {config['image_sizes']}: towers must share one image size")
    towers = [_tower(state, slot, i) for slot, i in zip(("featurizer", "fused_featurizer"), ids)]
    kinds = [t[0] for t in towers]
    backbone = {("siglip",): "siglip", ("dinov2",): "dinov2", ("dinov2", "siglip"): "dinosiglip"}.get(tuple(kinds))
    if backbone is None or len({t[2] for t in towers}) != 1:
        raise ValueError(f"config.json timm_model_ids {ids}: supported are one SigLIP or DINOv2 tower, or DINOv2 + SigLIP fused")
    if config.get("use_proprio"):
        raise ValueError("config.json use_proprio: OpenVLA-OFT's proprio projector is out of scope (action-token models only)")
    if policy.use_proprio or policy.action_queries != "zeros":
        raise ValueError("policy.use_proprio / policy.action_queries='learned' do not exist in official checkpoints "
                         "(OpenVLA-OFT's proprio projector is out of scope)")
    text = _text_config(config.get("text_config") or {}, state)
    pad = int(config.get("pad_to_multiple_of", 64))
    arch = VLAConfig(
        vision_backbone=backbone, image_size=sizes.pop(), patch_size=towers[0][2],
        vision=towers[0][1], fused_vision=towers[1][1] if fused else None, text_config=text,
        vocab_size=text["vocab_size"] - pad,  # OpenVLA's convention: padded rows minus the multiple
        pad_to_multiple_of=pad, n_action_bins=int(config.get("n_action_bins", 256)),
        action_chunk=policy.action_chunk, action_dims=policy.action_dims, attention=policy.attention,
    )
    if padded_vocab(arch) != arch.vocab_size + pad:
        raise ValueError(f"config.json pad_to_multiple_of {pad}: the embedding's {arch.vocab_size + pad} rows are not "
                         f"the {arch.vocab_size}-token vocabulary + <PAD> padded to a multiple of {pad}")
    return arch


# ---- weights -------------------------------------------------------------------------------------
def _source(name: str, kinds: list[str]) -> tuple[tuple[str, ...], Transform, re.Match | None]:
    if name.startswith(("projector.", "language_model.")):
        return (name,), _copy, None
    for slot, kind in zip(("featurizer", "fused_featurizer"), kinds):
        prefix = f"vision_backbone.{slot}."
        if name.startswith(prefix):
            rest = name[len(prefix):]
            for pattern, templates, fn in RULES[kind]:
                if m := re.fullmatch(pattern, rest):
                    return tuple(prefix + m.expand(t) for t in templates), fn, m
    raise KeyError(f"no official source for parameter {name}")


def _gamma_alias(name: str, official: dict) -> str:
    """LayerScale: OpenVLA's HF export renames timm's `gamma` to `scale_factor`; raw timm keeps `gamma`."""
    alias = name[: -len("scale_factor")] + "gamma" if name.endswith(".scale_factor") else name
    return alias if name not in official and alias in official else name


def conversion_plan(official: dict[str, torch.Tensor], targets: dict[str, tuple], kinds: list[str]) -> Plan:
    """Our parameter name -> (official tensor names, how to make it of them). `official` may hold
    meta tensors: every transform is tried on meta copies, so shapes are checked without data. Raises
    naming every official tensor that is missing, left unused, or of the wrong shape."""
    plan, used, missing, wrong = {}, set(), [], []
    for name, shape in targets.items():
        sources, fn, m = _source(name, kinds)
        sources = tuple(_gamma_alias(s, official) for s in sources)
        absent = [s for s in sources if s not in official]
        if absent:
            missing += absent
            continue
        make = functools.partial(_apply, fn, m, tuple(shape))
        out = make([torch.empty_like(official[s], device="meta") for s in sources])
        if tuple(out.shape) != tuple(shape):
            wrong.append(f"{'+'.join(sources)} {tuple(official[sources[0]].shape)} -> {name} needs {tuple(shape)}")
            continue
        used.update(sources)
        plan[name] = (sources, make)
    unexpected = sorted(k for k in set(official) - used if not IGNORED.match(k))
    errors = []
    if missing:
        errors.append(f"missing tensors: {_few(sorted(set(missing)))}")
    if wrong:
        errors.append(f"shape mismatches (config.json disagrees with the weights): {_few(wrong)}")
    if unexpected:
        hint = (" (OpenVLA-OFT's proprio projector / regression heads are out of scope)"
                if any(k.startswith(OUT_OF_SCOPE) for k in unexpected) else "")
        errors.append(f"unexpected tensors{hint}: {_few(unexpected)}")
    if errors:
        raise ValueError("checkpoint does not match the OpenVLA layout: " + "; ".join(errors))
    return plan


def _apply(fn: Transform, m: re.Match | None, shape: tuple, tensors: list[torch.Tensor]) -> torch.Tensor:
    return fn(tensors, m, shape)


def convert_state_dict(official: dict[str, torch.Tensor], targets: dict[str, tuple], kinds: list[str]) -> dict:
    """Our parameter name -> tensor, built from the official tensors (conversion_plan, applied)."""
    return {name: make([official[s] for s in sources])
            for name, (sources, make) in conversion_plan(official, targets, kinds).items()}


def check_unnorm_key(norm_stats: dict, unnorm_key: str | None) -> str:
    """select_unnorm_key, plus a hint for the `<suite>_no_noops` naming of the LIBERO checkpoints."""
    try:
        return select_unnorm_key(norm_stats, unnorm_key)
    except KeyError as e:
        near = [k for k in sorted(norm_stats) if unnorm_key and k.startswith(unnorm_key)]
        raise KeyError(e.args[0] + (f" (did you mean {near[0]!r}?)" if near else "")) from None


def load_official(folder: Path, config: dict, policy: PolicyConfig, unnorm_key: str | None,
                  device: str = "cpu", dtype: torch.dtype = torch.float32):
    """-> (model, image processor, norm stats) of an official folder; the caller adds the tokenizer.
    The architecture and the name map are checked on the files' headers; then the weights go file by
    file to `device` in `dtype`, each official tensor read once (policy/weights.py)."""
    stats_file = folder / "dataset_statistics.json"  # fine-tuned checkpoints: it wins over config.json (as OFT does)
    norm_stats = json.loads(stats_file.read_text()) if stats_file.is_file() else (config.get("norm_stats") or {})
    if not norm_stats:
        raise ValueError(f"{folder} has no action statistics (neither dataset_statistics.json nor config.json norm_stats)")
    check_unnorm_key(norm_stats, unnorm_key)  # before reading gigabytes of weights
    with Shards(folder, device) as shards:
        state = shards.meta()
        arch = official_arch(config, state, policy)
        with torch.device("meta"):  # no random init, no second copy of 7B weights
            model = OpenVLAOFTPolicy(arch)
        targets = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        load_sharded(model, shards, conversion_plan(state, targets, arch.tower_names), dtype)
    model.rebuild_buffers()
    if (folder / "preprocessor_config.json").is_file():
        processor = ImageProcessor.load(folder)
    else:
        processor = ImageProcessor.for_towers(arch.tower_names, arch.image_size)
    if processor.image_size != arch.image_size or len(processor.means) != len(arch.tower_names):
        raise ValueError(f"{folder}/preprocessor_config.json: {len(processor.means)} tower(s) at {processor.image_size}px, "
                         f"the model has {len(arch.tower_names)} at {arch.image_size}px")
    if policy.center_crop is not None:
        processor.center_crop = policy.center_crop
    return model, processor, norm_stats
