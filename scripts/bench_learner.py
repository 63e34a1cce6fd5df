"""The learner on one device: a LoRA GRPO mini-batch step, a full-parameter forward+backward, and
the merge of the adapters into the policy's weights (the weight sync's learner-side cost).

    python scripts/bench_learner.py [--config configs/oft7b.yaml] [--modes lora,full_fwd_bwd,merge]
        [--device cuda] [--samples 16] [--traj-chunks 4] [--iters 2] [--warmup 1] [--out PATH] [key=value ...]

The policy is built from the config on the meta device and materialised on --device in
policy.dtype (random weights, policy/checkpoint.py build_policy). The mini-batch is synthetic GRPO
data of the real shapes: --samples chunks (observations) in trajectories of --traj-chunks chunks,
uint8 images of env.image_size, one instruction, action tokens in the action-token range,
advantages +1 / -1 by trajectory, old log-probs the current policy's (every ratio 1: nothing clipped).
One rank (world size 1; NCCL on a GPU, gloo on the CPU); learner.* overrides apply
(micro_batch_chunks, gradient_checkpointing, zero_stage, lora.rank, ...).

Modes (any subset; full_fwd_bwd runs first, on the policy before adapters are attached):
  lora          LearnerEngine.grpo_minibatch with learner.lora (its defaults when the config has none):
                forward, backward and optimiser step, as training runs it
  full_fwd_bwd  every parameter trainable (as the learner without LoRA), forward and backward of the
                same micro-batches and loss with plain autograd, no optimiser: at 7B the fp32 master
                weights and Adam state (~16 bytes a parameter) fit no single GPU
  full          LearnerEngine.grpo_minibatch training every parameter, the fp32 master weights and
                Adam's state on the device: ~16 bytes a parameter (112 GiB at 7.54 B), so at 7B an
                H200 (141 GB) and not an 80 GB card; not with lora, merge or full_offload in the same run
  full_offload  the same with learner.offload_optimizer (ZeRO-2's fp32 partition and Adam's state in
                host memory, the step on the CPU); not with lora, merge or full in the same run
  merge         merged_tensors (learner/lora.py) over the whole model on the device, and
                LearnerEngine.weights() (merged, copied to host: the object-store sync's payload)
Tokens per sample: the length of the sequence the language model runs, read from its input during a
forward (BOS + patches + prompt + action placeholders + </s>). Useful FLOPs per sample, from the Linear
and conv weights W of each part over the tokens through it (scripts/bench_inference.py's 2 x W x tokens):
  forward       F = 2 x W x tokens over the towers, projector, LM blocks and the 256 action rows of the head
  full_fwd_bwd  3 F (activation and weight gradients of every layer: 6 x N x tokens); full and full_offload too
  lora          F + 2 x W_lm x L (activation gradients through the LM blocks, adapters included; the
                frozen towers and projector get none) + 2 x W_adapters x L + 4 x 256 x H x A (action
                head) [+ 2 x W_projector x patches when learner.lora.trainable lists the projector]
Recompute under gradient checkpointing is not counted as useful. MFU = useful FLOPs / seconds / the
device's dense bf16 peak (null on the CPU). Writes JSON to --out (default $OUT/bench_learner.json when
OUT is set, else runs/bench_learner.json) after every mode and prints a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config_learner import LoraConfig  # noqa: E402
from common.config_loading import ConfigError, load_config  # noqa: E402
from common.records import Trajectory  # noqa: E402
from learner.chunk_samples import ChunkSamples, micro_batches  # noqa: E402
from learner.grpo import grpo_chunk_loss  # noqa: E402
from learner.lora import is_adapter, merged_tensors  # noqa: E402
from policy.checkpoint import build_policy  # noqa: E402
from scripts.bench_inference import INSTRUCTIONS, estimated_flops, peak_flops, sync  # noqa: E402

MODES = ("lora", "full_fwd_bwd", "full", "full_offload", "merge")
FULL = ("full", "full_offload")  # every parameter trains: one of them per process, without lora and merge
FLOPS_FORMULA = {
    "forward": "F = 2 x Linear/conv weights x tokens through them (towers over patches, projector over patches, "
               "LM blocks over L, the head's 256 action rows over A)",
    "full_fwd_bwd": "3 F (activation and weight gradients of every layer)",
    "lora": "F + 2 x W_lm_blocks x L (activation gradients; frozen towers/projector get none) + 2 x W_adapters x L "
            "+ 4 x 256 x H x A (action head) [+ 2 x W_projector x patches when trained]",
    "recompute": "gradient-checkpointing recompute not counted",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/oft7b.yaml")
    p.add_argument("--modes", default=",".join(MODES), type=lambda s: s.split(","), help=f"subset of {','.join(MODES)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--samples", type=int, default=16, help="chunks (observations) in the GRPO mini-batch")
    p.add_argument("--traj-chunks", type=int, default=4, help="chunks per synthetic trajectory")
    p.add_argument("--iters", type=int, default=2, help="timed repetitions per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = Path(os.environ["OUT"]) / "bench_learner.json" if os.environ.get("OUT") else Path("runs/bench_learner.json")
    if unknown := set(args.modes) - set(MODES):
        p.error(f"--modes: unknown {sorted(unknown)}; known: {','.join(MODES)}")
    full = [m for m in FULL if m in args.modes]
    if full and ({"lora", "merge"} & set(args.modes) or len(full) > 1):
        p.error(f"--modes: {full[0]} trains every parameter of the policy; run {', '.join(full[1:] or ['lora and merge'])} "
                "in another process")
    if args.samples < 1 or args.traj_chunks < 1 or args.iters < 1 or args.warmup < 0:
        p.error("--samples, --traj-chunks and --iters must be positive, --warmup at least 0")
    if not Path(args.config).is_file() and (ROOT / args.config).is_file():
        args.config = str(ROOT / args.config)
    try:
        args.cfg = load_config(args.config, [f"policy.device={args.device}", "logging.tensorboard=false", *args.overrides])
    except ConfigError as err:
        p.error(str(err).replace("\n", " "))
    return args


def trajectories(policy, image_size: int, samples: int, traj_chunks: int, seed: int = 0) -> list[Trajectory]:
    rng = np.random.default_rng(seed)
    chunk, dims = policy.chunk_shape
    first = policy.action_tokenizer.first_id
    sizes = [traj_chunks] * (samples // traj_chunks) + ([samples % traj_chunks] if samples % traj_chunks else [])
    return [Trajectory(task="bench", init_state=i, instruction=INSTRUCTIONS[0],
                       images=rng.integers(0, 256, (T, image_size, image_size, 3), dtype=np.uint8),
                       tokens=rng.integers(first, first + 256, (T, chunk, dims)),
                       logprobs=np.zeros((T, chunk, dims), np.float32), executed=np.ones((T, chunk), bool),
                       success=i % 2 == 0, env_steps=T * chunk, policy_version=0,
                       proprio=(rng.uniform(-1, 1, (T, policy.model.config.proprio_dim)).astype(np.float32)
                                if policy.uses_proprio else None))
            for i, T in enumerate(sizes)]


@torch.no_grad()
def current_logprobs(policy, trajs: list[Trajectory], temperature: float) -> tuple[list[np.ndarray], int]:
    """The policy's own log-probs of the tokens (old = current: every ratio 1), and the length of
    the sequence the language model ran, read from its input."""
    lengths: list[int] = []
    hook = policy.model.language_model.model.register_forward_pre_hook(
        lambda _m, _a, kw: lengths.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        out = []
        for t in trajs:
            ids = torch.from_numpy(t.tokens.reshape(t.num_chunks, -1))
            logp, _ = policy.token_log_probs(t.images, [t.instruction] * t.num_chunks, ids, temperature, t.proprio)
            out.append(logp.float().cpu().numpy().reshape(t.tokens.shape))
    finally:
        hook.remove()
    return out, lengths[0]


def linear_weights(module: torch.nn.Module, adapters: bool | None = None) -> int:
    """Linear / conv weights of `module`; adapters True: only LoRA's, False: none of LoRA's."""
    return sum(m.weight.numel() for name, m in module.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and (adapters is None or is_adapter(name) == adapters))


def useful_flops(policy, mode: str, length: int, lora: LoraConfig | None) -> float:
    """Per sample, by FLOPS_FORMULA."""
    model, cfg = policy.model, policy.model.config
    forward = estimated_flops(model, 1, length)
    if mode == "full_fwd_bwd":
        return 3 * forward
    lm = model.language_model.model
    head = 4 * model.action_head_weight().numel() * cfg.num_action_tokens
    projector = 2 * linear_weights(model.projector) * cfg.num_patches if "projector" in lora.trainable else 0
    return forward + 2 * linear_weights(lm) * length + 2 * linear_weights(lm, adapters=True) * length + head + projector


def memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def rates(seconds: float, samples: int, length: int, flops_per_sample: float, peak: float | None) -> dict:
    return {"seconds": seconds, "samples_per_s": samples / seconds, "tokens_per_s": samples * length / seconds,
            "useful_tflops_per_sample": flops_per_sample / 1e12,
            "achieved_tflops": flops_per_sample * samples / seconds / 1e12,
            "mfu": flops_per_sample * samples / seconds / peak if peak else None}


def full_fwd_bwd(policy, trajs, old, args, length: int, peak: float | None) -> dict:
    """Every parameter trainable (as the learner without LoRA), the engine's micro-batches and loss."""
    lc, model, device = args.cfg.learner, policy.model, policy.device
    model.split_action_head()  # as LearnerEngine: the head's never-read rows stay frozen
    if lc.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    trainable = [p for n, p in model.named_parameters() if n != "language_model.lm_head.weight"]
    for p in trainable:
        p.requires_grad_(True)
    samples = ChunkSamples.of(trajs)
    advantages = np.where([t.success for t in trajs], 1.0, -1.0).astype(np.float32)
    weights = 1.0 / len(trajs) / samples.valid_tokens()

    def once() -> None:
        for idx in micro_batches(len(samples), -(-len(samples) // lc.micro_batch_chunks)):
            images, instructions, tokens, proprio = samples.inputs(idx, policy.uses_proprio)
            logp, _ = policy.token_log_probs(images, instructions, tokens, args.cfg.rollout.temperature, proprio)
            old_lp, mask, adv, w = (x.to(device) for x in samples.targets(idx, advantages, weights, old))
            grpo_chunk_loss(logp, old_lp, adv, mask, w, lc.clip_low, lc.clip_high)[0].backward()
        sync(device)

    for _ in range(args.warmup):
        once()
    memory_reset(device)
    times = []
    for _ in range(args.iters):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    out = {"trainable_params": sum(p.numel() for p in trainable), "peak_mem_gib": peak_memory_gib(device),
           **rates(float(np.mean(times)), len(samples), length, useful_flops(policy, "full_fwd_bwd", length, None), peak)}
    model.zero_grad(set_to_none=True)
    return out


def lora_engine(policy, args):
    from learner.engine import LearnerEngine

    lc = args.cfg.learner
    lc = lc if lc.lora is not None else lc.model_copy(update={"lora": LoraConfig()})
    return LearnerEngine(policy, lc, lc.lr, lc.micro_batch_chunks), lc.lora


def full_engine(policy, args, offload: bool):
    """Every parameter trained (no LoRA): the fp32 master weights and Adam's state on the device
    (~16 bytes a parameter in all), or with learner.offload_optimizer in host memory (ZeRO-2's fp32
    partition)."""
    from learner.engine import LearnerEngine

    update = {"lora": None, "offload_optimizer": offload}
    if offload:
        update["zero_stage"] = args.cfg.learner.zero_stage or 2
    lc = args.cfg.learner.model_copy(update=update)
    return LearnerEngine(policy, lc, lc.lr, lc.micro_batch_chunks)


def engine_step(engine, policy, trajs, old, args, length: int, flops_per_sample: float, peak: float | None) -> dict:
    """LearnerEngine.grpo_minibatch as training runs it (forward, backward, optimiser step), timed."""
    device, ds = policy.device, engine.engine
    step_times: list[float] = []
    step = ds.step

    def timed_step(*a, **kw):  # the optimiser step alone: the backward's kernels finish first
        sync(device)
        start = time.perf_counter()
        out = step(*a, **kw)
        sync(device)
        step_times.append(time.perf_counter() - start)
        return out

    ds.step = timed_step
    advantages = np.where([t.success for t in trajs], 1.0, -1.0).astype(np.float32)
    temperature = args.cfg.rollout.temperature
    for _ in range(args.warmup):
        engine.grpo_minibatch(trajs, advantages, temperature, len(trajs), old)
    memory_reset(device)
    step_times.clear()
    times, stats = [], None
    for _ in range(args.iters):
        start = time.perf_counter()
        stats = engine.grpo_minibatch(trajs, advantages, temperature, len(trajs), old)
        sync(device)
        times.append(time.perf_counter() - start)
    ds.step = step
    samples = sum(t.num_chunks for t in trajs)
    return {"trainable_params": sum(p.numel() for p in policy.model.parameters() if p.requires_grad),
            "peak_mem_gib": peak_memory_gib(device), "optimizer_step_s": float(np.mean(step_times)),
            "loss": stats.loss, "grad_norm": stats.grad_norm,
            **rates(float(np.mean(times)), samples, length, flops_per_sample, peak)}


def merge(engine, policy, args) -> dict:
    device = policy.device

    def on_device() -> int:
        n = sum(t.numel() for _, t in merged_tensors(policy.model))
        sync(device)
        return n

    for _ in range(args.warmup):
        on_device()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        numel = on_device()
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    host = engine.weights()
    host_s = time.perf_counter() - start
    return {"merge_s": float(np.mean(times)), "weights_to_host_s": host_s, "tensors": len(host), "merged_params": numel,
            "bytes": sum(t.numel() * t.element_size() for t in host.values())}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from learner.engine import init_distributed

    device = torch.device(args.device)
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    init_distributed(0, 1, "127.0.0.1", port, "nccl" if device.type == "cuda" else "gloo")
    cfg, lc = args.cfg, args.cfg.learner
    start = time.perf_counter()
    policy = build_policy(cfg.policy, seed=0)
    sync(policy.device)
    build_s = time.perf_counter() - start
    policy.model.train()
    trajs = trajectories(policy, cfg.env.image_size, args.samples, args.traj_chunks)
    old, length = current_logprobs(policy, trajs, cfg.rollout.temperature)
    name, peak = peak_flops(policy.device, next(policy.model.parameters()).dtype)
    result = {"device": name, "torch": torch.__version__, "config": args.config, "overrides": args.overrides,
              "dtype": cfg.policy.dtype, "params": sum(p.numel() for p in policy.model.parameters()), "build_s": build_s,
              "samples": args.samples, "traj_chunks": args.traj_chunks, "iters": args.iters, "warmup": args.warmup,
              "micro_batch_chunks": lc.micro_batch_chunks, "gradient_checkpointing": lc.gradient_checkpointing,
              "zero_stage": lc.zero_stage, "tokens_per_sample": length, "peak_flops": peak,
              "flops_formula": FLOPS_FORMULA, "modes": {}}

    def record(mode: str, figures: dict) -> None:
        result["modes"][mode] = figures
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=float))
        print(f"[bench_learner] {mode}: {json.dumps(figures, default=float)}", flush=True)

    if "full_fwd_bwd" in args.modes:
        record("full_fwd_bwd", full_fwd_bwd(policy, trajs, old, args, length, peak))
    for mode in FULL:
        if mode in args.modes:
            memory_reset(policy.device)
            engine = full_engine(policy, args, offload=mode == "full_offload")
            flops = useful_flops(policy, "full_fwd_bwd", length, None)
            record(mode, engine_step(engine, policy, trajs, old, args, length, flops, peak))
    if {"lora", "merge"} & set(args.modes):
        for p in policy.model.parameters():
            p.requires_grad_(False)  # the LoRA engine decides what trains
        memory_reset(policy.device)
        engine, lora = lora_engine(policy, args)
        if "lora" in args.modes:
            flops = useful_flops(policy, "lora", length, lora)
            record("lora", {"lora": lora.model_dump(), **engine_step(engine, policy, trajs, old, args, length, flops, peak)})
        if "merge" in args.modes:
            record("merge", merge(engine, policy, args))
    print_table(result)
    return result


def print_table(result: dict) -> None:
    print(f"\n{result['device']}  torch {result['torch']}  {result['dtype']}  {result['params'] / 1e9:.3f} B params  "
          f"{result['samples']} samples x {result['tokens_per_sample']} tokens  micro_batch_chunks "
          f"{result['micro_batch_chunks']}  gradient_checkpointing {result['gradient_checkpointing']}")
    head = ["mode", "trainable", "seconds", "samples/s", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "step s"]
    print(" ".join(f"{h:>12}" for h in head))
    for mode in ("lora", "full_fwd_bwd", "full_offload"):
        r = result["modes"].get(mode)
        if r is None:
            continue
        cells = [mode, f"{r['trainable_params'] / 1e6:.1f}M", f"{r['seconds']:.3f}", f"{r['samples_per_s']:.2f}",
                 f"{r['tokens_per_s']:.0f}", f"{r['achieved_tflops']:.3g}",
                 f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-",
                 f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-",
                 f"{r['optimizer_step_s']:.3f}" if "optimizer_step_s" in r else "-"]
        print(" ".join(f"{c:>12}" for c in cells))
    if "merge" in result["modes"]:
        m = result["modes"]["merge"]
        print(f"merge: {m['merge_s']:.3f} s on the device, {m['weights_to_host_s']:.3f} s to host "
              f"({m['bytes'] / 2**30:.2f} GiB in {m['tensors']} tensors)")


if __name__ == "__main__":
    main()
