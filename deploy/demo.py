"""`make demo`: the whole SFT -> RL story on a laptop, on the built-in tabletop suite.

expert demos (1 per task) -> SFT -> greedy eval on held-out initial states -> GRPO through the
full actor-learner pipeline -> greedy eval again -> runs/demo/report.json, a success-vs-step
plot, MP4 rollouts, and a before/after table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common.config import RunConfig
from common.config_loading import dump_config
from deploy.evaluate import evaluate, format_table
from deploy.runtime import Rollout, init_ray
from deploy.sft import run_sft
from deploy.telemetry import RunLogger
from deploy.train import GRPOTrainer


def run_demo(cfg: RunConfig) -> dict:
    start = time.monotonic()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    init_ray(cfg)
    say = lambda msg: print(f"[demo {time.monotonic() - start:5.0f}s] {msg}", flush=True)  # noqa: E731

    sft_folder = run_dir / "sft_policy"
    if not (sft_folder / "config.json").is_file():
        run_sft(cfg, sft_folder, log=say)
    say(f"SFT policy in {sft_folder}")

    rollout = Rollout.start(cfg, str(sft_folder))
    try:
        say("greedy eval of the SFT policy on held-out initial states")
        eval_start = time.monotonic()
        sft_report = evaluate(rollout, run_dir / "eval_sft", cfg.eval.episodes_per_task, cfg.eval.videos)
        eval_seconds = time.monotonic() - eval_start
        say(f"SFT success {100 * sft_report['success']:.1f}%")

        deadline = None
        if cfg.wall_budget_minutes is not None:
            # the final evaluation takes as long as the first; margin for saving the policy and report
            deadline = start + 60 * cfg.wall_budget_minutes - 1.2 * eval_seconds - 30
            say(f"GRPO: up to {cfg.total_steps} steps, ending by {deadline - start:.0f}s "
                f"(wall_budget_minutes={cfg.wall_budget_minutes:g})")
        logger = RunLogger(run_dir, cfg.logging.tensorboard, cfg.logging.console)
        logger.log_scalars(0, {"eval/success_rate": sft_report["success"]})  # Prometheus, TensorBoard, metrics.jsonl
        trainer = GRPOTrainer(cfg, str(sft_folder), rollout, logger)
        try:
            ended_by = trainer.run(run_dir / "rl_policy", deadline)
        finally:
            trainer.shutdown()

        say("greedy eval of the RL policy on held-out initial states")
        rl_report = evaluate(rollout, run_dir / "eval_rl", cfg.eval.episodes_per_task, cfg.eval.videos)
        logger.log_scalars(trainer.step, {"eval/success_rate": rl_report["success"]})
        logger.close()
    finally:
        rollout.shutdown()

    wall = time.monotonic() - start
    report = {
        "sft_success": sft_report["success"],
        "rl_success": rl_report["success"],
        "per_task": {t: {"sft": sft_report["per_task"][t]["success"], "rl": rl_report["per_task"][t]["success"]}
                     for t in sft_report["per_task"]},
        "eval_episodes": rl_report["episodes"],
        "rl_steps": trainer.step,
        "rl_ended_by": ended_by,
        "wall_seconds": wall,
        "history": trainer.history,
    }
    if trainer.selector is not None:  # eval.validate_every: which step's policy rl_success measures
        report["selection"] = trainer.selector.summary()
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    plot_history(trainer.history, sft_report["success"], rl_report["success"], run_dir / "success_vs_step.png",
                 cfg.rollout.temperature)
    print("\n" + format_table({"SFT": sft_report, "SFT+RL": rl_report}))
    print(f"\nwall time {wall / 60:.1f} min; report: {run_dir / 'report.json'}", flush=True)
    return report


def plot_history(history: list[dict], sft_eval: float, rl_eval: float, path: Path, temperature: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [h["rollout/success_rate"] for h in history], marker="o", label=f"rollout success (T={temperature}, train states)")
    ax.scatter([0, steps[-1] if steps else 0], [sft_eval, rl_eval], color="red", zorder=3, label="greedy eval (held-out states)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

