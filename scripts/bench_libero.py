"""Benchmark the LIBERO backend: rendered env steps/s of ONE env on ONE core, then through the Ray
rollout pipeline (Serve policy + N env workers) with a random tiny policy.

    python scripts/bench_libero.py [out.json] [--suite libero_spatial] [--size 224] [--steps 300]
                                   [--msaa] [--workers 2] [--envs-per-worker 1] [--episodes 8]
                                   [--episode-steps 64] [--skip-pipeline]

Part 1 pins itself to one core and times `env.step` (OSC control + physics + one agentview
render) under random delta actions, then `env.step_chunk` on chunks of 8 such actions (one render
per chunk, as the rollout steps), plus env build and reset times. Part 2 starts a local Ray
cluster with the tiny policy (configs/tiny.yaml) and reports env steps/s in total and per worker,
env builds excluded (a warm-up round builds them). Writes a JSON (default runs/bench_libero.json).
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

from deploy.runtime import apply_default_env  # noqa: E402

apply_default_env()  # MUJOCO_GL=egl etc. before anything imports MuJoCo

import numpy as np  # noqa: E402

from common.config import EnvConfig  # noqa: E402

SPLIT = {"split": "disjoint", "num_train": 25, "num_eval": 25}


def bench_one_env(suite: str, size: int, steps: int, msaa: bool) -> dict:
    from env_workers.libero.env import LiberoEnv

    env = LiberoEnv(EnvConfig(backend="libero", suite=suite, image_size=size, max_steps=steps, msaa=msaa, init_states=SPLIT))
    task = env.task_names[0]
    t0 = time.perf_counter()
    env.reset(task, 0)  # builds the scene
    build_s = time.perf_counter() - t0
    resets = []
    for i in range(1, 4):
        t0 = time.perf_counter()
        env.reset(task, i)
        resets.append(time.perf_counter() - t0)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    n = 0
    done = False
    while not done:
        action = np.concatenate([rng.uniform(-0.5, 0.5, 6), [rng.choice([-1.0, 1.0])]])
        done = env.step(action).done
        n += 1
    step_s = time.perf_counter() - t0
    # as the rollout steps: chunks of 8 actions, the camera rendered once per chunk (LiberoEnv.step_chunk)
    env.reset(task, 0)
    t0 = time.perf_counter()
    chunked = 0
    done = False
    while not done:
        actions = np.concatenate([rng.uniform(-0.5, 0.5, (8, 6)), rng.choice([-1.0, 1.0], (8, 1))], axis=1)
        result = env.step_chunk(actions)
        chunked, done = chunked + result.steps, result.done
    chunk_s = time.perf_counter() - t0
    env.close()
    return {"suite": suite, "task": task, "image_size": size, "msaa": msaa, "gl": env.gl, "steps": n,
            "steps_per_s": n / step_s, "step_ms": step_s / n * 1e3,
            "chunk8_steps_per_s": chunked / chunk_s, "chunk8_step_ms": chunk_s / chunked * 1e3, "build_s": build_s,
            "reset_s": float(np.mean(resets)), "reset_note": "reset + set_init_state + num_steps_wait settle steps"}


def bench_pipeline(args) -> dict:
    import ray

    from actors.env_pool import Episode
    from common.config_loading import load_config
    from deploy.runtime import Rollout, init_ray
    from policy.checkpoint import build_policy, save_policy

    overrides = ["env.backend=libero", f"env.suite={args.suite}", f"env.image_size={args.size}", f"env.msaa={str(args.msaa).lower()}",
                 f"env.max_steps={args.episode_steps}", "env.init_states.num_train=25", "env.init_states.num_eval=25",
                 f"cluster.num_env_workers={args.workers}", f"cluster.envs_per_worker={args.envs_per_worker}",
                 "run_dir=runs/bench_libero", "logging.tensorboard=false"]
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/tiny.yaml", overrides)
    policy_dir = save_policy(build_policy(cfg.policy, seed=0), Path(cfg.run_dir) / "random_policy")
    init_ray(cfg)
    rollout = Rollout.start(cfg, str(policy_dir))
    task = sorted(rollout.task_info)[0]  # one task: no scene rebuilds inside the timed part
    slots = rollout.pool.num_slots
    try:
        rollout.pool.run_all([Episode(task, i, 1.6, False) for i in range(slots)], 900)  # warm-up: builds every env
        start = time.perf_counter()
        done = rollout.pool.run_all([Episode(task, i % 25, 1.6, False) for i in range(args.episodes)], 1800)
        seconds = time.perf_counter() - start
    finally:
        rollout.shutdown()
        ray.shutdown()
    steps = sum(d.meta.env_steps for d in done)
    return {"workers": args.workers, "envs_per_worker": args.envs_per_worker, "image_size": args.size, "msaa": args.msaa,
            "episodes": len(done), "env_steps": steps, "seconds": seconds, "env_steps_per_s": steps / seconds,
            "env_steps_per_s_per_worker": steps / seconds / args.workers, "policy": "random tiny (configs/tiny.yaml)",
            "cpus": os.cpu_count()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="runs/bench_libero.json")
    p.add_argument("--suite", default="libero_spatial")
    p.add_argument("--size", type=int, default=224, help="rendered image size (the policy's input size)")
    p.add_argument("--steps", type=int, default=300, help="timed env steps of the one-core part")
    p.add_argument("--msaa", action="store_true", help="keep robosuite's 4x MSAA (default: off, env.msaa=false)")
    p.add_argument("--core", type=int, default=None, help="CPU core for the one-core part (default: first allowed)")
    p.add_argument("--workers", type=int, default=2, help="env workers of the pipeline part")
    p.add_argument("--envs-per-worker", type=int, default=1)
    p.add_argument("--episodes", type=int, default=8, help="timed episodes of the pipeline part")
    p.add_argument("--episode-steps", type=int, default=64, help="step limit of the pipeline episodes")
    p.add_argument("--skip-pipeline", action="store_true")
    args = p.parse_args(argv)

    allowed = sorted(os.sched_getaffinity(0))
    result = {"cpu": platform.processor() or platform.machine(), "cores": allowed}
    # Part 1 in a pinned child state; the pipeline part gets every core back.
    os.sched_setaffinity(0, {args.core if args.core is not None else allowed[0]})
    r = bench_one_env(args.suite, args.size, args.steps, args.msaa)
    os.sched_setaffinity(0, set(allowed))
    result["one_env_one_core"] = r
    print(f"one env, one core: {r['steps_per_s']:.1f} rendered env steps/s at {r['image_size']} px "
          f"(MSAA {'on' if r['msaa'] else 'off'}, {r['gl']}; step {r['step_ms']:.1f} ms, build {r['build_s']:.1f} s, "
          f"reset {r['reset_s']:.2f} s); in chunks of 8 actions, one render each: {r['chunk8_steps_per_s']:.1f} env "
          f"steps/s ({r['chunk8_step_ms']:.1f} ms a step)", flush=True)
    if not args.skip_pipeline:
        q = bench_pipeline(args)
        result["pipeline"] = q
        print(f"pipeline, {q['workers']} env workers x {q['envs_per_worker']} env: {q['env_steps_per_s']:.1f} env steps/s "
              f"({q['env_steps_per_s_per_worker']:.1f} per worker; {q['env_steps']} steps in {q['seconds']:.1f} s)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
