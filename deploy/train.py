"""`vla-grpo train CONFIG`: the GRPO loop. Each step reads like the paper:
roll out groups -> dynamic sampling -> group advantages -> clipped policy update -> sync weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import ray
import torch

from actors.coordinator import Group
from common.config import RunConfig
from deploy.runtime import Rollout
from deploy.telemetry import RunLogger
from deploy.validation import PolicySelector
from learner.checkpoints import CheckpointManager, load_trajectories, save_trajectories
from learner.grpo import group_advantages
from learner.group import LearnerGroup
from learner.lr_schedule import run_progress, scheduled_lr
from services.policy_service import broadcast_weights


def flatten(batch: list[Group]) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    items = [it for g in batch for it in g.items]
    refs = [it["ref"][0] for it in items]
    rewards = np.array([float(it["success"]) for it in items], dtype=np.float32)
    group_ids = np.repeat(np.arange(len(batch)), [len(g.items) for g in batch])
    versions = np.array([it["policy_version"] for it in items])
    return refs, rewards, group_ids, versions


class GRPOTrainer:
    def __init__(self, cfg: RunConfig, policy_path: str, rollout: Rollout, logger: RunLogger | None = None):
        self.cfg = cfg
        self.rollout = rollout
        self.coordinator = rollout.coordinator(cfg)
        self.learner = LearnerGroup(cfg)
        self.learner.setup(policy_path, "grpo", cfg.seed, self._demos_for_bc(), self._rehearsal())
        self.owns_logger = logger is None  # a caller's logger outlives the trainer (the demo's evaluations)
        self.logger = logger or RunLogger(cfg.run_dir, cfg.logging.tensorboard, cfg.logging.console)
        self.ckpt = CheckpointManager(Path(cfg.run_dir) / "checkpoints", cfg.checkpoint.keep)
        self.rng = np.random.default_rng(cfg.seed)
        self.step, self.version = 0, 0
        self.window: tuple[float, float] | None = None  # (start, deadline) of run(), time.monotonic()
        self.history: list[dict] = []
        self.selector = (PolicySelector(cfg, rollout.task_info, Path(cfg.run_dir) / "validated_policy")
                         if cfg.eval.validate_every else None)
        self.served_version = None  # the version the replicas hold
        # the replicas may serve other weights (a Rollout reused from an earlier run): start them
        # on this learner's, as version 0, so every trajectory's version and lag are this run's
        if not (cfg.checkpoint.resume and self.resume()):
            self.sync_weights()

    def _demos_for_bc(self):
        """learner.demo_bc_coef: the run's SFT demonstrations as samples, else None."""
        if self.cfg.learner.demo_bc_coef == 0:
            return None
        from deploy.sft import demo_samples, load_demos

        return demo_samples(self.cfg, load_demos(self.cfg))

    def _rehearsal(self):
        """learner.rehearsal_coef: expert demos of learner.rehearsal_suite as samples, else None."""
        if self.cfg.learner.rehearsal_coef == 0:
            return None
        from deploy.sft import rehearsal_samples

        return rehearsal_samples(self.cfg)

    # --- one RL step ---------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, t0 = self.cfg, time.monotonic()
        strict = cfg.rollout.max_policy_lag == 0
        batch = self.coordinator.next_batch(cfg.rollout.groups_per_batch, self.version, cfg.rollout.rollout_timeout_s, drain=strict)
        rollout_stats = self.coordinator.stats
        t1 = time.monotonic()
        refs, rewards, group_ids, versions = flatten(batch)
        advantages = group_advantages(torch.from_numpy(rewards), torch.from_numpy(group_ids)).numpy()
        order = self.rng.permutation(len(refs))
        futures = self.learner.grpo_step_async(refs, advantages, order, scheduled_lr(cfg.learner, self.progress()))
        while not strict and ray.wait(futures, num_returns=len(futures), timeout=0)[1]:
            self.coordinator.pump(cfg.rollout.groups_per_batch, timeout_s=0.05)  # overlap rollout with training
        train_stats = ray.get(futures, timeout=cfg.rollout.rollout_timeout_s)[0]
        t2 = time.monotonic()
        self.step += 1
        self.version += 1
        sync_s = self.sync_weights() if self.step % cfg.learner.sync_every == 0 else 0.0
        if not strict:
            self.coordinator.drop_stale(self.version)
        validation = self.validate() if self.selector is not None and self.selector.due(self.step) else {}
        s = rollout_stats
        scalars = {
            "rollout/success_rate": s.successes / max(s.episodes, 1),
            "rollout/episodes": s.episodes,
            # overlapped (lag >= 1): the stats also count the episodes that ran while the learner trained
            "rollout/env_steps_per_s": s.env_steps / max((t1 if strict else t2) - t0, 1e-6),
            "rollout/filtered_group_fraction": s.groups_filtered / max(s.groups_done, 1),
            "rollout/queue_depth": ray.get(self.rollout.queue.size.remote(), timeout=30),
            "rollout/policy_lag": float(np.mean(self.version - 1 - versions)),
            "rollout/stale_groups": s.groups_stale,
            "rollout/episodes_rerun": self.rollout.pool.rerun,
            **{f"train/{k}": v for k, v in train_stats.items()},
            "time/rollout_s": t1 - t0,
            "time/train_s": t2 - t1,
            "time/weight_sync_s": sync_s,
            "policy/version": self.version,
            **validation,
        }
        if cfg.rollout.task_sampling == "adaptive":
            scalars.update({f"sampler/weight/{t}": w for t, w in self.coordinator.sampler.weights().items()})
        per_task = {t: a / b for t, (a, b) in s.per_task.items() if b}
        self.logger.log(self.step, scalars, per_task, env_steps=s.env_steps)
        self.history.append({"step": self.step, **scalars})
        if self.step % cfg.checkpoint.every == 0:
            self.save_checkpoint()
        return scalars

    def progress(self) -> float:
        """How far the run is, 0 to 1, for learner.lr_schedule: by steps, or by the clock when run()
        has a deadline that comes first (a budgeted run on a slow machine still ends at the final lr;
        after a resume the clock part counts from the resume)."""
        if self.window is None:
            return run_progress(self.step, self.cfg.total_steps)
        start, deadline = self.window
        return run_progress(self.step, self.cfg.total_steps, time.monotonic() - start, deadline - start)

    def run(self, final_policy_dir: Path, deadline: float | None = None) -> str:
        """Train until `total_steps` (counting resumed steps), or until the next step would end past
        `deadline` (time.monotonic()), then write the servable policy. Returns what ended it."""
        step_seconds: list[float] = []
        self.window = None if deadline is None else (time.monotonic(), deadline)
        ended_by = "total_steps"
        while self.step < self.cfg.total_steps:
            # the slowest of the last few steps: a step's length varies with how many groups it drops
            if deadline is not None and time.monotonic() + max(step_seconds[-5:], default=0.0) > deadline:
                ended_by = "wall_budget_minutes"
                print(f"wall budget: stopping GRPO after step {self.step} of {self.cfg.total_steps}", flush=True)
                break
            t0 = time.monotonic()
            self.train_step()
            step_seconds.append(time.monotonic() - t0)
        # with max_policy_lag >= 1 groups are still in flight: finish them here, or their episodes
        # would come back to the env pool's next user (the demo's final evaluation)
        self.coordinator.drain(self.cfg.rollout.rollout_timeout_s)
        sel = self.selector
        if sel is not None and self.step > 0 and not sel.validated(self.step):
            self.validate()
        if sel is not None and sel.earlier_is_better():
            self.serve_best(final_policy_dir)
        else:
            self.learner.save_policy(final_policy_dir)
        return ended_by

    def serve_best(self, policy_dir: Path) -> None:
        """The best validated policy becomes the run's (`policy_dir`) and the replicas serve it, under
        its own version, for whatever runs next (the demo's final evaluation)."""
        sel = self.selector
        sel.copy_best(policy_dir)
        self._serve(sel.best["version"], sel.best_weights)
        print(f"validation: keeping the policy of step {sel.best['step']} ({100 * sel.best['success']:.1f} % on "
              f"train states) over the last one ({100 * sel.history[-1]['success']:.1f} %)", flush=True)

    def validate(self) -> dict:
        """eval.validate_every: greedy success of the current weights on the validation states."""
        timeout = self.cfg.rollout.rollout_timeout_s
        self.coordinator.drain(timeout)  # rollouts in flight (max_policy_lag >= 1) would share the env pool
        if self.served_version != self.version:  # sync_every > 1
            self.sync_weights()
        entry = self.selector.validate(self.step, self.version, self.rollout.pool, self.learner, timeout)
        return {"eval/validation_success": entry["success"], "eval/best_step": self.selector.best["step"]}

    def sync_weights(self) -> float:
        start = time.monotonic()
        self._serve(self.version, self.learner.publish_weights())
        return time.monotonic() - start

    def _serve(self, version: int, state_ref) -> None:
        """Every replica swaps to these weights as `version`, and all must report it."""
        versions = broadcast_weights(self.rollout.handle, version, state_ref)
        if set(versions) != {version}:
            raise RuntimeError(f"weight sync: replicas report versions {versions}, expected {version}")
        self.served_version = version

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        tmp = self.ckpt.begin(self.step)
        self.learner.save_state(tmp / "learner", {"step": self.step})
        self.learner.save_policy(tmp / "policy")
        surplus = self.coordinator.ready
        trajs = ray.get([it["ref"][0] for g in surplus for it in g.items], timeout=300)
        save_trajectories(trajs, tmp / "surplus")
        state = {
            "step": self.step, "version": self.version,
            "sampler": self.coordinator.sampler.state(),
            "numpy_rng": self.rng.bit_generator.state,
            "surplus": [[{k: v for k, v in it.items() if k != "ref"} for it in g.items] for g in surplus],
        }
        if self.selector is not None:
            state["validation"] = self.selector.state()
            self.selector.save_into(tmp)
        return self.ckpt.commit(tmp, state)

    def resume(self) -> bool:
        folder = self.ckpt.latest()
        if folder is None:
            return False
        state = json.loads((folder / "state.json").read_text())
        self.learner.load_state(folder / "learner")
        self.step, self.version = state["step"], state["version"]
        self.coordinator.sampler.load(state["sampler"])
        if self.selector is not None and "validation" in state:
            self.selector.load(state["validation"], folder)
        self.rng.bit_generator.state = state["numpy_rng"]
        trajs = iter(load_trajectories(folder / "surplus"))
        self.coordinator.ready = [
            Group((items[0]["task"], items[0]["init_state"]), [dict(it, ref=[ray.put(next(trajs))]) for it in items])
            for items in state["surplus"]
        ]
        self.sync_weights()
        print(f"resumed from {folder} at step {self.step} (version {self.version})", flush=True)
        return True

    def shutdown(self) -> None:
        self.learner.shutdown()
        if self.owns_logger:
            self.logger.close()
