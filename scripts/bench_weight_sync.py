"""Seconds per weight sync of each learner.weight_sync backend, on a local Ray cluster: the real
trainer, learner rank and Serve replicas of CONFIG (default: the tiny test policy, random weights).

For each backend a trainer starts (its first sync, version 0, also forms the collective group),
then `--syncs` more syncs are timed one by one: each delivers the learner's weights to every
replica, and rank 0 then copies them into the object store for replicas that restart (after the
sync returns; also timed, from the sync's start until that copy is ready). The replicas' own
counts of how they got their weights show which backend delivered (cuda_ipc reaches only replicas on learner rank 0's GPU, or node on CPUs;
the others load from the object store). A sanity figure for the machine it runs on, not a benchmark.
Prints one line per backend and writes every figure to --json.

    python scripts/bench_weight_sync.py [CONFIG] [--replicas 2] [--syncs 5]
        [--backends object_store,collective,cuda_ipc] [--json PATH] [key=value ...]

On one GPU, e.g. the 7B policy's shape built on the meta device and initialised on the GPU:
    python scripts/bench_weight_sync.py configs/oft7b.yaml --replicas 1 --backends object_store,cuda_ipc \
        cluster.learner_gpus=0.5 cluster.replica_gpus=0.5
(collective over NCCL needs a GPU per replica and for rank 0 besides).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKENDS = ("object_store", "collective", "cuda_ipc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "configs/tiny.yaml"))
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--syncs", type=int, default=5)
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated learner.weight_sync values")
    parser.add_argument("--json", default=None, help="where the figures go (default: the run folder's bench.json)")
    args = parser.parse_intermixed_args()  # key=value overrides may come after the options
    backends = args.backends.split(",")
    if unknown := set(backends) - {*BACKENDS, "auto"}:
        parser.error(f"--backends: unknown {sorted(unknown)}; choose from {', '.join((*BACKENDS, 'auto'))}")

    import ray
    import torch

    from common.config_loading import load_config
    from deploy.runtime import Rollout, apply_default_env, init_ray
    from deploy.train import GRPOTrainer
    from policy.checkpoint import build_policy, save_policy
    from services.weight_store import wait_for_current_copy

    apply_default_env()
    run_dir = Path(tempfile.mkdtemp(prefix="bench_weight_sync_"))
    cfg = load_config(args.config, [f"run_dir={run_dir}", "cluster.learner_world_size=1",
                                    f"cluster.serve_replicas={args.replicas}", *args.overrides])
    policy_path = cfg.policy.path or save_policy(build_policy(cfg.policy, seed=0), run_dir / "policy")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the policy built here: its GPU memory goes to the learner and the replicas
    out = Path(args.json) if args.json else run_dir / "bench.json"
    report = {"config": str(args.config), "overrides": args.overrides, "replicas": args.replicas,
              "bucket_mb": cfg.learner.weight_sync_bucket_mb, "backends": {}}
    start = time.perf_counter()
    init_ray(cfg)
    rollout = Rollout.start(cfg, str(policy_path))
    report["rollout_start_s"] = time.perf_counter() - start
    print(f"replicas up in {report['rollout_start_s']:.1f} s", flush=True)
    try:
        for backend in backends:
            run = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"weight_sync": backend})})
            before = replica_loads(rollout)
            start = time.perf_counter()
            trainer = GRPOTrainer(run, str(policy_path), rollout)  # includes the first sync
            first = time.perf_counter() - start
            print(f"{backend}: trainer up with its first sync in {first:.1f} s", flush=True)
            seconds, stored = [], []
            try:
                if "weights_mb" not in report:
                    state = ray.get(trainer.learner.publish_weights(), timeout=300)
                    report["weights_mb"] = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
                    del state
                    print(f"weights: {report['weights_mb']:.1f} MB", flush=True)
                for _ in range(args.syncs):
                    start = time.perf_counter()
                    trainer.sync_weights()
                    seconds.append(time.perf_counter() - start)
                    # the store's copy, made on rank 0 after the sync returned (off the sync's path)
                    wait_for_current_copy(rollout.weights, timeout_s=600)
                    stored.append(time.perf_counter() - start)
                    # a run cut short (a time limit) keeps every sync it timed; the medians come at the end
                    report["backends"][backend] = {"syncs_s": seconds, "store_copy_ready_s": stored,
                                                   "trainer_start_with_first_sync_s": first}
                    out.write_text(json.dumps(report, indent=2))
                    print(f"{backend}: sync {seconds[-1]:.3f} s, the store's copy ready {stored[-1]:.3f} s after "
                          f"it began", flush=True)
                resolved = getattr(trainer.weight_sync, "resolved", backend)
            finally:
                trainer.shutdown()
            after = replica_loads(rollout)
            loads = {k: sum(a[k] - before.get(r, {}).get(k, 0) for r, a in after.items()) for k in BACKENDS}
            median = statistics.median(seconds)
            report["backends"][backend].update({
                "resolved": resolved, "sync_median_s": median, "sync_min_s": min(seconds),
                "sync_max_s": max(seconds), "store_copy_ready_median_s": statistics.median(stored),
                "weights_GB_per_s": report["weights_mb"] / 1024 / median, "replica_loads": loads})
            print(f"{backend:>12}: {args.replicas} replicas, sync median {median:.3f} s "
                  f"(min {min(seconds):.3f}, max {max(seconds):.3f}, {args.syncs} syncs), "
                  f"{report['weights_mb'] / 1024 / median:.2f} GB/s; the store's copy ready "
                  f"{statistics.median(stored):.3f} s after the sync began; replicas loaded by {loads}"
                  f"{f' ({resolved})' if backend == 'auto' else ''}; trainer start with the first sync {first:.1f} s",
                  flush=True)
    finally:
        rollout.shutdown()
    out.write_text(json.dumps(report, indent=2))
    print(f"figures: {out}", flush=True)


def replica_loads(rollout) -> dict[str, dict[str, int]]:
    """How each replica got its weights so far, by replica id."""
    stats = rollout.handle.broadcast("stats").results(timeout_s=60)
    return {s["replica"]: s["weight_loads"] for s in stats}


if __name__ == "__main__":
    main()
