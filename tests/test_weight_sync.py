"""learner.weight_sync on the real local Ray cluster: two Serve replicas, a DeepSpeed learner rank
and the tiny policy. `collective` broadcasts over gloo here (CPU), by the code NCCL runs on GPUs;
`cuda_ipc` shares POSIX shared-memory buckets here, by the code that shares CUDA IPC handles on a GPU."""

import os
import signal
import time

import pytest
import ray

from actors.weight_group import plan_buckets, state_digest
from actors.weight_sync import MembersMismatch, check_members, resolve_backend
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


def test_auto_follows_the_placement_of_rank0_and_the_replicas():
    gpu = lambda node, uuid: {"layout": "L", "device": "cuda", "node": node, "gpu": uuid}  # noqa: E731
    cpu = lambda node: {"layout": "L", "device": "cpu", "node": node, "gpu": None}  # noqa: E731
    assert resolve_backend(gpu("n1", "g0"), [gpu("n1", "g0"), gpu("n1", "g0")]) == "cuda_ipc"
    assert resolve_backend(gpu("n1", "g0"), [gpu("n1", "g1"), gpu("n2", "g0")]) == "collective"
    # some share rank 0's GPU and some do not: neither handles nor NCCL reach all of them
    assert resolve_backend(gpu("n1", "g0"), [gpu("n1", "g0"), gpu("n1", "g1")]) == "object_store"
    assert resolve_backend(gpu("n1", "g0"), [gpu("n1", "g1"), gpu("n1", "g1")]) == "object_store"
    assert resolve_backend(cpu("n1"), [cpu("n1"), cpu("n1")]) == "object_store"
    assert resolve_backend(gpu("n1", "g0"), [cpu("n1")]) == "object_store"


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


LOADS = ("collective", "object_store", "cuda_ipc")


def _loads_since(before: dict, after: dict) -> dict[str, tuple[int, int, int]]:
    """Per replica: (collective, object_store, cuda_ipc) loads between two _replicas() readings."""
    return {r: tuple(a["weight_loads"][k] - before.get(r, {"weight_loads": {k: 0}})["weight_loads"][k]
                     for k in LOADS) for r, a in after.items()}


def _one_step(cfg, tiny_policy_dir, rollout) -> tuple[dict, str, dict, object]:
    """One RL step of a fresh trainer (which syncs version 0 first): its scalars, the learner's
    weight digest, the replicas after it, its weight sync."""
    from deploy.train import GRPOTrainer

    trainer = GRPOTrainer(cfg, str(tiny_policy_dir), rollout)
    try:
        scalars = trainer.train_step()
        learner = state_digest(ray.get(trainer.learner.publish_weights()))
    finally:
        trainer.shutdown()
    return scalars, learner, _replicas(rollout), trainer.weight_sync


def test_every_backend_gives_every_replica_the_learners_weights_bitwise(two_replicas, tiny_policy_dir):
    """collective and cuda_ipc deliver what object_store does; auto picks object_store on CPUs."""
    cfg, rollout = two_replicas
    start = _replicas(rollout)
    runs, loads = {}, {}
    for backend in ("object_store", "collective", "cuda_ipc", "auto"):
        before = _replicas(rollout)
        runs[backend] = scalars, learner, after, sync = _one_step(_with_backend(cfg, backend), tiny_policy_dir, rollout)
        loads[backend] = sorted(_loads_since(before, after).values())
        assert scalars["rollout/success_rate"] == 0.0, "a success makes the update depend on the rollouts"
        assert [r["version"] for r in after.values()] == [1, 1], backend
        assert [r["digest"] for r in after.values()] == [learner, learner], backend
    # each run synced twice (version 0 at start, version 1 after the step), each replica by its backend
    assert loads == {"object_store": [(0, 2, 0)] * 2, "collective": [(2, 0, 0)] * 2, "cuda_ipc": [(0, 0, 2)] * 2,
                     "auto": [(0, 2, 0)] * 2}, loads
    assert runs["auto"][3].resolved == "object_store"
    assert len({run[1] for run in runs.values()}) == 1, "the backends served different weights after one update"
    assert runs["collective"][1] != next(iter(start.values()))["digest"], "the update did not move the weights"
    print("\nweight sync of the tiny policy, CPU: " + ", ".join(
        f"{b} {run[0]['time/weight_sync_s']:.3f} s" for b, run in runs.items()), flush=True)


def test_a_lora_learner_delivers_its_merged_weights_by_collective_and_cuda_ipc(two_replicas, tiny_policy_dir):
    """learner.lora: the replicas hold no adapters; the collective and CUDA-IPC backends give them the
    merged weights (learner/lora.py merged_tensors) in the policy's own layout, the bytes rank 0
    publishes to the object store (LearnerEngine.weights: merged too)."""
    cfg, rollout = two_replicas
    lora = load_config(ROOT / "configs/tiny.yaml", ["learner.lora.rank=4"]).learner.lora
    cfg = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"lora": lora})})
    digests = {}
    for backend in ("collective", "cuda_ipc"):
        before = _replicas(rollout)
        _, learner, after, _ = _one_step(_with_backend(cfg, backend), tiny_policy_dir, rollout)
        assert [r["digest"] for r in after.values()] == [learner, learner], backend
        by_backend = tuple(2 * int(k == backend) for k in LOADS)  # version 0 and version 1, both by the backend
        assert sorted(_loads_since(before, after).values()) == [by_backend] * 2, backend
        digests[backend] = learner
    assert len(set(digests.values())) == 1, digests


def test_the_store_copy_made_after_a_delivery_holds_the_delivered_version(two_replicas, tiny_policy_dir):
    """cuda_ipc: the sync returns once the replicas have the weights; rank 0 copies them into the
    store after that, queued ahead of the next update, so the store's version 1 is what the replicas
    got as version 1 (a restarted replica loads it), not what the learner holds later."""
    from deploy.train import GRPOTrainer

    cfg, rollout = two_replicas
    trainer = GRPOTrainer(_with_backend(cfg, "cuda_ipc"), str(tiny_policy_dir), rollout)
    try:
        before = _replicas(rollout)
        trainer.train_step()  # version 1
        version, holder, weights_id = ray.get(rollout.weights.current.remote(), timeout=60)
        served = _replicas(rollout)
        trainer.train_step()  # version 2
        stored = state_digest(ray.get(holder[0], timeout=120))
        later = state_digest(ray.get(trainer.learner.publish_weights(), timeout=120))
    finally:
        trainer.shutdown()
    assert version == 1 and len(weights_id) == 32
    assert [r["digest"] for r in served.values()] == [stored, stored]
    assert stored != later, "the update did not move the weights"
    assert sorted(_loads_since(before, served).values()) == [(0, 0, 1)] * 2, "delivered, never loaded from the store"


def _kill_a_replica(rollout) -> None:
    """SIGKILL one replica and wait until Serve has replaced it (with its constructor arguments: the
    initial policy, version 0, until it loads the store's current weights)."""
    victim = rollout.handle.pid.remote().result(timeout_s=30)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        try:
            pids = rollout.handle.broadcast("pid").results(timeout_s=60)
        except ray.exceptions.RayActorError as err:  # the router has not yet heard of its death
            pids = [str(err)]
        if len(pids) == 2 and victim not in pids:
            return
        assert time.monotonic() < deadline, f"the killed replica did not come back: {pids}"
        time.sleep(1.0)


def test_a_replica_restarted_after_the_learner_is_gone_serves_the_last_weights(two_replicas, tiny_policy_dir):
    """The store's copy outlives the learner ranks that made it (the demo evaluates after GRPO ends),
    also when the last sync returned before rank 0 had made it (cuda_ipc): the trainer ends the
    ranks only once it is made."""
    from deploy.train import GRPOTrainer

    cfg, rollout = two_replicas
    trainer = GRPOTrainer(_with_backend(cfg, "cuda_ipc"), str(tiny_policy_dir), rollout)
    try:
        trainer.train_step()
    finally:
        trainer.shutdown()
    served = _replicas(rollout)
    _kill_a_replica(rollout)
    back = _replicas(rollout)
    (fresh,) = set(back) - set(served)
    assert back[fresh]["weight_loads"]["object_store"] == 1
    assert [r["version"] for r in back.values()] == [1, 1]
    assert len({r["digest"] for r in (*served.values(), *back.values())}) == 1


@pytest.mark.parametrize("backend", ["collective", "cuda_ipc"])
def test_a_killed_replica_comes_back_on_the_current_version_and_joins_the_next_delivery(two_replicas, tiny_policy_dir,
                                                                                        backend):
    from deploy.train import GRPOTrainer

    cfg, rollout = two_replicas
    trainer = GRPOTrainer(_with_backend(cfg, backend), str(tiny_policy_dir), rollout)
    try:
        trainer.train_step()  # version 1, by the backend
        before = _replicas(rollout)
        _kill_a_replica(rollout)
        learner = state_digest(ray.get(trainer.learner.publish_weights()))
        back = _replicas(rollout)
        (fresh,) = set(back) - set(before)
        # it loaded version 1 from the object-store copy before it took a request
        assert back[fresh]["weight_loads"] == {"object_store": 1, "collective": 0, "cuda_ipc": 0}
        assert [r["version"] for r in back.values()] == [1, 1]
        assert [r["digest"] for r in back.values()] == [learner, learner]
        scalars = trainer.train_step()  # version 2, delivered to the new replica too (collective: a new formation)
        learner = state_digest(ray.get(trainer.learner.publish_weights()))
        after = _replicas(rollout)
    finally:
        trainer.shutdown()
    assert scalars["policy/version"] == 2 and scalars["rollout/policy_lag"] == 0.0
    assert [r["version"] for r in after.values()] == [2, 2]
    assert [r["digest"] for r in after.values()] == [learner, learner]
    by_backend = tuple(int(k == backend) for k in LOADS)
    assert sorted(_loads_since(back, after).values()) == [by_backend] * 2, f"both replicas got version 2 by {backend}"


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
    assert sorted(_loads_since(before, after).values()) == [(0, 1, 0)] * 2, "each reloaded the store's copy"


def test_a_cuda_ipc_delivery_that_stalls_midway_leaves_every_replica_on_whole_weights(two_replicas, tiny_policy_dir):
    """Rank 0 waits for a third receiver that never copies a bucket, so after the first two buckets
    of its weights it refills none: each replica has written those into its model, gives up on the
    third, and reloads the store's copy (other weights, here) before it serves again."""
    from actors.weight_sync import serve_weights
    from deploy.train import GRPOTrainer

    cfg, rollout = two_replicas
    trainer = GRPOTrainer(_with_backend(cfg, "cuda_ipc"), str(tiny_policy_dir), rollout)
    try:
        state = ray.get(trainer.learner.publish_weights())
        other = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
        serve_weights(rollout, 7, ray.put(other), 2)  # the store's copy and the replicas: version 7, `other`
        before = _replicas(rollout)
        rank0, receivers = trainer.learner.rank0, sorted(before)
        assert ray.get(rank0.open_weight_ipc.remote("stalled", [*receivers, "gone"], 1 << 20), timeout=60) > 2 << 20
        try:
            with pytest.raises(Exception, match="bucket 2 did not come within 3s"):
                rollout.handle.broadcast("receive_weights_ipc", "stalled", receivers, rank0, 1 << 20, 8,
                                         "never-published", 3.0).results(timeout_s=60)
        finally:  # a shared file rank 0 holds when it is killed stays in /dev/shm
            finished = ray.get(rank0.close_weight_ipc.remote("stalled"), timeout=60)
        assert finished is False
        after = _replicas(rollout)
    finally:
        trainer.shutdown()
    assert [r["version"] for r in after.values()] == [7, 7]
    assert [r["digest"] for r in after.values()] == [state_digest(other)] * 2
    assert state_digest(other) != state_digest(state)
    assert sorted(_loads_since(before, after).values()) == [(0, 1, 0)] * 2, "each reloaded the store's copy"


def test_a_failed_cuda_ipc_delivery_falls_back_to_the_object_store(two_replicas, tiny_policy_dir, monkeypatch, capsys):
    """A replica that does not answer within the deadline (stopped, here, and continued after it)
    fails the delivery: the sync says so and every replica loads the version from the object store."""
    import threading

    from actors import weight_sync
    from deploy.train import GRPOTrainer

    cfg, rollout = two_replicas
    trainer = GRPOTrainer(_with_backend(cfg, "cuda_ipc"), str(tiny_policy_dir), rollout)
    try:
        before = _replicas(rollout)
        victim = rollout.handle.pid.remote().result(timeout_s=30)
        monkeypatch.setattr(weight_sync, "GROUP_TIMEOUT_S", 3.0)
        os.kill(victim, signal.SIGSTOP)
        resume = threading.Timer(8.0, os.kill, (victim, signal.SIGCONT))
        resume.start()
        try:
            trainer.version = 5
            trainer.sync_weights()
        finally:
            resume.join()
        learner = state_digest(ray.get(trainer.learner.publish_weights()))
        after = _replicas(rollout)
    finally:
        trainer.shutdown()
    assert "weight sync: the cuda_ipc delivery of version 5 failed" in capsys.readouterr().out
    assert set(after) == set(before), "the stopped replica was replaced"
    assert [r["version"] for r in after.values()] == [5, 5]
    assert [r["digest"] for r in after.values()] == [learner, learner]
    assert sorted(_loads_since(before, after).values()) == [(0, 1, 0)] * 2, "each loaded the store's copy"
