"""The five LIBERO suites: their tasks, instructions, bddl files, fixed initial states and step limits.

Step limits (env steps after the `num_steps_wait` settle steps, which never count):
- eval: OpenVLA / OpenVLA-OFT `run_libero_eval.py` — about 1.1 x the longest training demo of the
  suite (193, 254, 270, 505 and 373 steps).
- rl: SimpleVLA-RL's rollout limit, 512 for every LIBERO suite (`rob_rollout.py`).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
EVAL_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
RL_MAX_STEPS = {suite: 512 for suite in SUITES}
NUM_INIT_STATES = 50  # every task ships 50 fixed initial states (`<task>.pruned_init`)


def max_steps(suite: str, mode: Literal["eval", "rl"]) -> int:
    """The published step limit of a suite: 'eval' (OpenVLA's evaluation) or 'rl' (SimpleVLA-RL)."""
    check_suite(suite)
    if mode == "eval":
        return EVAL_MAX_STEPS[suite]
    if mode == "rl":
        return RL_MAX_STEPS[suite]
    raise ValueError(f"mode must be 'eval' or 'rl', got {mode!r}")


def check_suite(suite: str) -> None:
    if suite not in SUITES:
        raise ValueError(f"env.suite {suite!r} is not a LIBERO suite; choose one of {list(SUITES)}")


@dataclass(frozen=True)
class LiberoTask:
    name: str  # the bddl file's stem, unique within a suite
    instruction: str
    bddl_file: Path
    init_states_file: Path


class SuiteCatalog:
    """Task list of one suite, read from the installed `libero` package (after bootstrap)."""

    def __init__(self, suite: str):
        check_suite(suite)
        from libero.libero import benchmark, get_libero_path

        with contextlib.redirect_stdout(io.StringIO()):  # it prints "[info] using task orders ..."
            bench = benchmark.get_benchmark_dict()[suite]()  # task order 0: the published order
        bddl_root, init_root = Path(get_libero_path("bddl_files")), Path(get_libero_path("init_states"))
        self.suite = suite
        self.tasks: dict[str, LiberoTask] = {}
        for t in bench.tasks:
            self.tasks[t.name] = LiberoTask(t.name, t.language, bddl_root / t.problem_folder / t.bddl_file,
                                            init_root / t.problem_folder / t.init_states_file)
        self._init_states: dict[str, np.ndarray] = {}

    @cached_property
    def names(self) -> list[str]:
        return list(self.tasks)

    def task(self, name: str) -> LiberoTask:
        if name not in self.tasks:
            raise ValueError(f"unknown task {name!r} for suite {self.suite}; known: {self.names}")
        return self.tasks[name]

    def init_states(self, name: str) -> np.ndarray:
        """[50, 1 + nq + nv] flattened MuJoCo states (time, qpos, qvel), as LIBERO ships them."""
        if name not in self._init_states:
            import torch

            # LIBERO's files are pickled numpy arrays written by torch.save, so weights_only must be off;
            # they come from the installed package, never from user input.
            states = torch.load(self.task(name).init_states_file, weights_only=False)
            self._init_states[name] = np.asarray(states, dtype=np.float64)
        return self._init_states[name]
