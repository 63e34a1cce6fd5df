"""Rollout throughput: our slot-freeing rollout vs a lock-step rollout, same envs and policy, one run.

    python scripts/bench_rollout.py [configs/demo.yaml] [--rounds N] [key=value ...]

Prints env steps/s, mean inference batch size, the machine's CPU time per env step (all
processes; run it alone) and the GPU's utilisation for both modes and their ratio; writes
run_dir/bench_rollout.json. The policy is `policy.path` if set (e.g. runs/demo/rl_policy), else a
random one of the configured size. Each mode runs `--rounds` rounds of one episode per env slot.

The modes (scripts/bench_gpu.py runs them too, with the sim-only ceiling):
  ours      the real pipeline (deploy/runtime.py `Rollout`, actors/env_pool.py): a slot takes its
            next episode as soon as its own ends; each worker's waiting envs go to the policy
            service in one request, and the service batches the requests of all workers.
  lockstep  SimpleVLA-RL's loop, driven from here over SimWorkers (env_workers/sim_worker.py, the
            same envs): all envs reset together, then per step one batched forward over every env
            (finished ones included, up to the longest step limit) and every unfinished env applies
            its chunk; sim and inference never overlap.
  sim       the same workers stepping random action chunks with no policy: the simulation ceiling.
A random policy never succeeds, so every episode runs to the step limit and lock-step wastes
nothing on finished envs; the gap in our favour grows with the spread of episode lengths."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Callable

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.env_pool import Episode  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.config_loading import load_config  # noqa: E402
from deploy.runtime import Rollout, init_ray  # noqa: E402
from env_workers.sim_worker import kill_workers, spawn_sim_workers  # noqa: E402
from policy.checkpoint import build_policy, save_policy  # noqa: E402
from scripts.phase_meter import PhaseMeter  # noqa: E402

ROUNDS = 8  # rounds of one episode per env slot, per mode
WARMUP_SECONDS = 5.0  # random stepping before it (first resets: JIT compiles, GL contexts)
TIMEOUT_S = 3600.0  # a whole phase
POLICY_TIMEOUT_S = 120.0  # one lock-step forward


def slot_requests(task_info: dict, n: int) -> list[tuple[str, int]]:
    """(task, init state) of each of n env slots: slot i runs task i mod T at that task's
    (i div T)-th train state, cycling through the states when the slots outnumber them."""
    tasks = sorted(task_info)
    out = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        states = task_info[task]["train"]
        out.append((task, states[(i // len(tasks)) % len(states)]))
    return out


def shards(requests: list, per: int) -> list[list]:
    return [requests[i:i + per] for i in range(0, len(requests), per)]


def replica_stats(handle) -> dict:
    """Observations served and forward passes, summed over every replica."""
    stats = handle.broadcast("stats").results(timeout_s=60)
    return {k: sum(s[k] for s in stats) for k in ("served", "batches")}


def mean_batch(before: dict, after: dict) -> float:
    return (after["served"] - before["served"]) / max(after["batches"] - before["batches"], 1)


def sim_clocks(workers: list) -> list[dict]:
    return ray.get([w.sim_seconds.remote() for w in workers], timeout=60)


class RolloutMeter(PhaseMeter):
    """A PhaseMeter that also reads the workers' sim-thread clocks before the phase, so that its
    figures carry sim_thread_figures."""

    def __init__(self, workers: list):
        self.workers = workers

    def __enter__(self) -> "RolloutMeter":
        self.clocks = sim_clocks(self.workers)
        return super().__enter__()

    def figures(self, env_steps: int) -> dict:
        figures = super().figures(env_steps)
        return {**figures, **sim_thread_figures(self.workers, self.clocks, figures)}


def sim_thread_figures(workers: list, before: list[dict], figures: dict) -> dict:
    """What the workers' sim threads did over the timed part: wall ms inside env calls per env step
    (against the sim phase's: waiting for a core or for the GPU), the share of the wall time they
    were busy (below the sim phase's: waiting for actions), that share per worker, and the renders'
    ms per env step (LIBERO)."""
    after = sim_clocks(workers)
    per_worker = [a["busy"] - b["busy"] for a, b in zip(after, before)]
    steps, busy = max(figures["env_steps"], 1), sum(per_worker)
    render = None if any(a["render"] is None for a in after) else sum(a["render"] - b["render"] for a, b in zip(after, before))
    return {"sim_thread_ms_per_env_step": 1000 * busy / steps, "sim_thread_busy_fraction": busy / (figures["seconds"] * len(workers)),
            # a round ends with its slowest worker: the spread shows how long the others wait for it
            "sim_thread_busy_by_worker": [w / figures["seconds"] for w in per_worker],
            "render_ms_per_env_step": None if render is None else 1000 * render / steps}


def measure_ours(rollout: Rollout, cfg: RunConfig, requests: list, rounds: int) -> dict:
    def episodes(pairs):
        return [Episode(t, s, cfg.rollout.temperature, False) for t, s in pairs]

    # warm-up: one episode per slot, so that every env has built its task's scene (LIBERO: a whole robosuite
    # env, seconds) before the timed rounds, as the sim and lock-step phases' envs have
    rollout.pool.run_all(episodes(requests), TIMEOUT_S)
    before = replica_stats(rollout.handle)
    with RolloutMeter(rollout.pool.workers) as meter:
        done = rollout.pool.run_all(episodes(requests * rounds), TIMEOUT_S)
    after = replica_stats(rollout.handle)
    return {**meter.figures(sum(d.meta.env_steps for d in done)), "episodes": len(done),
            "mean_inference_batch": mean_batch(before, after)}


def lockstep_round(handle, workers: list, parts: list[list], cfg: RunConfig, steps: int | None = None) -> dict:
    """One lock-step round: worker w's envs run parts[w]; queries continue up to the longest step
    limit (or `steps`) for every env, finished or not, as SimpleVLA-RL's loop does."""
    obs = ray.get([w.reset.remote(p) for w, p in zip(workers, parts)], timeout=TIMEOUT_S)
    done = [[False] * len(p) for p in parts]
    limit = steps or max(cfg.env.step_limit(t) for p in parts for t, _ in p)
    offered = useful = queries = 0
    while offered < limit:
        flat = [o for per in obs for o in per]
        chunks = iter(handle.act_many.remote(flat, cfg.rollout.temperature, False).result(timeout_s=POLICY_TIMEOUT_S))
        queries += len(flat)
        offered += cfg.policy.action_chunk
        moves = [[None if d else c.actions for d, c in zip(dw, itertools.islice(chunks, len(dw)))] for dw in done]
        results = ray.get([w.step.remote(m) for w, m in zip(workers, moves)], timeout=TIMEOUT_S)
        for j, per in enumerate(results):
            for k, r in enumerate(per):
                if r is not None:
                    useful += r.steps
                    obs[j][k], done[j][k] = r.observation, r.done
    return {"env_steps": useful, "queries": queries}


def measure_lockstep(handle, workers: list, cfg: RunConfig, requests: list, rounds: int) -> dict:
    parts = shards(requests, cfg.cluster.envs_per_worker)
    lockstep_round(handle, workers, parts, cfg, steps=cfg.policy.action_chunk)  # warm-up: one step at full batch
    before = replica_stats(handle)
    with RolloutMeter(workers) as meter:
        out = [lockstep_round(handle, workers, parts, cfg) for _ in range(rounds)]
    after = replica_stats(handle)
    return {**meter.figures(sum(o["env_steps"] for o in out)), "queries": sum(o["queries"] for o in out),
            "mean_inference_batch": mean_batch(before, after)}


def measure_sim(workers: list, cfg: RunConfig, requests: list, rounds: int, warmup_s: float) -> dict:
    """The same episodes as ours and lockstep (`rounds` per env slot, from reset to the step limit),
    with random actions: a window of stepping would leave out the resets when it is shorter than an
    episode (a LIBERO reset and its settle steps cost the sim thread about a second)."""
    parts, chunk = shards(requests, cfg.cluster.envs_per_worker), cfg.policy.action_chunk
    # warm-up: every env builds its task's scene (LIBERO: seconds), as in the other phases
    ray.get([w.run_random.remote(p, chunk, seconds=warmup_s) for w, p in zip(workers, parts)], timeout=TIMEOUT_S)
    with RolloutMeter(workers) as meter:
        out = ray.get([w.run_random.remote(p, chunk, episodes=rounds) for w, p in zip(workers, parts)], timeout=TIMEOUT_S)
    return {**meter.figures(sum(o["env_steps"] for o in out)), "episodes": sum(o["episodes"] for o in out),
            "mean_inference_batch": None}


def run_phases(cfg: RunConfig, policy_dir: str | None, phases: set[str], record: Callable[[str, dict], None],
               rounds: int = ROUNDS, warmup_s: float = WARMUP_SECONDS) -> None:
    """Runs the selected phases of {'ours', 'lockstep', 'sim'} on the Ray cluster and hands each
    result to record(phase, figures). Order: ours first (its EnvWorkers), then the SimWorkers that
    take their CPUs over run sim and lockstep (lockstep against the same policy service)."""
    init_ray(cfg)
    rollout = Rollout.start(cfg, str(policy_dir)) if phases & {"ours", "lockstep"} else None
    workers: list = []
    slots = cfg.cluster.num_env_workers * cfg.cluster.envs_per_worker
    try:
        if "ours" in phases:
            record("ours", measure_ours(rollout, cfg, slot_requests(rollout.task_info, slots), rounds))
        if rollout is not None:
            rollout.pool.shutdown()  # its CPUs go to the SimWorkers
        if phases & {"sim", "lockstep"}:
            workers = spawn_sim_workers(cfg.env, cfg.cluster, cfg.seed)
            info = rollout.task_info if rollout else ray.get(workers[0].task_info.remote(), timeout=120)
            requests = slot_requests({t: v for t, v in info.items() if not cfg.env.tasks or t in cfg.env.tasks}, slots)
            if "sim" in phases:
                record("sim", measure_sim(workers, cfg, requests, rounds, warmup_s))
            if "lockstep" in phases:
                record("lockstep", measure_lockstep(rollout.handle, workers, cfg, requests, rounds))
    finally:
        kill_workers(workers)
        if rollout is not None:
            rollout.shutdown()


def random_policy_dir(cfg: RunConfig, policy=None) -> Path:
    """`policy` (else a random policy of the configured size) saved where the replicas load it from."""
    return save_policy(policy or build_policy(cfg.policy, seed=cfg.seed), Path(cfg.run_dir) / "bench" / "random_policy")


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
    results: dict = {"rounds": rounds}
    run_phases(cfg, str(cfg.policy.path or random_policy_dir(cfg)), {"ours", "lockstep"}, results.__setitem__, rounds)
    results["ratio_ours_over_lockstep"] = results["ours"]["env_steps_per_s"] / results["lockstep"]["env_steps_per_s"]
    for mode in ("ours", "lockstep"):
        r = results[mode]
        gpu = f"GPU {r['gpu_util']['mean_pct']:.0f} %  " if r["gpu_util"] else ""
        print(f"{mode:>9}: {r['env_steps_per_s']:7.1f} env steps/s  mean inference batch {r['mean_inference_batch']:5.2f}  "
              f"{gpu}CPU {r['cpu_ms_per_env_step']:.2f} ms/env step, "
              f"{100 * r['cpu_busy_fraction']:.0f} % busy  ({r['env_steps']} steps in {r['seconds']:.1f}s)")
    print(f"ratio ours / lock-step: {results['ratio_ours_over_lockstep']:.2f}x")
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.run_dir) / "bench_rollout.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
