"""Tests for the built-in tabletop suite: the episode API contract, seeded initial states, success
predicates from sim state, language conditioning, and the scripted experts."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest

from common.config import EnvConfig
from common.records import Observation, StepResult
from env_workers.api import EpisodeEnv
from env_workers.factory import BackendUnavailable, make_env
from env_workers.tabletop import TASKS, TabletopEnv, get_task, run_expert
from env_workers.tabletop.scene import BLOCK_HALF, BOWL_BASE

SIZE = 64


def _cfg(**kw) -> EnvConfig:
    base = dict(backend="tabletop", suite="tabletop", image_size=SIZE, max_steps=100, num_steps_wait=0)
    return EnvConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def env():
    e = TabletopEnv(_cfg())
    yield e
    e.close()


def _noop(gripper: float = -1.0) -> np.ndarray:
    return np.array([0, 0, 0, 0, 0, 0, gripper], np.float32)


# --- the episode API contract ---
def test_env_satisfies_the_episode_env_protocol(env):
    assert isinstance(env, EpisodeEnv)
    assert env.action_dim == 7
    assert len(env.task_names) >= 8 and set(env.task_names) == set(TASKS)


def test_reset_and_step_return_observations_of_the_documented_shapes(env):
    obs = env.reset("red_in_bowl", 0)
    assert isinstance(obs, Observation)
    assert obs.image.shape == (SIZE, SIZE, 3) and obs.image.dtype == np.uint8
    assert obs.instruction == env.instruction("red_in_bowl") == "put the red block in the bowl"
    assert obs.proprio.shape == (8,) and obs.proprio.dtype == np.float32
    res = env.step(_noop())
    assert isinstance(res, StepResult)
    assert res.observation.image.shape == (SIZE, SIZE, 3) and res.observation.proprio.dtype == np.float32
    assert res.success is False and res.done is False


def test_episode_is_done_at_the_step_limit_and_refuses_further_steps():
    with TabletopEnv(_cfg(max_steps=5, tasks=["stack_red_on_green"])) as e:
        e.reset("stack_red_on_green", 3)
        dones = [e.step(_noop()).done for _ in range(5)]
        assert dones == [False] * 4 + [True]
        with pytest.raises(RuntimeError, match="reset"):
            e.step(_noop())
        e.reset("stack_red_on_green", 3)  # a fresh episode steps again
        assert e.step(_noop()).done is False


def test_per_task_step_limits_override_max_steps_and_reject_unknown_tasks():
    with TabletopEnv(_cfg(max_steps=6, task_max_steps={"red_on_yellow": 3})) as e:
        for task, limit in (("red_on_yellow", 3), ("stack_red_on_green", 6)):
            e.reset(task, 0)
            dones = [e.step(_noop()).done for _ in range(limit)]
            assert dones == [False] * (limit - 1) + [True], task
    with pytest.raises(KeyError, match="red_in_bowl"):  # the error lists the known tasks
        TabletopEnv(_cfg(task_max_steps={"red_in_bwol": 3}))
    with pytest.raises(ValueError, match="task_max_steps"):
        _cfg(task_max_steps={"red_on_yellow": 0})


def test_step_chunk_matches_single_steps_and_stops_at_the_step_limit():
    """A chunk renders once but must end exactly where k single steps end, also when the step
    limit falls inside the chunk, and give one frame per applied action when asked."""
    rng = np.random.default_rng(3)
    actions = rng.uniform(-1, 1, (10, 7)).astype(np.float32)
    with TabletopEnv(_cfg(max_steps=7, tasks=["red_in_bowl"])) as e:
        e.reset("red_in_bowl", 2)
        singles = []
        for a in actions:
            singles.append(e.step(a))
            if singles[-1].done:
                break
        assert len(singles) == 7  # the limit ends the episode inside the second chunk below
        e.reset("red_in_bowl", 2)
        first = e.step_chunk(actions[:4])
        second = e.step_chunk(actions[4:], keep_frames=True)
        assert (first.steps, first.done, first.frames) == (4, False, None)
        assert (second.steps, second.done, second.success) == (3, True, singles[-1].success)
        np.testing.assert_array_equal(first.observation.image, singles[3].observation.image)
        np.testing.assert_array_equal(first.observation.proprio, singles[3].observation.proprio)
        np.testing.assert_array_equal(second.observation.image, singles[-1].observation.image)
        np.testing.assert_array_equal(second.observation.proprio, singles[-1].observation.proprio)
        assert len(second.frames) == 3
        for frame, single in zip(second.frames, singles[4:]):
            np.testing.assert_array_equal(frame, single.observation.image)
        with pytest.raises(RuntimeError, match="reset"):
            e.step_chunk(actions[:2])
        e.reset("red_in_bowl", 2)
        with pytest.raises(ValueError, match="actions must be"):
            e.step_chunk(actions[0])


def test_step_each_is_the_plain_chunk_step():
    from env_workers.api import step_each

    actions = np.tile(_noop(), (5, 1))
    with TabletopEnv(_cfg(max_steps=3, tasks=["red_on_yellow"])) as e:
        e.reset("red_on_yellow", 0)
        plain = step_each(e, actions, keep_frames=True)
        e.reset("red_on_yellow", 0)
        fast = e.step_chunk(actions, keep_frames=True)
    assert (plain.steps, plain.done) == (fast.steps, fast.done) == (3, True)
    for a, b in zip(plain.frames, fast.frames):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(plain.observation.image, fast.observation.image)


def test_close_releases_the_simulators_and_can_be_called_twice():
    e = TabletopEnv(_cfg(tasks=["red_on_yellow"]))
    e.reset("red_on_yellow", 0)
    e.close()
    e.close()
    assert e.sim is None


def test_env_can_hop_threads_between_calls(env):
    """Env workers call the env from executor threads; the GL context must follow."""
    from concurrent.futures import ThreadPoolExecutor

    first = env.reset("red_on_yellow", 4).image
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            again = pool.submit(env.reset, "red_on_yellow", 4).result().image
            np.testing.assert_array_equal(first, again)
            pool.submit(env.step, _noop()).result()


def test_actions_are_clipped_to_the_unit_box(env):
    env.reset("stack_red_on_green", 0)
    env.step(np.array([50, 0, 0, 0, 0, 0, -1], np.float32))
    far = env.sim.ee_target.copy()
    env.reset("stack_red_on_green", 0)
    env.step(np.array([1, 0, 0, 0, 0, 0, -1], np.float32))
    np.testing.assert_allclose(env.sim.ee_target, far)


def test_rotation_dims_are_accepted_and_ignored(env):
    env.reset("stack_red_on_green", 1)
    a = env.step(np.array([0.3, -0.2, 0.1, 0, 0, 0, -1], np.float32)).observation
    env.reset("stack_red_on_green", 1)
    b = env.step(np.array([0.3, -0.2, 0.1, 1, -1, 0.5, -1], np.float32)).observation
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.proprio, b.proprio)


def test_gripper_follows_libero_convention_plus_one_closes(env):
    env.reset("stack_red_on_green", 0)  # gripper starts open, high above the table
    open_q = env.sim.finger_q.copy()
    for _ in range(3):
        env.step(_noop(+1.0))
    assert np.all(env.sim.finger_q < open_q - 0.02)
    for _ in range(3):
        env.step(_noop(-1.0))
    np.testing.assert_allclose(env.sim.finger_q, open_q, atol=3e-3)


def test_make_env_builds_tabletop_and_names_the_missing_backends(monkeypatch):
    import env_workers.maniskill.bootstrap as maniskill

    e = make_env(_cfg(tasks=["red_in_bowl"]))
    assert isinstance(e, TabletopEnv)
    e.close()
    monkeypatch.setattr(maniskill, "maniskill_installed", lambda: False)  # libero: tests/test_libero_env.py
    with pytest.raises(BackendUnavailable, match=r"'maniskill'.*make setup.*\[maniskill\]"):
        make_env(EnvConfig(backend="maniskill", suite="maniskill"))


def test_unknown_task_is_rejected_with_the_known_names():
    with pytest.raises(KeyError, match="red_in_bowl"):
        TabletopEnv(_cfg(tasks=["red_in_the_bowl"]))


# --- initial states ---
def test_reset_is_deterministic_for_a_task_and_init_state(env):
    first = env.reset("red_then_blue_in_bowl", 57)
    steps1 = [env.step(np.array([0.5, -0.3, -0.8, 0, 0, 0, 1], np.float32)).observation for _ in range(6)]
    env.reset("push_red_to_yellow", 2)  # something else in between
    again = env.reset("red_then_blue_in_bowl", 57)
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.proprio, again.proprio)
    steps2 = [env.step(np.array([0.5, -0.3, -0.8, 0, 0, 0, 1], np.float32)).observation for _ in range(6)]
    for a, b in zip(steps1, steps2):
        np.testing.assert_array_equal(a.image, b.image)


def test_different_init_states_give_different_scenes(env):
    a = env.reset("red_in_bowl", 0).image
    b = env.reset("red_in_bowl", 1).image
    assert not np.array_equal(a, b)


def test_train_and_eval_init_states_are_disjoint(env):
    split = env.cfg.init_states  # the default: 25 train, then 25 eval
    assert (split.split, split.num_train, split.num_eval) == ("disjoint", 25, 25)
    for task in env.task_names:
        train, ev = env.init_states(task, "train"), env.init_states(task, "eval")
        assert train == list(range(25)) and ev == list(range(25, 50))
        assert not set(train) & set(ev)


def test_paper_split_evaluates_on_the_training_states():
    with TabletopEnv(_cfg(init_states={"split": "paper", "num_train": 7, "num_eval": 7})) as e:
        assert e.init_states("red_in_bowl", "eval") == e.init_states("red_in_bowl", "train") == list(range(7))


def test_tasks_sharing_a_layout_start_from_the_same_scene(env):
    a = env.reset("red_in_bowl", 60).image
    b = env.reset("green_in_bowl", 60).image
    np.testing.assert_array_equal(a, b)
    assert env.instruction("red_in_bowl") != env.instruction("green_in_bowl")


# --- success from sim state ---
def _put_in_goal(env, subgoal, slot: int = 0) -> None:
    verb, block, target = subgoal
    sim = env.sim
    if verb == "in_bowl":
        c = sim.fixture_pos("bowl")
        sim.set_block(block, (c[0], c[1] + (slot - 0.5) * 0.07, BOWL_BASE + BLOCK_HALF))
    elif verb in ("on_zone", "push_to_zone"):
        c = sim.fixture_pos(f"zone_{target}")
        sim.set_block(block, (c[0], c[1], BLOCK_HALF))
    elif verb == "on_block":
        q = sim.block_pos(target)
        sim.set_block(block, (q[0], q[1], q[2] + 2 * BLOCK_HALF))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_success_when_the_goal_holds_in_sim_state_and_not_before(env, task):
    env.reset(task, 50)
    assert not env.check_success()  # initial states never start solved
    goal = get_task(task).goal
    for k, sub in enumerate(goal):
        _put_in_goal(env, sub, slot=k)
    assert env.check_success()
    # Put the (last) goal block back where it started, out of its goal: no longer a success.
    block = goal[-1][1]
    x, y, yaw = get_task(task).layout.sample(50)[block]
    env.sim.set_block(block, (x, y, BLOCK_HALF), yaw)
    assert not env.check_success()


def test_two_stage_task_needs_both_blocks(env):
    env.reset("red_then_blue_in_bowl", 51)
    _put_in_goal(env, ("in_bowl", "red", None), slot=0)
    assert not env.check_success()
    _put_in_goal(env, ("in_bowl", "blue", None), slot=1)
    assert env.check_success()


def test_success_is_reported_by_step_and_ends_the_episode(env):
    env.reset("red_on_yellow", 52)
    _put_in_goal(env, ("on_zone", "red", "yellow"))
    res = env.step(_noop())
    assert res.success and res.done


# --- language conditioning and experts ---
@pytest.mark.parametrize(
    "done_task,other_task",
    [("red_in_bowl", "green_in_bowl"), ("push_red_to_yellow", "push_green_to_yellow"),
     ("stack_red_on_green", "stack_green_on_red"), ("red_on_yellow", "blue_on_magenta")],
)
def test_instruction_decides_the_goal(env, done_task, other_task, init_state=55):
    assert get_task(done_task).layout is get_task(other_task).layout
    _, _, success = run_expert(env, done_task, init_state)
    assert success
    assert not get_task(other_task).success(env.sim)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_expert_solves_eval_init_states(env, task):
    for i in env.init_states(task, "eval")[:3]:
        _, actions, success = run_expert(env, task, i)
        assert success, f"{task} init state {i}"
        assert actions.shape[1] == 7 and np.all(np.abs(actions) <= 1.0)
        # No exact no-ops mid-demo (OpenVLA would filter them).
        assert np.all(np.linalg.norm(actions[:, :6], axis=1) > 1e-4)


def test_eval_keeps_per_task_limits_unless_an_eval_limit_is_given():
    from common.config import RunConfig
    from deploy.evaluate import eval_config

    cfg = RunConfig(env=_cfg(max_steps=48, task_max_steps={"red_then_blue_in_bowl": 96}))
    ev = eval_config(cfg).env
    assert ev.step_limit("red_then_blue_in_bowl") == 96 and ev.step_limit("red_in_bowl") == 48
    ev = eval_config(cfg.model_copy(update={"env": cfg.env.model_copy(update={"eval_max_steps": 200})})).env
    assert ev.step_limit("red_then_blue_in_bowl") == ev.step_limit("red_in_bowl") == 200


# --- absolute (position) control ---
def test_absolute_control_drives_the_gripper_to_the_commanded_point_at_bounded_speed():
    from env_workers.tabletop.env import MAX_LEAD
    from env_workers.tabletop.scene import EE_HIGH, EE_LOW

    with TabletopEnv(_cfg(control="absolute")) as env:
        env.reset("red_on_yellow", 0)
        goal = np.array([0.1, -0.05, 0.12])
        move = 2.0 * (goal - EE_LOW) / (EE_HIGH - EE_LOW) - 1.0
        action = np.r_[move, 0, 0, 0, -1].astype(np.float32)
        before = env.sim.ee_pos
        env.step(action)
        lead = env.sim.ee_target - before
        assert np.abs(lead).max() <= MAX_LEAD + 1e-9  # far goals are approached, never jumped to
        assert np.all(np.sign(lead[np.abs(goal - before) > 1e-3]) == np.sign((goal - before)[np.abs(goal - before) > 1e-3]))
        for _ in range(20):  # the same absolute action again and again: the gripper settles there
            env.step(action)
        np.testing.assert_allclose(env.sim.ee_pos, goal, atol=2e-3)
        np.testing.assert_allclose(env.sim.ee_target, goal, atol=1e-5)
        # -1 / +1 are the workspace box's corners
        env.reset("red_on_yellow", 0)
        for _ in range(30):
            env.step(np.array([1, -1, 1, 0, 0, 0, -1], np.float32))
        np.testing.assert_allclose(env.sim.ee_target, [EE_HIGH[0], EE_LOW[1], EE_HIGH[2]], atol=1e-9)


@pytest.mark.parametrize("task", ["red_then_blue_in_bowl", "push_red_to_yellow", "stack_green_on_red"])
def test_experts_record_absolute_targets_that_replay_their_delta_episodes_exactly(env, task):
    """Under absolute control the experts' actions are the servo targets their delta moves set:
    same states, images and success, and replaying the recorded targets reproduces the episode."""
    delta_obs, delta_actions, delta_ok = run_expert(env, task, 3)
    with TabletopEnv(_cfg(control="absolute")) as absolute:
        obs, actions, ok = run_expert(absolute, task, 3)
        assert ok and delta_ok and len(actions) == len(delta_actions)
        np.testing.assert_array_equal(obs[-1].image, delta_obs[-1].image)
        np.testing.assert_allclose(obs[-1].proprio, delta_obs[-1].proprio, atol=1e-6)
        assert not np.allclose(actions[:, :3], delta_actions[:, :3])  # they are different conventions
        assert np.all(np.abs(actions) <= 1.0)
        end = absolute.proprio()
        absolute.reset(task, 3)
        for a in actions:
            res = absolute.step(a)
        assert res.success and res.done
        np.testing.assert_allclose(res.observation.proprio, end, atol=1e-5)


def test_absolute_control_is_tabletop_only_and_its_targets_skip_q01_q99_rescaling():
    from pydantic import ValidationError

    from env_workers.demos import Demo, dataset_statistics
    from env_workers.factory import env_scaled_action_dims

    with pytest.raises(ValidationError, match="control 'absolute' exists for the tabletop backend only"):
        EnvConfig(backend="libero", control="absolute")
    assert env_scaled_action_dims(_cfg()) == ()
    assert env_scaled_action_dims(_cfg(control="absolute")) == (0, 1, 2)
    rng = np.random.default_rng(0)
    demo = Demo(task="t", instruction="i", images=np.zeros((20, 8, 8, 3), np.uint8),
                actions=rng.uniform(-0.5, 0.5, (20, 7)).astype(np.float32))
    assert dataset_statistics([demo])["action"]["mask"] == [True] * 6 + [False]
    assert dataset_statistics([demo], scaled_dims=(0, 1, 2))["action"]["mask"] == [False] * 3 + [True] * 3 + [False]
