"""The Ray pipeline on real ManiSkill scenes with the tiny policy: one GRPO step end to end (Serve
replica, one env worker hosting 2 ManiSkill envs, coordinator, 2-rank learner), and the config
that ships for ManiSkill."""

import numpy as np
import pytest

pytest.importorskip("mani_skill", reason="ManiSkill is installed by `make setup`")

from common.config_loading import load_config  # noqa: E402
from tests.backend_pipeline import check_one_grpo_step, check_trajectories, start_pipeline  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

TASK = "PushCube-v1"
MANISKILL = ["env.backend=maniskill", "env.suite=maniskill", f"env.tasks=[{TASK}]", "env.image_size=64",
             "env.num_steps_wait=0", "cluster.num_env_workers=1", "cluster.envs_per_worker=2"]


def test_maniskill_config_loads_and_names_real_tasks():
    from deploy.preflight import check_tasks
    from env_workers.maniskill import TASKS

    cfg = load_config(ROOT / "configs/maniskill.yaml")
    assert cfg.env.backend == "maniskill" and cfg.env.image_size == cfg.policy.image_size == 128
    assert cfg.policy.proprio_dim == 8 and cfg.policy.action_dims == 7
    check_tasks(cfg)  # every task and per-task limit names a task of the suite
    # ManiSkill's registered limits, but PlaceSphere's: its expert's plans take up to 62 steps
    registered = {t: spec.max_episode_steps for t, spec in TASKS.items()}
    assert {t: cfg.env.step_limit(t) for t in TASKS} == {**registered, "PlaceSphere-v1": 80}


@pytest.fixture(scope="module")
def pipeline(ray_cluster, tiny_policy_dir, tmp_path_factory):
    cfg, rollout = start_pipeline(MANISKILL, tiny_policy_dir, tmp_path_factory.mktemp("run"))
    yield cfg, rollout
    rollout.shutdown()


def test_one_grpo_step_on_maniskill_end_to_end(pipeline, tiny_policy_dir):
    check_one_grpo_step(*pipeline, tiny_policy_dir, TASK)


def test_maniskill_trajectories_hold_the_rendered_frames_and_stop_at_the_limit(pipeline):
    check_trajectories(*pipeline, TASK, init_state=3)


def test_sft_on_maniskill_tasks_without_an_expert_asks_for_a_dataset(tmp_path):
    """Motion-planner experts exist for some ManiSkill tasks only (env_workers/maniskill/experts.py);
    SFT without sft.dataset on the whole suite names the others and the field to set."""
    from deploy.sft import demo_folder

    cfg = load_config(ROOT / "configs/maniskill.yaml", [f"run_dir={tmp_path}", "env.image_size=64"])
    with pytest.raises(ValueError, match=r"no ManiSkill expert reaches 90 % on .*LiftPegUpright-v1.* sft.dataset=DIR"):
        demo_folder(cfg)


def test_maniskill_demos_train_the_policy_in_openvlas_gripper_convention(tmp_path):
    """ManiSkill takes LIBERO's env actions and the env worker converts policy actions as for LIBERO,
    so SFT reads ManiSkill demos (env actions: -1 open, +1 close) into RLDS's (1 open, 0 close)."""
    from deploy.sft import load_demos
    from env_workers.demos import Demo, write_demos
    from env_workers.worker import to_env_actions

    actions = np.array([[0.1, 0, 0, 0, 0, 0, -1.0], [0, 0, -0.2, 0, 0, 0, 1.0]], dtype=np.float32)
    write_demos([Demo(TASK, "push", np.zeros((2, 8, 8, 3), np.uint8), actions, np.zeros((2, 8), np.float32))],
                tmp_path / "demos")
    cfg = load_config(ROOT / "configs/maniskill.yaml", [f"run_dir={tmp_path}", f"sft.dataset={tmp_path / 'demos'}"])
    (demo,) = load_demos(cfg)
    assert demo.actions[:, -1].tolist() == [1.0, 0.0]
    np.testing.assert_array_equal(to_env_actions("maniskill", demo.actions), actions)  # what the env gets back
