"""`vla-grpo train CONFIG`: the GRPO loop. One RL step is five named, timed phases:

    rollout -> advantages -> update -> weight sync -> log / checkpoint

Each phase is a method below; its seconds go to `time/{phase}_s`.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError

from actors.coordinator import Group, RolloutStats
from actors.weight_sync import make_weight_sync, serve_weights
from common.config import RunConfig
from common.files import reading
from deploy.runtime import Rollout
from deploy.telemetry import RunLogger
from deploy.validation import PolicySelector
from learner.checkpoints import CheckpointManager, load_trajectories, save_trajectories
from learner.grpo import group_advantages
from learner.group import LearnerGroup
from learner.lr_schedule import run_progress, scheduled_lr
from services.weight_store import wait_for_current_copy


@dataclass
class RolloutBatch:
    """The groups of one step as the learner takes them: trajectory refs in group order, with their
    advantages, the order they are trained in, and the policy version that sampled each."""

    refs: list
    advantages: np.ndarray  # [N]
    order: np.ndarray  # [N], a permutation
    versions: np.ndarray  # [N]
    chunks: int  # observations (action chunks) the learner trains on: its work, whatever the episode lengths


class PhaseTimer:
    """Seconds per named phase of one step, for the `time/{phase}_s` metrics."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.monotonic() - start

    def scalars(self) -> dict[str, float]:
        return {f"time/{phase}_s": s for phase, s in self.seconds.items()}


class GRPOTrainer:
    def __init__(self, cfg: RunConfig, policy_path: str, rollout: Rollout, logger: RunLogger | None = None):
        from deploy.sft import loss_term_samples

        self.cfg = cfg
        self.rollout = rollout
        self.coordinator = rollout.coordinator(cfg)
        self.learner = LearnerGroup(cfg)
        self.learner.setup_grpo(policy_path, cfg.seed, loss_term_samples(cfg))
        self.weight_sync = make_weight_sync(cfg, self.learner, rollout)  # learner.weight_sync
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

    @property
    def strict(self) -> bool:
        """max_policy_lag 0: no rollout runs while the learner trains."""
        return self.cfg.rollout.max_policy_lag == 0

    # --- one RL step, phase by phase ------------------------------------------------------------
    def train_step(self) -> dict:
        try:
            return self._train_step()
        except RayActorError as err:  # env workers and replicas are replaced; a learner rank is not
            latest = self.ckpt.latest()
            resume = (f"the last complete checkpoint is {latest}; continue from it with checkpoint.resume=true"
                      if latest else "no checkpoint was written yet")
            raise RuntimeError(f"a learner rank died during RL step {self.step + 1} ({type(err).__name__}); "
                               f"{resume}") from None

    def _train_step(self) -> dict:
        timer = PhaseTimer()
        with timer("rollout"):
            groups, rollout_stats = self.collect_rollouts()
        with timer("advantages"):
            batch = self.compute_advantages(groups)
        with timer("train"):
            train_stats = self.update(batch)
        with timer("weight_sync"):
            self.sync_after_update()
        return self.log_and_checkpoint(timer, batch, rollout_stats, train_stats)

    def collect_rollouts(self) -> tuple[list[Group], RolloutStats]:
        """`groups_per_batch` groups that pass dynamic sampling, none older than the allowed lag."""
        c = self.cfg.rollout
        groups = self.coordinator.next_batch(c.groups_per_batch, self.version, c.rollout_timeout_s, drain=self.strict)
        return groups, self.coordinator.stats

    def compute_advantages(self, groups: list[Group]) -> RolloutBatch:
        """Group-normalised 0/1 rewards, and the order the learner trains in."""
        episodes = [e for g in groups for e in g.episodes]
        rewards = torch.tensor([float(e.meta.success) for e in episodes])
        group_ids = torch.from_numpy(np.repeat(np.arange(len(groups)), [len(g.episodes) for g in groups]))
        return RolloutBatch(refs=[e.ref for e in episodes], advantages=group_advantages(rewards, group_ids).numpy(),
                            order=self.rng.permutation(len(episodes)),
                            versions=np.array([e.meta.policy_version for e in episodes]),
                            chunks=sum(e.meta.num_chunks for e in episodes))

    def update(self, batch: RolloutBatch) -> dict:
        """The clipped policy update on every learner rank; with max_policy_lag >= 1 the env slots
        keep rolling out for the next step meanwhile."""
        c = self.cfg.rollout
        lr = scheduled_lr(self.cfg.learner, self.progress())
        futures = self.learner.grpo_step_async(batch.refs, batch.advantages, batch.order, lr)
        while not self.strict and ray.wait(futures, num_returns=len(futures), timeout=0)[1]:
            self.coordinator.pump(c.groups_per_batch, timeout_s=0.05)
            if not self.coordinator.open_groups:
                break  # none in flight and none to launch before a batch is taken: pumping would only spin
        stats = ray.get(futures, timeout=c.rollout_timeout_s)[0]
        self.step += 1
        self.version += 1
        return stats

    def sync_after_update(self) -> None:
        """The replicas serve the new version (every `learner.sync_every` steps); ready groups now
        too old for max_policy_lag are dropped."""
        if self.step % self.cfg.learner.sync_every == 0:
            self.sync_weights()
        if not self.strict:
            self.coordinator.drop_stale(self.version)

    def log_and_checkpoint(self, timer: PhaseTimer, batch: RolloutBatch, s: RolloutStats, train_stats: dict) -> dict:
        """Validation when due (eval.validate_every), the step's scalars to every sink, a checkpoint
        every `checkpoint.every` steps."""
        validation = {}
        if self.selector is not None and self.selector.due(self.step):
            with timer("validation"):
                validation = self.validate()
        seconds = timer.seconds
        # overlapped (lag >= 1): the stats also count the episodes that ran while the learner trained
        rollout_s = seconds["rollout"] + (0.0 if self.strict else seconds["train"])
        scalars = {
            "rollout/success_rate": s.successes / max(s.episodes, 1),
            "rollout/episodes": s.episodes,
            "rollout/env_steps_per_s": s.env_steps / max(rollout_s, 1e-6),
            "rollout/filtered_group_fraction": s.groups_filtered / max(s.groups_done, 1),
            "rollout/queue_depth": self.coordinator.buffered(),
            "rollout/policy_lag": float(np.mean(self.version - 1 - batch.versions)),
            "rollout/stale_groups": s.groups_stale,
            "rollout/episodes_rerun": self.rollout.pool.rerun,
            **{f"train/{k}": v for k, v in train_stats.items()},
            "train/chunks": batch.chunks,
            **timer.scalars(),
            "policy/version": self.version,
            **validation,
        }
        if self.cfg.rollout.task_sampling != "uniform":
            scalars.update({f"sampler/weight/{t}": w for t, w in self.coordinator.sampler.weights().items()})
        per_task = {t: a / b for t, (a, b) in s.per_task.items() if b}
        self.logger.log(self.step, scalars, per_task, env_steps=s.env_steps)
        self.history.append({"step": self.step, **scalars})
        if self.step % self.cfg.checkpoint.every == 0:
            self.save_checkpoint()
        return scalars

    # --- the run --------------------------------------------------------------------------------
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

    def sync_weights(self) -> None:
        """Every replica serves the learner's weights as `self.version` (learner.weight_sync)."""
        self.weight_sync.sync(self.version)
        self.served_version = self.version

    def _serve(self, version: int, state_ref) -> None:
        """Every replica serves the weights of `state_ref` (in the object store) as `version`."""
        serve_weights(self.rollout, version, state_ref, self.cfg.cluster.serve_replicas)
        self.served_version = version

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """checkpoints/step_N, complete or not at all: a write that fails (e.g. a full disk) leaves the
        previous checkpoint as `latest` and says so."""
        try:
            return self._write_checkpoint()
        except Exception as err:
            self.ckpt.abandon(self.step)
            cause = (str(err).strip().splitlines() or [type(err).__name__])[-1]  # a rank's error: its last line
            raise RuntimeError(f"checkpoint of step {self.step} could not be written ({cause}); the last complete "
                               f"one, {self.ckpt.latest()}, is intact") from err

    def _write_checkpoint(self) -> Path:
        tmp = self.ckpt.begin(self.step)
        self.learner.save_state(tmp / "learner", {"step": self.step})
        self.learner.save_policy(tmp / "policy")
        surplus, refs = self.coordinator.surplus_state()
        save_trajectories(ray.get(refs, timeout=300), tmp / "surplus")
        state = {
            "step": self.step, "version": self.version,
            "sampler": self.coordinator.sampler.state(),
            "numpy_rng": self.rng.bit_generator.state,
            "surplus": surplus,
        }
        if self.selector is not None:
            state["validation"] = self.selector.state()
            self.selector.save_into(tmp)
        return self.ckpt.commit(tmp, state)

    def resume(self) -> bool:
        folder = self.ckpt.latest()
        if folder is None:
            return False
        with reading(folder / "state.json", "checkpoint file"):
            state = json.loads((folder / "state.json").read_text())
        self.learner.load_state(folder / "learner")
        self.step, self.version = state["step"], state["version"]
        self.coordinator.sampler.load(state["sampler"])
        if self.selector is not None and "validation" in state:
            self.selector.load(state["validation"], folder)
        self.rng.bit_generator.state = state["numpy_rng"]
        self.coordinator.restore_surplus(state["surplus"], [ray.put(t) for t in load_trajectories(folder / "surplus")])
        self.sync_weights()
        print(f"resumed from {folder} at step {self.step} (version {self.version})", flush=True)
        return True

    def shutdown(self) -> None:
        """End the learner. The replicas may serve on (the demo's final evaluation): the store's copy
        of the weights is this process's and outlives the ranks, once rank 0 has finished making it
        (the last sync does not wait for it)."""
        try:
            wait_for_current_copy(self.rollout.weights, timeout_s=660)
        except RayActorError:  # the rollout is gone already: no replica needs the copy
            pass
        self.learner.shutdown()
        if self.owns_logger:
            self.logger.close()
