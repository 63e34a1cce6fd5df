"""The checks every simulator backend's pipeline test runs (tests/test_libero_pipeline.py,
tests/test_maniskill_pipeline.py): the Ray pipeline on the backend's real scenes with the tiny
policy, one GRPO step end to end, and trajectories that hold the rendered frames."""

import numpy as np
import ray

from common.config_loading import load_config
from tests.conftest import ROOT


def start_pipeline(backend_overrides: list[str], tiny_policy_dir, run_dir):
    """(config, Rollout) of the tiny config on the backend: 25 train + 25 held-out states, 16-step episodes."""
    from deploy.runtime import Rollout

    cfg = load_config(ROOT / "configs/tiny.yaml", [*backend_overrides, f"run_dir={run_dir}", "env.max_steps=16",
                                                   "env.init_states.num_train=25", "env.init_states.num_eval=25",
                                                   "rollout.min_group_success=0.0", "checkpoint.every=100"])
    return cfg, Rollout.start(cfg, str(tiny_policy_dir))


def check_one_grpo_step(cfg, rollout, tiny_policy_dir, task: str) -> None:
    from deploy.train import GRPOTrainer

    assert rollout.task_info[task]["train"] == list(range(25)) and rollout.task_info[task]["eval"] == list(range(25, 50))
    trainer = GRPOTrainer(cfg, str(tiny_policy_dir), rollout)
    try:
        scalars = trainer.train_step()
    finally:
        trainer.shutdown()
    assert scalars["rollout/episodes"] >= cfg.rollout.groups_per_batch * cfg.rollout.group_size
    assert np.isfinite(scalars["train/loss"]) and scalars["policy/version"] == 1
    assert rollout.handle.broadcast("get_version").results(timeout_s=30) == [1] * cfg.cluster.serve_replicas


def check_trajectories(cfg, rollout, task: str, init_state: int) -> None:
    """Two episodes from one init state: 64 px uint8 frames, stopped at the step limit, same first frame."""
    from actors.env_pool import Episode

    results = rollout.pool.run_all([Episode(task, init_state, 1.6, False) for _ in range(2)], timeout_s=300)
    trajs = [ray.get(done.ref) for done in results]
    for done, traj in zip(results, trajs):
        assert traj.images.shape[1:] == (64, 64, 3) and traj.images.dtype == np.uint8
        assert traj.executed.sum() == done.meta.env_steps == cfg.env.max_steps and not traj.success
    np.testing.assert_array_equal(trajs[0].images[0], trajs[1].images[0])
