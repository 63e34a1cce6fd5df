"""How many steps a policy's successful episodes take, per task: what a step limit can be cut to.

    python scripts/success_lengths.py POLICY [--sampled] [--states N] [--out FILE] [CONFIG] [key=value ...]

Runs one episode per init state in this process (no Ray): greedy on the first N held-out states of
every task, or with `--sampled` at `rollout.temperature` on the first N train states (what GRPO
rollouts see). Prints per task the success rate and the 50th/90th percentile and maximum length of
the successes against the task's step limit, and writes them as JSON (default:
run_dir/success_lengths_{greedy,sampled}.json).
Failures always run to the limit, so a limit far above the longest success only makes failed
rollouts cost more env steps, inference and learner chunks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.config_loading import load_config  # noqa: E402
from env_workers.factory import make_env  # noqa: E402
from env_workers.worker import to_env_actions  # noqa: E402
from policy.checkpoint import load_policy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("policy")
    ap.add_argument("--sampled", action="store_true", help="sample at rollout.temperature on train states")
    ap.add_argument("--states", type=int, default=30, help="init states per task")
    ap.add_argument("--out", default=None)
    ap.add_argument("rest", nargs="*", help="[CONFIG.yaml] [key=value ...]")
    args = ap.parse_intermixed_args()  # the config and overrides may follow the options
    rest = list(args.rest)
    config = rest.pop(0) if rest and rest[0].endswith(".yaml") else "configs/demo.yaml"
    cfg = load_config(config, rest)
    env = make_env(cfg.env)
    policy = load_policy(args.policy, unnorm_key=cfg.policy.unnorm_key, policy=cfg.policy)
    generator = torch.Generator().manual_seed(cfg.seed)
    split = "train" if args.sampled else "eval"
    report = {"policy": args.policy, "mode": "sampled" if args.sampled else "greedy", "split": split, "tasks": {}}
    for task in env.task_names:
        outcomes = []
        for state in env.init_states(task, split)[: args.states]:
            obs, done, steps = env.reset(task, state), False, 0
            while not done:
                chunk = policy.act([obs], temperature=cfg.rollout.temperature, greedy=not args.sampled, generator=generator)[0]
                result = env.step_chunk(to_env_actions(cfg.env.backend, chunk.actions))
                obs, done, steps = result.observation, result.done, steps + result.steps
            outcomes.append((bool(result.success), steps))
        lengths = [s for ok, s in outcomes if ok]
        row = {"success": float(np.mean([ok for ok, _ in outcomes])), "episodes": len(outcomes), "step_limit": cfg.env.step_limit(task),
               "success_lengths": lengths}
        report["tasks"][task] = row
        pct = (f"p50 {np.percentile(lengths, 50):3.0f}  p90 {np.percentile(lengths, 90):3.0f}  max {max(lengths):3d}"
               if lengths else "no successes")
        print(f"{task:24s} success {100 * row['success']:5.1f} %  success lengths {pct}  limit {row['step_limit']}", flush=True)
    env.close()
    out = Path(args.out) if args.out else Path(cfg.run_dir) / f"success_lengths_{report['mode']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
