"""The one episode API every simulator backend implements (built-in tabletop, LIBERO, SAPIEN).

gymnasium-like, but episode-shaped: `reset(task, init_state)` picks the task and a fixed,
seeded initial state, so GRPO groups can roll out the same start n times.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from common.config import EnvConfig, InitStateConfig
from common.records import ChunkResult, Observation, StepResult

Split = Literal["train", "eval"]


def split_init_states(cfg: InitStateConfig, split: Split) -> list[int]:
    """Indices of a task's initial states for `split`: train = the first num_train, eval = the next
    num_eval (disjoint), or the train states again under the paper's shared split."""
    if split == "train" or (split == "eval" and cfg.split == "paper"):  # the paper evaluates on its training states
        return list(range(cfg.num_train))
    if split == "eval":
        return list(range(cfg.num_train, cfg.num_train + cfg.num_eval))
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def configured_tasks(cfg: EnvConfig, backend: str, suite_tasks: Callable[[str], list[str]],
                     check_task: Callable[[str], object]) -> list[str]:
    """The tasks a backend's env runs: `env.tasks`, or its whole suite. Fails at construction on a
    wrong backend, suite or task name (`check_task` raises naming the known tasks)."""
    if cfg.backend != backend:
        raise ValueError(f"this env needs env.backend {backend!r}, got {cfg.backend!r}")
    try:
        suite = suite_tasks(cfg.suite)
    except ValueError as e:
        raise ValueError(f"env.suite: {e}") from None
    names = list(cfg.tasks) if cfg.tasks else suite
    for n in [*names, *cfg.task_max_steps]:
        check_task(n)
    return names


def apply_chunk(actions: np.ndarray, action_dim: int, apply: Callable[[np.ndarray], None],
                render: Callable[[], np.ndarray] | None, done: Callable[[], bool]) -> tuple[int, list | None]:
    """Physics for every action of a chunk until the episode ends, rendering only where `render` is
    given (videos: after each action); the policy reads one image per chunk, and a render costs
    several physics steps. -> (steps applied, frames or None)."""
    actions = np.asarray(actions)
    if actions.ndim != 2 or len(actions) == 0:
        raise ValueError(f"actions must be [k, {action_dim}] with k >= 1, got shape {actions.shape}")
    frames: list[np.ndarray] | None = [] if render is not None else None
    steps = 0
    for action in actions:
        apply(action)
        steps += 1
        if frames is not None:
            frames.append(render())
        if done():
            break
    return steps, frames


@runtime_checkable
class EpisodeEnv(Protocol):
    action_dim: int  # 7 per arm, LIBERO-style (dx, dy, dz, droll, dpitch, dyaw, gripper); 14 for two arms

    @property
    def task_names(self) -> list[str]: ...

    def instruction(self, task: str) -> str: ...

    def init_states(self, task: str, split: Split) -> list[int]:
        """Indices of the task's fixed initial states of that split (train and eval are disjoint
        unless the config asks for the paper's shared split)."""

    def reset(self, task: str, init_state: int) -> Observation: ...

    def step(self, action: np.ndarray) -> StepResult:
        """Apply one env action ([action_dim] float); `done` once success or the step limit."""

    def step_chunk(self, actions: np.ndarray, keep_frames: bool = False) -> ChunkResult:
        """Apply `actions` ([k, action_dim]) in order until the episode ends; same outcome as k
        `step` calls, but a backend may render only the observation the policy reads next
        (`step_each` is the plain version)."""

    def close(self) -> None: ...


def step_each(env: EpisodeEnv, actions: np.ndarray, keep_frames: bool = False) -> ChunkResult:
    """`step_chunk` as repeated `step` calls, for backends that observe at every step anyway."""
    frames: list[np.ndarray] | None = [] if keep_frames else None
    steps, result = 0, None
    for action in actions:
        result = env.step(action)
        steps += 1
        if frames is not None:
            frames.append(result.observation.image)
        if result.done:
            break
    if result is None:
        raise ValueError("step_chunk needs at least one action")
    return ChunkResult(observation=result.observation, success=result.success, done=result.done, steps=steps, frames=frames)
