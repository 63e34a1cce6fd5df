"""The ManiSkill3 backend against real ManiSkill (SAPIEN 3, PhysX CPU, Vulkan on lavapipe): episode
API contract on every task, success from the task's own evaluation, seeded init-state split,
LIBERO's action conventions, offline setup and its one-line errors."""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("mani_skill", reason="ManiSkill is installed by `make setup`")

from common.config import EnvConfig  # noqa: E402
from env_workers.api import EpisodeEnv  # noqa: E402
from env_workers.factory import make_env  # noqa: E402
from env_workers.maniskill import TASKS, ManiSkillEnv, conventions  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

SIZE = 64
SPLIT = {"split": "disjoint", "num_train": 30, "num_eval": 20}


def _cfg(**kw) -> EnvConfig:
    base = dict(backend="maniskill", suite="maniskill", image_size=SIZE, max_steps=10, num_steps_wait=0, init_states=SPLIT)
    return EnvConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def env():
    e = make_env(_cfg())
    yield e
    e.close()


def _noop(gripper: float = -1.0) -> np.ndarray:
    return np.array([0, 0, 0, 0, 0, 0, gripper], dtype=np.float64)


def _place(actor, p, q=None) -> None:
    """Move a ManiSkill actor (at rest) to position p (and quaternion q, wxyz)."""
    import torch
    from mani_skill.utils.structs.pose import Pose

    p = torch.as_tensor(np.asarray(p, dtype=np.float32)).reshape(1, 3)
    q = None if q is None else torch.as_tensor(np.asarray(q, dtype=np.float32)).reshape(1, 4)
    actor.set_pose(Pose.create_from_pq(p=p, q=q))
    actor.set_linear_velocity(torch.zeros(1, 3))
    actor.set_angular_velocity(torch.zeros(1, 3))


def _solve(sim, task: str) -> None:
    """Put the scene in a state that the task's own evaluate() counts as success."""
    if task == "PickCube-v1":  # goals lie up to 0.3 m above the table; one on the table keeps the cube at rest
        _place(sim.goal_site, sim.cube.pose.p[0])
    elif task in ("PushCube-v1", "PullCube-v1"):
        goal = sim.goal_region.pose.p[0].clone()
        goal[2] = sim.cube_half_size
        _place(sim.obj, goal)
    elif task == "StackCube-v1":
        top = sim.cubeB.pose.p[0].clone()
        top[2] += 2 * sim.cube_half_size[2]
        _place(sim.cubeA, top)
    elif task == "PlaceSphere-v1":
        inside = sim.bin.pose.p[0].clone()
        inside[2] += sim.radius + sim.block_half_size[0]
        _place(sim.obj, inside)
    elif task == "LiftPegUpright-v1":
        p = sim.peg.pose.p[0].clone()
        p[2] = sim.peg_half_length
        # the peg's long (x) axis vertical, as XYZ Euler angles (pi/2, 0, pi/2): clear of the gimbal lock
        # that a plain quarter turn about y would put evaluate()'s Euler-angle test in
        _place(sim.peg, p, [0.5, 0.5, -0.5, 0.5])
    elif task == "PegInsertionSide-v1":
        sim.peg.set_pose(sim.goal_pose)  # the peg's head at the hole's centre
    else:
        raise AssertionError(f"no success state for {task}")


# --- the episode API on every task ---
def test_env_satisfies_the_episode_env_protocol_with_the_suites_tasks(env):
    assert isinstance(env, EpisodeEnv) and isinstance(env, ManiSkillEnv) and env.action_dim == 7
    assert env.task_names == ["PickCube-v1", "PushCube-v1", "PullCube-v1", "StackCube-v1", "PlaceSphere-v1",
                              "LiftPegUpright-v1", "PegInsertionSide-v1"]
    assert env.instruction("StackCube-v1") == "stack the red cube on top of the green cube"
    assert len({env.instruction(t) for t in env.task_names}) == len(TASKS)


def test_pickcube_shows_its_goal_marker_to_the_camera(env):
    """PickCube hides its goal from cameras (its state observation has the goal); an image-only
    policy must see it, so the marker is rendered: the image changes where the marker stands."""
    env.reset("PickCube-v1", 0)
    sim = env.sim
    with_goal = env.render()
    goal = sim.goal_site.pose.p[0].clone()
    _place(sim.goal_site, goal + np.array([0.0, 0.0, 5.0], dtype=np.float32))  # far above the camera's view
    without = env.render()
    green = lambda img: int(((img[..., 1] > 150) & (img[..., 0] < 100) & (img[..., 2] < 100)).sum())  # noqa: E731
    assert green(with_goal) > green(without) == 0


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_resets_steps_and_succeeds_by_its_own_evaluation(env, task):
    obs = env.reset(task, 3)
    assert obs.image.shape == (SIZE, SIZE, 3) and obs.image.dtype == np.uint8 and obs.image.std() > 10
    assert obs.instruction == TASKS[task].instruction
    assert obs.proprio.shape == (conventions.PROPRIO_DIM,) and obs.proprio.dtype == np.float32
    np.testing.assert_allclose(obs.proprio[:3], env.sim.agent.tcp.pose.p[0].numpy(), rtol=1e-6)
    assert abs(np.linalg.norm(obs.proprio[3:6]) - np.pi) < 0.2, "gripper points down: axis-angle of ~pi"
    assert obs.proprio[6] > 0.03 and obs.proprio[7] < -0.03, "fingers open, with LIBERO's signs"
    first = env.step(_noop())
    assert (first.success, first.done) == (False, False) and not env.check_success()
    _solve(env.sim, task)
    result = env.step(_noop())
    assert result.success and result.done and env.steps == 2
    with pytest.raises(RuntimeError, match="reset"):
        env.step(_noop())


def test_peg_insertion_draws_peg_and_box_sizes_from_the_init_state(env):
    sizes = []
    for state in (4, 5, 4):
        env.reset("PegInsertionSide-v1", state)
        sizes.append(env.sim.peg_half_sizes[0].numpy().copy())
    np.testing.assert_array_equal(sizes[0], sizes[2])
    assert not np.array_equal(sizes[0], sizes[1])


# --- initial states ---
def test_init_states_are_seeds_split_disjoint_and_independent_of_history(env):
    train, heldout = env.init_states("StackCube-v1", "train"), env.init_states("StackCube-v1", "eval")
    assert train == list(range(30)) and heldout == list(range(30, 50)) and not set(train) & set(heldout)
    actions = np.random.default_rng(1).uniform(-1, 1, (4, 7))
    first = env.reset("StackCube-v1", heldout[0])
    first_end = env.step_chunk(actions).observation
    env.reset("StackCube-v1", 2)  # another episode in the same scene in between
    env.step_chunk(actions[::-1])
    again = env.reset("StackCube-v1", heldout[0])
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.proprio, again.proprio)
    np.testing.assert_array_equal(env.step_chunk(actions).observation.proprio, first_end.proprio)  # same actions, same path
    assert not np.array_equal(first.image, env.reset("StackCube-v1", train[0]).image), "other seeds, other scenes"
    paper = ManiSkillEnv(_cfg(init_states={"split": "paper", "num_train": 10, "num_eval": 10}))
    assert paper.init_states("StackCube-v1", "eval") == paper.init_states("StackCube-v1", "train") == list(range(10))


# --- steps, limit, chunks ---
def test_step_chunk_matches_single_steps_and_stops_at_the_step_limit(env):
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (env.cfg.max_steps + 3, 7))
    env.reset("StackCube-v1", 1)
    singles = [env.step(a) for a in actions[:env.cfg.max_steps]]
    assert [r.done for r in singles] == [False] * (env.cfg.max_steps - 1) + [True]
    env.reset("StackCube-v1", 1)
    chunk = env.step_chunk(actions, keep_frames=True)
    assert (chunk.steps, chunk.done, chunk.success, len(chunk.frames)) == (env.cfg.max_steps, True, False, env.cfg.max_steps)
    np.testing.assert_array_equal(chunk.observation.image, singles[-1].observation.image)
    np.testing.assert_array_equal(chunk.observation.proprio, singles[-1].observation.proprio)
    np.testing.assert_array_equal(chunk.frames[2], singles[2].observation.image)
    env.reset("StackCube-v1", 1)
    with pytest.raises(ValueError, match="7 values"):
        env.step(np.zeros(6))
    with pytest.raises(ValueError, match="NaN"):
        env.step(np.full(7, np.nan))


# --- LIBERO's action conventions ---
@pytest.mark.parametrize("dim,sign", [(0, 1.0), (1, -1.0), (2, 1.0), (2, -1.0)])
def test_a_position_delta_moves_the_gripper_that_way_in_the_world(env, dim, sign):
    env.reset("PushCube-v1", 0)
    start = env.observe().proprio[:3]
    action = _noop()
    action[dim] = 0.5 * sign
    for _ in range(3):
        end = env.step(action).observation.proprio[:3]
    moved = end - start
    assert sign * moved[dim] > 0.03, moved  # 3 steps at 0.05 m of target offset each
    assert np.abs(np.delete(moved, dim)).max() < 0.5 * abs(moved[dim]), moved


def test_gripper_closes_on_plus_one_opens_on_minus_one_and_holds_on_zero(env):
    env.reset("PushCube-v1", 0)
    open_width = env.observe().proprio[6] - env.observe().proprio[7]
    for _ in range(4):
        closed = env.step(_noop(+1.0)).observation.proprio
    assert closed[6] - closed[7] < open_width - 0.05, "LIBERO: +1 closes"
    held = env.step(_noop(0.0)).observation.proprio
    assert held[6] - held[7] < open_width - 0.05, "exactly 0 keeps the last command (robosuite reads the sign)"
    for _ in range(4):
        reopened = env.step(_noop(-1.0)).observation.proprio
    assert reopened[6] - reopened[7] > 0.8 * open_width, "LIBERO: -1 opens (most of the way in 4 steps)"


def test_two_envs_in_one_process_each_render_their_own_scene(env):
    """An env worker hosts several envs; each renders its own SAPIEN scene."""
    first = env.reset("PushCube-v1", 0).image
    other = make_env(_cfg(tasks=["PullCube-v1"]))
    try:
        pull = other.reset("PullCube-v1", 0).image
        np.testing.assert_array_equal(env.reset("PushCube-v1", 0).image, first)
        np.testing.assert_array_equal(other.reset("PullCube-v1", 0).image, pull)
        assert np.abs(first.astype(int) - pull).mean() > 5, "different scenes"
    finally:
        other.close()


def test_per_task_step_limits_override_max_steps():
    with ManiSkillEnv(_cfg(tasks=["PushCube-v1"], max_steps=5, task_max_steps={"PushCube-v1": 2})) as e:
        e.reset("PushCube-v1", 0)
        assert [e.step(_noop()).done for _ in range(2)] == [False, True]


def test_env_worker_gives_maniskill_the_same_policy_actions_as_libero():
    from env_workers.libero.conventions import openvla_to_libero
    from env_workers.worker import to_env_actions

    policy = np.array([[0.1, -0.2, 0.3, 0, 0, 0.05, 1.0], [0, 0, 0, 0, 0, 0, 0.0], [0, 0, 0, 0, 0, 0, 0.5]])
    env_actions = to_env_actions("maniskill", policy)
    np.testing.assert_array_equal(env_actions, openvla_to_libero(policy))
    assert env_actions[:, -1].tolist() == [-1.0, 1.0, 0.0]  # RLDS 1 = open -> LIBERO -1 = open
    ms = [conventions.libero_to_maniskill(a, last_gripper=-1.0)[6] for a in env_actions]
    assert ms == [1.0, -1.0, -1.0]  # ManiSkill: +1 = open; 0 keeps the last target
    np.testing.assert_array_equal(conventions.libero_to_maniskill(np.array([2, -3, 0, 0, 0, 0, -1.0]), 1.0)[:2], [1, -1])


def test_orientation_proprio_is_robosuites_axis_angle():
    np.testing.assert_allclose(conventions.quat_wxyz_to_axisangle(np.array([0.0, 1.0, 0.0, 0.0])), [np.pi, 0, 0], atol=1e-7)
    half = np.pi / 4  # 90 degrees about z
    np.testing.assert_allclose(conventions.quat_wxyz_to_axisangle(np.array([np.cos(half), 0, 0, np.sin(half)])),
                               [0, 0, np.pi / 2], atol=1e-7)
    assert conventions.quat_wxyz_to_axisangle(np.array([1.0, 0, 0, 0])).tolist() == [0.0, 0.0, 0.0]


# --- config errors and the offline setup ---
def test_unknown_tasks_and_suites_name_what_exists():
    with pytest.raises(ValueError, match=r"unknown task 'PickCube-v2'.*PickCube-v1"):
        ManiSkillEnv(_cfg(tasks=["PickCube-v2"]))
    with pytest.raises(ValueError, match=r"unknown task 'StackCube'.*StackCube-v1"):
        ManiSkillEnv(_cfg(task_max_steps={"StackCube": 3}))
    with pytest.raises(ValueError, match=r"env.suite.*'maniskill'"):
        ManiSkillEnv(_cfg(suite="libero_spatial"))
    with pytest.raises(ValueError, match="init_state must be >= 0"):
        ManiSkillEnv(_cfg()).reset("PushCube-v1", -1)


def test_preflight_lists_the_suites_tasks_for_an_unknown_task(tmp_path):
    from common.config import RunConfig
    from deploy.preflight import PreflightError, check_tasks

    with pytest.raises(PreflightError, match=r"env.tasks: \['PickCube'\] not in the maniskill suite.*PegInsertionSide-v1"):
        check_tasks(RunConfig(env=_cfg(tasks=["PickCube-v1", "PickCube"])))
    with pytest.raises(PreflightError, match=r"env.suite: unknown ManiSkill suite 'maniskil'.*\['maniskill', 'maniskill_bimanual'\]"):
        check_tasks(RunConfig(env=_cfg(suite="maniskil")))
    check_tasks(RunConfig(env=_cfg(tasks=["PegInsertionSide-v1"])))


def test_missing_maniskill_tells_how_to_install(monkeypatch):
    import env_workers.maniskill.bootstrap as bootstrap
    from env_workers.factory import BackendUnavailable

    monkeypatch.setattr(bootstrap, "maniskill_installed", lambda: False)
    with pytest.raises(BackendUnavailable, match=r"not installed: run `make setup`.*mani-skill==3.0.1") as err:
        make_env(_cfg())
    assert "\n" not in str(err.value)


def test_no_vulkan_device_fails_in_one_line_naming_the_fix():
    """Without a Vulkan driver SAPIEN would fail deep inside env creation; here it is one line."""
    code = ("from common.config import EnvConfig\nfrom env_workers.factory import make_env\n"
            "make_env(EnvConfig(backend='maniskill', suite='maniskill'))")
    env = {**os.environ, "VK_ICD_FILENAMES": "/nonexistent/icd.json", "VK_DRIVER_FILES": "/nonexistent/icd.json",
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("env_workers.maniskill.bootstrap.RenderDeviceError: SAPIEN") and "make apt" in last, out.stderr


def test_every_task_builds_offline_and_tasks_that_need_downloads_are_refused():
    """Nothing is fetched at run time: our tasks declare no ManiSkill asset download (so env creation
    never prompts or downloads), and a task that does is refused before ManiSkill would fetch it."""
    from env_workers.maniskill.bootstrap import check_offline, ensure_maniskill

    ensure_maniskill()
    for task in TASKS:
        check_offline(task)
    with pytest.raises(RuntimeError, match=r"PickSingleYCB-v1 needs downloaded assets \['ycb'\].*offline"):
        check_offline("PickSingleYCB-v1")
