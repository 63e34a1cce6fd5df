"""The inference-only ceiling of the policy on one device (scripts/bench_gpu.py's `inference` phase):
chunks/s, MFU and latency, no Ray, no envs.

The policy is `policy.path` if the config sets one, else random-initialised on the device in the
dtype (built on the meta device first: policy/weights.py). Inputs: random uint8 images of
--image-size (256 = LIBERO's render: the processor crops and resizes them), one fixed instruction
for every row ("uniform": no padding, so the LM runs without an attention mask) or several of
different lengths ("mixed": right-padded, so the LM gets the [B, 1, 1, L] key-padding bias).

Timed per batch size (each iteration ends in a device sync; warm-up iterations excluded):
  act      policy.act on host uint8 images: the uint8 copy to the device, crop / resize / normalise
           there, the forward, sampling and the chunk back to the host: the service's path
  forward  model.action_logits alone, on inputs already on the device
  graph    policy.act with policy.cuda_graphs' bucketed CUDA graphs (--cuda-graphs): the service's
           path when the config sets it; the row also gives the largest difference of its logits
           from the eager forward's
FLOPs per forward are counted by torch.utils.flop_counter on one real forward (every matmul,
convolution and attention, all tower layers included), and for comparison estimated as 2 x weights
x tokens (Linear / conv weights of each part times the tokens through it; the LM head counts only
its 256 action rows at the 56 read positions). MFU = counted FLOPs / time / the device's dense bf16
peak (PEAK_TFLOPS).
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np
import torch
import torch.nn.functional as F

from common.config import PolicyConfig
from common.records import Observation
from policy.checkpoint import DTYPES, build_policy, load_policy

# dense bf16 tensor-core peak, TFLOP/s, by device-name substring (first match wins; vendor datasheets)
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]
INSTRUCTIONS = [  # LIBERO-Spatial-style, of different lengths ("mixed"); the first one for "uniform"
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl on the stove and place it on the plate",
    "pick up the black bowl next to the cookie box and place it on the plate",
    "pick up the black bowl on the wooden cabinet and place it on the plate",
]
ATTENTION_KERNEL = re.compile(r"flash|fmha|attention|attn|cudnn|mha|sdpa", re.IGNORECASE)


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    peak = next((tf for key, tf in PEAK_TFLOPS if key in name), None)
    return name, peak * 1e12 if peak is not None and dtype == torch.bfloat16 else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, iters: int, warmup: int, device: torch.device) -> np.ndarray:
    """Seconds per call: synchronize + perf_counter around each call, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return np.array(times)


def observations(batch: int, size: int, prompts: str) -> list[Observation]:
    rng = np.random.default_rng(batch)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    texts = [INSTRUCTIONS[0 if prompts == "uniform" else i % len(INSTRUCTIONS)] for i in range(batch)]
    return [Observation(im, t) for im, t in zip(images, texts)]


def device_inputs(policy, obs: list[Observation]) -> tuple[tuple[torch.Tensor, ...], bool]:
    ids, lengths = policy.prompts([o.instruction for o in obs])
    images = torch.from_numpy(np.stack([o.image for o in obs])).to(policy.device)
    inputs = (policy.pixels(images), ids.to(policy.device), lengths.to(policy.device))
    return inputs, bool(lengths.min() < lengths.max())


def seq_len(model, prompt_len: int) -> int:
    """The LM's sequence: BOS + patches (+ proprio) + prompt[1:] + action placeholders + </s>."""
    cfg = model.config
    return cfg.num_patches + (cfg.proprio_dim > 0) + prompt_len + cfg.num_action_tokens + 1


def counted_flops(forward) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.compiler.set_stance("force_eager"):  # count the eager ops, compiled or not
        forward()
    return float(counter.get_total_flops())


def estimated_flops(model, batch: int, length: int) -> float:
    """2 x weights x tokens: each tower's Linear / conv weights over its tokens (DINOv2: patches + CLS
    + 4 registers), the projector's over the patches, the LM blocks' over the whole sequence, and the
    256 action rows of the LM head over the 56 read positions."""
    def weights(module):
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))

    cfg, vision = model.config, model.vision_backbone
    patches = cfg.num_patches
    total = 0
    for tower, kind in zip((vision.featurizer, vision.fused_featurizer), vision.tower_kinds):
        total += weights(tower) * (patches + (5 if kind == "dinov2" else 0))
    total += weights(model.projector) * patches + weights(model.language_model.model) * length
    total += model.action_head_weight().numel() * cfg.num_action_tokens
    return 2.0 * total * batch


def graph_row(policy, graphed, obs, inputs, padded: bool, gen, flops: float, peak, args) -> dict:
    """policy.act through the bucketed CUDA graphs (captured on the first call, untimed), and how far
    the graphed logits are from the eager forward's on the same inputs."""
    stop = policy.tokenizer.eos_token_id
    policy.graphed = graphed
    t = timed(lambda: policy.act(obs, generator=gen), args.iters, args.warmup, policy.device)
    diff = (graphed(*inputs, stop_token_id=stop, proprio=None, padded=padded).float()
            - policy.model.action_logits(*inputs, stop_token_id=stop, padded=padded).float()).abs().max()
    return {"graph_act_ms": 1e3 * t.mean(), "graph_chunks_per_s": len(obs) / t.mean(),
            "mfu_graph": flops / t.mean() / peak if peak else None, "graph_logits_max_abs_diff": float(diff)}


def attention_report(policy, inputs, padded: bool, device: torch.device) -> dict:
    """Which SDPA kernels the forward launches (CUDA kernel names from the profiler), and which SDPA
    backends accept the LM's attention at these shapes with the policy's mask and with none."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        policy.model.action_logits(*inputs, padded=padded)
        sync(device)
    kernels = {}
    for evt in prof.key_averages():
        if ATTENTION_KERNEL.search(evt.key) and getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA:
            ms = getattr(evt, "device_time_total", getattr(evt, "cuda_time_total", 0.0)) / 1e3
            kernels[evt.key[:160]] = {"calls": evt.count, "ms": round(ms, 3)}
    text = policy.model.language_model.config
    batch, length = inputs[1].shape[0], seq_len(policy.model, inputs[1].shape[1])
    head_dim = text.hidden_size // text.num_attention_heads
    q, k, v = (torch.randn(batch, text.num_attention_heads, length, head_dim, device=device, dtype=inputs[0].dtype) for _ in range(3))
    bias = torch.zeros(batch, 1, 1, length, device=device, dtype=q.dtype)
    bias[0, ..., length - 3:] = torch.finfo(q.dtype).min  # one padded row, as a mixed batch has
    backends = {}
    for label, mask in (("key_padding_bias", bias), ("no_mask", None)):
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                backends[f"{label}/{backend.name}"] = "ok"
            except RuntimeError as e:
                backends[f"{label}/{backend.name}"] = "refused: " + str(e).strip().splitlines()[-1][:160]
    return {"kernels_in_forward": kernels, "lm_shape": [batch, text.num_attention_heads, length, head_dim],
            "backends": backends}


def load_bench_policy(cfg: PolicyConfig):
    """-> (policy, seconds to build or load it): `cfg.path` if set, else random weights of the configured size."""
    start = time.perf_counter()
    policy = build_policy(cfg, seed=0) if cfg.path is None else load_policy(cfg.path, cfg.unnorm_key, cfg.dtype, cfg)
    sync(policy.device)
    policy.model.eval()
    return policy, time.perf_counter() - start


def measure_inference(policy, build_s: float, args: argparse.Namespace) -> dict:
    """The ceiling's figures: one row per (prompt mix, batch size), batch-1 latency, attention kernels.
    `args`: batches, iters, warmup, latency_iters, image_size, prompts, compile, cuda_graphs, dtype."""
    if args.compile:
        policy.model.compile_blocks()
    device, dtype = policy.device, DTYPES[args.dtype]
    name, peak = peak_flops(device, dtype)
    stop = policy.tokenizer.eos_token_id
    gen = torch.Generator(device=device).manual_seed(0)
    rows, attention = [], {}
    graphed = None
    if args.cuda_graphs and device.type == "cuda":
        from policy.cuda_graphs import GraphedActionLogits

        graphed = GraphedActionLogits(policy.model, max(args.batches))
    with torch.inference_mode():
        for prompts in args.prompts:
            for batch in args.batches:
                obs = observations(batch, args.image_size, prompts)
                inputs, padded = device_inputs(policy, obs)

                def forward_on(x, padded=padded):
                    return policy.model.action_logits(*x, stop_token_id=stop, padded=padded)

                flops = counted_flops(lambda: forward_on(inputs))
                length = seq_len(policy.model, inputs[1].shape[1])
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                act = timed(lambda: policy.act(obs, generator=gen), args.iters, args.warmup, device)
                fwd = timed(lambda: forward_on(inputs), args.iters, args.warmup, device)
                row = {"prompts": prompts, "padded": padded, "batch": batch, "seq_len": length,
                       "flops_counted": flops, "flops_2nt": estimated_flops(policy.model, batch, length),
                       "act_ms": 1e3 * act.mean(), "act_chunks_per_s": batch / act.mean(),
                       "forward_ms": 1e3 * fwd.mean(), "forward_chunks_per_s": batch / fwd.mean(),
                       "mfu_act": flops / act.mean() / peak if peak else None,
                       "mfu_forward": flops / fwd.mean() / peak if peak else None,
                       "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
                if graphed is not None:
                    try:
                        row.update(graph_row(policy, graphed, obs, inputs, padded, gen, flops, peak, args))
                    except Exception as e:  # report, keep measuring: the graph variant is optional
                        row["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    policy.graphed = None
                rows.append(row)
                if device.type == "cuda" and batch == min(args.batches, key=lambda b: abs(b - 8)):
                    attention[prompts] = attention_report(policy, inputs, padded, device)
        latency = {}
        for prompts in args.prompts[:1]:
            obs = observations(1, args.image_size, prompts)
            inputs, padded = device_inputs(policy, obs)
            for label, fn in (("act", lambda: policy.act(obs, generator=gen)),
                              ("forward", lambda: policy.model.action_logits(*inputs, stop_token_id=stop, padded=padded)),
                              ("act_graph", lambda: policy.act(obs, generator=gen))):
                if label == "act_graph" and graphed is None:
                    continue
                policy.graphed = graphed if label == "act_graph" else None
                t = timed(fn, args.latency_iters, args.warmup, device)
                latency[label] = {"p50_ms": 1e3 * float(np.percentile(t, 50)), "p99_ms": 1e3 * float(np.percentile(t, 99)),
                                  "iters": len(t)}
        policy.graphed = None
    import transformers

    result = {
        "device": name, "torch": torch.__version__, "transformers": transformers.__version__,
        "dtype": args.dtype, "compile": args.compile, "params": sum(p.numel() for p in policy.model.parameters()),
        "build_s": build_s, "peak_flops": peak, "image_size": args.image_size, "center_crop": policy.image_processor.center_crop,
        "timing": "synchronize + perf_counter per iteration, warm-up excluded; act includes the uint8 host->device "
                  "copy and GPU preprocessing, forward does not",
        "flops": "flops_counted: torch.utils.flop_counter on one forward; flops_2nt: 2 x Linear/conv weights x tokens",
        "rows": rows, "latency_batch1": latency, "attention": attention,
        "cuda_graphs": None if graphed is None else {"graphs": len(graphed.graphs), "capture_s": graphed.capture_s},
    }
    return result


def print_table(result: dict) -> None:
    print(f"{result['device']}  torch {result['torch']}  transformers {result['transformers']}  {result['dtype']}  "
          f"{result['params'] / 1e9:.3f} B params  built in {result['build_s']:.1f} s  compile={result['compile']}")
    head = ["prompts", "B", "L", "GFLOP", "act ms", "act ch/s", "fwd ms", "fwd ch/s", "graph ms", "MFU act", "MFU fwd", "mem GiB"]
    print(" ".join(f"{h:>9}" for h in head))
    pct = lambda x: f"{100 * x:.1f}%" if x is not None else "-"  # noqa: E731
    for r in result["rows"]:
        cells = [r["prompts"], r["batch"], r["seq_len"], f"{r['flops_counted'] / 1e9:.1f}", f"{r['act_ms']:.1f}",
                 f"{r['act_chunks_per_s']:.1f}", f"{r['forward_ms']:.1f}", f"{r['forward_chunks_per_s']:.1f}",
                 f"{r['graph_act_ms']:.1f}" if "graph_act_ms" in r else "-", pct(r["mfu_act"]), pct(r["mfu_forward"]),
                 f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"]
        print(" ".join(f"{c:>9}" for c in cells))
    for label, lat in result["latency_batch1"].items():
        print(f"batch 1 {label}: p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms ({lat['iters']} iterations)")
    if result.get("cuda_graphs"):
        g = result["cuda_graphs"]
        print(f"CUDA graphs: {g['graphs']} captured in {g['capture_s']:.1f} s; graphed logits vs eager, max abs diff: "
              + ", ".join(f"B{r['batch']} {r['graph_logits_max_abs_diff']:.3g}" for r in result["rows"] if "graph_logits_max_abs_diff" in r))
    for prompts, rep in result["attention"].items():
        print(f"attention ({prompts}): kernels {rep['kernels_in_forward']}")
        print(f"  SDPA backends at LM shape {rep['lm_shape']}: {rep['backends']}")

