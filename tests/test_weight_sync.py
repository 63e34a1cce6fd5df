"""learner.weight_sync on the real local Ray cluster: two Serve replicas, a DeepSpeed learner rank
and the tiny policy. `collective` broadcasts over gloo here (CPU), by the code NCCL runs on GPUs."""

import os
import signal
import time

import pytest
import ray

from actors.weight_group import plan_buckets, state_digest
from actors.weight_sync import MembersMismatch, check_members
from common.config_loading import load_config
from tests.conftest import ROOT


def test_buckets_carry_every_byte_once_and_never_exceed_their_size():
    sizes = [5, 250, 0, 3, 100]
    buckets = plan_buckets(sizes, 100)
    covered = {i: [] for i in range(len(sizes))}
    for pieces in buckets:
        assert sum(n for *_, n in pieces) <= 100
        assert [dst for _, _, dst, _ in pieces] == [sum(n for *_, n in pieces[:k]) for k in range(len(pieces))]
        for i, src, _, n in pieces:
            covered[i].append((src, n))
    for i, size in enumerate(sizes):  # in order, no gap, no overlap
        assert [src for src, _ in covered[i]] == [sum(n for _, n in covered[i][:k]) for k in range(len(covered[i]))]
        assert sum(n for _, n in covered[i]) == size
    assert len(buckets) == 4  # 358 bytes in buckets of 100


def test_nccl_members_must_not_share_a_gpu_and_cpu_members_take_gloo():
    gpu = lambda node, uuid: {"layout": "L", "device": "cuda", "node": node, "gpu": uuid}  # noqa: E731
    assert check_members(gpu("n1", "g0"), [gpu("n1", "g1"), gpu("n2", "g0")]) == "nccl"
    assert check_members(gpu("n1", "g0"), [{"layout": "L", "device": "cpu", "node": "n1", "gpu": None}]) == "gloo"
    with pytest.raises(MembersMismatch, match=r"learner\.weight_sync.*share one.*object_store"):
        check_members(gpu("n1", "g0"), [gpu("n1", "g1"), gpu("n1", "g1")])
    with pytest.raises(MembersMismatch, match=r"learner\.weight_sync.*policy\.dtype"):
        check_members(gpu("n1", "g0"), [{**gpu("n1", "g1"), "layout": "other"}])


@pytest.fixture(scope="module")
def two_replicas(ray_cluster, tiny_policy_dir, tmp_path_factory):
    from deploy.runtime import Rollout

    run_dir = tmp_path_factory.mktemp("weight_sync")
    # the random tiny policy fails every episode: advantages are 0 and only weight decay moves the
    # weights, the same way in every run, so two runs' updates can be compared bitwise. Buckets of
    # 1 MB: the tiny policy's weights take several, and some tensors span two.
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"run_dir={run_dir}", "rollout.min_group_success=0.0",
                                                   "env.max_steps=24", "checkpoint.every=100",
                                                   "cluster.learner_world_size=1", "cluster.serve_replicas=2",
                                                   "learner.weight_decay=1.0", "learner.lr=0.05",
                                                   "learner.weight_sync_bucket_mb=1"])
    rollout = Rollout.start(cfg, str(tiny_policy_dir))
    yield cfg, rollout
    rollout.shutdown()


def _with_backend(cfg, backend: str):
    return cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"weight_sync": backend})})


def _replicas(rollout) -> dict[str, dict]:
    """Every replica's stats (version, weight_loads, ...) and the digest of its weights, by replica id."""
    stats = {s["replica"]: s for s in rollout.handle.broadcast("stats").results(timeout_s=60)}
    for replica, digest in rollout.handle.broadcast("weights_digest").results(timeout_s=60):
        stats[replica]["digest"] = digest
    assert len(stats) == 2 and all("digest" in s for s in stats.values()), stats
    return stats


def _loads_since(before: dict, after: dict) -> dict[str, tuple[int, int]]:
    """Per replica: (collective, object_store) loads between two _replicas() readings."""
    return {r: tuple(a["weight_loads"][k] - before.get(r, {"weight_loads": {k: 0}})["weight_loads"][k]
                     for k in ("collective", "object_store")) for r, a in after.items()}


def _one_step(cfg, tiny_policy_dir, rollout) -> tuple[dict, str, dict]:
    """One RL step of a fresh trainer (which syncs version 0 first): its scalars, the learner's
    weight digest, the replicas after it."""
    from deploy.train import GRPOTrainer

    trainer = GRPOTrainer(cfg, str(tiny_policy_dir), rollout)
    try:
        scalars = trainer.train_step()
        learner = state_digest(ray.get(trainer.learner.publish_weights()))
    finally:
        trainer.shutdown()
    return scalars, learner, _replicas(rollout)


def test_collective_gives_every_replica_the_learners_weights_bitwise_as_object_store_does(two_replicas, tiny_policy_dir):
    cfg, rollout = two_replicas
    start = _replicas(rollout)
    runs, loads = {}, {}
    for backend in ("object_store", "collective"):
        before = _replicas(rollout)
        runs[backend] = scalars, learner, after = _one_step(_with_backend(cfg, backend), tiny_policy_dir, rollout)
        loads[backend] = sorted(_loads_since(before, after).values())
        assert scalars["rollout/success_rate"] == 0.0, "a success makes the update depend on the rollouts"
        assert [r["version"] for r in after.values()] == [1, 1], backend
        assert [r["digest"] for r in after.values()] == [learner, learner], backend
    # each run synced twice (version 0 at start, version 1 after the step), each replica by its backend
    assert loads == {"object_store": [(0, 2), (0, 2)], "collective": [(2, 0), (2, 0)]}, loads
    assert runs["object_store"][1] == runs["collective"][1], "the backends served different weights after one update"
    assert runs["collective"][1] != next(iter(start.values()))["digest"], "the update did not move the weights"
    print(f"\nweight sync of the tiny policy, CPU: object_store {runs['object_store'][0]['time/weight_sync_s']:.3f} s, "
          f"collective {runs['collective'][0]['time/weight_sync_s']:.3f} s", flush=True)


def test_a_killed_replica_comes_back_on_the_current_version_and_joins_the_next_broadcast(two_replicas, tiny_policy_dir):
    from deploy.train import GRPOTrainer

    cfg, rollout = two_replicas
    trainer = GRPOTrainer(_with_backend(cfg, "collective"), str(tiny_policy_dir), rollout)
    try:
        trainer.train_step()  # version 1, by broadcast
        before = _replicas(rollout)
        victim = rollout.handle.pid.remote().result(timeout_s=30)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while True:  # Serve replaces it with its constructor arguments: the initial policy, version 0
            try:
                pids = rollout.handle.broadcast("pid").results(timeout_s=60)
            except ray.exceptions.RayActorError as err:  # the router has not yet heard of its death
                pids = [str(err)]
            if len(pids) == 2 and victim not in pids:
                break
            assert time.monotonic() < deadline, f"the killed replica did not come back: {pids}"
            time.sleep(1.0)
        learner = state_digest(ray.get(trainer.learner.publish_weights()))
        back = _replicas(rollout)
        (fresh,) = set(back) - set(before)
        # it loaded version 1 from the object-store copy before it took a request
        assert back[fresh]["weight_loads"] == {"object_store": 1, "collective": 0}
        assert [r["version"] for r in back.values()] == [1, 1]
        assert [r["digest"] for r in back.values()] == [learner, learner]
        scalars = trainer.train_step()  # version 2: a new formation, with the new replica in it
        learner = state_digest(ray.get(trainer.learner.publish_weights()))
        after = _replicas(rollout)
    finally:
        trainer.shutdown()
    assert scalars["policy/version"] == 2 and scalars["rollout/policy_lag"] == 0.0
    assert [r["version"] for r in after.values()] == [2, 2]
    assert [r["digest"] for r in after.values()] == [learner, learner]
    assert sorted(_loads_since(back, after).values()) == [(1, 0), (1, 0)], "both replicas got version 2 by broadcast"


def test_a_broadcast_that_breaks_midway_leaves_every_replica_on_whole_weights(two_replicas, tiny_policy_dir):
    """The sender stops after one bucket (of zeros) and never sends the rest: each replica has
    written that bucket into its model, times out on the next one, and reloads the store's copy
    before it serves again."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from actors.weight_group import GroupSpec, WeightGroup, host_rendezvous, layout, plan_buckets
    from deploy.train import GRPOTrainer

    cfg, rollout = two_replicas
    trainer = GRPOTrainer(_with_backend(cfg, "collective"), str(tiny_policy_dir), rollout)  # version 0 in the store
    try:
        state = ray.get(trainer.learner.publish_weights())
        before = _replicas(rollout)
        store, host, port = host_rendezvous(30)
        spec = GroupSpec(uuid.uuid4().hex, host, port, 3, "gloo", 1 << 20, timeout_s=5)
        sizes = [state[name].numel() * state[name].element_size() for name, _, _ in layout(state)]
        first = plan_buckets(sizes, spec.bucket_bytes)[0]
        # a handle's broadcast goes out when its results are awaited: this process's rank 0 runs beside it
        with ThreadPoolExecutor(1) as pool:
            joining = pool.submit(WeightGroup, spec, 0, store)
            ranks = {r: i + 1 for i, r in enumerate(sorted(before))}
            assert sorted(rollout.handle.broadcast("join_weight_group", spec, ranks).results(timeout_s=60)) == sorted(before)
            sender = joining.result(timeout=60)
            sending = pool.submit(sender._broadcast, torch.zeros(first[-1][2] + first[-1][3], dtype=torch.uint8))
            with pytest.raises(Exception, match="(?i)timed? ?out"):
                rollout.handle.broadcast("receive_weights", spec.group_id, 7, "never-published").results(timeout_s=60)
            sending.result(timeout=60)
        after = _replicas(rollout)
    finally:
        trainer.shutdown()
    assert [r["version"] for r in after.values()] == [0, 0]
    assert [r["digest"] for r in after.values()] == [state_digest(state)] * 2
    assert sorted(_loads_since(before, after).values()) == [(0, 1), (0, 1)], "each reloaded the store's copy"
