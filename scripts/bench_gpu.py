"""One machine, one run: our rollout against its two ceilings and a lock-step rollout, side by side.

    python scripts/bench_gpu.py [--config configs/gpu_1x16.yaml] [--phases sim,inference,ours,lockstep]
        [--warmup-seconds 5] [--rounds 2]
        [--device cuda] [--dtype bfloat16] [--batches 1,8,32,64] [--iters 20] [--warmup 3]
        [--latency-iters 50] [--image-size 256] [--prompts uniform,mixed] [--compile] [--cuda-graphs]
        [--out PATH] [key=value ...]

Phases (any subset; they run in the order inference, ours, sim, lockstep, so that each finds the
CPUs and the GPU free of the others):
  sim        (a) sim-only ceiling: the config's env workers (same number, same envs each) run the
             same --rounds rounds of one episode per env slot as ours and lockstep (resets included)
             with random action chunks, no policy (env_workers/sim_worker.py)
  inference  (b) inference-only ceiling: the policy on this process's device, no Ray, no envs
             (scripts/bench_inference.py: chunks/s, MFU, batch-1 latency, attention kernels)
  ours       (c) our rollout through the real pipeline (deploy/runtime.py Rollout, actors/env_pool.py)
  lockstep   (d) a lock-step rollout: all envs step together, one batched forward per step, sim and
             inference never overlap (scripts/bench_rollout.py); ours and lockstep run --rounds
             rounds of one episode per env slot against the same policy service
For a, c and d: env steps/s, mean inference batch, GPU utilisation sampled during the phase
(null without NVML or nvidia-smi) and the machine's CPU-ms per env step. The targets: ours at
>= 90 % of min(sim ceiling, inference ceiling), the inference ceiling in env steps/s being the best
act chunks/s of phase b times policy.action_chunk; ours >= 1.5 x lockstep; ours >= 600 env steps/s.
The policy is `policy.path` if set, else random weights of the configured size (saved once under
run_dir/bench for the replica). Writes JSON to --out (default $OUT/bench_gpu.json when OUT is set,
else runs/bench_gpu.json) after every phase, and prints a table at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config_loading import ConfigError, load_config  # noqa: E402
from deploy.preflight import check_local_resources, check_tasks  # noqa: E402
from policy.checkpoint import DTYPES  # noqa: E402
from scripts.bench_inference import load_bench_policy, measure_inference, print_table  # noqa: E402

PHASES = ("sim", "inference", "ours", "lockstep")
TARGETS = {"ours_over_ceiling": 0.9, "ours_over_lockstep": 1.5, "ours_env_steps_per_s": 600.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/gpu_1x16.yaml")
    p.add_argument("--phases", default=",".join(PHASES), type=lambda s: s.split(","),
                   help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--warmup-seconds", type=float, default=5.0, help="sim: random stepping before the timed rounds")
    p.add_argument("--rounds", type=int, default=2, help="sim, ours, lockstep: rounds of one episode per env slot")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--batches", default="1,8,32,64", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--iters", type=int, default=20, help="inference: timed iterations per batch size")
    p.add_argument("--warmup", type=int, default=3, help="inference: untimed iterations first")
    p.add_argument("--latency-iters", type=int, default=50, help="inference: timed iterations at batch 1 for p50/p99")
    p.add_argument("--image-size", type=int, default=256, help="inference: side of the random uint8 images")
    p.add_argument("--prompts", default="uniform,mixed", type=lambda s: s.split(","))
    p.add_argument("--compile", action="store_true", help="inference: torch.compile every transformer block (regional)")
    p.add_argument("--cuda-graphs", action="store_true", help="inference: also time the forward as a CUDA graph")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_intermixed_args(argv)  # key=value overrides may come before options
    if args.out is None:
        args.out = Path(os.environ["OUT"]) / "bench_gpu.json" if os.environ.get("OUT") else Path("runs/bench_gpu.json")
    if unknown := set(args.phases) - set(PHASES):
        p.error(f"--phases: unknown {sorted(unknown)}; known: {','.join(PHASES)}")
    if any(b < 1 for b in args.batches) or args.iters < 1 or set(args.prompts) - {"uniform", "mixed"}:
        p.error("batches and iters must be positive; prompts are uniform and/or mixed")
    if args.warmup_seconds < 0 or args.rounds < 1:
        p.error("--warmup-seconds must be at least 0 and --rounds at least 1")
    if not Path(args.config).is_file() and (ROOT / args.config).is_file():
        args.config = str(ROOT / args.config)
    try:
        args.cfg = load_config(args.config, [f"policy.device={args.device}", f"policy.dtype={args.dtype}",
                                             "logging.tensorboard=false", *args.overrides])
        if args.cfg.policy.path is None and args.cfg.policy.unnorm_key is not None:
            raise ConfigError(f"policy.unnorm_key: {args.cfg.policy.unnorm_key!r} needs a checkpoint's dataset statistics; "
                              "random weights (policy.path: null) have none: set policy.unnorm_key=null or give policy.path")
        if set(args.phases) & {"sim", "ours", "lockstep"}:  # their roles must fit before a cluster starts
            check_tasks(args.cfg)
            check_local_resources(args.cfg, learner=False)
    except ConfigError as err:
        p.error(str(err).replace("\n", " "))
    return args


def inference_ceiling(result: dict, chunk: int) -> dict:
    """The best act chunks/s of phase b, and in env steps/s (every chunk is `chunk` env steps)."""
    best = max(result["rows"], key=lambda r: r["act_chunks_per_s"])
    chunks_per_s = float(best["act_chunks_per_s"])
    return {"env_steps_per_s": chunks_per_s * chunk, "chunks_per_s": chunks_per_s,
            "batch": best["batch"], "prompts": best["prompts"]}


def targets(result: dict) -> dict:
    """Ours against min(sim, inference ceiling), against lockstep, and against 600 env steps/s,
    each with its threshold and whether it is met (null where a phase it needs did not run)."""
    ceilings = {k: result[k]["env_steps_per_s"] for k in ("sim", "inference_ceiling") if k in result}
    ours = result.get("ours", {}).get("env_steps_per_s")
    values = {"ours_over_ceiling": ours / min(ceilings.values()) if ours and ceilings else None,
              "ours_over_lockstep": ours / result["lockstep"]["env_steps_per_s"] if ours and "lockstep" in result else None,
              "ours_env_steps_per_s": ours}
    return {k: {"value": v, "target": TARGETS[k], "met": None if v is None else bool(v >= TARGETS[k])} for k, v in values.items()}


def write(result: dict, out: Path) -> None:
    """The figures so far and the targets they allow (a run cut short keeps both)."""
    result["targets"] = targets(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # a time limit's SIGTERM (gpu_checks.sh) ends the run through the finally blocks: Ray is shut down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    cfg, phases, start = args.cfg, set(args.phases), time.perf_counter()
    cluster = cfg.cluster
    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "cpus": os.cpu_count(),
              "config": args.config, "overrides": args.overrides, "phases": [p for p in PHASES if p in phases],
              "env": {"backend": cfg.env.backend, "suite": cfg.env.suite, "max_steps": cfg.env.max_steps,
                      "num_env_workers": cluster.num_env_workers, "envs_per_worker": cluster.envs_per_worker},
              "rounds": args.rounds}

    def record(phase: str, figures: dict) -> None:
        result[phase] = figures
        write(result, args.out)
        print(f"[bench_gpu {time.perf_counter() - start:.0f}s] {phase}: {json.dumps(figures, default=float)}", flush=True)

    rollouts = phases & {"sim", "ours", "lockstep"}
    if rollouts:  # Ray and the simulators: the inference phase alone needs only torch, transformers and pydantic
        from scripts.bench_rollout import random_policy_dir, run_phases
    policy_dir = cfg.policy.path
    if "inference" in phases or (policy_dir is None and phases & {"ours", "lockstep"}):
        policy, build_s = load_bench_policy(cfg.policy)
        if "inference" in phases:
            result["inference"] = measure_inference(policy, build_s, args)
            record("inference_ceiling", inference_ceiling(result["inference"], cfg.policy.action_chunk))
        if policy_dir is None and phases & {"ours", "lockstep"}:
            policy_dir = random_policy_dir(cfg, policy)
        del policy  # the GPU memory goes to the replica
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    if rollouts:
        import ray

        try:
            run_phases(cfg, policy_dir, phases, record, args.rounds, args.warmup_seconds)
        finally:
            ray.shutdown()
    write(result, args.out)
    print_summary(result)
    return result


def print_summary(result: dict) -> None:
    if "inference" in result:
        print_table(result["inference"])
    env = result["env"]
    print(f"\n{result['device']}, {result['cpus']} CPUs; {env['backend']}/{env['suite']}: {env['num_env_workers']} workers x "
          f"{env['envs_per_worker']} envs, {env['max_steps']} steps per episode")
    print(f"{'phase':>14} {'env steps/s':>12} {'mean batch':>11} {'GPU util':>9} {'CPU ms/step':>12} {'seconds':>8}")
    labels = {"sim": "(a) sim", "inference_ceiling": "(b) inference", "ours": "(c) ours", "lockstep": "(d) lockstep"}
    for key, label in labels.items():
        if key not in result:
            continue
        r = result[key]
        if key == "inference_ceiling":
            print(f"{label:>14} {r['env_steps_per_s']:12.1f}  ({r['chunks_per_s']:.1f} chunks/s at batch {r['batch']}, {r['prompts']})")
            continue
        batch = f"{r['mean_inference_batch']:.1f}" if r["mean_inference_batch"] is not None else "-"
        gpu = f"{r['gpu_util']['mean_pct']:.0f} %" if r["gpu_util"] else "-"
        print(f"{label:>14} {r['env_steps_per_s']:12.1f} {batch:>11} {gpu:>9} {r['cpu_ms_per_env_step']:12.2f} {r['seconds']:8.1f}")
    for key in ("sim", "ours", "lockstep"):
        if key in result:
            r = result[key]
            roles = list(r["cpu_ms_per_env_step_by_role"].items())[:6]
            print(f"{labels[key]:>14} CPU ms/step by role: " + ", ".join(f"{n} {ms:.2f}" for n, ms in roles))
            render = "-" if r.get("render_ms_per_env_step") is None else f"{r['render_ms_per_env_step']:.2f}"
            spread = r["sim_thread_busy_by_worker"]
            print(f"{labels[key]:>14} sim threads: {r['sim_thread_ms_per_env_step']:.2f} ms/step, "
                  f"{100 * r['sim_thread_busy_fraction']:.0f} % busy (workers {100 * min(spread):.0f}-{100 * max(spread):.0f} %); "
                  f"renders {render} ms/step; host memory {r['host_memory']['used_gib']:.0f} of "
                  f"{r['host_memory']['total_gib']:.0f} GiB in use")
    for name, t in result["targets"].items():
        value = "not measured" if t["value"] is None else f"{t['value']:.2f} ({'met' if t['met'] else 'NOT met'})"
        print(f"target {name} >= {t['target']:g}: {value}")


if __name__ == "__main__":
    main()
