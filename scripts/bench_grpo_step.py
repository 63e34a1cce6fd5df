"""Whole GRPO steps at a reduced batch through the real trainer, and the paper's batch extrapolated.

    python scripts/bench_grpo_step.py [--config configs/gpu_1x16.yaml] [--steps 2]
        [--paper-groups 64] [--paper-group-size 8] [--paper-max-steps 512] [--out PATH] [key=value ...]

Starts the run's roles as `vla-grpo train` does (deploy/runtime.py Rollout, deploy/train.py
GRPOTrainer: env workers, the Serve replica, the learner, the configured learner.weight_sync) and
runs --steps RL steps, timing each step's phases (rollout, advantages, train, weight_sync). The
policy is `policy.path` if set, else random weights of the configured size. A random policy never
succeeds, so dynamic sampling is off here (rollout.min_group_success=0, max_group_success=1;
overrides after them win): every group is trained, and every episode runs to env.max_steps.

The paper's batch (--paper-groups x --paper-group-size trajectories of --paper-max-steps env steps)
is extrapolated from the last measured step, phase by phase: rollout at the measured env steps/s,
train at the measured seconds per chunk, weight sync as measured (it does not grow with the batch),
and whatever part of rank 0's object-store copy of the weights the rollout does not hide (after each
step the script waits for that copy and times it: `store_copy_s`).
With every episode at the step limit this is the upper bound of a step; a policy that succeeds
ends episodes early.

With rollout.max_policy_lag >= 1 the env slots keep rolling out while the learner trains, so the
phases overlap and do not add up. Then the figure is the steady state: each step's wall time (the
copy's wait included, where it falls in a run) per trained chunk, over the steps after the first,
times the paper batch's chunks. Writes JSON to --out (default $OUT/bench_grpo_step.json when OUT is set, else
runs/bench_grpo_step.json) after every step, and prints the arithmetic.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.config_loading import ConfigError, load_config  # noqa: E402
from deploy.preflight import check_local_resources, check_tasks  # noqa: E402

# a random policy's groups all fail: without these every group would be dropped and no step would end
NO_DYNAMIC_SAMPLING = ["rollout.min_group_success=0", "rollout.max_group_success=1"]
PHASES = ("rollout", "advantages", "train", "weight_sync")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/gpu_1x16.yaml")
    p.add_argument("--steps", type=int, default=2, help="RL steps to run (the first includes warm-up)")
    p.add_argument("--paper-groups", type=int, default=64, help="groups per step of the extrapolated batch")
    p.add_argument("--paper-group-size", type=int, default=8, help="trajectories per group of the extrapolated batch")
    p.add_argument("--paper-max-steps", type=int, default=512, help="env steps per trajectory of the extrapolated batch")
    default_out = Path(os.environ["OUT"]) / "bench_grpo_step.json" if os.environ.get("OUT") else ROOT / "runs/bench_grpo_step.json"
    p.add_argument("--out", type=Path, default=default_out)
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        p.error(f"unrecognised arguments: {' '.join(bad)} (config overrides are key=value)")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if not Path(args.config).is_file() and (ROOT / args.config).is_file():
        args.config = str(ROOT / args.config)
    args.overrides = NO_DYNAMIC_SAMPLING + ["logging.tensorboard=false"] + overrides
    try:
        args.cfg = load_config(args.config, args.overrides)
        check_tasks(args.cfg)
        check_local_resources(args.cfg)
    except ConfigError as err:
        p.error(str(err).replace("\n", " "))
    return args


def step_figures(scalars: dict, env_steps: int, episodes: int, trajectories: int) -> dict:
    """`episodes`/`env_steps`: all that finished during the rollout phase (the env slots keep every
    one busy, so a few beyond the batch finish too); `trajectories`/`chunks`: what the learner trained."""
    seconds = {phase: scalars.get(f"time/{phase}_s", 0.0) for phase in PHASES}
    chunks = int(scalars["train/chunks"])
    return {"seconds": seconds, "total_s": sum(seconds.values()), "episodes": episodes, "env_steps": env_steps,
            "trajectories": trajectories,
            "chunks": chunks, "env_steps_per_s": env_steps / max(seconds["rollout"], 1e-9),
            "train_s_per_chunk": seconds["train"] / max(chunks, 1), "loss": scalars.get("train/loss")}


def store_copy_wait(rollout) -> float:
    """Seconds until rank 0's object-store copy of the weights just synced is ready. In a run the copy
    is made beside the next rollout; rank 0 trains only after it, so a rollout shorter than the copy
    (a reduced batch's) would show the rest as train time. Waited for here, it is timed on its own."""
    from services.weight_store import wait_for_current_copy

    start = time.perf_counter()
    wait_for_current_copy(rollout.weights, timeout_s=900)
    return time.perf_counter() - start


def extrapolate(step: dict, groups: int, group_size: int, max_steps: int, chunk: int) -> dict:
    """The paper's batch from one measured step, phase by phase, with the arithmetic as text."""
    trajs = groups * group_size
    env_steps = trajs * max_steps
    chunks = trajs * -(-max_steps // chunk)
    rollout_s = env_steps / step["env_steps_per_s"]
    train_s = chunks * step["train_s_per_chunk"]
    sync_s = step["seconds"]["weight_sync"]
    adv_s = step["seconds"]["advantages"] * trajs / step["trajectories"]
    copy_wait_s = max(0.0, step.get("store_copy_s", 0.0) - rollout_s)  # the copy runs beside the next rollout
    total = rollout_s + adv_s + train_s + sync_s + copy_wait_s
    return {
        "trajectories": trajs, "env_steps": env_steps, "chunks": chunks,
        "seconds": {"rollout": rollout_s, "advantages": adv_s, "train": train_s, "weight_sync": sync_s,
                    "store_copy_wait": copy_wait_s},
        "total_s": total, "total_min": total / 60,
        "arithmetic": [
            f"rollout: {trajs} trajectories x {max_steps} env steps = {env_steps} env steps / "
            f"{step['env_steps_per_s']:.1f} env steps/s = {rollout_s:.0f} s",
            f"train: {trajs} x ceil({max_steps}/{chunk}) = {chunks} chunks x {step['train_s_per_chunk'] * 1e3:.1f} ms "
            f"per chunk = {train_s:.0f} s",
            f"weight sync: {sync_s:.1f} s (measured; the weights do not grow with the batch)",
            f"store copy: {step.get('store_copy_s', 0.0):.1f} s beside the next rollout's {rollout_s:.0f} s: "
            f"{copy_wait_s:.1f} s of waiting",
            f"advantages: {adv_s:.1f} s; total {total:.0f} s = {total / 60:.1f} min",
        ],
    }


def extrapolate_overlapped(steps: list[dict], groups: int, group_size: int, max_steps: int, chunk: int) -> dict:
    """The paper's batch from steady-state steps of an overlapped run (max_policy_lag >= 1): rollout
    and train share the step's wall time, and both grow with the batch's chunks."""
    trajs = groups * group_size
    chunks = trajs * -(-max_steps // chunk)
    wall, trained = sum(st["wall_s"] for st in steps), sum(st["chunks"] for st in steps)
    total = chunks * wall / trained
    return {
        "trajectories": trajs, "env_steps": trajs * max_steps, "chunks": chunks, "overlapped": True,
        "total_s": total, "total_min": total / 60,
        "arithmetic": [
            f"steps {', '.join(str(st['step']) for st in steps)}: {wall:.1f} s of wall time for {trained} trained chunks "
            f"= {wall / trained * 1e3:.1f} ms per chunk, rollout and train overlapped",
            f"{trajs} x ceil({max_steps}/{chunk}) = {chunks} chunks x {wall / trained * 1e3:.1f} ms = {total:.0f} s "
            f"= {total / 60:.1f} min",
        ],
    }


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # a time limit's SIGTERM ends the run through the finally blocks (the caller's handler comes back after)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    import ray
    import torch

    from deploy.runtime import Rollout, init_ray
    from deploy.train import GRPOTrainer
    from scripts.bench_rollout import random_policy_dir

    cfg = args.cfg
    overlapped = cfg.rollout.max_policy_lag >= 1
    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "cpus": os.cpu_count(),
              "config": args.config, "overrides": args.overrides,
              "batch": {"groups": cfg.rollout.groups_per_batch, "group_size": cfg.rollout.group_size,
                        "max_steps": cfg.env.max_steps, "mini_batch_size": cfg.learner.mini_batch_size},
              "weight_sync": cfg.learner.weight_sync, "steps": []}
    start = time.perf_counter()
    policy_dir = str(cfg.policy.path or random_policy_dir(cfg))
    result["policy_saved_s"] = time.perf_counter() - start
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the random policy built here: its memory goes to the replica and the learner
    owns_ray = not ray.is_initialized()  # a caller's cluster (the tests') stays up
    init_ray(cfg)
    rollout = trainer = None
    try:
        rollout = Rollout.start(cfg, policy_dir)
        trainer = GRPOTrainer(cfg, policy_dir, rollout)
        result["setup_s"] = time.perf_counter() - start
        print(f"[bench_grpo_step] roles up in {result['setup_s']:.0f} s", flush=True)
        began = time.perf_counter()
        for step in range(1, args.steps + 1):
            scalars = trainer.train_step()
            s = trainer.coordinator.stats
            trajectories = cfg.rollout.groups_per_batch * cfg.rollout.group_size
            result["steps"].append({"step": step, **step_figures(scalars, s.env_steps, s.episodes, trajectories),
                                    "wall_s": time.perf_counter() - began})
            if not overlapped:  # timed apart (see store_copy_wait); overlapped, it falls where it falls in a run
                result["steps"][-1]["store_copy_s"] = store_copy_wait(rollout)
            began = time.perf_counter()
            if torch.cuda.is_available():
                result["peak_gpu_gb_driver"] = torch.cuda.max_memory_allocated() / 2**30  # this process only
            write(result, args.out)
            last = result["steps"][-1]
            print(f"[bench_grpo_step] step {len(result['steps'])}: " + ", ".join(
                f"{k} {v:.1f} s" for k, v in last["seconds"].items()) + f"; {last['env_steps']} env steps, "
                f"{last['chunks']} chunks", flush=True)
    finally:
        if trainer is not None:
            trainer.shutdown()
        if rollout is not None:
            rollout.shutdown()
        if owns_ray:
            ray.shutdown()
        signal.signal(signal.SIGTERM, previous)
    paper = (args.paper_groups, args.paper_group_size, args.paper_max_steps, cfg.policy.action_chunk)
    if overlapped:  # the first step has nothing to overlap with
        result["paper_batch"] = extrapolate_overlapped(result["steps"][1:] or result["steps"], *paper)
    else:
        result["paper_batch"] = extrapolate(result["steps"][-1], *paper)
    write(result, args.out)
    print(f"\n{result['device']}: {len(result['steps'])} GRPO steps of {cfg.rollout.groups_per_batch} x "
          f"{cfg.rollout.group_size} trajectories, env.max_steps {cfg.env.max_steps}, weight sync {cfg.learner.weight_sync}")
    for i, st in enumerate(result["steps"], 1):
        print(f"  step {i}: " + "  ".join(f"{k} {v:6.1f} s" for k, v in st["seconds"].items())
              + f"  total {st['total_s']:.1f} s  wall {st['wall_s']:.1f} s")
    print(f"paper batch ({args.paper_groups} x {args.paper_group_size}, {args.paper_max_steps} steps), "
          + ("from the steps after the first, overlapped:" if overlapped else "from the last step:"))
    for line in result["paper_batch"]["arithmetic"]:
        print("  " + line)
    return result


if __name__ == "__main__":
    main()
