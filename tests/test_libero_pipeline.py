"""The Ray pipeline on real LIBERO scenes with the tiny policy: `vla-grpo eval` end to end, and one
GRPO step (Serve replica, one env worker hosting 2 LIBERO envs, coordinator, 2-rank learner)."""

import json

import pytest

pytest.importorskip("libero", reason="LIBERO is installed by `make setup`")

from tests.backend_pipeline import check_one_grpo_step, check_trajectories, start_pipeline  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

TASK = "pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate"
LIBERO = ["env.backend=libero", "env.suite=libero_spatial", f"env.tasks=[{TASK}]", "env.image_size=64",
          "env.num_steps_wait=10", "cluster.num_env_workers=1", "cluster.envs_per_worker=2"]


def test_eval_cli_reports_every_state_and_which_were_training_states(ray_cluster, tiny_policy_dir, tmp_path, capsys):
    from deploy.cli import main

    # 45 training + 3 held-out states: the LIBERO protocol evaluates held-out states first, then the rest
    main(["eval", str(ROOT / "configs/tiny.yaml"), *LIBERO, f"run_dir={tmp_path}", f"policy.path={tiny_policy_dir}",
          "env.init_states.num_train=45", "env.init_states.num_eval=3", "env.eval_max_steps=8",
          "eval.episodes_per_task=5", "eval.videos=1"])
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    task = report["per_task"][TASK]
    assert report["episodes"] == task["episodes"] == 5 and report["max_steps"] == 8
    assert task["train_states_evaluated"] == [0, 1] and task["heldout_episodes"] == 3
    split = report["init_states"]
    assert split["split"] == "disjoint" and split["train_state_episodes"] == 2 and split["heldout_episodes"] == 3
    assert report["mean_env_steps"] <= 8
    videos = list((tmp_path / "eval" / "videos").glob("*.mp4"))
    assert [v.name.split(f"{TASK}_")[1].split("_")[0] for v in videos] == ["45"]
    out = capsys.readouterr().out
    assert "held-out" in out and "average" in out and "2 of 5 episodes started from RL training states" in out


@pytest.fixture(scope="module")
def pipeline(ray_cluster, tiny_policy_dir, tmp_path_factory):
    cfg, rollout = start_pipeline(LIBERO, tiny_policy_dir, tmp_path_factory.mktemp("run"))
    yield cfg, rollout
    rollout.shutdown()


def test_one_grpo_step_on_libero_end_to_end(pipeline, tiny_policy_dir):
    check_one_grpo_step(*pipeline, tiny_policy_dir, TASK)


def test_libero_trajectories_hold_the_rendered_frames_and_stop_at_the_limit(pipeline):
    check_trajectories(*pipeline, TASK, init_state=0)
