"""Where a policy closes its gripper, per init state: greedy, and the spread over a group of
sampled rollouts (the diagnosis behind docs/demo.md "Shifts that move the labels"); then, per task,
how far the greedy close point follows the target block: the least-squares slope of the close point
on the block's initial position (1 = the grasp follows the block, 0 = one fixed grasp point), both
spreads (docs/demo.md, session 17), and the close point's offset from the block (mean and std: how
finely the policy localises it; session 21).

usage: python scripts/grasp_spread.py CONFIG POLICY_FOLDER [--states N] [--samples N] [--split train|eval]
                                      [TASK ...] [key=value ...]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.config_loading import load_config  # noqa: E402
from env_workers.factory import make_env  # noqa: E402
from env_workers.tabletop.tasks import get_task  # noqa: E402
from policy.action_tokenizer import postprocess_gripper  # noqa: E402
from policy.checkpoint import load_policy  # noqa: E402


def close_point(env, policy, task: str, state: int, greedy: bool, temperature: float, gen) -> tuple[np.ndarray | None, bool]:
    """(gripper position when it first closes, or None; success) of one episode, stepping one action at a time."""
    obs = env.reset(task, state)
    closed_at = None
    while True:
        chunk = policy.act([obs], temperature=temperature, greedy=greedy, generator=gen)[0]
        for action in postprocess_gripper(chunk.actions):
            result = env.step(action)
            if closed_at is None and action[6] > 0:
                closed_at = env.sim.ee_pos.copy()
            if result.done:
                return closed_at, result.success
        obs = result.observation


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 2:
        sys.exit(__doc__)
    config, folder, rest = args[0], args[1], args[2:]
    opts, tasks, overrides = {"--states": 4, "--samples": 8, "--split": "train"}, [], []
    it = iter(rest)
    for a in it:
        if a in opts:
            opts[a] = next(it) if a == "--split" else int(next(it))
        elif "=" in a:
            overrides.append(a)
        else:
            tasks.append(a)
    cfg = load_config(config, overrides)
    policy = load_policy(folder, unnorm_key=cfg.env.suite, policy=cfg.policy)
    env = make_env(cfg.env)
    gen = torch.Generator()
    gen.manual_seed(cfg.seed)
    for task in tasks or ["green_in_bowl", "stack_red_on_green", "push_red_to_yellow"]:
        spec = get_task(task)
        block = spec.goal[0][1]  # the block the task grasps first
        blocks, closes = [], []
        for state in env.init_states(task, opts["--split"])[: opts["--states"]]:
            block_xy = np.array(spec.layout.sample(state)[block][:2])  # where reset() puts it, without a reset
            greedy, greedy_ok = close_point(env, policy, task, state, True, 1.0, gen)
            runs = [close_point(env, policy, task, state, False, cfg.rollout.temperature, gen) for _ in range(opts["--samples"])]
            points = np.array([p for p, _ in runs if p is not None])
            spread = np.round(points.std(0) * 1000, 1) if len(points) else None
            sampled = f"; T={cfg.rollout.temperature}: {sum(ok for _, ok in runs)}/{len(runs)} succeed, close-point std x/y/z {spread} mm" if runs else ""
            print(f"{task} state {state}: {block} at {np.round(block_xy, 3)}, greedy closes at "
                  f"{None if greedy is None else np.round(greedy, 3)} (success {greedy_ok}){sampled}", flush=True)
            if greedy is not None:
                blocks.append(block_xy)
                closes.append(greedy[:2])
        if len(blocks) >= 3:
            b, c = np.array(blocks), np.array(closes)
            slopes = [np.polyfit(b[:, d], c[:, d], 1)[0] for d in range(2)]
            offset = c - b  # where it closes relative to the block: how finely the policy localises it
            print(f"{task}: greedy close point on {block}'s position over {len(b)} states: slope x {slopes[0]:.2f}, "
                  f"y {slopes[1]:.2f}; std x/y close point {np.round(c.std(0) * 1000, 1)} mm, block {np.round(b.std(0) * 1000, 1)} mm; "
                  f"close point - block: mean x/y {np.round(offset.mean(0) * 1000, 1)} mm, std {np.round(offset.std(0) * 1000, 1)} mm",
                  flush=True)


if __name__ == "__main__":
    main()
