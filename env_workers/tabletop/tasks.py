"""Task specs of the tabletop suites: layouts, seeded initial states, goals and success predicates.

"tabletop" is the benchmark suite (10 tasks, LIBERO-style: every initial state is a few cm off one
nominal scene per layout). "tabletop_pretrain" is a disjoint pretraining suite, the analogue of the
robot data a VLA base is trained on before one-demo SFT: 14 other goals (other colour and verb
combinations, two block colours the benchmark never moves) in scenes drawn anew for every initial
state, so a policy trained on it has to find blocks anywhere rather than memorise positions.

Several tasks share a layout, and tasks of one layout share their initial states (the seed is the
layout's, not the task's), so at a given init-state index the first image is identical and only the
instruction says which block goes where.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from env_workers.tabletop.scene import BLOCK_HALF, BOWL_BASE, BOWL_INNER_R, BOWL_WALL, ZONE_HALF, Sim

SUITE = "tabletop"
PRETRAIN_SUITE = "tabletop_pretrain"
EXPERT_MAX_STEPS = 96  # step limit for recording expert demos of any task (the two-step tasks take up to ~62)

# Where objects may start: inside the camera view with room for the gripper around them.
X_RANGE, Y_RANGE = (-0.17, 0.17), (-0.12, 0.12)
FIXTURE_SHRINK = 0.05  # the bowl and zones are wider than a block: keep them whole in view
YAW_RANGE = (-0.35, 0.35)  # the gripper cannot turn; closing squares up a block this far off
BLOCK_GAP = 0.11  # centre distance: an open finger fits between two blocks
BOWL_CLEAR = BOWL_INNER_R + BOWL_WALL + 0.06  # block centre to bowl centre: open fingers miss the rim
ZONE_CLEAR = ZONE_HALF + BLOCK_HALF * math.sqrt(2) + 0.01  # block centre to zone centre, per axis
# LIBERO-style initial states: every state perturbs one fixed nominal scene of its layout by a few
# cm, so a single demonstration covers the neighbourhood the policy will start in.
INIT_NOISE = 0.02  # metres, per axis
YAW_NOISE = 0.25  # radians


@dataclass(frozen=True)
class Layout:
    name: str
    blocks: tuple[str, ...]
    bowl: bool = False
    zones: tuple[str, ...] = ()
    push_paths: bool = False  # keep every block's straight path to the zone free of the others
    spread: bool = False  # every seed draws a new scene over the whole workspace (no nominal scene)

    def sample(self, seed: int) -> dict[str, tuple[float, ...]]:
        """Placements {block: (x, y, yaw), fixture: (x, y)}, a pure function of (layout, seed):
        the layout's nominal scene with every object moved by up to INIT_NOISE (or, for a spread
        layout, a uniform draw over the workspace)."""
        nominal = None if self.spread else self.nominal()
        rng = np.random.default_rng([zlib.crc32(self.name.encode()), int(seed)])
        for _ in range(10_000):
            p = self._draw(rng, nominal)
            if p is not None:
                return p
        raise RuntimeError(f"layout {self.name}: no valid placement for seed {seed}")

    def nominal(self) -> dict[str, tuple[float, ...]]:
        """The layout's fixed scene: one valid uniform draw from a reserved seed."""
        if "_nominal" not in self.__dict__:
            rng = np.random.default_rng([zlib.crc32(self.name.encode()), 2**31 - 1])
            p = None
            while p is None:
                p = self._draw(rng, None)
            object.__setattr__(self, "_nominal", p)
        return self.__dict__["_nominal"]

    def _draw(self, rng: np.random.Generator, nominal: dict | None) -> dict | None:
        def xy(name: str, shrink: float = 0.0) -> np.ndarray:
            lo = np.array([X_RANGE[0] + shrink, Y_RANGE[0] + shrink])
            hi = np.array([X_RANGE[1] - shrink, Y_RANGE[1] - shrink])
            if nominal is None:
                return rng.uniform(lo, hi)
            return np.clip(np.array(nominal[name][:2]) + rng.uniform(-INIT_NOISE, INIT_NOISE, 2), lo, hi)

        def yaw(name: str) -> float:
            if nominal is None:
                return float(rng.uniform(*YAW_RANGE))
            return float(np.clip(nominal[name][2] + rng.uniform(-YAW_NOISE, YAW_NOISE), *YAW_RANGE))

        out: dict[str, tuple[float, ...]] = {}
        bowl, zones = None, []
        if self.bowl:
            bowl = xy("bowl", FIXTURE_SHRINK)
            out["bowl"] = tuple(bowl)
        for z in self.zones:
            c = xy(f"zone_{z}", FIXTURE_SHRINK)
            if any(np.abs(c - f).max() < 2 * ZONE_HALF + 0.02 for f in zones):
                return None
            out[f"zone_{z}"] = tuple(c)
            zones.append(c)
        placed: list[np.ndarray] = []
        for b in self.blocks:
            c = xy(b)
            if bowl is not None and np.linalg.norm(c - bowl) < BOWL_CLEAR:
                return None
            if any(np.abs(c - f).max() < ZONE_CLEAR for f in zones):  # start fully off every zone
                return None
            if any(np.linalg.norm(c - q) < BLOCK_GAP for q in placed):
                return None
            placed.append(c)
            out[b] = (float(c[0]), float(c[1]), yaw(b))
        if self.push_paths and not self._paths_clear(out):
            return None
        return out

    def _paths_clear(self, p: dict) -> bool:
        """Each block's push, from behind it to the zone centre, passes no other block."""
        for z in self.zones:
            goal = np.array(p[f"zone_{z}"])
            for b in self.blocks:
                start = np.array(p[b][:2])
                d = goal - start
                if np.linalg.norm(d) > 0.26:  # keep pushes short
                    return False
                u = d / np.linalg.norm(d)
                seg0, seg1 = start - u * 0.08, goal
                for o in self.blocks:
                    if o != b and _seg_dist(np.array(p[o][:2]), seg0, seg1) < 0.085:
                        return False
        return True


def _seg_dist(q: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    t = np.clip(np.dot(q - a, b - a) / max(np.dot(b - a, b - a), 1e-12), 0.0, 1.0)
    return float(np.linalg.norm(q - (a + t * (b - a))))


# A goal is a sequence of sub-goals (verb, block, target); the task succeeds when all hold at once.
# Verbs: "in_bowl" (target None), "on_zone" (target zone colour), "push_to_zone" (same predicate as
# on_zone; tells the expert to push), "on_block" (target block colour).
Subgoal = tuple[str, str, str | None]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    instruction: str
    layout: Layout
    goal: tuple[Subgoal, ...]

    def success(self, sim: Sim) -> bool:
        return all(subgoal_done(sim, g) for g in self.goal)


def subgoal_done(sim: Sim, goal: Subgoal) -> bool:
    """Predicate from sim state: the block rests where it should and the gripper has let go."""
    verb, block, target = goal
    p = sim.block_pos(block)
    if verb == "in_bowl":
        c = sim.fixture_pos("bowl")
        placed = np.linalg.norm(p[:2] - c[:2]) < BOWL_INNER_R - 0.01 and p[2] < BOWL_BASE + 3 * BLOCK_HALF
    elif verb in ("on_zone", "push_to_zone"):
        c = sim.fixture_pos(f"zone_{target}")
        placed = np.all(np.abs(p[:2] - c[:2]) < ZONE_HALF) and p[2] < BLOCK_HALF + 0.01
    elif verb == "on_block":
        q = sim.block_pos(target)
        dz = p[2] - q[2]
        placed = np.linalg.norm(p[:2] - q[:2]) < BLOCK_HALF and 1.6 * BLOCK_HALF < dz < 2.4 * BLOCK_HALF
    else:
        raise ValueError(f"unknown goal verb {verb!r}")
    # the contact scan last: it is the costly part, and most control steps fail on placement already
    return bool(placed) and not sim.touching_gripper(block)


BOWL = Layout("bowl", ("red", "green", "blue"), bowl=True)
ZONES = Layout("zones", ("red", "blue"), zones=("yellow", "magenta"))
PUSH = Layout("push", ("red", "green"), zones=("yellow",), push_paths=True)
STACK = Layout("stack", ("red", "green"))

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("red_in_bowl", "put the red block in the bowl", BOWL, (("in_bowl", "red", None),)),
        TaskSpec("green_in_bowl", "put the green block in the bowl", BOWL, (("in_bowl", "green", None),)),
        TaskSpec("blue_in_bowl", "put the blue block in the bowl", BOWL, (("in_bowl", "blue", None),)),
        TaskSpec(
            "red_then_blue_in_bowl",
            "put the red block in the bowl and then the blue block in the bowl",
            BOWL,
            (("in_bowl", "red", None), ("in_bowl", "blue", None)),
        ),
        TaskSpec("red_on_yellow", "place the red block on the yellow square", ZONES, (("on_zone", "red", "yellow"),)),
        TaskSpec("blue_on_magenta", "place the blue block on the magenta square", ZONES, (("on_zone", "blue", "magenta"),)),
        TaskSpec("push_red_to_yellow", "push the red block onto the yellow square", PUSH, (("push_to_zone", "red", "yellow"),)),
        TaskSpec("push_green_to_yellow", "push the green block onto the yellow square", PUSH, (("push_to_zone", "green", "yellow"),)),
        TaskSpec("stack_red_on_green", "stack the red block on the green block", STACK, (("on_block", "red", "green"),)),
        TaskSpec("stack_green_on_red", "stack the green block on the red block", STACK, (("on_block", "green", "red"),)),
    )
}


# Pretraining goals: none of them is a benchmark goal above; the bowl verb is taught only with
# yellow and magenta blocks, the zone, push and stack verbs only with other pairs than above.
# Each bowl task has its own scene with benchmark colours as distractors, so a base has seen red,
# green and blue blocks beside a bowl (and left them there) before the benchmark asks it to move
# them (four blocks and a bowl do not always fit the workspace, hence three scenes of three).
P_BOWL_Y = Layout("p_bowl_y", ("yellow", "red", "blue"), bowl=True, spread=True)
P_BOWL_M = Layout("p_bowl_m", ("magenta", "blue", "green"), bowl=True, spread=True)
P_BOWL_MY = Layout("p_bowl_my", ("magenta", "yellow", "red"), bowl=True, spread=True)
P_ZONES_A = Layout("p_zones_a", ("green", "red"), zones=("yellow", "magenta"), spread=True)
P_ZONES_B = Layout("p_zones_b", ("blue", "green"), zones=("yellow", "magenta"), spread=True)
P_PUSH_M = Layout("p_push_m", ("red", "green"), zones=("magenta",), push_paths=True, spread=True)
P_PUSH_Y = Layout("p_push_y", ("blue", "red"), zones=("yellow",), push_paths=True, spread=True)
P_STACK = Layout("p_stack", ("red", "green", "blue"), spread=True)


def _place(block: str, zone: str, layout: Layout) -> TaskSpec:
    return TaskSpec(f"{block}_on_{zone}", f"place the {block} block on the {zone} square", layout, (("on_zone", block, zone),))


def _push(block: str, zone: str, layout: Layout) -> TaskSpec:
    return TaskSpec(f"push_{block}_to_{zone}", f"push the {block} block onto the {zone} square", layout,
                    (("push_to_zone", block, zone),))


def _stack(top: str, bottom: str) -> TaskSpec:
    return TaskSpec(f"stack_{top}_on_{bottom}", f"stack the {top} block on the {bottom} block", P_STACK,
                    (("on_block", top, bottom),))


PRETRAIN_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("yellow_in_bowl", "put the yellow block in the bowl", P_BOWL_Y, (("in_bowl", "yellow", None),)),
        TaskSpec("magenta_in_bowl", "put the magenta block in the bowl", P_BOWL_M, (("in_bowl", "magenta", None),)),
        TaskSpec("magenta_then_yellow_in_bowl", "put the magenta block in the bowl and then the yellow block in the bowl",
                 P_BOWL_MY, (("in_bowl", "magenta", None), ("in_bowl", "yellow", None))),
        _place("red", "magenta", P_ZONES_A), _place("green", "yellow", P_ZONES_A),
        _place("green", "magenta", P_ZONES_A), _place("blue", "yellow", P_ZONES_B),
        _push("red", "magenta", P_PUSH_M), _push("green", "magenta", P_PUSH_M), _push("blue", "yellow", P_PUSH_Y),
        _stack("blue", "red"), _stack("red", "blue"), _stack("green", "blue"), _stack("blue", "green"),
    )
}
SUITES: dict[str, dict[str, TaskSpec]] = {SUITE: TASKS, PRETRAIN_SUITE: PRETRAIN_TASKS}
assert not set(TASKS) & set(PRETRAIN_TASKS), "the pretraining suite must not hold a benchmark task"


def get_task(name: str) -> TaskSpec:
    for tasks in SUITES.values():
        if name in tasks:
            return tasks[name]
    known = sorted(t for tasks in SUITES.values() for t in tasks)
    raise KeyError(f"unknown tabletop task {name!r}; known: {known}") from None


def suite_tasks(suite: str) -> list[str]:
    """Task names of a tabletop suite, in order; names the known suites on a typo."""
    if suite not in SUITES:
        raise ValueError(f"unknown tabletop suite {suite!r}; known: {sorted(SUITES)}")
    return list(SUITES[suite])
