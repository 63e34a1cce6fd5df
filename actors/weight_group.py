"""One member of the weight-broadcast group (learner.weight_sync: collective): learner rank 0
sends, every Serve replica receives.

The group is a torch.distributed process group of its own, built straight from a TCPStore that
rank 0 hosts, so it never touches the learner's DeepSpeed group (rank 0 is in both). gloo when
any member is on the CPU, NCCL when all are on GPUs: the same code either way.

The state dict travels as one byte stream cut into buckets of `bucket_bytes`, one broadcast per
bucket, so no tensor the size of the model is ever built. Sender and receivers cut the stream the
same way because they share the layout (names, dtypes, shapes; checked by digest before a group
forms) and the bucket size.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import ray
import torch
import torch.distributed as dist

Piece = tuple[int, int, int, int]  # (tensor index, byte offset in the tensor, byte offset in the bucket, bytes)


@dataclass(frozen=True)
class GroupSpec:
    """What every member needs to join one formation of the group (the driver sends it)."""

    group_id: str  # new for every formation: members of an older one know they are out
    host: str  # rank 0's TCPStore
    port: int
    world_size: int  # rank 0 + the replicas
    backend: str  # "gloo" | "nccl"
    bucket_bytes: int
    timeout_s: float  # rendezvous and every broadcast


def layout(state: dict[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor, in the order the byte stream carries them."""
    return [(name, str(state[name].dtype), tuple(state[name].shape)) for name in sorted(state)]


def layout_digest(state: dict[str, torch.Tensor]) -> str:
    return hashlib.sha1(repr(layout(state)).encode()).hexdigest()


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A digest of every byte of every tensor: equal digests, bitwise equal weights."""
    h = hashlib.sha1(repr(layout(state)).encode())
    for name in sorted(state):
        h.update(_bytes(state[name].detach().cpu(), writable=False).numpy().tobytes())
    return h.hexdigest()


def member_info(state: dict[str, torch.Tensor]) -> dict:
    """What the driver checks before it forms a group: the layout, and where the weights live
    (NCCL takes one rank per GPU, so two members may not share one)."""
    device = next(iter(state.values())).device
    gpu = str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None
    return {"layout": layout_digest(state), "device": device.type, "gpu": gpu,
            "node": ray.get_runtime_context().get_node_id()}


def plan_buckets(sizes: list[int], bucket_bytes: int) -> list[list[Piece]]:
    """The concatenated bytes of tensors of `sizes` bytes, cut into buckets of at most
    `bucket_bytes`: per bucket, the pieces that fill it. A tensor larger than a bucket spans
    several; every byte lands in exactly one piece."""
    buckets: list[list[Piece]] = []
    pieces: list[Piece] = []
    fill = 0
    for index, size in enumerate(sizes):
        offset = 0
        while offset < size:
            n = min(size - offset, bucket_bytes - fill)
            pieces.append((index, offset, fill, n))
            offset, fill = offset + n, fill + n
            if fill == bucket_bytes:
                buckets.append(pieces)
                pieces, fill = [], 0
    if pieces:
        buckets.append(pieces)
    return buckets


class SentTensors:
    """A sender's side of the byte stream: the flat bytes of `state`'s tensors in layout order, each
    made when the stream reaches it. `merge(name, tensor)` gives the tensor to send in place of the
    state's own (LoRA's merged weight, learner/lora.py); only the one being packed is kept, so a
    sender never holds a second copy of the weights."""

    def __init__(self, state: dict[str, torch.Tensor], merge: Callable[[str, torch.Tensor], torch.Tensor] | None = None):
        self.state, self.merge = state, merge
        self.names = [name for name, _, _ in layout(state)]
        self.sizes = [state[n].numel() * state[n].element_size() for n in self.names]
        self.device = next(iter(state.values())).device
        self.current: tuple[int, torch.Tensor] | None = None

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.current is None or self.current[0] != index:
            self.current = None  # the previous one goes before the next is made
            name = self.names[index]
            tensor = self.state[name].detach()
            self.current = index, _bytes(self.merge(name, tensor) if self.merge else tensor, writable=False)
        return self.current[1]

    def release(self) -> None:
        self.current = None


def _bytes(t: torch.Tensor, writable: bool) -> torch.Tensor:
    """A flat uint8 view of `t`'s storage (a receiver writes through it into the model)."""
    if writable and not t.is_contiguous():
        raise RuntimeError(f"weight sync: a non-contiguous tensor {tuple(t.shape)} cannot be received in place")
    return t.reshape(-1).view(torch.uint8)


def host_rendezvous(timeout_s: float) -> tuple[dist.TCPStore, str, int]:
    """Rank 0's store on a free port of its node; every formation uses it under its own prefix."""
    store = dist.TCPStore(ray.util.get_node_ip_address(), 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    return store, ray.util.get_node_ip_address(), store.port


class WeightGroup:
    """This process's membership in one formation of the group. Joining blocks until every member
    has joined, or fails after spec.timeout_s."""

    def __init__(self, spec: GroupSpec, rank: int, master_store: dist.TCPStore | None = None):
        self.spec, self.rank = spec, rank
        timeout = datetime.timedelta(seconds=spec.timeout_s)
        store = master_store or dist.TCPStore(spec.host, spec.port, is_master=False, timeout=timeout)
        store = dist.PrefixStore(f"weights/{spec.group_id}", store)
        if spec.backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, spec.world_size, options)
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, spec.world_size, timeout)
        self.timeout = timeout

    @torch.no_grad()
    def send(self, state: dict[str, torch.Tensor], merge=None) -> int:
        """Rank 0: broadcast every tensor of `state` (each through `merge`: SentTensors), bucket by
        bucket. Returns the bytes sent."""
        tensors = SentTensors(state, merge)
        bucket = self._bucket(tensors.device, sum(tensors.sizes))
        for pieces in plan_buckets(tensors.sizes, self.spec.bucket_bytes):
            used = bucket[: pieces[-1][2] + pieces[-1][3]]
            for i, src, dst, n in pieces:
                used[dst : dst + n].copy_(tensors[i][src : src + n])
            self._broadcast(used)
        return sum(tensors.sizes)

    @torch.no_grad()
    def receive(self, state: dict[str, torch.Tensor]) -> None:
        """A replica: every bucket straight into the tensors of `state` (the model's own storage).
        Between the first bucket and the last the model is half-updated: the caller must not serve
        until this returns, or, on an error, until it has loaded whole weights again."""
        tensors = [_bytes(state[name], writable=True) for name, _, _ in layout(state)]
        bucket = self._bucket(tensors[0].device, sum(t.numel() for t in tensors))
        for pieces in plan_buckets([t.numel() for t in tensors], self.spec.bucket_bytes):
            used = bucket[: pieces[-1][2] + pieces[-1][3]]
            self._broadcast(used)
            for i, src, dst, n in pieces:
                tensors[i][src : src + n].copy_(used[dst : dst + n])

    def _bucket(self, device: torch.device, total: int) -> torch.Tensor:
        # NCCL moves GPU memory; gloo here moves CPU buffers (a GPU member copies through them)
        device = device if self.spec.backend == "nccl" else torch.device("cpu")
        return torch.empty(min(self.spec.bucket_bytes, max(total, 1)), dtype=torch.uint8, device=device)

    def _broadcast(self, bucket: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        self.pg.broadcast([bucket], opts).wait(self.timeout)
