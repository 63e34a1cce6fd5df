"""Faults of the serving side on a real local Ray cluster: a Serve replica killed mid-run comes back
on the run's current weights, so a strict on-policy run never trains on stale trajectories; and a
replica that cannot start ends the error with its own exception."""

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
        ray.get(worker.inject_hang.remote(8.0), timeout=60)  # slot 0's next env call: the first episode's reset
        refs = [worker.run_episode.remote("red_in_bowl", i, 1.6, False)[0] for i in range(envs)]
        outcomes = []
        for ref in refs:
            try:
                outcomes.append(ray.get(ref, timeout=180).init_state)
            except EnvTimeout:
                outcomes.append("timeout")
        assert outcomes == ["timeout", 1, 2], outcomes
        assert ray.get(worker.run_episode.remote("red_in_bowl", 0, 1.6, False)[0], timeout=180).init_state == 0
    finally:
        ray.kill(worker)


def test_a_replica_that_cannot_start_ends_the_error_with_its_own_exception(ray_cluster, tiny_policy_dir, tmp_path):
    from services.policy_service import APP_NAME, start_policy_service

    cfg = load_config(ROOT / "configs/tiny.yaml", [f"run_dir={tmp_path}", "policy.unnorm_key=no_such_dataset"])
    with pytest.raises(RuntimeError) as err:
        start_policy_service(str(tiny_policy_dir), cfg.cluster, cfg.policy)
    last = str(err.value).strip().splitlines()[-1]
    assert "no_such_dataset" in last and "identity" in last, str(err.value)[-2000:]
    from ray import serve

    serve.delete(APP_NAME)


def test_chaos_kills_and_a_hang_lose_no_trajectory_and_train_nothing_stale(ray_cluster, tiny_policy_dir, tmp_path):
    """A short strict GRPO run while two env workers and the replica are SIGKILLed at seeded random
    moments and one env hangs past its deadline: the run finishes, every finished episode is
    accounted for once (trained, filtered, stale or still held), and no step trains on stale weights."""
    import random
    import threading
    import time

    from deploy.runtime import Rollout
    from deploy.train import GRPOTrainer

    cfg = load_config(ROOT / "configs/tiny.yaml", [f"run_dir={tmp_path}", "rollout.min_group_success=0.0",
                                                   "env.max_steps=24", "env.step_timeout_s=2", "total_steps=5",
                                                   "checkpoint.every=100", "cluster.learner_world_size=1"])
    rollout = Rollout.start(cfg, str(tiny_policy_dir))
    trainer = GRPOTrainer(cfg, str(tiny_policy_dir), rollout)
    pool, rng, done = rollout.pool, random.Random(0), threading.Event()
    faults: list[str] = []

    def inject():
        for fault in rng.sample(["worker", "worker", "replica", "hang"], 4):
            if done.wait(rng.uniform(2.0, 6.0)):
                return
            if fault == "worker":
                index = len([f for f in faults if f == "worker"]) % len(pool.workers)
                os.kill(ray.get(pool.workers[index].pid.remote(), timeout=30), signal.SIGKILL)
            elif fault == "replica":
                os.kill(rollout.handle.pid.remote().result(timeout_s=30), signal.SIGKILL)
            else:
                ray.get(pool.workers[-1].inject_hang.remote(cfg.env.step_timeout_s * 8 * 3), timeout=30)
            faults.append(fault)

    drill = threading.Thread(target=inject, daemon=True)
    start = time.monotonic()
    try:
        drill.start()
        trainer.run(tmp_path / "rl_policy")
        done.set()
        drill.join(timeout=60)
        ledger, held = trainer.coordinator.ledger, trainer.coordinator.held()
        versions = rollout.handle.broadcast("get_version").results(timeout_s=60)
    finally:
        done.set()
        trainer.shutdown()
        rollout.shutdown()
    print(f"chaos: {faults} in {time.monotonic() - start:.0f}s; {ledger}, held {held}; "
          f"re-run {pool.rerun}, workers replaced {pool.replaced}")
    assert sorted(faults) == ["hang", "replica", "worker", "worker"], "the run ended before every fault"
    assert trainer.step == cfg.total_steps and versions == [cfg.total_steps] * cfg.cluster.serve_replicas
    assert ledger.trained == cfg.total_steps * cfg.rollout.groups_per_batch * cfg.rollout.group_size
    assert ledger.finished == ledger.trained + ledger.filtered + ledger.stale + ledger.discarded + held
    assert all(h["rollout/policy_lag"] == 0.0 for h in trainer.history)
    assert pool.replaced >= 2 and pool.rerun >= 1


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
