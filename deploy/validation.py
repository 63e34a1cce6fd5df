"""Best-policy selection during GRPO (`eval.validate_every`).

Every few RL steps, and after the last, the policy the replicas serve runs greedily on a fixed set
of RL *training* initial states (the paper validates on its training states); the best one so far
is kept, in the object store for the replicas and as a policy folder on disk. GRPO's success moves
up and down from step to step (one task can slip from 100 % while another climbs), so the last
step is not always the best one; when an earlier policy validated clearly better than the last
(`earlier_is_better`), it becomes the run's policy. Held-out states never take part, so the final
evaluation on them stays an honest estimate of the selected policy.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import ray
from safetensors.torch import load_file

from actors.env_pool import Episode
from common.config import RunConfig
from common.host_state import HostState
from policy.checkpoint import copy_policy


def clearly_better(best: float, last: float, episodes: int, margin_se: float) -> bool:
    """Whether success `best` beats `last` (each over `episodes`) by more than `margin_se` standard
    errors of the difference (binomial). Validation success climbs over a run while each estimate
    carries a few points of sampling noise, so the plain maximum would often pick a lucky earlier
    policy over a better-trained last one; the margin leaves the choice to real drops (a task lost)."""
    se = math.sqrt((best * (1 - best) + last * (1 - last)) / episodes)
    return best - last > margin_se * se


class PolicySelector:
    def __init__(self, cfg: RunConfig, task_info: dict, folder: Path):
        self.every = cfg.eval.validate_every
        self.margin_se = cfg.eval.validation_margin_se
        k = cfg.eval.validation_states_per_task
        self.states = {task: list(info["train"])[:k] for task, info in sorted(task_info.items())}
        self.folder = Path(folder)  # the best policy so far (atomically replaced by save_policy)
        self.history: list[dict] = []  # {"step", "version", "success", "per_task"} per validation
        self.best: dict | None = None  # the history entry of the best policy
        self.best_weights = None  # its state dict in the object store (a ref), for the replicas

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def validated(self, step: int) -> bool:
        return bool(self.history) and self.history[-1]["step"] == step

    def validate(self, step: int, version: int, pool, learner, timeout_s: float) -> dict:
        """Greedy episodes on the validation states with the weights the replicas serve now (which
        must be the learner's, `version`); keeps them when they beat the best so far (strictly, as
        early stopping does: a tie keeps the earlier policy)."""
        episodes = [Episode(task, s, 1.0, greedy=True) for task, states in self.states.items() for s in states]
        outcomes: dict[str, list[int]] = {}
        for done in pool.run_all(episodes, timeout_s):
            outcomes.setdefault(done.meta.task, []).append(int(done.meta.success))
        entry = {"step": step, "version": version,
                 "success": float(np.mean([o for v in outcomes.values() for o in v])),
                 "per_task": {t: float(np.mean(v)) for t, v in sorted(outcomes.items())}}
        self.history.append(entry)
        if self.best is None or entry["success"] > self.best["success"]:
            self.best = entry
            self.best_weights = learner.publish_weights()
            learner.save_policy(self.folder)
        return entry

    def earlier_is_better(self) -> bool:
        """Whether the best validation beats the last one clearly (`clearly_better`)."""
        if self.best is None or not self.history or self.best is self.history[-1]:
            return False
        n = sum(len(s) for s in self.states.values())
        return clearly_better(self.best["success"], self.history[-1]["success"], n, self.margin_se)

    def copy_best(self, destination: Path) -> None:
        copy_policy(self.folder, destination)

    # --- checkpoints: the history, and the best policy folder inside the checkpoint ----------------
    def state(self) -> dict:
        return {"history": self.history, "best_step": None if self.best is None else self.best["step"]}

    def load(self, state: dict, checkpoint_folder: Path) -> None:
        self.history = list(state["history"])
        step = state["best_step"]
        self.best = next((h for h in self.history if h["step"] == step), None)
        if self.best is None:
            return
        saved = Path(checkpoint_folder) / "validated_policy"
        if not (saved / "model.safetensors").is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint_folder} records a validated policy (step {step}) "
                                    f"but holds no validated_policy/model.safetensors")
        copy_policy(saved, self.folder)  # the run's own copy may be newer than the checkpoint
        self.best_weights = ray.put(HostState(load_file(str(self.folder / "model.safetensors"))))

    def save_into(self, checkpoint_folder: Path) -> None:
        if self.best is not None:
            shutil.copytree(self.folder, Path(checkpoint_folder) / "validated_policy")

    def summary(self) -> dict:
        return {"validate_every": self.every, "states_per_task": len(next(iter(self.states.values()), [])),
                "best_step": None if self.best is None else self.best["step"],
                "best_validation_success": None if self.best is None else self.best["success"],
                "margin_se": self.margin_se, "kept_earlier": self.earlier_is_better(),
                "history": [{"step": h["step"], "success": h["success"]} for h in self.history]}
