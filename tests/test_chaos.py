"""Faults with runs of their own on the real local Ray cluster (each test starts and ends its own
policy service, which takes the run's app name): a chaos run in which env workers and the replica
are SIGKILLed and an env hangs, and a replica that cannot start."""

import os
import signal

import pytest
import ray

from common.config_loading import load_config
from tests.conftest import ROOT


def test_chaos_kills_and_a_hang_lose_no_trajectory_and_train_nothing_stale(ray_cluster, tiny_policy_dir, tmp_path):
    """A short strict GRPO run while two env workers and the replica are SIGKILLed at seeded random
    moments of its progress and one env hangs past its deadline: the run finishes, every finished episode is
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

    trained = cfg.total_steps * cfg.rollout.groups_per_batch * cfg.rollout.group_size
    # seeded random moments of the run's progress (finished episodes), not of the clock: a fast machine
    # finishes the run in seconds, a loaded one in a minute
    moments = sorted(rng.sample(range(2, trained - 8, 4), 4))

    def inject():
        for fault, moment in zip(rng.sample(["worker", "worker", "replica", "hang"], 4), moments):
            while trainer.coordinator.ledger.finished < moment:
                if done.wait(0.02):
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
    assert ledger.trained == trained
    assert ledger.finished == ledger.trained + ledger.filtered + ledger.stale + ledger.discarded + held
    assert all(h["rollout/policy_lag"] == 0.0 for h in trainer.history)
    assert pool.replaced >= 2 and pool.rerun >= 1


def test_a_replica_that_cannot_start_ends_the_error_with_its_own_exception(ray_cluster, tiny_policy_dir, tmp_path):
    from services.policy_service import APP_NAME, start_policy_service

    cfg = load_config(ROOT / "configs/tiny.yaml", [f"run_dir={tmp_path}", "policy.unnorm_key=no_such_dataset"])
    with pytest.raises(RuntimeError) as err:
        start_policy_service(str(tiny_policy_dir), cfg.cluster, cfg.policy)
    last = str(err.value).strip().splitlines()[-1]
    assert "no_such_dataset" in last and "identity" in last, str(err.value)[-2000:]
    from ray import serve

    serve.delete(APP_NAME)
