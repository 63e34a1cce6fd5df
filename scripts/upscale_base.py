"""Turn a pretrained base into the same policy for k-times-larger images on the same patch grid
(policy.checkpoint.upscale_images): every patch kernel weight is spread over k x k pixels, so on a
nearest-upscaled image the new base computes exactly what the old one does, while SFT and GRPO can
learn from the finer detail of a real larger render at the same number of tokens. This is how the
shipped 128 px base was made from the 64 px one (docs/demo.md, session 22).

usage: python scripts/upscale_base.py SOURCE OUT [--factor K] [--dtype bfloat16|float32]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policy.checkpoint import DTYPES, load_policy, save_policy, upscale_images  # noqa: E402


def upscale_base(source: str | Path, out: str | Path, factor: int = 2, dtype: str = "bfloat16") -> dict:
    source, out = Path(source), Path(out)
    policy = upscale_images(load_policy(source), factor)
    policy.model.to(DTYPES[dtype])  # kernels / k^2 with k a power of two: exact in bfloat16 too
    save_policy(policy, out)
    arch = policy.model.config
    summary_file = source / "pretrain_summary.json"
    history = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    summary = {key: history[key] for key in ("suite", "tasks") if key in history}
    summary.update(upscaled_from=str(source), factor=factor, image_size=arch.image_size, patch_size=arch.patch_size,
                   dtype=dtype, init_summary=history or None)
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source")
    ap.add_argument("out")
    ap.add_argument("--factor", type=int, default=2)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = ap.parse_args()
    s = upscale_base(args.source, args.out, args.factor, args.dtype)
    print(f"saved {args.out}: {s['image_size']} px images in {s['patch_size']} px patches")
