"""Scripted experts for every tabletop task: closed-loop waypoint scripts that read the sim state.

Each sub-goal becomes a pick-and-place or a push, written as a generator of 7-dim actions in the
policy's own action space. Moves are P-control on the servo target, rate-limited for smooth
demos; a little seeded noise keeps demos diverse and free of exact no-ops (OpenVLA drops those).
"""

from __future__ import annotations

import zlib
from typing import Callable, Iterator

import numpy as np

from env_workers.tabletop.env import POS_SCALE, TabletopEnv
from env_workers.tabletop.scene import BLOCK_HALF, BOWL_BASE, EE_LOW
from env_workers.tabletop.tasks import Subgoal

CARRY_Z = 0.10  # ee height for moving a held block: its bottom clears the bowl rim and other blocks
HOVER_Z = 0.09  # ee height above a block before descending onto it
PUSH_Z = EE_LOW[2] + 0.005  # fingertips just above the table
PUSH_BACKOFF = 0.075  # ee start distance behind a block's centre for a push
PUSH_AHEAD, PUSH_SPEED = 0.02, 0.35  # slow, short shoves keep the block on the fingers' line
BOWL_SLOTS = (-0.034, 0.034)  # y offsets in the bowl for the 1st and 2nd block of a task
DESCEND_XY_TOL = 0.01  # xy error allowed while going down onto a block or a place target
MAX_DELTA = 0.5  # per-step change of an action dim: smooth demos, no bang-bang
NOISE = 0.04  # std of the (smoothed) exploration noise, in action units

Target = Callable[[], np.ndarray]


class ScriptedExpert:
    """Call `reset()` after `env.reset(...)`, then `act()` once per env step."""

    def __init__(self, env: TabletopEnv, noise: float = NOISE, seed: int = 0):
        self.env, self.noise, self.seed = env, float(noise), int(seed)

    def reset(self) -> None:
        env = self.env
        self._rng = np.random.default_rng([zlib.crc32(env.task.name.encode()), env.init_state, self.seed])
        self._prev = np.zeros(7)
        self._ou = np.zeros(3)
        self._close = False
        self._pushing = False
        self._plan = self._script()

    def act(self) -> np.ndarray:
        raw = next(self._plan, None)
        if raw is None:  # script finished but the episode is not over: drift upwards, gripper as is
            raw = np.r_[0.0, 0.0, 0.3, 0, 0, 0, 1.0 if self._close else -1.0]
        # Limit speeding up only: smooth starts, but stops stay prompt (a lagging stop overshoots).
        base = np.where(raw * self._prev > 0, self._prev, 0.0)
        a = np.where(np.abs(raw) > np.abs(base), base + np.clip(raw - base, -MAX_DELTA, MAX_DELTA), raw)
        a[6] = raw[6]  # the gripper is a switch: never smooth it
        self._ou = 0.7 * self._ou + self._rng.normal(0.0, self.noise, 3)
        a[:3] += self._ou * (1.0, 1.0, 0.0 if self._pushing else 1.0)  # z jitter would drag a pushed block up
        a[3:6] = 0.0
        a = np.clip(a, -1.0, 1.0)
        self._prev = a
        return self.env.from_delta(a.astype(np.float32))

    # --- the script ---
    def _script(self) -> Iterator[np.ndarray]:
        goal = self.env.task.goal
        for k, sub in enumerate(goal):
            verb, block, target = sub
            if verb == "push_to_zone":
                yield from self._push(block, target)
            else:
                yield from self._pick(block)
                yield from self._place(block, self._place_target(sub, k, len(goal)))

    def _place_target(self, sub: Subgoal, k: int, n: int) -> Target:
        """Where the held block's centre should go (re-read every step: targets may move)."""
        verb, block, target = sub
        sim = self.env.sim
        if verb == "in_bowl":
            dy = BOWL_SLOTS[k] if n > 1 else 0.0
            return lambda: sim.fixture_pos("bowl") + (0.0, dy, BOWL_BASE + BLOCK_HALF)
        if verb == "on_zone":
            return lambda: sim.fixture_pos(f"zone_{target}") + (0.0, 0.0, BLOCK_HALF)
        if verb == "on_block":
            return lambda: sim.block_pos(target) + (0.0, 0.0, 2 * BLOCK_HALF)
        raise ValueError(f"no place target for {verb!r}")

    def _pick(self, block: str) -> Iterator[np.ndarray]:
        sim = self.env.sim
        above = lambda: np.r_[sim.block_pos(block)[:2], HOVER_Z]  # noqa: E731
        yield from self._move(above, close=False, tol=0.015)
        grasp_z = lambda: max(sim.block_pos(block)[2], EE_LOW[2])  # noqa: E731
        yield from self._move(self._descend(lambda: sim.block_pos(block)[:2], grasp_z), close=False, tol=0.005)
        yield from self._grip(close=True)
        up = sim.ee_pos
        yield from self._move(lambda: np.r_[up[:2], CARRY_Z], close=True, tol=0.03)

    def _place(self, block: str, target: Target) -> Iterator[np.ndarray]:
        sim = self.env.sim
        # Held block centre minus ee point, measured after the grasp (the grip height varies).
        offset = sim.block_pos(block) - sim.ee_pos if sim.touching_gripper(block) else np.zeros(3)
        above = lambda: np.r_[target()[:2], CARRY_Z]  # noqa: E731
        yield from self._move(above, close=True, tol=0.01)
        low = lambda: target() - offset + (0.0, 0.0, 0.006)  # noqa: E731
        yield from self._move(self._descend(lambda: low()[:2], lambda: low()[2]), close=True, tol=0.006)
        yield from self._grip(close=False)
        # Straight up until the fingertips clear the released block, or moving on drags it along.
        up = np.r_[sim.ee_pos[:2], max(sim.ee_pos[2] + 0.05, CARRY_Z)]
        yield from self._move(lambda: up, close=False, tol=0.01)

    def _push(self, block: str, zone: str) -> Iterator[np.ndarray]:
        sim = self.env.sim
        goal = lambda: sim.fixture_pos(f"zone_{zone}")[:2]  # noqa: E731
        b = lambda: sim.block_pos(block)[:2]  # noqa: E731

        def unit() -> np.ndarray:
            d = goal() - b()
            return d / max(np.linalg.norm(d), 1e-9)

        for _ in range(4):  # re-approach if the block slipped sideways off the fingers
            behind = lambda: np.r_[b() - unit() * PUSH_BACKOFF, HOVER_Z]  # noqa: E731
            yield from self._move(behind, close=True, tol=0.012)
            yield from self._move(lambda: np.r_[b() - unit() * PUSH_BACKOFF, PUSH_Z], close=True, tol=0.005)
            for _ in range(60):
                dist = np.linalg.norm(goal() - b())
                if dist < 0.012:
                    break
                rel = sim.ee_pos[:2] - b()
                u = unit()
                lateral = abs(rel[0] * u[1] - rel[1] * u[0])
                if lateral > 0.025 or rel @ u > -0.02:
                    break  # no longer behind the block
                # Aim just ahead of the contact point: the fingers drive the block along u.
                tgt = np.r_[b() - u * 0.04 + u * min(PUSH_AHEAD, dist + 0.005), PUSH_Z]
                self._pushing = True
                yield self._toward(tgt, close=True, speed=PUSH_SPEED)
            self._pushing = False
            if np.linalg.norm(goal() - b()) < 0.03:
                break
        back = np.r_[sim.ee_pos[:2] - unit() * 0.03, PUSH_Z + 0.02]
        yield from self._move(lambda: back, close=True, tol=0.01)
        yield from self._move(lambda: back + (0.0, 0.0, 0.06), close=True, tol=0.02)

    # --- primitives ---
    def _toward(self, target: np.ndarray, close: bool, speed: float = 1.0) -> np.ndarray:
        """Action moving the servo target onto `target` (one step if within reach)."""
        self._close = close
        d = (target - self.env.sim.ee_target) / POS_SCALE
        return np.r_[np.clip(d, -speed, speed), 0.0, 0.0, 0.0, 1.0 if close else -1.0]

    def _descend(self, xy: Callable[[], np.ndarray], z: Callable[[], float]) -> Target:
        """Go down only while above the xy goal, so fingers never land on the block's edge."""
        sim = self.env.sim

        def target() -> np.ndarray:
            goal = xy()
            aligned = np.linalg.norm(goal - sim.ee_pos[:2]) < DESCEND_XY_TOL
            return np.r_[goal, z() if aligned else sim.ee_pos[2]]

        return target

    def _move(self, target: Target, close: bool, tol: float, max_steps: int = 40) -> Iterator[np.ndarray]:
        for _ in range(max_steps):
            t = target()
            if np.linalg.norm(self.env.sim.ee_pos - t) < tol:
                return
            yield self._toward(t, close)

    def _grip(self, close: bool, min_steps: int = 2, max_steps: int = 6) -> Iterator[np.ndarray]:
        """Switch the gripper while holding still, until the fingers stop moving."""
        hold = self.env.sim.ee_target
        for i in range(max_steps):
            yield self._toward(hold, close)
            if i + 1 >= min_steps and self.env.sim.finger_speed < 0.01:
                return


def run_expert(env: TabletopEnv, task: str, init_state: int, seed: int = 0, noise: float = NOISE):
    """Roll the expert out once; returns (observations, actions, success). For tests and demos."""
    obs = [env.reset(task, init_state)]
    expert = ScriptedExpert(env, noise=noise, seed=seed)
    expert.reset()
    actions, success = [], False
    while True:
        a = expert.act()
        res = env.step(a)
        actions.append(a)
        if res.done:
            success = res.success
            break
        obs.append(res.observation)
    return obs, np.stack(actions), success
