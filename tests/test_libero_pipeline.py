"""The Ray pipeline on real LIBERO scenes with the tiny policy: `vla-grpo eval` end to end, and one
GRPO step (Serve replica, one env worker hosting 2 LIBERO envs, coordinator, 2-rank learner)."""

import json

import numpy as np
import pytest
import ray

pytest.importorskip("libero", reason="LIBERO is installed by `make setup`")

from common.config_loading import load_config  # noqa: E402
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
    from deploy.runtime import Rollout

    cfg = load_config(ROOT / "configs/tiny.yaml", [*LIBERO, f"run_dir={tmp_path_factory.mktemp('run')}", "env.max_steps=16",
                                                   "env.init_states.num_train=25", "env.init_states.num_eval=25",
                                                   "rollout.min_group_success=0.0", "checkpoint.every=100"])
    rollout = Rollout.start(cfg, str(tiny_policy_dir))
    yield cfg, rollout
    rollout.shutdown()


def test_one_grpo_step_on_libero_end_to_end(pipeline, tiny_policy_dir):
    from deploy.train import GRPOTrainer

    cfg, rollout = pipeline
    assert rollout.task_info[TASK]["train"] == list(range(25)) and rollout.task_info[TASK]["eval"] == list(range(25, 50))
    trainer = GRPOTrainer(cfg, str(tiny_policy_dir), rollout)
    try:
        scalars = trainer.train_step()
    finally:
        trainer.shutdown()
    assert scalars["rollout/episodes"] >= cfg.rollout.groups_per_batch * cfg.rollout.group_size
    assert np.isfinite(scalars["train/loss"]) and scalars["policy/version"] == 1
    assert rollout.handle.broadcast("get_version").results(timeout_s=30) == [1] * cfg.cluster.serve_replicas


def test_libero_trajectories_hold_the_rendered_frames_and_stop_at_the_limit(pipeline):
    from actors.env_pool import Episode

    cfg, rollout = pipeline
    results = rollout.pool.run_all([Episode(TASK, s, 1.6, False) for s in (0, 0)], timeout_s=300)
    trajs = [ray.get(done.ref) for done in results]
    for done, traj in zip(results, trajs):
        assert traj.images.shape[1:] == (64, 64, 3) and traj.images.dtype == np.uint8
        assert traj.executed.sum() == done.meta.env_steps == cfg.env.max_steps and not traj.success
    np.testing.assert_array_equal(trajs[0].images[0], trajs[1].images[0])  # same init state, same first frame
