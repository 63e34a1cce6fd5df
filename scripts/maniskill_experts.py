"""Success of the ManiSkill motion-planner experts in our control mode, per task, on held-out states.

    python scripts/maniskill_experts.py [--episodes N] [--skip K] [--tasks T ...] [--out FILE] [CONFIG] [key=value ...]

Runs ManiSkill's mplib solution for every task that has one (env_workers/maniskill/planner.py),
follows its waypoints with end-effector delta actions in our env (env_workers/maniskill/experts.py)
on N eval init states after the first K (the follower's gains were tuned on the first 20), within
the config's step limits, without rendering. A seed the planner finds no path for counts as a
failure. Prints a table (also the planner's own success in joint control) and writes JSON (default:
run_dir/maniskill_experts.json). EXPERT_TASKS should hold the tasks at >= 90 %.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from common.config_loading import load_config  # noqa: E402
from env_workers.factory import make_env  # noqa: E402
from env_workers.maniskill.experts import EXPERT_TASKS, PlannerExpert, run_expert  # noqa: E402
from env_workers.maniskill.planner import solution  # noqa: E402


def has_solution(task: str) -> bool:
    try:
        solution(task)
    except ValueError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=20, help="eval init states per task")
    ap.add_argument("--skip", type=int, default=0, help="eval init states to leave out first (e.g. those used for tuning)")
    ap.add_argument("--tasks", nargs="*", default=None, help="default: every task of the suite with a planner")
    ap.add_argument("--out", default=None)
    ap.add_argument("rest", nargs="*", help="[CONFIG.yaml] [key=value ...]")
    args = ap.parse_intermixed_args()
    rest = list(args.rest)
    config = rest.pop(0) if rest and rest[0].endswith(".yaml") else "configs/maniskill.yaml"
    cfg = load_config(config, rest)
    env = make_env(cfg.env)
    expert = PlannerExpert(env)
    tasks = args.tasks or [t for t in env.task_names if has_solution(t)]
    report = {"config": config, "episodes": args.episodes, "skip": args.skip, "split": "eval", "tasks": {}}
    print(f"{'task':22s} {'expert':>7s} {'planner':>8s} {'steps p50/max':>14s} {'limit':>6s} {'in registry':>12s} {'s':>6s}")
    try:
        for task in tasks:
            start = time.monotonic()
            states = env.init_states(task, "eval")[args.skip: args.skip + args.episodes]
            runs = [run_expert(env, expert, task, s) for s in states]
            steps = [r["steps"] for r in runs if r["success"]]
            row = {"success": float(np.mean([r["success"] for r in runs])),
                   "planner_success": float(np.mean([r["planner_success"] for r in runs])),
                   "episodes": len(runs), "init_states": [states[0], states[-1]], "step_limit": cfg.env.step_limit(task),
                   "steps_p50": float(np.median(steps)) if steps else None, "steps_max": max(steps) if steps else None,
                   "in_registry": task in EXPERT_TASKS, "seconds": time.monotonic() - start}
            report["tasks"][task] = row
            lengths = f"{row['steps_p50']:.0f}/{row['steps_max']}" if steps else "-"
            print(f"{task:22s} {row['success']:7.0%} {row['planner_success']:8.0%} {lengths:>14s} {row['step_limit']:6d} "
                  f"{'yes' if row['in_registry'] else 'no':>12s} {row['seconds']:6.0f}", flush=True)
    finally:
        expert.close()
        env.close()
    out = Path(args.out or Path(cfg.run_dir) / "maniskill_experts.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
