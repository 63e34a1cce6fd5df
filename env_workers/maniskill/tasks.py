"""The ManiSkill3 suites we run: task ids, language instructions, published step limits, and how
each task is built. Plain data: listing tasks (preflight, configs) never imports the simulator.

ManiSkill's tasks come without language, so every task gets the instruction a person would give
for what the task's own `evaluate()` counts as success. Step limits are the ones ManiSkill
registers (`max_episode_steps`); configs/maniskill.yaml uses them as `env.task_max_steps`.

Suite "maniskill": the single-arm Panda tabletop primitives, all offline (no asset download: the
robot and every object ship in the wheel or are built from boxes, spheres and capsules).
Suite "maniskill_bimanual": two Pandas facing each other across the table; the action is 7 dims per
arm (conventions.py), so a suite's tasks share one arm count (`suite_arms`).
"""

from __future__ import annotations

from dataclasses import dataclass

SUITE = "maniskill"


@dataclass(frozen=True)
class ManiSkillTask:
    name: str  # the gymnasium id ManiSkill registers
    instruction: str
    max_episode_steps: int  # ManiSkill's registered limit, at its 20 Hz control rate
    show_hidden: tuple[str, ...] = ()  # task attributes ManiSkill hides from cameras that a policy must see
    # False where a seed also draws the scene's geometry (built once per scene of a batched env, so
    # a partial reset could not reproduce init state i)
    batches: bool = True
    arms: int = 1  # Panda arms the task drives


TASKS: dict[str, ManiSkillTask] = {t.name: t for t in (
    # PickCube hides its goal marker from the cameras (its state observation carries the goal position);
    # an image-only policy could not know where to bring the cube, so the green marker is rendered
    ManiSkillTask("PickCube-v1", "pick up the red cube and move it to the green marker", 50, show_hidden=("goal_site",)),
    ManiSkillTask("PushCube-v1", "push the blue cube onto the red and white target", 50),
    ManiSkillTask("PullCube-v1", "pull the blue cube back onto the red and white target", 50),
    ManiSkillTask("StackCube-v1", "stack the red cube on top of the green cube", 50),
    ManiSkillTask("PlaceSphere-v1", "put the blue ball into the white bin", 50),
    ManiSkillTask("LiftPegUpright-v1", "stand the red and blue peg upright on the table", 50),
    ManiSkillTask("PegInsertionSide-v1", "insert the orange end of the peg into the hole in the box", 100, batches=False),
)}

BIMANUAL_SUITE = "maniskill_bimanual"
BIMANUAL_TASKS: dict[str, ManiSkillTask] = {t.name: t for t in (
    # agents[0] (first 7 action dims) stands at y = -0.75 next to the blue cube, agents[1] at y = +0.75
    # next to the green one; success: green on the target, blue on green, both released
    ManiSkillTask("TwoRobotStackCube-v1", "put the green cube on the red and white target and stack the blue cube "
                  "on top of it", 100, arms=2),
)}

SUITES: dict[str, dict[str, ManiSkillTask]] = {SUITE: TASKS, BIMANUAL_SUITE: BIMANUAL_TASKS}

# Every task runs the plain Panda. StackCube and PegInsertionSide default to `panda_wristcam`, the same
# arm plus a wrist camera and its RealSense mesh; we use no wrist image, and that mesh alone doubles
# the CPU render time of the third-person camera (~75 ms instead of ~35 ms at 128 px).
ROBOT = "panda"
CAMERA = "base_camera"  # each task's third-person camera (the one ManiSkill's RGB baselines use)


def suite_tasks(suite: str) -> list[str]:
    """Task names of a ManiSkill suite, in order; names the known suites on a typo."""
    if suite not in SUITES:
        raise ValueError(f"unknown ManiSkill suite {suite!r}; known: {sorted(SUITES)}")
    return list(SUITES[suite])


def robot_uids(task: ManiSkillTask) -> str | tuple[str, ...]:
    """gym.make's robot_uids: one Panda, or one per arm (ManiSkill's multi-agent form)."""
    return ROBOT if task.arms == 1 else (ROBOT,) * task.arms


def suite_arms(suite: str) -> int:
    """Arms of a suite's tasks (one number: they share the action space)."""
    arms = {t.arms for t in SUITES[suite].values()} if suite in SUITES else {1}
    if len(arms) != 1:
        raise ValueError(f"ManiSkill suite {suite!r} mixes tasks with {sorted(arms)} arms")
    return arms.pop()


def get_task(suite: str, name: str) -> ManiSkillTask:
    tasks = SUITES[suite] if suite in SUITES else {}
    if name not in tasks:
        raise ValueError(f"unknown task {name!r} for ManiSkill suite {suite!r}; known: {list(tasks)}")
    return tasks[name]


def batch_task(suite: str, names: list[str]) -> ManiSkillTask:
    """The one task of a batched env (batched_env.py: its N scenes are one ManiSkill env, i.e. one task
    whose init states a partial reset reproduces); raises naming env.tasks otherwise."""
    if len(names) != 1:
        raise ValueError(f"env.tasks: a batched ManiSkill env (env.sim_backend physx_cuda or env.batched) runs one "
                         f"task, got {len(names)}: {names}; set env.tasks=[ONE_TASK] (one run per task)")
    task = get_task(suite, names[0])
    if not task.batches:
        raise ValueError(f"env.tasks: {task.name} cannot batch (a seed also draws its geometry, built once per "
                         f"scene); batchable: {[t.name for t in SUITES[suite].values() if t.batches]}")
    if task.arms != 1:  # the batched env drives one Panda per scene
        raise ValueError(f"env.tasks: {task.name} drives {task.arms} arms; a batched ManiSkill env runs single-arm tasks")
    return task
