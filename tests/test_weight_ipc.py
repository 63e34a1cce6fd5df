"""The shared-bucket mechanics of learner.weight_sync: cuda_ipc (actors/weight_ipc.py) on CPU tensors:
the handles are POSIX shared memory, opened by Ray actors that rank 0's process did not fork."""

import glob
import os
import pickle

import pytest
import ray
import torch

from actors.weight_group import state_digest
from actors.weight_ipc import IpcSender, colocated, receive


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(1000, generator=g),  # 4000 bytes: spans buckets of 1000
            "b.bias": torch.randn(3, 5, generator=g).to(torch.bfloat16),
            "c.count": torch.randint(-9, 9, (17,), generator=g),
            "d.empty": torch.zeros(0),
            "e.mask": torch.rand(301, generator=g) > 0.5}


def _processes():
    """A sender process that owns weights and shares them as rank 0 does (LearnerWorker.open_weight_ipc),
    and receivers with weights of the same layout (replicas). Defined here so that Ray ships them by value."""

    @ray.remote(num_cpus=0)
    class Sender:
        def __init__(self, state: dict, receivers: list[str], bucket_bytes: int):
            self.state = state
            self.sender = IpcSender(state, receivers, bucket_bytes)

        def next(self, receiver: str, bucket: int) -> bytes | None:
            return self.sender.next(receiver, bucket)

        def close(self) -> tuple[bool, list[str]]:
            """Whether every receiver copied every bucket; the shared files this process left behind."""
            finished = self.sender.finished()
            self.sender.close()
            return finished, glob.glob(f"/dev/shm/torch_{os.getpid()}_*")

    @ray.remote(num_cpus=0)
    class Receiver:
        def __init__(self, state: dict):
            self.state = state

        def digest(self) -> str:
            return state_digest(self.state)

        def receive(self, sender, me: str, bucket_bytes: int) -> tuple[int, str, list[int]]:
            handle_sizes = []

            def fetch(bucket: int) -> bytes | None:
                handle = ray.get(sender.next.remote(me, bucket), timeout=30)
                handle_sizes.append(len(handle or b""))
                return handle

            received = receive(self.state, bucket_bytes, fetch, timeout_s=30)
            return received, state_digest(self.state), handle_sizes

    return Sender, Receiver


def test_buckets_round_trip_through_handles_opened_in_other_processes(ray_cluster):
    Sender, Receiver = _processes()
    bucket_bytes = 1000
    sender = Sender.remote(_state(0), ["r1", "r2"], bucket_bytes)
    receivers = [Receiver.remote(_state(1)), Receiver.remote(_state(2))]
    assert ray.get(receivers[0].digest.remote(), timeout=30) != state_digest(_state(0))
    try:
        results = ray.get([r.receive.remote(sender, f"r{i + 1}", bucket_bytes) for i, r in enumerate(receivers)],
                          timeout=120)
    finally:  # a shared file the sender holds when Ray kills it stays in /dev/shm
        finished, left = ray.get(sender.close.remote(), timeout=30)
    total = sum(t.numel() * t.element_size() for t in _state(0).values())
    for received, digest, handle_sizes in results:
        assert received == total
        assert digest == state_digest(_state(0)), "a receiver's weights differ from the sender's"
        # a handle names the shared buffer; it does not carry the bucket's bytes
        assert 0 < max(handle_sizes) < bucket_bytes / 2, handle_sizes
    assert finished and left == [], left


def test_a_buffer_is_refilled_only_after_every_receiver_copied_its_bucket():
    state = _state(0)
    before = set(glob.glob(f"/dev/shm/torch_{os.getpid()}_*"))
    sender = IpcSender(state, ["r1", "r2"], 1000)

    def bucket(receiver: str, index: int) -> torch.Tensor | None:
        handle = sender.next(receiver, index)
        return None if handle is None else pickle.loads(handle).clone()  # opened as a receiver does

    try:
        assert len(sender.plan) == 5  # 4000 + 30 + 136 + 0 + 301 bytes in buckets of 1000
        first = bucket("r1", 0)
        assert torch.equal(first, state["a.weight"].view(torch.uint8)[:1000])
        assert bucket("r1", 1) is not None
        assert bucket("r1", 2) is None, "bucket 2 would overwrite bucket 0, which r2 has not copied"
        assert torch.equal(bucket("r2", 0), first)
        assert bucket("r1", 2) is None
        bucket("r2", 1)  # r2 copied bucket 0
        assert torch.equal(bucket("r1", 2), state["a.weight"].view(torch.uint8)[2000:3000])
        with pytest.raises(RuntimeError, match="asked for bucket 5"):
            sender.next("r2", 5)
        with pytest.raises(RuntimeError, match="not a receiver"):
            sender.next("r3", 0)
        assert not sender.finished()
    finally:
        sender.close()
    assert set(glob.glob(f"/dev/shm/torch_{os.getpid()}_*")) == before, "a shared bucket outlived its sender"


def test_a_receiver_gives_up_on_a_bucket_that_never_comes():
    state = _state(1)
    with pytest.raises(TimeoutError, match="bucket 0 did not come within"):
        receive(state, 1000, lambda bucket: None, timeout_s=0.2)
    assert state_digest(state) == state_digest(_state(1)), "nothing was written"


def test_only_members_on_rank0s_gpu_or_cpu_node_can_open_its_handles():
    gpu = lambda node, uuid: {"device": "cuda", "node": node, "gpu": uuid}  # noqa: E731
    cpu = lambda node: {"device": "cpu", "node": node, "gpu": None}  # noqa: E731
    assert colocated(gpu("n1", "g0"), gpu("n1", "g0"))
    assert not colocated(gpu("n1", "g0"), gpu("n1", "g1"))
    assert not colocated(gpu("n1", "g0"), gpu("n2", "g0"))
    assert not colocated(gpu("n1", "g0"), cpu("n1"))
    assert colocated(cpu("n1"), cpu("n1")) and not colocated(cpu("n1"), cpu("n2"))
