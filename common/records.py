"""Records that cross role boundaries (env workers <-> policy service <-> coordinator <-> learner).

Plain dataclasses of numpy arrays: cheap to pickle into the Ray object store, no torch needed
by the simulators. Each is defined here once and imported by every role.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Observation:
    image: np.ndarray  # [H, W, 3] uint8, as the env renders it (the policy's processor resizes)
    instruction: str
    proprio: np.ndarray | None = None  # [P] float32


@dataclass
class StepResult:
    observation: Observation
    success: bool
    done: bool  # success or step limit reached


@dataclass
class ChunkResult:
    """What an env reports after applying an action chunk (stops early when the episode ends)."""

    observation: Observation  # after the last applied action
    success: bool
    done: bool
    steps: int  # actions applied
    frames: list[np.ndarray] | None = None  # the image after every applied action, when asked for (videos)


@dataclass
class ActionChunk:
    tokens: np.ndarray  # [chunk, dims] int64 action-token ids
    logprobs: np.ndarray  # [chunk, dims] float32, under the sampling temperature
    actions: np.ndarray  # [chunk, dims] float32, un-normalised env actions
    policy_version: int


@dataclass
class Trajectory:
    """One finished episode. Images are stored once per policy query (one per chunk)."""

    task: str
    init_state: int
    instruction: str
    images: np.ndarray  # [T, H, W, 3] uint8, T = policy queries
    tokens: np.ndarray  # [T, chunk, dims] int64
    logprobs: np.ndarray  # [T, chunk, dims] float32 (rollout-time "old" log-probs)
    executed: np.ndarray  # [T, chunk] bool: action was stepped before the episode ended
    success: bool
    env_steps: int
    policy_version: int  # oldest version that produced any of its chunks
    proprio: np.ndarray | None = None  # [T, P] float32

    @property
    def num_chunks(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True)
class EpisodeMeta:
    """What an env worker reports of a finished episode beside its Trajectory: small, so the driver
    reads it without pulling the images."""

    task: str
    init_state: int
    success: bool
    env_steps: int
    policy_version: int  # oldest version that produced any of its chunks
    num_chunks: int
    seconds: float
    frames: np.ndarray | None = None  # [env_steps, H, W, 3] uint8, when a video was asked for


@dataclass(frozen=True)
class SceneShift:
    """How an SFT label moves when an image shift is read as the whole scene translating on the
    table: under absolute position control the servo targets and the gripper's position move with
    the scene (a delta action does not, so such envs give none). The env knows its camera and its
    action and proprio layouts; the learner only applies this."""

    metres_per_col: float  # world x per image column of content shift, at the env's image size
    metres_per_row: float  # world y per image row (negative: rows grow towards the camera)
    action_dims: tuple[int, int]  # action dims holding the world x and y target
    action_per_metre: tuple[float, float]  # action units per metre in those dims
    proprio_dims: tuple[int, int]  # proprio dims holding the gripper's world x and y, in metres
