"""Weights through shared-memory handles (learner.weight_sync: cuda_ipc): learner rank 0 hands its
weights to the Serve replicas on its own GPU (or, on the CPU, its own node), bucket by bucket.

Rank 0 packs the state dict, tensor by tensor in layout order, into a bucket buffer on the weights'
device and shares the buffer's handle (torch.multiprocessing's reduce_tensor: a CUDA IPC handle on
a GPU, a POSIX shared-memory file name on the CPU under the "file_system" sharing strategy, so a
process not forked from rank 0 can open it). Each receiver rebuilds the bucket from the handle and
copies its bytes straight into its own weights: the bytes never pass through the object store,
nor, on a GPU, through host memory. Two buffers alternate: rank 0 refills one only after every
receiver acknowledged the bucket it held, while the receivers copy from the other. A receiver
acknowledges a bucket by asking for the next, and asks again while that one is not ready: rank 0
never blocks, so it answers between its other calls (one task at a time, as it trains).

Sender and receivers cut the byte stream the same way (actors/weight_group.py: plan_buckets) since
they share the layout (checked by digest before a delivery) and the bucket size. A handle opens
only on its own host, and a CUDA one only on its own GPU: replicas elsewhere are no receivers here
and get the weights from the object store (actors/weight_sync.py, step 3).
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing

from actors.weight_group import SentTensors, _bytes, layout, plan_buckets

Fetch = Callable[[int], "bytes | None"]  # bucket index -> its handle, b"" past the last, None: not yet


def colocated(sender: dict, member: dict) -> bool:
    """Whether `member` (actors/weight_group.py: member_info) can open `sender`'s handles: the same
    node, and the same GPU when the weights are on one."""
    return (member["node"] == sender["node"] and member["device"] == sender["device"]
            and member["gpu"] == sender["gpu"])


class IpcSender:
    """Rank 0's side of one delivery to `receivers` (their ids). Every call comes from the actor's
    one task thread, so no lock is needed; `next` never blocks (a receiver asks again)."""

    def __init__(self, state: dict[str, torch.Tensor], receivers: list[str], bucket_bytes: int, merge=None):
        # the model's own storage, each tensor (through `merge`) made when its bucket is packed:
        # no copy of the state dict is made
        self.tensors = SentTensors(state, merge)
        self.plan = plan_buckets(self.tensors.sizes, bucket_bytes)
        self.done = {r: -1 for r in receivers}  # per receiver, the last bucket it copied
        device = self.tensors.device
        if device.type == "cpu":  # a handle another process (not forked from this one) can open by name
            torch.multiprocessing.set_sharing_strategy("file_system")
        size = min(bucket_bytes, max(self.bytes, 1))
        self.buffers = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(min(len(self.plan), 2))]
        for buffer in self.buffers:
            if device.type == "cpu":
                buffer.share_memory_()
        self.held: list[int | None] = [None] * len(self.buffers)  # the bucket each buffer holds
        self.filled: list[torch.Tensor | None] = [None] * len(self.buffers)  # the part of each the bucket fills

    @property
    def bytes(self) -> int:
        return sum(self.tensors.sizes)

    def finished(self) -> bool:
        return all(d == len(self.plan) - 1 for d in self.done.values())

    def close(self) -> None:
        """Free the buffers now. On the CPU their shared files go once the receivers closed theirs; a
        process killed while it holds one leaves it in /dev/shm (Ray ends torch's cleanup daemon with it)."""
        self.buffers, self.filled, self.held = [], [], []
        self.tensors.release()

    def next(self, receiver: str, bucket: int) -> bytes | None:
        """`receiver` has copied every bucket before `bucket` and asks for it (again, after a None):
        its handle, b"" when `bucket` is past the last, None while its buffer still holds a bucket
        another receiver has not copied yet."""
        if receiver not in self.done:
            raise RuntimeError(f"weight sync: {receiver} is not a receiver of this delivery")
        if bucket > len(self.plan) or bucket not in (self.done[receiver] + 1, self.done[receiver] + 2):
            raise RuntimeError(f"weight sync: {receiver} asked for bucket {bucket} after copying "
                               f"{self.done[receiver] + 1} of {len(self.plan)}")
        self.done[receiver] = bucket - 1
        if bucket == len(self.plan):
            return b""
        slot = bucket % len(self.buffers)
        if self.held[slot] != bucket:
            if self.held[slot] is not None and min(self.done.values()) < self.held[slot]:
                return None
            self._pack(slot, bucket)
        # a handle per receiver: on the CPU each pickling counts one reference to the shared file, which
        # the receiver that opens it gives back (a handle opened twice would let the file be unlinked)
        return bytes(ForkingPickler.dumps(self.filled[slot]))  # torch.multiprocessing's reduce_tensor

    @torch.no_grad()
    def _pack(self, slot: int, bucket: int) -> None:
        pieces = self.plan[bucket]
        used = self.buffers[slot][: pieces[-1][2] + pieces[-1][3]]
        for i, src, dst, n in pieces:
            used[dst : dst + n].copy_(self.tensors[i][src : src + n])
        if used.is_cuda:  # the receivers copy on streams of their own processes
            torch.cuda.synchronize(used.device)
        self.filled[slot], self.held[slot] = used, bucket


@torch.no_grad()
def receive(state: dict[str, torch.Tensor], bucket_bytes: int, fetch: Fetch, timeout_s: float) -> int:
    """Copy every bucket that `fetch` hands out straight into the tensors of `state` (a model's own
    storage), acknowledging each by asking for the next. Waits at most `timeout_s` for any one
    bucket. Between the first bucket and the last the model is half-updated: the caller must not
    serve until this returns, or, on an error, until it has loaded whole weights again. Returns the
    bytes received."""
    tensors = [_bytes(state[name], writable=True) for name, _, _ in layout(state)]
    plan = plan_buckets([t.numel() for t in tensors], bucket_bytes)
    for bucket, pieces in enumerate(plan):
        used = pickle.loads(_wait(fetch, bucket, timeout_s))
        for i, src, dst, n in pieces:
            tensors[i][src : src + n].copy_(used[dst : dst + n])
        if used.is_cuda:  # copied before rank 0 may refill the buffer
            torch.cuda.synchronize(used.device)
        del used
    if _wait(fetch, len(plan), timeout_s) != b"":  # the last acknowledgement
        raise RuntimeError("weight sync: rank 0 has more buckets than this replica's layout")
    return sum(t.numel() for t in tensors)


def _wait(fetch: Fetch, bucket: int, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    pause = 0.0005
    while (handle := fetch(bucket)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"weight sync: bucket {bucket} did not come within {timeout_s:.0f}s "
                               f"(another receiver did not copy the one before)")
        time.sleep(pause)
        pause = min(2 * pause, 0.02)
    return handle
