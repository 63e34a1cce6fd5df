"""Greedy evaluation: per-task table, JSON, optional MP4 videos.

Which initial states: the eval split (`env.init_states`), except on LIBERO, where the published
protocol (OpenVLA, SimpleVLA-RL) runs every one of the 50 fixed initial states of every task, i.e.
500 episodes per 10-task suite. Under the default disjoint split some of those are RL training
states, so the report names them and gives the success on held-out states separately.
Step limit: `env.eval_max_steps`, or the suite's OpenVLA limit on LIBERO (`eval_config`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from actors.env_pool import Episode
from common.config import EnvConfig, RunConfig
from deploy.runtime import Rollout


def eval_max_steps(env_cfg: EnvConfig) -> int:
    if env_cfg.eval_max_steps is not None:
        return env_cfg.eval_max_steps
    if env_cfg.backend == "libero":
        from env_workers.libero.suites import max_steps

        return max_steps(env_cfg.suite, "eval")
    return env_cfg.max_steps


def eval_config(cfg: RunConfig) -> RunConfig:
    """The run config of `vla-grpo eval`: envs stop at the evaluation step limit. Per-task limits
    stay unless an evaluation limit is given (`env.eval_max_steps`, or LIBERO's protocol)."""
    env = cfg.env
    update = {"max_steps": eval_max_steps(env)}
    if env.eval_max_steps is not None or env.backend == "libero":
        update["task_max_steps"] = {}
    return cfg.model_copy(update={"env": env.model_copy(update=update)})


def eval_states(env_cfg: EnvConfig, info: dict) -> list[int]:
    """Held-out states first (so `episodes_per_task` and videos prefer them), then the rest."""
    if env_cfg.backend != "libero":
        return list(info["eval"])
    from env_workers.libero.suites import NUM_INIT_STATES

    train = set(info["train"])
    heldout = [s for s in info["eval"] if s not in train]
    return heldout + sorted(set(range(NUM_INIT_STATES)) - set(heldout))


def evaluate(rollout: Rollout, out_dir: Path, episodes_per_task: int | None, videos: int, timeout_s: float = 3600) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env_cfg: EnvConfig = rollout.pool.env_cfg
    episodes = []
    for task, info in sorted(rollout.task_info.items()):
        states = eval_states(env_cfg, info)
        for i, s in enumerate(states[:episodes_per_task] if episodes_per_task else states):
            episodes.append(Episode(task, s, 1.0, greedy=True, record_video=i < videos))
    results = rollout.pool.run_all(episodes, timeout_s)
    per_task: dict[str, dict[int, int]] = {}
    for meta in sorted((r.meta for r in results), key=lambda m: (m.task, m.init_state)):
        per_task.setdefault(meta.task, {})[meta.init_state] = int(meta.success)
        if meta.frames is not None:
            write_video(out_dir / "videos" / f"{meta.task}_{meta.init_state}_{'ok' if meta.success else 'fail'}.mp4", meta.frames)
    train = {t: set(rollout.task_info[t]["train"]) for t in per_task}
    report = {
        "success": float(np.mean([s for v in per_task.values() for s in v.values()])),
        "episodes": len(results),
        "per_task": {t: _task_entry(v, train[t]) for t, v in sorted(per_task.items())},
        "mean_env_steps": float(np.mean([r.meta.env_steps for r in results])),
        "max_steps": env_cfg.max_steps,
        "task_max_steps": dict(env_cfg.task_max_steps),
        "init_states": _split_entry(env_cfg, per_task, train),
    }
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    return report


def _task_entry(outcomes: dict[int, int], train: set[int]) -> dict:
    held = [v for s, v in outcomes.items() if s not in train]
    seen = [v for s, v in outcomes.items() if s in train]
    return {"success": float(np.mean(list(outcomes.values()))), "episodes": len(outcomes),
            "success_heldout": float(np.mean(held)) if held else None, "heldout_episodes": len(held),
            "success_train_states": float(np.mean(seen)) if seen else None,
            "train_states_evaluated": sorted(s for s in outcomes if s in train)}


def _split_entry(env_cfg: EnvConfig, per_task: dict[str, dict[int, int]], train: dict[str, set[int]]) -> dict:
    s = env_cfg.init_states
    held = [v for t, o in per_task.items() for st, v in o.items() if st not in train[t]]
    seen = [v for t, o in per_task.items() for st, v in o.items() if st in train[t]]
    if not seen:
        note = "none of the evaluated initial states was an RL training state"
    elif not held:
        note = "every evaluated initial state was an RL training state (the paper's setting)"
    else:
        note = (f"{len(seen)} of {len(seen) + len(held)} episodes started from RL training states; "
                "success_heldout counts only the others")
    protocol = ("every fixed initial state of every task (OpenVLA / SimpleVLA-RL protocol)"
                if env_cfg.backend == "libero" else "the eval split of env.init_states")
    return {"split": s.split, "num_train": s.num_train, "num_eval": s.num_eval, "protocol": protocol, "note": note,
            "success_heldout": float(np.mean(held)) if held else None, "heldout_episodes": len(held),
            "success_train_states": float(np.mean(seen)) if seen else None, "train_state_episodes": len(seen)}


def write_video(path: Path, frames: np.ndarray, scale: int | None = None, fps: int = 20) -> None:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    scale = scale or max(1, 256 // frames.shape[1])  # small renders are upscaled to about 256 px
    big = frames.repeat(scale, axis=1).repeat(scale, axis=2) if scale > 1 else frames
    imageio.mimwrite(str(path), list(big), fps=fps, macro_block_size=1)


def format_table(columns: dict[str, dict]) -> str:
    """Per-task success of several evaluations side by side (columns: label -> report)."""
    labels = list(columns)
    tasks = sorted({t for r in columns.values() for t in r["per_task"]})
    width = max([len(t) for t in tasks] + [8])
    lines = [f"{'task':<{width}}  " + "  ".join(f"{label:>10}" for label in labels)]
    for t in tasks:
        lines.append(f"{t:<{width}}  " + "  ".join(_pct(columns[l]["per_task"][t]["success"]) for l in labels))
    lines.append(f"{'average':<{width}}  " + "  ".join(_pct(columns[l]["success"]) for l in labels))
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """One evaluation: all states, plus held-out and training-state columns when they overlap."""
    split = report.get("init_states")
    if not split or not split["train_state_episodes"] or not split["heldout_episodes"]:
        table = format_table({"success": report})
    else:
        def view(key: str) -> dict:
            return {"success": split[key], "per_task": {t: {"success": v[key]} for t, v in report["per_task"].items()}}

        table = format_table({"all": report, "held-out": view("success_heldout"), "train-st.": view("success_train_states")})
    if split:
        table += f"\ninit states: {split['split']} split ({split['protocol']}); {split['note']}"
    return table


def _pct(x: float | None) -> str:
    return f"{'-':>10}" if x is None else f"{100 * x:9.1f}%"
