"""The OpenVLA-OFT-style policy: vision tower(s) -> MLP projector -> Llama, decoding a whole chunk
of `chunk x dims` action tokens in ONE forward pass.

Sequence per sample (right-padded in a batch):
    [BOS] [P patch embeddings] [prompt tokens ... "▁"] [chunk*dims zero placeholders] [</s>]
The logits of action token k are read one position earlier (next-token shift), restricted to the
256 action ids, and attention is bidirectional over the whole sequence (padding masked), as in
OpenVLA-OFT; `attention="causal"` is kept for ablations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    AttentionInterface,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NUM_DINO_REGISTERS = 4  # Prismatic uses DINOv2 ViT-L/14 with 4 registers
ATTENTION = "vla_sdpa"


def _sdpa_never_causal(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with `is_causal` always off: the mask the policy passes is the
    whole story. The LM gets a [B, 1, 1, L] key-padding bias (bidirectional), a [B, 1, L, L] one
    (causal ablation), or none at all when no row is padded; under "sdpa" no mask would mean causal.
    Under a name of its own transformers passes a 4D mask through as is and builds none otherwise.

    Which CUDA kernel runs (PyTorch's sdp_utils.cpp): flash attention refuses any attn_mask
    (check_for_attn_mask), so a padded batch goes to memory-efficient attention (which takes an
    additive bias, broadcast over heads and queries) or to cuDNN attention where PyTorch puts cuDNN
    first (sm90 with cuDNN > 9.15; it takes masks of supported shapes); a batch without padding, and
    so without a mask, can use flash. docs/performance.md; scripts/bench_gpu.py reports the kernels."""
    return sdpa_attention_forward(module, query, key, value, attention_mask, **{**kwargs, "is_causal": False})


AttentionInterface.register(ATTENTION, _sdpa_never_causal)


@dataclass
class VLAConfig:
    vision_backbone: str = "dinosiglip"  # siglip | dinov2 | dinosiglip (fused, channel-wise concat)
    image_size: int = 224
    patch_size: int = 14
    vision: dict = field(default_factory=lambda: dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128))
    fused_vision: dict | None = None  # second tower's sizes when they differ (real dinosiglip: ViT-L vs So400m); None = `vision`
    text_config: dict = field(default_factory=dict)  # LlamaConfig kwargs
    vocab_size: int = 32000  # real vocabulary; the LM head is padded to a multiple of 64
    pad_to_multiple_of: int = 64
    n_action_bins: int = 256
    action_chunk: int = 8
    action_dims: int = 7
    attention: str = "bidirectional"
    action_queries: str = "zeros"  # zeros (OpenVLA-OFT) | learned (one embedding per action token)
    proprio_dim: int = 0  # > 0: one extra projected proprio token after the patches (OFT / RoboTwin)

    @property
    def num_action_tokens(self) -> int:
        return self.action_chunk * self.action_dims

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tower_names(self) -> list[str]:
        return {"siglip": ["siglip"], "dinov2": ["dinov2"], "dinosiglip": ["dinov2", "siglip"]}[self.vision_backbone]

    def to_dict(self) -> dict:
        return asdict(self)


def _build_tower(kind: str, cfg: VLAConfig, v: dict) -> nn.Module:
    common = dict(
        hidden_size=v["hidden_size"],
        num_hidden_layers=v["num_layers"],
        num_attention_heads=v["num_heads"],
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    if "hidden_act" in v:  # timm's towers (OpenVLA checkpoints) use exact GELU, HF SigLIP defaults to tanh
        common["hidden_act"] = v["hidden_act"]
    if kind == "siglip":
        return SiglipVisionModel(SiglipVisionConfig(intermediate_size=v["intermediate_size"], **common))
    return Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(
            mlp_ratio=max(1, v["intermediate_size"] // v["hidden_size"]), num_register_tokens=NUM_DINO_REGISTERS, **common
        )
    )


class VisionBackbone(nn.Module):
    """Patch features from the second-to-last block of each tower (Prismatic's choice), prefix
    tokens (CLS, registers) dropped, towers concatenated channel-wise. Input channels: 3 per tower,
    stacked in `tower_names` order (DINOv2 first)."""

    def __init__(self, cfg: VLAConfig):
        super().__init__()
        names = cfg.tower_names
        self.tower_kinds = names
        sizes = [cfg.vision, cfg.fused_vision or cfg.vision][: len(names)]
        self.featurizer = _build_tower(names[0], cfg, sizes[0])
        self.fused_featurizer = _build_tower(names[1], cfg, sizes[1]) if len(names) > 1 else None
        self.embed_dim = sum(v["hidden_size"] for v in sizes)

    @staticmethod
    def _patches(tower: nn.Module, kind: str, pixels: torch.Tensor) -> torch.Tensor:
        out = tower(pixel_values=pixels, output_hidden_states=True)
        hidden = out.hidden_states[-2]  # [B, prefix + P, D]
        prefix = 1 + NUM_DINO_REGISTERS if kind == "dinov2" else 0
        return hidden[:, prefix:]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3 * towers, H, W] -> [B, P, D]
        feats = [self._patches(self.featurizer, self.tower_kinds[0], pixel_values[:, :3])]
        if self.fused_featurizer is not None:
            feats.append(self._patches(self.fused_featurizer, self.tower_kinds[1], pixel_values[:, 3:6]))
        return torch.cat(feats, dim=-1)


class Projector(nn.Module):
    """Prismatic's `gelu-mlp` (one tower) or `fused-gelu-mlp` (two towers); names fc1/fc2/fc3."""

    def __init__(self, vision_dim: int, llm_dim: int, fused: bool):
        super().__init__()
        self.fused = fused
        if fused:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
        else:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(F.gelu(self.fc1(x)))
        return self.fc3(F.gelu(x)) if self.fused else x


def padded_vocab(cfg: VLAConfig) -> int:
    """OpenVLA adds one <PAD> token (id 32000) and pads the embedding to a multiple of 64: 32064."""
    m = cfg.pad_to_multiple_of
    return ((cfg.vocab_size + 1 + m - 1) // m) * m


class OpenVLAOFTPolicy(nn.Module):
    def __init__(self, cfg: VLAConfig):
        super().__init__()
        self.config = cfg
        self.vision_backbone = VisionBackbone(cfg)
        text = LlamaConfig(**{**cfg.text_config, "vocab_size": padded_vocab(cfg)})
        text._attn_implementation = ATTENTION
        self.language_model = LlamaForCausalLM(text)
        self.projector = Projector(self.vision_backbone.embed_dim, text.hidden_size, fused=cfg.vision_backbone == "dinosiglip")
        self.action_first_id = cfg.vocab_size - cfg.n_action_bins
        self.proprio_projector = (
            nn.Sequential(nn.Linear(cfg.proprio_dim, text.hidden_size), nn.GELU(), nn.Linear(text.hidden_size, text.hidden_size))
            if cfg.proprio_dim > 0 else None
        )
        # OFT feeds zero embeddings at the action positions; a small model trained from scratch
        # learns far faster with one learned query per action token (opt-in, off for OFT checkpoints).
        self.action_queries = (
            nn.Parameter(0.02 * torch.randn(cfg.num_action_tokens, text.hidden_size)) if cfg.action_queries == "learned" else None
        )
        self.action_head: nn.Parameter | None = None  # split_action_head()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Draw every parameter as construction does: the HF towers and LM by their own
        `_init_weights`, the projectors by torch's layer init, the action queries N(0, 0.02). For a
        model built on the meta device and allocated with `to_empty` (policy/weights.py)."""
        for hf in (self.vision_backbone.featurizer, self.vision_backbone.fused_featurizer, self.language_model):
            if hf is None:
                continue
            for t in [*hf.modules(), *hf.parameters(), *hf.buffers()]:  # transformers skips what it marked done
                if "_is_hf_initialized" in t.__dict__:
                    del t._is_hf_initialized
            hf.init_weights()
        for head in (self.projector, self.proprio_projector):
            for layer in head.modules() if head is not None else ():
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
        if self.action_queries is not None:
            nn.init.normal_(self.action_queries, std=0.02)
        if self.action_head is not None:
            self.action_head.copy_(self.language_model.lm_head.weight[self.action_first_id : self.config.vocab_size])

    def rebuild_buffers(self) -> None:
        """Recompute the non-persistent buffers (rotary frequencies, SigLIP's position ids) on the
        parameters' device: `to_empty` leaves them uninitialised, an `assign` load on the meta device."""
        device = self.language_model.lm_head.weight.device
        lm = self.language_model.model
        lm.rotary_emb = type(lm.rotary_emb)(lm.rotary_emb.config).to(device)  # float32 frequencies, as built
        for tower in (self.vision_backbone.featurizer, self.vision_backbone.fused_featurizer):
            emb = getattr(tower, "embeddings", None) if tower is not None else None
            if emb is not None and getattr(emb, "position_ids", None) is not None:
                emb.position_ids = torch.arange(emb.num_positions, device=device).expand((1, -1))
        left = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if left and device.type != "meta":
            raise RuntimeError(f"tensors left on the meta device: {left[:12]}")

    def compile_blocks(self) -> None:
        """Regional torch.compile for inference: every transformer block of the towers and the LM
        compiled on its own (identical blocks share the compiled code, so it compiles once per block
        type and input shape). Measured on an H200 at 7B: +28 % chunks/s at batch 32 (docs/performance.md)."""
        blocks = [*self.language_model.model.layers]
        for tower in (self.vision_backbone.featurizer, self.vision_backbone.fused_featurizer):
            if tower is not None:
                encoder = tower.encoder
                blocks += [*getattr(encoder, "layer", getattr(encoder, "layers", []))]
        for block in blocks:
            block.compile()

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing of every transformer block (towers and LM) by HF's own mechanism,
        non-reentrant: in training, a block keeps only its input and recomputes the rest in the backward."""
        for hf in (self.vision_backbone.featurizer, self.vision_backbone.fused_featurizer, self.language_model):
            if hf is not None:
                hf.activation_checkpointing_enable({"use_reentrant": False})

    def split_action_head(self) -> None:
        """Train the LM head's 256 action rows as a parameter of their own (the learner calls this).
        action_logits reads no other row, but as one [32064, H] parameter the head costs a zeroed
        full-size gradient in every backward and a full pass in every norm and optimiser step. The
        updates are the same (weight decay would shrink only never-read rows); state_dict() writes
        the rows back into lm_head.weight, so checkpoints and published weights keep the HF layout."""
        if self.action_head is not None:
            return
        head = self.language_model.lm_head.weight
        self.action_head = nn.Parameter(head.detach()[self.action_first_id : self.config.vocab_size].clone())
        head.requires_grad_(False)
        self.register_state_dict_post_hook(_merge_action_head)
        self.register_load_state_dict_pre_hook(_split_action_head)

    def action_head_weight(self) -> torch.Tensor:  # [256, H]
        if self.action_head is not None:
            return self.action_head
        return self.language_model.lm_head.weight[self.action_first_id : self.config.vocab_size]

    def action_logits(
        self,
        pixel_values: torch.Tensor,  # [B, 3 * towers, H, W] float
        prompt_ids: torch.Tensor,  # [B, S] int64, right-padded, starts with BOS, ends with "▁"
        prompt_lengths: torch.Tensor,  # [B] int64, real length of each prompt
        stop_token_id: int = 2,
        proprio: torch.Tensor | None = None,  # [B, proprio_dim] normalised, when the model uses it
        padded: bool | None = None,  # do prompt lengths differ? None = read prompt_lengths (a device sync)
    ) -> torch.Tensor:  # [B, chunk * dims, 256]
        cfg = self.config
        B, S = prompt_ids.shape
        device = prompt_ids.device
        embed = self.language_model.get_input_embeddings()
        patches = self.projector(self.vision_backbone(pixel_values))  # [B, P, H]
        if self.proprio_projector is not None:
            if proprio is None:
                raise ValueError("this policy reads proprio (proprio_dim > 0) but none was given")
            patches = torch.cat([patches, self.proprio_projector(proprio.to(patches.dtype))[:, None]], dim=1)
        A, P = cfg.num_action_tokens, patches.shape[1]
        text = embed(prompt_ids)  # [B, S, H]
        stop = embed(torch.full((B, 1), stop_token_id, device=device))  # [B, 1, H]

        # Right-padded layout: BOS | patches | prompt[1:len] | A zeros | </s> | padding
        L = 1 + P + (S - 1) + A + 1
        seq = text.new_zeros(B, L, text.shape[-1])
        seq[:, 0] = text[:, 0]
        seq[:, 1 : 1 + P] = patches
        arange_s = torch.arange(1, S, device=device)
        prompt_pos = P + arange_s  # positions of prompt tokens 1..S-1
        valid_prompt = arange_s[None, :] < prompt_lengths[:, None]  # [B, S-1]
        seq[:, prompt_pos] = text[:, 1:] * valid_prompt[..., None]
        action_start = P + prompt_lengths  # [B] first placeholder position
        stop_pos = action_start + A
        seq[torch.arange(B, device=device), stop_pos] = stop[:, 0]
        if self.action_queries is not None:
            action_pos = action_start[:, None] + torch.arange(A, device=device)[None, :]  # [B, A]
            seq = seq.scatter_add(1, action_pos[..., None].expand(B, A, seq.shape[-1]),
                                  self.action_queries[None].expand(B, -1, -1).to(seq.dtype))
        length = stop_pos + 1  # [B] real sequence length

        positions = torch.arange(L, device=device)
        valid = positions[None, :] < length[:, None]  # [B, L]
        if padded is None:
            padded = bool((prompt_lengths != S).any())
        if cfg.attention == "causal":
            allowed = valid[:, None, None, :] & torch.ones(L, L, dtype=torch.bool, device=device).tril()  # [B, 1, L, L]
            allowed = allowed | ~valid[:, None, :, None]  # padded queries see everything: no NaN rows
        elif padded:  # one key-padding row per sequence, broadcast over the queries: no [B, 1, L, L] mask to build
            allowed = valid[:, None, None, :]  # [B, 1, 1, L]; padded queries see the valid keys, never read
        else:  # every key valid: no mask at all, so SDPA may pick flash attention (see _sdpa_never_causal)
            allowed = None
        bias = None if allowed is None else (
            torch.zeros(allowed.shape, dtype=seq.dtype, device=device).masked_fill(~allowed, torch.finfo(seq.dtype).min))

        # use_cache=False: a KV cache of a single full pass is never read, only held (GBs at batch 64 on 7B)
        hidden = self.language_model.model(inputs_embeds=seq, attention_mask=bias, use_cache=False).last_hidden_state
        read = (action_start - 1)[:, None] + torch.arange(A, device=device)[None, :]  # [B, A]
        h = hidden.gather(1, read[..., None].expand(B, A, hidden.shape[-1]))  # [B, A, H]
        return F.linear(h, self.action_head_weight())  # [B, A, 256]


def _merge_action_head(module: OpenVLAOFTPolicy, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict() of a split head: the action rows back inside lm_head.weight, no extra key."""
    key = prefix + "language_model.lm_head.weight"
    head = state_dict[key].clone()
    head[module.action_first_id : module.config.vocab_size] = state_dict.pop(prefix + "action_head").detach()
    state_dict[key] = head


def _split_action_head(module: OpenVLAOFTPolicy, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict() into a split head from the HF layout: the action rows come from lm_head.weight."""
    key = prefix + "language_model.lm_head.weight"
    if key in state_dict and prefix + "action_head" not in state_dict:
        state_dict[prefix + "action_head"] = state_dict[key][module.action_first_id : module.config.vocab_size]
