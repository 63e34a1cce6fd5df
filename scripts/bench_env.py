"""Benchmark the tabletop env: rendered env steps/s on ONE core, and (optionally) expert quality.

    python scripts/bench_env.py [out.json] [--sizes 64,96,128,224] [--steps 1500] [--experts 50]

Pins itself to one CPU core, rolls out the scripted experts over the suite's tasks (realistic
contacts and motions) and times `env.step` (physics + render) separately from the expert, then
replays the same actions through `env.step_chunk` in chunks of `--chunk` (one render per chunk,
as env workers step a policy's action chunk).
`--experts N` also measures expert success and mean episode length on the first N eval
initial states of every task. Writes a JSON (default runs/bench_env.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from common.config import EnvConfig  # noqa: E402
from env_workers.tabletop import DEFAULT_IMAGE_SIZE, TASKS, ScriptedExpert, TabletopEnv  # noqa: E402


def _cfg(size: int, max_steps: int = 200) -> EnvConfig:
    return EnvConfig(backend="tabletop", suite="tabletop", image_size=size, max_steps=max_steps, num_steps_wait=0)


def bench_speed(size: int, steps: int, chunk: int) -> dict:
    env = TabletopEnv(_cfg(size))
    tasks = list(TASKS)
    for t in tasks:  # build every layout's model and renderer before timing
        env.reset(t, 0)
    t_step = t_reset = 0.0
    n_step = n_reset = 0
    k = 0
    episodes: list[tuple[str, int, list[np.ndarray]]] = []  # replayed below in chunks
    while n_step < steps:
        task = tasks[k % len(tasks)]
        t0 = time.perf_counter()
        env.reset(task, k)
        t_reset += time.perf_counter() - t0
        n_reset += 1
        expert = ScriptedExpert(env)
        expert.reset()
        done, actions = False, []
        while not done and n_step < steps:
            a = expert.act()
            t0 = time.perf_counter()
            done = env.step(a).done
            t_step += time.perf_counter() - t0
            n_step += 1
            actions.append(a)
        episodes.append((task, k, actions))
        k += 1
    t_chunked = 0.0
    for task, state, actions in episodes:
        env.reset(task, state)
        t0 = time.perf_counter()
        for i in range(0, len(actions), chunk):
            env.step_chunk(np.stack(actions[i : i + chunk]))
        t_chunked += time.perf_counter() - t0
    # Physics alone (no render) tells how the step time splits.
    sim = env.sim
    t0 = time.perf_counter()
    for _ in range(200):
        sim.step(sim.ee_target, close=False)
    physics_ms = (time.perf_counter() - t0) / 200 * 1e3
    env.close()
    return {
        "image_size": size,
        "steps": n_step,
        "steps_per_s": n_step / t_step,
        "chunk": chunk,
        "chunked_steps_per_s": n_step / t_chunked,
        "step_ms": t_step / n_step * 1e3,
        "physics_ms": physics_ms,
        "reset_ms": t_reset / n_reset * 1e3,
    }


def bench_experts(n: int, size: int) -> dict:
    env = TabletopEnv(_cfg(size, max_steps=200))
    out = {}
    for task in TASKS:
        wins, lengths = [], []
        for i in env.init_states(task, "eval")[:n]:
            env.reset(task, i)
            expert = ScriptedExpert(env)
            expert.reset()
            while True:
                res = env.step(expert.act())
                if res.done:
                    break
            wins.append(res.success)
            lengths.append(env.steps)
        succ_len = [n for n, w in zip(lengths, wins) if w] or [0]
        out[task] = {
            "episodes": len(wins),
            "success_rate": float(np.mean(wins)),
            "mean_steps": float(np.mean(succ_len)),
            "max_steps": int(np.max(succ_len)),
        }
        print(f"  {task:24s} success {out[task]['success_rate']:.2f}  mean steps {out[task]['mean_steps']:.1f}  "
              f"max {out[task]['max_steps']}", flush=True)
    env.close()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="runs/bench_env.json")
    p.add_argument("--sizes", default=str(DEFAULT_IMAGE_SIZE), help="comma-separated image sizes")
    p.add_argument("--steps", type=int, default=1500, help="timed env steps per size")
    p.add_argument("--chunk", type=int, default=16, help="actions per step_chunk call in the chunked replay")
    p.add_argument("--core", type=int, default=None, help="CPU core to pin to (default: the first allowed)")
    p.add_argument("--experts", type=int, default=0, help="also measure experts on N eval states per task")
    args = p.parse_args(argv)

    if hasattr(os, "sched_setaffinity"):
        core = args.core if args.core is not None else min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
    result = {
        "mujoco_gl": os.environ.get("MUJOCO_GL"),
        "cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": platform.processor() or platform.machine(),
        "default_image_size": DEFAULT_IMAGE_SIZE,
        "speed": [],
    }
    for size in (int(s) for s in args.sizes.split(",")):
        r = bench_speed(size, args.steps, args.chunk)
        result["speed"].append(r)
        print(f"image {size:4d}px: {r['steps_per_s']:7.1f} rendered env steps/s on one core "
              f"(step {r['step_ms']:.2f} ms, physics {r['physics_ms']:.2f} ms, reset {r['reset_ms']:.2f} ms); "
              f"{r['chunked_steps_per_s']:7.1f} steps/s in chunks of {r['chunk']} (one render per chunk)", flush=True)
    if args.experts:
        print(f"experts on {args.experts} eval init states per task:")
        result["experts"] = bench_experts(args.experts, DEFAULT_IMAGE_SIZE)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
