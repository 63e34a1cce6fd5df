"""Benchmark the ManiSkill backend, one env on ONE core, every task of the suite: scene build (incl.
the first render), reset, and env steps/s under random delta actions, stepped one at a time (a render
per step, as for videos) and in 8-action chunks (one render per chunk, as the policy reads them).

    python scripts/bench_maniskill.py [out.json] [--size 128] [--episodes 3] [--tasks PickCube-v1 ...]

Writes a JSON (default runs/bench_maniskill.json) and prints one line per task.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from common.config import EnvConfig  # noqa: E402

CHUNK = 8


def _actions(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.concatenate([rng.uniform(-0.5, 0.5, (n, 6)), rng.choice([-1.0, 1.0], (n, 1))], axis=1)


def bench_task(env, task: str, episodes: int) -> dict:
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    env.reset(task, 0)  # builds the scene and renders its first image
    build_s = time.perf_counter() - t0
    resets, single, chunked = [], [0, 0.0], [0, 0.0]
    for ep in range(episodes):
        t0 = time.perf_counter()
        env.reset(task, ep + 1)
        resets.append(time.perf_counter() - t0)
        t0, done = time.perf_counter(), False
        while not done:
            done = env.step(_actions(rng, 1)[0]).done
            single[0] += 1
        single[1] += time.perf_counter() - t0
        env.reset(task, ep + 1)
        t0, done = time.perf_counter(), False
        while not done:
            result = env.step_chunk(_actions(rng, CHUNK))
            chunked[0] += result.steps
            done = result.done
        chunked[1] += time.perf_counter() - t0
    return {"task": task, "build_s": round(build_s, 3), "reset_s": round(float(np.median(resets)), 3),
            "steps_per_s_single": round(single[0] / single[1], 1), "steps_per_s_chunk8": round(chunked[0] / chunked[1], 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/bench_maniskill.json")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--tasks", nargs="*", default=None)
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as one env worker gets
    import torch

    torch.set_num_threads(1)
    from env_workers.maniskill import ManiSkillEnv

    t0 = time.perf_counter()
    env = ManiSkillEnv(EnvConfig(backend="maniskill", suite="maniskill", tasks=args.tasks, image_size=args.size,
                                 max_steps=50, num_steps_wait=0))
    rows = {"import_s": round(time.perf_counter() - t0, 2), "image_size": args.size, "machine": platform.node(), "tasks": []}
    for task in env.task_names:
        row = bench_task(env, task, args.episodes)
        rows["tasks"].append(row)
        print(json.dumps(row), flush=True)
    env.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"import + first setup {rows['import_s']} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
