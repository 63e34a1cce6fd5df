"""ManiSkill motion-planner experts and the bimanual task, against real ManiSkill (PhysX CPU, lavapipe):
expert demos recorded through `vla-grpo sft`'s path in our HDF5 layout, replayed to success, with
dataset statistics; a 14-dim two-arm task end to end through the env and a policy of 14 action dims."""

import json

import numpy as np
import pytest

pytest.importorskip("mani_skill", reason="ManiSkill is installed by `make setup`")

from common.config_loading import load_config  # noqa: E402
from env_workers.factory import make_env  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

TASK = "PickCube-v1"
SMALL = ["env.image_size=64", "policy.image_size=64"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One PickCube expert demo recorded as `vla-grpo sft` does with sft.dataset unset."""
    from deploy.sft import demo_folder

    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(ROOT / "configs/maniskill.yaml", [f"run_dir={run_dir}", f"env.tasks=[{TASK}]",
                                                         "sft.demos_per_task=1", *SMALL])
    return cfg, demo_folder(cfg)


def test_expert_demo_round_trip_replays_to_success(recorded):
    from env_workers.demos import read_demos

    cfg, folder = recorded
    assert [p.name for p in folder.glob("*.hdf5")] == [f"{TASK}_demo.hdf5"]
    (demo,) = read_demos(folder)
    T = len(demo)
    assert demo.actions.shape == (T, 7) and demo.images.shape == (T, 64, 64, 3) and demo.proprio.shape == (T, 8)
    assert T <= cfg.env.step_limit(TASK) and set(np.unique(demo.actions[:, 6])) <= {-1.0, 1.0}
    assert demo.init_state in range(cfg.env.init_states.num_train)  # demos come from train states only
    env = make_env(cfg.env)
    try:  # the stored env actions alone reproduce the success, at the same step
        env.reset(TASK, demo.init_state)
        assert demo.states.shape[0] == T
        np.testing.assert_allclose(demo.states[0], env.sim_state(), atol=1e-6)  # the recorded start is this seed's
        results = [env.step(a) for a in demo.actions]
        assert results[-1].success and not any(r.done for r in results[:-1])
    finally:
        env.close()


def test_expert_demos_give_the_policy_dataset_statistics(recorded, tmp_path):
    """What `vla-grpo sft` saves before training: statistics of the converted demos in the policy folder."""
    from deploy.sft import load_demos
    from env_workers.demos import dataset_statistics
    from policy.checkpoint import initial_policy, save_policy

    cfg, _ = recorded
    demos = load_demos(cfg)
    stats = {"maniskill": dataset_statistics(demos, gripper_dims=(6,))}
    save_policy(initial_policy(cfg.policy, stats), tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "dataset_statistics.json").read_text())["maniskill"]
    assert saved["action"]["mask"] == [True] * 6 + [False] and len(saved["proprio"]["q01"]) == 8
    assert saved["num_trajectories"] == 1 and saved["num_transitions"] == len(demos[0])
    assert set(np.round(demos[0].actions[:, 6], 3)) == {0.0, 1.0}  # RLDS gripper: 1 open, 0 closed


def test_expert_rotation_actions_turn_the_tcp_toward_the_target(recorded):
    from env_workers.maniskill.experts import PlannerExpert, _angle, _qconj, _qmul, delta_action

    cfg, _ = recorded
    env = make_env(cfg.env)
    try:
        env.reset(TASK, 0)
        tcp = PlannerExpert(env)._tcp
        start = tcp()
        half = 0.15 / 2  # target: the start pose turned 0.15 rad about each root axis in turn
        for axis in range(3):
            turn = np.r_[np.cos(half), np.eye(3)[axis] * np.sin(half)]
            target = np.r_[start[:3], _qmul(turn, start[3:7])]
            env.reset(TASK, 0)
            for _ in range(4):
                env.apply_action(delta_action(tcp(), target, close=False))
            assert _angle(_qmul(target[3:7], _qconj(tcp()[3:7]))) < 0.02, axis
    finally:
        env.close()


def test_bimanual_task_takes_14_dims_and_a_14_dim_policy_drives_it():
    import torch

    from env_workers.worker import to_env_actions
    from policy.checkpoint import build_policy
    from policy.tiny import default_norm_stats

    cfg = load_config(ROOT / "configs/maniskill_bimanual.yaml", SMALL)
    env = make_env(cfg.env)
    try:
        assert env.task_names == ["TwoRobotStackCube-v1"] and env.action_dim == 14
        obs = env.reset("TwoRobotStackCube-v1", 0)
        assert obs.image.shape == (64, 64, 3) and obs.proprio.shape == (16,)
        with pytest.raises(ValueError, match="action must have 14 values"):
            env.step(np.zeros(7))
        down = np.zeros(14)
        down[[2, 6, 13]] = -0.5, 1.0, -1.0  # arm 0 down with its gripper closing; arm 1 still, open
        before = env.proprio()
        env.step_chunk(np.tile(down, (3, 1)))
        after = env.proprio()
        assert after[2] < before[2] - 0.02 and abs(after[10] - before[10]) < 0.01  # TCP z of arm 0, arm 1
        assert after[6] < before[6] - 0.005 and abs(after[14] - before[14]) < 0.002  # fingers of arm 0, arm 1
        policy = build_policy(cfg.policy, default_norm_stats(14), seed=0)
        (chunk,) = policy.act([env.observe()], greedy=True, generator=torch.Generator().manual_seed(0))
        assert chunk.actions.shape == (cfg.policy.action_chunk, 14) == (25, 14)
        env_actions = to_env_actions("maniskill", chunk.actions)
        assert set(np.unique(env_actions[:, [6, 13]])) <= {-1.0, 0.0, 1.0}  # both arms' grippers converted
        result = env.step_chunk(env_actions)
        assert result.steps == 25 and result.observation.proprio.shape == (16,)
    finally:
        env.close()


def test_policy_action_dims_must_match_the_suite():
    with pytest.raises(ValueError, match=r"policy.action_dims 7 does not match the 14 action dims .* set policy.action_dims=14"):
        load_config(ROOT / "configs/maniskill_bimanual.yaml", ["policy.action_dims=7"])
    with pytest.raises(ValueError, match=r"policy.proprio_dim 8 does not match the 16 proprio dims"):
        load_config(ROOT / "configs/maniskill_bimanual.yaml", ["policy.proprio_dim=8"])


def test_sft_without_a_dataset_names_the_tasks_without_an_expert(tmp_path):
    from env_workers.demos import record_demos

    cfg = load_config(ROOT / "configs/maniskill.yaml", [f"run_dir={tmp_path}", *SMALL])
    env = make_env(cfg.env)
    try:
        with pytest.raises(ValueError, match=r"no ManiSkill expert reaches 90 % on \['LiftPegUpright-v1'"):
            record_demos(env, ["PickCube-v1", "LiftPegUpright-v1"], 1)
    finally:
        env.close()


def test_place_sphere_expert_needs_more_than_the_registered_50_steps():
    """configs/maniskill.yaml gives PlaceSphere 80 steps: eval state 99's plan takes 62 and succeeds."""
    from env_workers.maniskill.experts import EXPERT_TASKS, PlannerExpert, run_expert

    cfg = load_config(ROOT / "configs/maniskill.yaml", ["env.tasks=[PlaceSphere-v1]", *SMALL])
    assert cfg.env.step_limit("PlaceSphere-v1") == 80 and "PlaceSphere-v1" in EXPERT_TASKS
    env = make_env(cfg.env)
    expert = PlannerExpert(env)
    try:
        run = run_expert(env, expert, "PlaceSphere-v1", 99)
    finally:
        expert.close()
        env.close()
    assert run["success"] and 50 < run["steps"] <= 80, run


def test_a_batched_env_refuses_the_bimanual_task():
    from env_workers.maniskill.tasks import batch_task

    with pytest.raises(ValueError, match="TwoRobotStackCube-v1 drives 2 arms"):
        batch_task("maniskill_bimanual", ["TwoRobotStackCube-v1"])
