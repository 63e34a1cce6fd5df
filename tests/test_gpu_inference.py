"""GPU inference paths, checked on the CPU: uint8 images processed on the model's device, the LM's
attention mask only where a batch is padded, and scripts/bench_gpu.py's smoke run."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from policy.checkpoint import build_policy
from policy.processor import ImageProcessor
from tests.conftest import ROOT


@pytest.mark.parametrize("size, crop", [(256, 0.9), (256, None), (224, None), (224, 0.9)])
def test_device_preprocessing_equals_the_numpy_path(size, crop):
    """The tensor path (uint8 tensor on any device) against the numpy path, on CPU tensors: the same
    uint8 crop, then rounding differences only. One uint8 level is 1 / (255 std) after
    normalisation; the paths agree to a twentieth of that (a crop differing anywhere would not)."""
    rng = np.random.default_rng(size)
    images = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    images[0] = np.tile(np.arange(size, dtype=np.uint8)[None, :, None], (size, 1, 3))  # a ramp: every level
    proc = ImageProcessor.for_towers(["dinov2", "siglip"], 224, center_crop=crop)
    want = proc(images)
    got = proc.on_device(torch.from_numpy(images))
    assert got.shape == want.shape == (3, 6, 224, 224) and got.dtype == torch.float32
    level = 1.0 / (255.0 * torch.tensor(proc.stds).reshape(1, 6, 1, 1))
    assert ((got - want).abs() / level).max() < 0.05
    assert proc.on_device(torch.from_numpy(images), torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="uint8"):
        proc.on_device(torch.from_numpy(images).float())


def test_policy_pixels_take_arrays_or_device_tensors_alike(tiny_policy):
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    assert torch.equal(tiny_policy.pixels(list(images)), tiny_policy.pixels(torch.from_numpy(images)))


def _masks_seen(policy, instructions, **kwargs) -> list:
    """The attention_mask the LM's first attention layer receives (a forward pre-hook reads it)."""
    seen = []
    attn = policy.model.language_model.model.layers[0].self_attn
    hook = attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    images = np.zeros((len(instructions), 64, 64, 3), np.uint8)
    try:
        with torch.no_grad():
            ids, lengths = policy.prompts(instructions)
            policy.model.action_logits(policy.pixels(images), ids, lengths, **kwargs)
            logits = policy.action_logits(images, instructions)
    finally:
        hook.remove()
    return seen, logits


def test_only_padded_batches_give_the_lm_a_mask(tiny_policy, tiny_config):
    """Prompts of one length: no mask at all, so CUDA's SDPA may use flash attention. Different
    lengths: the [B, 1, 1, L] key-padding bias (0 on real keys, the dtype's min on padding). The
    causal ablation always gets its [B, 1, L, L] mask. Whether told (`padded`) or reading the
    lengths, the model decides the same."""
    (auto, told), _ = _masks_seen(tiny_policy, ["push it", "pull it"])  # one length (tokenised)
    assert auto is None and told is None
    mixed = ["push it", "put the red block in the bowl"]
    (auto, told), logits = _masks_seen(tiny_policy, mixed)
    assert torch.equal(auto, told) and auto.shape[:3] == (2, 1, 1)
    L, pad = auto.shape[-1], int(np.diff([len(tiny_policy.prompts.ids(s)) for s in mixed])[0])
    assert (auto[1] == 0).all()  # the longer prompt fills the sequence
    assert (auto[0, ..., L - pad:] == torch.finfo(auto.dtype).min).all() and (auto[0, ..., : L - pad] == 0).all()
    (alone, _), alone_logits = _masks_seen(tiny_policy, ["push it"])
    assert alone is None
    torch.testing.assert_close(logits[0], alone_logits[0], atol=1e-4, rtol=1e-4)  # mask vs none: the same row

    causal = build_policy(tiny_config.policy.model_copy(update={"attention": "causal"}), seed=0)
    (mask, _), _ = _masks_seen(causal, ["push it", "pull it"])
    assert mask.shape == (2, 1, L - pad, L - pad)


def test_bench_gpu_runs_on_the_cpu_with_the_tiny_config(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "scripts/bench_gpu.py"), "--device", "cpu", "--config", "configs/tiny.yaml",
                    "--phases", "inference", "--batches", "1,2", "--iters", "2", "--warmup", "1", "--latency-iters", "3",
                    "--out", str(out)],
                   check=True, cwd=tmp_path, capture_output=True, timeout=600)
    result = json.loads(out.read_text())["inference"]
    rows = {(r["prompts"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {("uniform", 1), ("uniform", 2), ("mixed", 1), ("mixed", 2)}
    assert not rows["uniform", 2]["padded"] and rows["mixed", 2]["padded"]
    for r in rows.values():
        assert r["act_chunks_per_s"] > 0 and r["forward_chunks_per_s"] > 0 and r["mfu_act"] is None  # no peak on CPU
        assert 0.8 < r["flops_counted"] / r["flops_2nt"] < 1.25  # the counter and 2 x weights x tokens agree
    assert rows["uniform", 2]["flops_counted"] == 2 * rows["uniform", 1]["flops_counted"]
    assert result["latency_batch1"]["forward"]["iters"] == 3 and result["latency_batch1"]["act"]["p99_ms"] > 0
    assert result["dtype"] == "bfloat16" and result["device"] == "cpu"
