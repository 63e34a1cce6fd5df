"""Seconds per weight sync of each learner.weight_sync backend, on a local Ray cluster: the real
trainer, learner rank and Serve replicas of CONFIG (default: the tiny test policy, random weights).

For each backend a trainer starts (its first sync, version 0, also forms the collective group),
then `--syncs` more syncs are timed one by one: each puts the learner's weights in the object store
and delivers them to every replica. A sanity figure for the machine it runs on, not a benchmark.

    python scripts/bench_weight_sync.py [CONFIG] [--replicas 2] [--syncs 5] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs/tiny.yaml"))
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--syncs", type=int, default=5)
    args = parser.parse_args()

    import ray

    from common.config_loading import load_config
    from deploy.runtime import Rollout, apply_default_env, init_ray
    from deploy.train import GRPOTrainer
    from policy.checkpoint import build_policy, save_policy

    apply_default_env()
    run_dir = Path(tempfile.mkdtemp(prefix="bench_weight_sync_"))
    cfg = load_config(args.config, [f"run_dir={run_dir}", "cluster.learner_world_size=1",
                                    f"cluster.serve_replicas={args.replicas}", *args.overrides])
    policy_path = cfg.policy.path or save_policy(build_policy(cfg.policy, seed=0), run_dir / "policy")
    init_ray(cfg)
    rollout = Rollout.start(cfg, str(policy_path))
    try:
        for backend in ("object_store", "collective"):
            run = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"weight_sync": backend})})
            start = time.perf_counter()
            trainer = GRPOTrainer(run, str(policy_path), rollout)  # includes the first sync
            first = time.perf_counter() - start
            seconds = []
            try:
                if backend == "object_store":
                    state = ray.get(trainer.learner.publish_weights(), timeout=300)
                    print(f"weights: {sum(t.numel() * t.element_size() for t in state.values()) / 2**20:.1f} MB",
                          flush=True)
                for _ in range(args.syncs):
                    start = time.perf_counter()
                    trainer.sync_weights()
                    seconds.append(time.perf_counter() - start)
            finally:
                trainer.shutdown()
            print(f"{backend:>12}: {args.replicas} replicas, sync median {statistics.median(seconds):.3f} s "
                  f"(min {min(seconds):.3f}, max {max(seconds):.3f}, {args.syncs} syncs); "
                  f"trainer start with the first sync {first:.1f} s", flush=True)
    finally:
        rollout.shutdown()


if __name__ == "__main__":
    main()
