"""Reference numbers for OpenVLA's vision towers, recorded once with timm itself.

OpenVLA checkpoints store the towers as timm modules. timm needs torchvision, which this project never
installs (constraints.txt), so the tests cannot run timm. Instead this file, run once in a scratch
venv (`pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31 safetensors numpy`, then
`python tests/timm_reference.py`), records for two width-reduced towers built from the official
timm model ids:
  - the real timm parameter names and shapes (safetensors metadata),
  - timm's own outputs for deterministic weights and pixels: the second-to-last block's patch tokens
    (what Prismatic feeds the projector), the normed last block, and the pooled output (SigLIP's
    attention-pool head), so every tensor of a tower is checked, not only the ones OpenVLA reads.
tests/test_openvla_checkpoint.py rebuilds the same weights with `fill` (numpy's legacy RandomState is
frozen across numpy versions) and checks that our transformers towers reproduce timm's numbers.
Imports only numpy here; torch, safetensors and timm inside `record`.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

# Official ids (OpenVLA's `timm_model_ids`), widths cut down; head dims stay the real ones (64 and 72).
TOWERS = {
    "featurizer": ("vit_large_patch14_reg4_dinov2.lvd142m", dict(embed_dim=128, depth=3, num_heads=2)),
    "fused_featurizer": ("vit_so400m_patch14_siglip_224", dict(embed_dim=144, depth=3, num_heads=2)),
}
IMAGE_SIZE = 56  # 4 x 4 patches of 14 px
FIXTURE = Path(__file__).parent / "fixtures" / "timm_towers.safetensors"


def fill(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Deterministic float32 values for one tensor, scaled so activations stay O(1) through the blocks."""
    x = np.random.RandomState(zlib.crc32(name.encode())).standard_normal(shape)
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf == "weight":
        x = 1.0 + 0.1 * x
    elif leaf in ("gamma", "scale_factor"):  # LayerScale: far from timm's 1e-5 init so the blocks matter
        x = 0.5 + 0.1 * x
    elif leaf == "bias":
        x = 0.05 * x
    elif leaf == "weight":
        x = x / np.sqrt(np.prod(shape[1:]))
    else:  # cls / register tokens, position embeddings, the pool's latent query
        x = 0.5 * x
    return x.astype(np.float32)


def pixels(batch: int = 2) -> np.ndarray:
    """[B, 3, S, S] normalised pixels, shared by both towers."""
    return np.random.RandomState(0).standard_normal((batch, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)


def record() -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    out, meta = {}, {"timm_version": timm.__version__, "image_size": str(IMAGE_SIZE)}
    x = torch.from_numpy(pixels()).double()
    for prefix, (model_id, kwargs) in TOWERS.items():
        model = timm.create_model(model_id, pretrained=False, num_classes=0, img_size=IMAGE_SIZE, **kwargs).double().eval()
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        model.load_state_dict({k: torch.from_numpy(fill(f"{prefix}.{k}", s)) for k, s in shapes.items()})
        meta[prefix] = json.dumps({"model_id": model_id, "kwargs": kwargs, "tensors": [[k, list(s)] for k, s in shapes.items()]})
        with torch.no_grad():
            (patches,) = model.get_intermediate_layers(x, n={len(model.blocks) - 2})  # Prismatic's featurizer output
            final = model.forward_features(x)  # all blocks + final norm, prefix tokens kept
            pooled = model.forward_head(final)  # DINOv2: CLS token; SigLIP: attention-pool head
        out.update({f"{prefix}.patches": patches, f"{prefix}.final": final, f"{prefix}.pooled": pooled})
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in out.items()}, str(FIXTURE), metadata=meta)
    print(f"wrote {FIXTURE} with timm {timm.__version__}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items()))


if __name__ == "__main__":
    record()
