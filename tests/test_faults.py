"""Faults during one strict on-policy run on the real local Ray cluster: a Serve replica killed mid-run
comes back on the run's current weights (no step trains stale), a hung env fails only its own
episode, a dead learner rank ends the run naming the checkpoint that resumes it, a full disk fails a
checkpoint cleanly. Chaos and a replica that cannot start: tests/test_chaos.py."""

import os
import signal

import pytest
import ray

from common.config_loading import load_config
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def strict_run(ray_cluster, tiny_policy_dir, tmp_path_factory):
    from deploy.runtime import Rollout

    run_dir = tmp_path_factory.mktemp("faults")
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"run_dir={run_dir}", "rollout.min_group_success=0.0",
                                                   "env.max_steps=24", "checkpoint.every=100", "total_steps=3",
                                                   "cluster.learner_world_size=1", "learner.weight_decay=1.0",
                                                   "learner.lr=0.05"])
    rollout = Rollout.start(cfg, str(tiny_policy_dir))
    yield cfg, rollout
    rollout.shutdown()


def test_a_killed_replica_returns_on_the_current_weights_and_no_step_trains_stale(strict_run, tiny_policy_dir):
    from deploy.train import GRPOTrainer

    cfg, rollout = strict_run
    trainer = GRPOTrainer(cfg, str(tiny_policy_dir), rollout)
    try:
        for _ in range(2):
            trainer.train_step()
        victim = rollout.handle.pid.remote().result(timeout_s=30)
        os.kill(victim, signal.SIGKILL)
        # Serve restarts it with its construction arguments (the initial policy, version 0); it must
        # load version 2 from the weight store before it serves
        scalars = trainer.train_step()
        assert rollout.handle.pid.remote().result(timeout_s=60) != victim
        assert rollout.handle.broadcast("get_version").results(timeout_s=60) == [3] * cfg.cluster.serve_replicas
    finally:
        trainer.shutdown()
    assert [h["rollout/policy_lag"] for h in trainer.history] == [0.0, 0.0, 0.0]
    assert scalars["policy/version"] == 3 and scalars["rollout/episodes"] >= 8


def test_a_hung_env_fails_only_its_own_episode_and_its_siblings_finish_on_new_envs(strict_run):
    """One env of a worker hangs: its episode times out, the worker rebuilds its envs, and the
    worker's other episodes, whose sim thread went with the rebuild, start again on the new envs
    instead of failing (each failure would count against the episode's three attempts)."""
    from env_workers.worker import EnvTimeout, EnvWorker
    from services.policy_service import APP_NAME

    cfg, rollout = strict_run
    envs = 3
    worker = EnvWorker.options(max_concurrency=envs + 4).remote(
        cfg.env.model_copy(update={"step_timeout_s": 2.0}), envs, APP_NAME)
    try:
        ray.get(worker.inject_hang.remote(8.0), timeout=60)  # slot 0's next env call: one episode's reset
        refs = [worker.run_episode.remote("red_in_bowl", i, 1.6, False)[0] for i in range(envs)]
        outcomes = []
        for ref in refs:
            try:
                outcomes.append(ray.get(ref, timeout=180).init_state)
            except EnvTimeout:
                outcomes.append("timeout")
        # whichever episode took the hanging env (calls to an async actor need not start in order)
        assert outcomes.count("timeout") == 1 and sorted(o for o in outcomes if o != "timeout") == \
            [i for i in range(envs) if outcomes[i] != "timeout"], outcomes
        assert ray.get(worker.run_episode.remote("red_in_bowl", 0, 1.6, False)[0], timeout=180).init_state == 0
    finally:
        ray.kill(worker)


def test_a_dead_learner_rank_ends_the_run_clearly_and_the_checkpoint_resumes(strict_run, tiny_policy_dir, tmp_path):
    from deploy.train import GRPOTrainer

    cfg, rollout = strict_run
    cfg = cfg.model_copy(update={"run_dir": tmp_path, "checkpoint": cfg.checkpoint.model_copy(update={"every": 1})})
    trainer = GRPOTrainer(cfg, str(tiny_policy_dir), rollout)
    try:
        trainer.train_step()  # checkpoint step 1
        os.kill(ray.get(trainer.learner.workers[0].pid.remote(), timeout=30), signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"learner rank died during RL step 2.*step_000001.*checkpoint\.resume=true"):
            trainer.train_step()
    finally:
        trainer.shutdown()
    resumed = GRPOTrainer(cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"resume": True})}),
                          str(tiny_policy_dir), rollout)
    try:
        assert resumed.step == 1
        assert resumed.train_step()["policy/version"] == 2
    finally:
        resumed.shutdown()


def _folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_a_full_disk_fails_the_checkpoint_clearly_and_the_previous_one_resumes(strict_run, tiny_policy_dir, tmp_path):
    """run_dir on a tmpfs with room for one checkpoint and not two (CI runs as root and can mount it)."""
    import subprocess

    from deploy.train import GRPOTrainer

    cfg, rollout = strict_run
    probe = cfg.model_copy(update={"run_dir": tmp_path / "probe"})
    trainer = GRPOTrainer(probe, str(tiny_policy_dir), rollout)
    try:
        one = _folder_bytes(trainer.save_checkpoint())
    finally:
        trainer.shutdown()
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(1.5 * one)}", "tmpfs", str(disk)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        run = cfg.model_copy(update={"run_dir": disk, "checkpoint": cfg.checkpoint.model_copy(update={"keep": 2})})
        trainer = GRPOTrainer(run, str(tiny_policy_dir), rollout)
        try:
            trainer.train_step()
            first = trainer.save_checkpoint()
            trainer.train_step()
            with pytest.raises(RuntimeError, match=rf"step 2 could not be written .*{first.name}.* is intact"):
                trainer.save_checkpoint()
        finally:
            trainer.shutdown()
        assert not list((disk / "checkpoints").glob("*.tmp")), "the half-written checkpoint was left behind"
        resumed = GRPOTrainer(run.model_copy(update={"checkpoint": run.checkpoint.model_copy(update={"resume": True})}),
                              str(tiny_policy_dir), rollout)
        try:
            assert resumed.step == 1
        finally:
            resumed.shutdown()
    finally:
        subprocess.run(["umount", "-l", str(disk)])
