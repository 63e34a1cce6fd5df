"""Per-step scalars to three sinks: Prometheus (ray.util.metrics, `vla_` prefix, units in names),
TensorBoard, and one console line per RL step. Also `metrics.jsonl` for plots and tests."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ray.util import metrics

# scalar key -> (prometheus name, description). Names carry units; the task label splits success.
GAUGES = {
    "rollout/env_steps_per_s": ("vla_env_steps_per_second", "env steps per second during rollout"),
    "rollout/episodes": ("vla_episodes_per_step", "episodes finished in the step"),
    "rollout/success_rate": ("vla_success_rate_ratio", "rollout success rate"),
    "rollout/filtered_group_fraction": ("vla_filtered_group_ratio", "groups dropped by dynamic sampling"),
    "rollout/queue_depth": ("vla_queue_depth_items", "finished trajectories the driver holds for later steps"),
    "rollout/policy_lag": ("vla_policy_lag_versions", "mean policy lag of the trained batch"),
    "rollout/stale_groups": ("vla_stale_groups", "groups dropped for exceeding max_policy_lag"),
    "rollout/episodes_rerun": ("vla_episodes_rerun", "episodes re-run after an env worker failure"),
    "train/loss": ("vla_loss", "GRPO loss"),
    "train/clip_fraction": ("vla_clip_fraction_ratio", "fraction of clipped action tokens"),
    "train/entropy": ("vla_entropy_nats", "entropy of the action-token distribution"),
    "train/grad_norm": ("vla_grad_norm", "gradient norm before clipping"),
    "train/approx_kl": ("vla_approx_kl", "approximate KL(old || new)"),
    "train/lr": ("vla_learning_rate", "learner learning rate of the step (learner.lr_schedule)"),
    "time/rollout_s": ("vla_rollout_seconds", "seconds of the step's rollout phase"),
    "time/advantages_s": ("vla_advantages_seconds", "seconds of the step's advantage phase"),
    "time/train_s": ("vla_train_seconds", "seconds of the step's update phase (learner)"),
    "time/weight_sync_s": ("vla_weight_sync_seconds", "seconds of the step's weight-sync phase"),
    "time/validation_s": ("vla_validation_seconds", "seconds of the step's validation (eval.validate_every)"),
    "train/demo_bc_loss": ("vla_demo_bc_loss", "behaviour-cloning loss on the SFT demos (learner.loss_terms.demo_bc)"),
    "eval/success_rate": ("vla_eval_success_rate_ratio", "greedy success on held-out initial states"),
    "eval/validation_success": ("vla_validation_success_ratio", "greedy success on the validation (train) states"),
    "eval/best_step": ("vla_best_validated_step", "RL step of the best validated policy so far"),
    "policy/version": ("vla_policy_version", "weight version served"),
}


class RunLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True, console: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.console = console
        self.gauges = {k: metrics.Gauge(n, d) for k, (n, d) in GAUGES.items()}
        self.task_success = metrics.Gauge("vla_task_success_rate_ratio", "rollout success rate per task", tag_keys=("task",))
        self.env_steps = metrics.Counter("vla_env_steps_total", "env steps taken by rollout")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self.start = time.monotonic()

    def log_scalars(self, step: int, scalars: dict) -> None:
        """Gauges, TensorBoard and metrics.jsonl, without a console line (evaluations)."""
        for key, value in scalars.items():
            if key in self.gauges:
                self.gauges[key].set(float(value))
            if self.writer is not None:
                self.writer.add_scalar(key, float(value), step)
        self.jsonl.write(json.dumps({"step": step, "wall_s": time.monotonic() - self.start, **scalars}) + "\n")
        self.jsonl.flush()

    def log(self, step: int, scalars: dict, per_task: dict | None = None, env_steps: int = 0) -> None:
        self.log_scalars(step, scalars)
        for task, rate in (per_task or {}).items():
            self.task_success.set(float(rate), tags={"task": task})
            if self.writer is not None:
                self.writer.add_scalar(f"rollout_task/{task}", float(rate), step)
        if env_steps:
            self.env_steps.inc(env_steps)
        if self.console:
            g = scalars.get
            print(
                f"[step {step:4d} | {time.monotonic() - self.start:6.0f}s] "
                f"success {g('rollout/success_rate', 0):.2f}  kept {1 - g('rollout/filtered_group_fraction', 0):.2f}  "
                f"loss {g('train/loss', 0):+.4f}  clip {g('train/clip_fraction', 0):.3f}  "
                f"entropy {g('train/entropy', 0):.2f}  steps/s {g('rollout/env_steps_per_s', 0):.0f}  "
                f"lag {g('rollout/policy_lag', 0):.1f}  sync {g('time/weight_sync_s', 0):.2f}s"
                + (f"  validation {g('eval/validation_success'):.3f} (best: step {g('eval/best_step'):.0f})"
                   if "eval/validation_success" in scalars else ""),
                flush=True,
            )

    def close(self) -> None:
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
