"""Rollout throughput: our slot-freeing rollout vs the original's lock-step rollout, same run.

    python scripts/bench_rollout.py [configs/demo.yaml] [--rounds N] [key=value ...]

Prints env steps/s, mean inference batch size and the machine's CPU time per env step
(all processes; run it alone) for both modes and their ratio;
writes run_dir/bench_rollout.json. The policy is `policy.path` if set (e.g. runs/demo/rl_policy),
else a random one of the configured size. A random policy never succeeds, so every episode runs to
the step limit and lock-step wastes nothing (it even batches better); the gap in our favour grows
with the spread of episode lengths, i.e. with a policy that succeeds early and often."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.env_pool import Episode  # noqa: E402
from common.config_loading import load_config  # noqa: E402
from deploy.runtime import Rollout, init_ray  # noqa: E402
from policy.checkpoint import build_policy, save_policy  # noqa: E402

ROUNDS = 8  # rounds of one episode per env slot, per mode


def _busy(times) -> float:
    # guest time is already inside user/nice on Linux
    skip = ("idle", "iowait", "guest", "guest_nice")
    return sum(getattr(times, f) for f in times._fields if f not in skip)


def main() -> None:
    args = sys.argv[1:]
    rounds = ROUNDS
    if "--rounds" in args:
        i = args.index("--rounds")
        if i + 1 >= len(args) or not args[i + 1].isdigit() or int(args[i + 1]) < 1:
            sys.exit("--rounds needs a positive whole number, e.g. --rounds 32")
        rounds = int(args[i + 1])
        del args[i : i + 2]
    path = args.pop(0) if args and args[0].endswith(".yaml") else "configs/demo.yaml"
    cfg = load_config(path, args + ["logging.tensorboard=false"])
    run_dir = Path(cfg.run_dir) / "bench"
    policy_dir = cfg.policy.path or save_policy(build_policy(cfg.policy, seed=cfg.seed), run_dir / "random_policy")
    init_ray(cfg)
    rollout = Rollout.start(cfg, str(policy_dir))
    tasks = sorted(rollout.task_info)
    n = rollout.pool.num_slots
    requests = [(tasks[i % len(tasks)], rollout.task_info[tasks[i % len(tasks)]]["train"][i]) for i in range(n)]
    results = {}
    try:
        rollout.pool.run_all([Episode(t, s, cfg.rollout.temperature, False) for t, s in requests[:2]], 600)  # warm-up
        for mode in ("ours", "lockstep"):
            before = rollout.handle.stats.remote().result(timeout_s=60)
            cpu_before = psutil.cpu_times()
            start = time.perf_counter()
            if mode == "ours":
                done = rollout.pool.run_all([Episode(t, s, cfg.rollout.temperature, False) for t, s in requests * rounds], 1800)
                steps = sum(d.meta.env_steps for d in done)
            else:
                per = cfg.cluster.envs_per_worker
                shards = [requests[i * per:(i + 1) * per] for i in range(len(rollout.pool.workers))]
                out = []
                for _ in range(rounds):
                    out += ray.get([w.run_lockstep.remote(sh, cfg.rollout.temperature) for w, sh in zip(rollout.pool.workers, shards)])
                steps = sum(o["env_steps"] for o in out)
            seconds = time.perf_counter() - start
            cpu_after = psutil.cpu_times()
            # whole machine, all but idle (Ray's workers run niced: their time counts as `nice`, not `user`)
            busy = _busy(cpu_after) - _busy(cpu_before)
            after = rollout.handle.stats.remote().result(timeout_s=60)
            batches = max(after["batches"] - before["batches"], 1)
            results[mode] = {"env_steps": steps, "seconds": seconds, "env_steps_per_s": steps / seconds,
                             "mean_inference_batch": (after["served"] - before["served"]) / batches,
                             "cpu_ms_per_env_step": 1000 * busy / max(steps, 1),
                             "cpu_busy_fraction": busy / seconds / psutil.cpu_count()}
    finally:
        rollout.shutdown()
    results["rounds"] = rounds
    results["ratio_ours_over_lockstep"] = results["ours"]["env_steps_per_s"] / results["lockstep"]["env_steps_per_s"]
    for mode in ("ours", "lockstep"):
        r = results[mode]
        print(f"{mode:>9}: {r['env_steps_per_s']:7.1f} env steps/s  mean inference batch {r['mean_inference_batch']:5.2f}  "
              f"CPU {r['cpu_ms_per_env_step']:.2f} ms/env step, "
              f"{100 * r['cpu_busy_fraction']:.0f} % busy  ({r['env_steps']} steps in {r['seconds']:.1f}s)")
    print(f"ratio ours / lock-step: {results['ratio_ours_over_lockstep']:.2f}x")
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.run_dir) / "bench_rollout.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
