"""scripts/bench_learner.py runs every mode through its CLI on the CPU with the tiny config and
writes finite figures; the tokens per sample are the language model's real sequence length."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path: Path, modes: str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """scripts/bench_learner.py on the tiny config on the CPU: a mini-batch of 3 chunks, one timed iteration."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_learner.py"), "--config", "configs/tiny.yaml", "--device", "cpu",
         "--modes", modes, "--samples", "3", "--traj-chunks", "2", "--iters", "1", "--warmup", "0",
         "--out", str(out), "learner.micro_batch_chunks=2", *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_bench_learner_reports_every_mode_on_the_cpu(tmp_path, tiny_policy):
    from scripts.bench_inference import INSTRUCTIONS

    out = tmp_path / "bench.json"
    proc = _bench(tmp_path, "lora,full_fwd_bwd,merge", out, "learner.gradient_checkpointing=true", "learner.lora={rank: 8}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    cfg = tiny_policy.model.config
    _, prompt_len = tiny_policy.prompts([INSTRUCTIONS[0]])
    # BOS + patches + prompt[1:] + action placeholders + </s>
    assert result["tokens_per_sample"] == cfg.num_patches + int(prompt_len[0]) + cfg.num_action_tokens + 1
    assert (result["micro_batch_chunks"], result["gradient_checkpointing"], result["samples"]) == (2, True, 3)
    assert result["device"] == "cpu" and result["peak_flops"] is None and set(result["flops_formula"]) >= {"lora", "full_fwd_bwd"}
    lora, full, merge = (result["modes"][m] for m in ("lora", "full_fwd_bwd", "merge"))
    for r in (lora, full):
        for key in ("seconds", "samples_per_s", "tokens_per_s", "useful_tflops_per_sample", "achieved_tflops"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # no peak FLOPs or CUDA memory on the CPU
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * result["tokens_per_sample"])
    assert lora["lora"]["rank"] == 8 and 0 < lora["trainable_params"] < full["trainable_params"] < result["params"]
    assert math.isfinite(lora["optimizer_step_s"]) and 0 < lora["optimizer_step_s"] < lora["seconds"]
    assert lora["grad_norm"] > 0, "the adapters got a gradient through the checkpointed blocks"
    assert lora["useful_tflops_per_sample"] < full["useful_tflops_per_sample"]  # no weight gradients for the base
    assert merge["merge_s"] > 0 and merge["weights_to_host_s"] > 0 and merge["merged_params"] == result["params"]
    assert "lora" in proc.stdout and "merge:" in proc.stdout


def test_bench_learner_times_a_full_parameter_step_with_the_optimizer_offloaded(tmp_path):
    out = tmp_path / "bench.json"
    proc = _bench(tmp_path, "full_fwd_bwd,full_offload", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, offload = (json.loads(out.read_text())["modes"][m] for m in ("full_fwd_bwd", "full_offload"))
    assert offload["trainable_params"] == full["trainable_params"]
    assert offload["useful_tflops_per_sample"] == full["useful_tflops_per_sample"]
    assert offload["grad_norm"] > 0 and 0 < offload["optimizer_step_s"] < offload["seconds"]
    # the optimizer on the device: the same step from the same weights and mini-batch
    on_device = tmp_path / "on_device.json"
    proc = _bench(tmp_path, "full", on_device)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = json.loads(on_device.read_text())["modes"]["full"]
    assert step["trainable_params"] == full["trainable_params"] and step["loss"] == pytest.approx(offload["loss"])
    assert step["grad_norm"] == pytest.approx(offload["grad_norm"], rel=1e-4)
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/bench_learner.py"), "--modes", "full_offload,lora"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "full_offload trains every parameter" in bad.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/bench_learner.py"), "--modes", "full,full_offload"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "run full_offload in another process" in bad.stderr
