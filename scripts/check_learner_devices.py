"""Does the learner learn the same on two devices? A few GRPO optimiser steps from one seed, side by side.

    python scripts/check_learner_devices.py [--config configs/demo.yaml] [--devices cpu,cuda] [--steps 4]
        [--samples 32] [--traj-chunks 2] [--tolerance 0.01] [--out PATH] [key=value ...]

Each device runs in a process of its own (DeepSpeed picks its accelerator at import): the config's
policy (policy.path, else random weights from the seed) on that device in policy.dtype, one learner
rank (learner/engine.py LearnerEngine, gloo on the CPU, NCCL on a GPU), and the same synthetic GRPO
mini-batch on every device (scripts/bench_learner.py: uint8 images, action tokens and advantages from
one numpy seed; old log-probs are each device's own, as its replica would have sampled them). Every
step is one `grpo_minibatch` over that batch, so the steps move the weights the way a run's do.
Compared per step: the loss (relative to 0.01 at least: it can sit near 0) and the gradient norm; after the last step: the weights (relative L2
difference over all parameters). --tolerance is relative; bf16's own resolution is 2^-8 = 0.0039.
Writes JSON to --out (default $OUT/check_learner_devices.json when OUT is set, else
runs/check_learner_devices.json) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


LOSS_FLOOR = 0.01  # a GRPO loss sums +/- advantage terms and can sit near 0: compare it on this scale at least


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--devices", default="cpu,cuda", type=lambda s: s.split(","))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--samples", type=int, default=32, help="chunks (observations) in the mini-batch")
    p.add_argument("--traj-chunks", type=int, default=2, help="chunks per synthetic trajectory")
    p.add_argument("--tolerance", type=float, default=0.01, help="relative difference that still counts as equal")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one device, write --out
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)
    if args.out is None:
        base = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "runs"
        args.out = base / "check_learner_devices.json"
    if len(args.devices) < 2 and args.one is None:
        p.error("--devices: two devices to compare, e.g. cpu,cuda")
    if args.steps < 1 or args.samples < 1 or args.traj_chunks < 1:
        p.error("--steps, --samples and --traj-chunks must be positive")
    if not Path(args.config).is_file() and (ROOT / args.config).is_file():
        args.config = str(ROOT / args.config)
    from common.config_loading import ConfigError, load_config

    try:
        args.cfg = load_config(args.config, ["logging.tensorboard=false", *args.overrides])
    except ConfigError as err:
        p.error(str(err).replace("\n", " "))
    return args


def run_one(args: argparse.Namespace) -> None:
    """This process's device: the steps' losses and gradient norms, and the final weights."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from learner.engine import LearnerEngine, init_distributed
    from policy.checkpoint import build_policy, load_policy
    from scripts.bench_learner import current_logprobs, trajectories

    device = torch.device(args.one)
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    init_distributed(0, 1, "127.0.0.1", port, "nccl" if device.type == "cuda" else "gloo")
    cfg = args.cfg
    pc = cfg.policy.model_copy(update={"device": args.one})
    policy = (load_policy(pc.path, pc.unnorm_key, pc.dtype, pc, device=args.one) if pc.path is not None
              else build_policy(pc, seed=cfg.seed))
    torch.manual_seed(cfg.seed)
    policy.model.train()
    trajs = trajectories(policy, cfg.env.image_size, args.samples, args.traj_chunks, seed=cfg.seed)
    old, _ = current_logprobs(policy, trajs, cfg.rollout.temperature)
    lc = cfg.learner
    engine = LearnerEngine(policy, lc, lc.lr, lc.micro_batch_chunks)
    advantages = np.where([t.success for t in trajs], 1.0, -1.0).astype(np.float32)
    steps = []
    for _ in range(args.steps):
        stats = engine.grpo_minibatch(trajs, advantages, cfg.rollout.temperature, len(trajs), old)
        steps.append({"loss": stats.loss, "grad_norm": stats.grad_norm})
    weights = {k: v.float().contiguous() for k, v in engine.weights().items()}
    save_file(weights, str(args.out.with_suffix(".safetensors")))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.out.write_text(json.dumps({"device": name, "dtype": pc.dtype, "steps": steps}))


def relative(a: float, b: float, floor: float = 1e-12) -> float:
    """|a - b| over the larger magnitude, or over `floor` when both are smaller (a loss near 0)."""
    return abs(a - b) / max(abs(a), abs(b), floor)


def compare(runs: list[dict], weights: list[dict], tolerance: float) -> dict:
    ref, other = runs
    steps = [{"loss": [r["loss"], o["loss"]], "grad_norm": [r["grad_norm"], o["grad_norm"]],
              "loss_rel_diff": relative(r["loss"], o["loss"], LOSS_FLOOR),
              "grad_norm_rel_diff": relative(r["grad_norm"], o["grad_norm"])}
             for r, o in zip(ref["steps"], other["steps"])]
    diff = sum(float((weights[0][k] - weights[1][k]).pow(2).sum()) for k in weights[0])
    norm = sum(float(weights[0][k].pow(2).sum()) for k in weights[0])
    weight_rel = (diff / max(norm, 1e-30)) ** 0.5
    worst = max(max(s["loss_rel_diff"], s["grad_norm_rel_diff"]) for s in steps)
    return {"steps": steps, "weights_rel_l2_diff": weight_rel, "worst_step_rel_diff": worst,
            "equal_within_tolerance": worst <= tolerance and weight_rel <= tolerance}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.one is not None:
        run_one(args)
        return {}
    from safetensors.torch import load_file

    runs, weights = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, device in enumerate(args.devices[:2]):
            out = Path(tmp) / f"run{i}.json"
            env = dict(os.environ, DS_ACCELERATOR="cuda" if device.startswith("cuda") else "cpu")
            cmd = [sys.executable, __file__, "--config", args.config, "--one", device, "--steps", str(args.steps),
                   "--samples", str(args.samples), "--traj-chunks", str(args.traj_chunks), "--out", str(out),
                   *args.overrides]
            subprocess.run(cmd, check=True, env=env, cwd=ROOT)
            runs.append(json.loads(out.read_text()))
            weights.append(load_file(str(out.with_suffix(".safetensors"))))
    result = {"config": args.config, "overrides": args.overrides, "devices": [r["device"] for r in runs],
              "dtype": runs[0]["dtype"], "tolerance": args.tolerance, "samples": args.samples,
              **compare(runs, weights, args.tolerance)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    a, b = result["devices"]
    print(f"\n{result['dtype']}, {args.samples} chunks per mini-batch: {a} vs {b}")
    print(f"{'step':>4} {'loss ' + a[:12]:>20} {'loss ' + b[:12]:>20} {'rel diff':>9} {'grad norm rel diff':>19}")
    for i, s in enumerate(result["steps"], 1):
        print(f"{i:>4} {s['loss'][0]:>20.6f} {s['loss'][1]:>20.6f} {s['loss_rel_diff']:>9.2e} {s['grad_norm_rel_diff']:>19.2e}")
    print(f"weights after {args.steps} steps: relative L2 difference {result['weights_rel_l2_diff']:.2e}; "
          f"equal within {args.tolerance}: {result['equal_within_tolerance']}")
    return result


if __name__ == "__main__":
    main()
