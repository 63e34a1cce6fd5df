"""Greedy evaluation over held-out initial states: per-task table, JSON, optional MP4 videos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from actors.env_pool import Episode
from deploy.runtime import Rollout


def evaluate(rollout: Rollout, out_dir: Path, episodes_per_task: int | None, videos: int, timeout_s: float = 3600) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    episodes = []
    for task, info in sorted(rollout.task_info.items()):
        states = info["eval"][:episodes_per_task] if episodes_per_task else info["eval"]
        for i, s in enumerate(states):
            episodes.append(Episode(task, s, 1.0, greedy=True, record_video=i < videos))
    results = rollout.pool.run_all(episodes, timeout_s)
    per_task: dict[str, list[int]] = {}
    for ep, meta, _ in results:
        per_task.setdefault(ep.task, []).append(int(meta["success"]))
        if meta.get("frames") is not None:
            write_video(out_dir / "videos" / f"{ep.task}_{ep.init_state}_{'ok' if meta['success'] else 'fail'}.mp4", meta["frames"])
    report = {
        "success": float(np.mean([s for v in per_task.values() for s in v])),
        "episodes": len(results),
        "per_task": {t: {"success": float(np.mean(v)), "episodes": len(v)} for t, v in sorted(per_task.items())},
        "mean_env_steps": float(np.mean([m["env_steps"] for _, m, _ in results])),
    }
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2))
    return report


def write_video(path: Path, frames: np.ndarray, scale: int = 4, fps: int = 20) -> None:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    big = frames.repeat(scale, axis=1).repeat(scale, axis=2) if scale > 1 else frames
    imageio.mimwrite(str(path), list(big), fps=fps, macro_block_size=1)


def format_table(columns: dict[str, dict]) -> str:
    """Per-task success of several evaluations side by side (columns: label -> report)."""
    labels = list(columns)
    tasks = sorted({t for r in columns.values() for t in r["per_task"]})
    width = max([len(t) for t in tasks] + [8])
    lines = [f"{'task':<{width}}  " + "  ".join(f"{label:>10}" for label in labels)]
    for t in tasks:
        lines.append(f"{t:<{width}}  " + "  ".join(f"{100 * columns[l]['per_task'][t]['success']:9.1f}%" for l in labels))
    lines.append(f"{'average':<{width}}  " + "  ".join(f"{100 * columns[l]['success']:9.1f}%" for l in labels))
    return "\n".join(lines)
