"""Benchmark the ManiSkill backend.

Per-core mode (default): one env on ONE core, every task of the suite: scene build (incl. the first
render), reset, and env steps/s under random delta actions, stepped one at a time (a render per step,
as for videos) and in 8-action chunks (one render per chunk, as the policy reads them).

    python scripts/bench_maniskill.py [out.json] [--size 128] [--episodes 3] [--tasks PickCube-v1 ...]

Batched mode (--sim-backend): the batched env of the GPU-parallel env worker
(env_workers/maniskill/batched_env.py), one env per (N, image size) in turn, in this process: build,
reset of all N scenes (one partial reset each), then random actions with the sensor camera rendered
after EVERY batched step; rendered steps/s counts N env steps per batched step. physx_cuda needs an
NVIDIA GPU with its Vulkan driver; physx_cpu runs the same code with N = 1.

    python scripts/bench_maniskill.py [out.json] --sim-backend physx_cuda --num-envs 64,256,1024 \
        --image-size 128,224 [--tasks PickCube-v1] [--steps 100]

Writes a JSON (default runs/bench_maniskill.json, batched: runs/bench_maniskill_batched.json) and
prints one line per task, or a table of the batched runs.
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


WARMUP_STEPS = 3  # batched steps before the clock starts (the first render compiles SAPIEN's pipelines)


def bench_batched(sim_backend: str, task: str, num_envs: int, size: int, steps: int) -> dict:
    """One batched env of `num_envs` scenes: build, reset all, then `steps` timed batched steps of
    random actions, each followed by a render of every scene's camera (copied to host memory, as the
    worker sends it). Scenes whose episode ends start the next one outside the clock."""
    from env_workers.maniskill.batched_env import BatchedManiSkillEnv

    cfg = EnvConfig(backend="maniskill", suite="maniskill", tasks=[task], image_size=size, max_steps=50,
                    num_steps_wait=0, sim_backend=sim_backend, batched=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    env = BatchedManiSkillEnv(cfg, num_envs)
    build_s = time.perf_counter() - t0
    everyone = list(range(num_envs))
    try:
        t0 = time.perf_counter()
        env.reset_envs(everyone, everyone)
        reset_s = time.perf_counter() - t0
        ones = np.ones(num_envs, dtype=np.int64)
        env_steps, clock = 0, 0.0
        for i in range(WARMUP_STEPS + steps):
            ended = np.flatnonzero(env.done).tolist()
            if ended:
                env.reset_envs(ended, ended)
            actions = _actions(rng, num_envs).reshape(num_envs, 1, 7)
            t0 = time.perf_counter()
            applied, _ = env.step_chunks(actions, ones)
            env.render()
            if i >= WARMUP_STEPS:
                clock += time.perf_counter() - t0
                env_steps += int(applied.sum())
    finally:
        env.close()
    return {"sim_backend": sim_backend, "task": task, "num_envs": num_envs, "image_size": size,
            "build_s": round(build_s, 2), "reset_all_s": round(reset_s, 3), "batched_steps": steps,
            "env_steps": env_steps, "seconds": round(clock, 3), "rendered_steps_per_s": round(env_steps / clock, 1),
            "batched_steps_per_s": round(steps / clock, 2)}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main_batched(args) -> int:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    rows = []
    for task in args.tasks or ["PickCube-v1"]:
        for num_envs in _ints(args.num_envs):
            for size in _ints(args.image_size):
                rows.append(bench_batched(args.sim_backend, task, num_envs, size, args.steps))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'task':<20} {'N':>6} {'px':>5} {'build s':>8} {'reset all s':>12} {'rendered steps/s':>17} {'batched steps/s':>16}")
    for r in rows:
        print(f"{r['task']:<20} {r['num_envs']:>6} {r['image_size']:>5} {r['build_s']:>8} {r['reset_all_s']:>12} "
              f"{r['rendered_steps_per_s']:>17} {r['batched_steps_per_s']:>16}")
    out = Path(args.out or "runs/bench_maniskill_batched.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.node(), "gpu": gpu, "batched": rows}, indent=1))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=None)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--sim-backend", choices=["physx_cpu", "physx_cuda"], default=None,
                        help="batched mode: the GPU-parallel worker's env on this PhysX backend")
    parser.add_argument("--num-envs", default="64,256,1024", help="batched mode: scenes per env, comma-separated")
    parser.add_argument("--image-size", default="128,224", help="batched mode: camera sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=100, help="batched mode: timed batched steps per env")
    args = parser.parse_args(argv)
    if args.sim_backend is not None:
        if args.sim_backend == "physx_cpu" and _ints(args.num_envs) != [1]:
            parser.error("--num-envs: ManiSkill's physx_cpu holds one scene per env; pass --num-envs 1")
        return main_batched(args)
    args.out = args.out or "runs/bench_maniskill.json"
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
