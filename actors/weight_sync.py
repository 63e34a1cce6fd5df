"""How the learner's weights reach the Serve replicas after an update (learner.weight_sync).

Every backend runs the same three steps, and differs only in the first:
1. `deliver`: object_store does nothing here; collective broadcasts the weights over a process
   group of rank 0 and the replicas (actors/weight_group.py); cuda_ipc hands them to the replicas
   on rank 0's own GPU through shared-memory handles (actors/weight_ipc.py). Each sync's weights
   have an id of their own, which a replica records with what it received;
2. the store copy: rank 0 copies the state dict into the object store, and the WeightStore
   records it with its version and id (services/weight_store.py): a replica that (re)starts loads
   it before it serves. The copy is queued on rank 0 behind the delivery and the sync does not
   wait for it: rank 0 makes it while the next rollout runs, and runs no later task (an update)
   before it, so it holds this version's weights. At 7B it takes seconds (a 14 GB copy to host
   memory and into the store) that a delivery does not;
3. `broadcast_weights` calls set_weights(version, ref, id) on every replica until all report the
   version. A replica that holds the id already (step 1 delivered it) only takes the version;
   any other (started meanwhile, or the delivery failed) loads the store's copy, waiting for it.
Step 3 is what makes a failed or partial delivery safe, so a new backend only writes `deliver`. A
replica that fails midway through a delivery reloads the store's whole weights: the version
before, or, while the store holds none yet (a run's first sync), this one's, which that sync puts
before it delivers. auto picks one of the three at the first sync, from where rank 0's and the
replicas' weights live.
"""

from __future__ import annotations

import uuid

import ray

from actors.weight_group import GroupSpec
from actors.weight_ipc import colocated
from common.config import RunConfig
from services.policy_service import broadcast_weights

GROUP_TIMEOUT_S = 60.0  # a formation's rendezvous, and each bucket's broadcast
DELIVERY_TIMEOUT_S = 600.0  # the whole broadcast, every bucket to every replica


def serve_weights(rollout, version: int, state_ref, replicas: int) -> None:
    """Steps 2 (the store) and 3 for weights already in the object store, e.g. a validated policy."""
    ray.get(rollout.weights.publish.remote(version, [state_ref]), timeout=60)
    broadcast_weights(rollout.handle, version, state_ref, state_ref.hex(), replicas)


class ObjectStoreSync:
    """learner.weight_sync object_store: every replica fetches rank 0's copy from the object store."""

    def __init__(self, cfg: RunConfig, learner, rollout):
        self.cfg, self.learner, self.rollout = cfg, learner, rollout

    def sync(self, version: int) -> None:
        weights_id = uuid.uuid4().hex
        stored, _, _ = ray.get(self.rollout.weights.current.remote(), timeout=60)
        if stored is None:  # the first sync: whole weights in the store before any delivery
            state_ref = self.store_copy(version, weights_id)
            self.deliver(version, weights_id)
        else:  # the copy queued behind the delivery, made while the next rollout runs
            self.deliver(version, weights_id)
            state_ref = self.store_copy(version, weights_id)
        broadcast_weights(self.rollout.handle, version, state_ref, weights_id, self.cfg.cluster.serve_replicas)

    def store_copy(self, version: int, weights_id: str):
        """Step 2: the ref to rank 0's copy of the current weights, being made, in the store."""
        state_ref = self.learner.publish_weights()
        ray.get(self.rollout.weights.publish.remote(version, [state_ref], weights_id), timeout=60)
        return state_ref

    def deliver(self, version: int, weights_id: str) -> None:
        """Nothing: the replicas load the store's copy in set_weights."""


class CollectiveSync(ObjectStoreSync):
    """learner.weight_sync collective: rank 0 broadcasts to the replicas of the current formation.

    A formation is rank 0 plus the replicas that are up when a sync begins. It is kept while they
    stay the same; when one died and Serve replaced it (a new replica id), or one is missing, or a
    broadcast failed, the next sync forms a new one with whoever is up then. A replica outside the
    formation has the current weights all the same: from the store when it started, or from step 3.
    """

    def __init__(self, cfg: RunConfig, learner, rollout):
        super().__init__(cfg, learner, rollout)
        self.group_id: str | None = None
        self.members: list[str] = []  # replica ids of the formation, sorted

    def deliver(self, version: int, weights_id: str) -> None:
        handle = self.rollout.handle
        try:
            group_id = self.formation()
            if group_id is None:
                return
            sent = self.learner.rank0.send_weights.remote(group_id)
            received = handle.broadcast("receive_weights", group_id, version, weights_id)
            received.results(timeout_s=DELIVERY_TIMEOUT_S)
            ray.get(sent, timeout=DELIVERY_TIMEOUT_S)
        except MembersMismatch:
            raise  # no retry helps
        except Exception as err:  # a member died or timed out: its formation is never used again
            self.group_id = None
            print(f"weight sync: the collective broadcast of version {version} failed ({last_line(err)}); the "
                  f"replicas load it from the object store, and the next sync forms a new group", flush=True)

    def formation(self) -> str | None:
        """The id of a formation of rank 0 and every replica up now: the current one when they are
        its members, else a new one. None when no replica is up."""
        members = self.rollout.handle.broadcast("weight_member").results(timeout_s=GROUP_TIMEOUT_S)
        ids = sorted(m["replica"] for m in members)
        if self.group_id is not None and ids == self.members and all(m["group"] == self.group_id for m in members):
            return self.group_id
        self.group_id = None
        if not members:
            return None
        rank0 = self.learner.rank0
        backend = check_members(ray.get(rank0.weight_member.remote(), timeout=GROUP_TIMEOUT_S), members)
        host, port = ray.get(rank0.weight_rendezvous.remote(GROUP_TIMEOUT_S), timeout=GROUP_TIMEOUT_S)
        spec = GroupSpec(uuid.uuid4().hex, host, port, len(ids) + 1, backend,
                         self.cfg.learner.weight_sync_bucket_mb << 20, GROUP_TIMEOUT_S)
        # rank 0 and the replicas join at once: each join waits for all the others
        joined0 = rank0.join_weight_group.remote(spec)
        joined = self.rollout.handle.broadcast("join_weight_group", spec, {r: i + 1 for i, r in enumerate(ids)})
        joined = joined.results(timeout_s=GROUP_TIMEOUT_S + 30)
        ray.get(joined0, timeout=GROUP_TIMEOUT_S + 30)
        if sorted(j for j in joined if j is not None) != ids:
            raise RuntimeError(f"the replicas changed while the group formed ({ids} -> {joined})")
        self.group_id, self.members = spec.group_id, ids
        return spec.group_id


class CudaIpcSync(ObjectStoreSync):
    """learner.weight_sync cuda_ipc: the replicas that share rank 0's GPU (its node, on the CPU)
    copy the weights from rank 0's shared bucket buffers (actors/weight_ipc.py), with no copy through
    host memory or the object store. Replicas on another node or GPU cannot open those handles: they
    load the object-store copy in step 3, as does every replica when a delivery fails."""

    def __init__(self, cfg: RunConfig, learner, rollout):
        super().__init__(cfg, learner, rollout)
        self.told_elsewhere = False  # said once that some replicas are elsewhere

    def deliver(self, version: int, weights_id: str) -> None:
        try:
            self.hand_over(version, weights_id)
        except MembersMismatch:
            raise  # no retry helps
        except Exception as err:  # a replica died or timed out: step 3 gives every replica the store's copy
            print(f"weight sync: the cuda_ipc delivery of version {version} failed ({last_line(err)}); the "
                  f"replicas load it from the object store", flush=True)

    def hand_over(self, version: int, weights_id: str, timeout_s: float = GROUP_TIMEOUT_S) -> list:
        """One delivery to every replica up now that shares rank 0's GPU; each replica's answer
        (its new version, or None: not a receiver). Every bucket comes within `timeout_s`."""
        rank0, handle = self.learner.rank0, self.rollout.handle
        members = handle.broadcast("weight_member").results(timeout_s=GROUP_TIMEOUT_S)
        sender = ray.get(rank0.weight_member.remote(), timeout=GROUP_TIMEOUT_S)
        receivers = sorted(m["replica"] for m in members if colocated(sender, m))
        if any(m["layout"] != sender["layout"] for m in members):
            raise MembersMismatch("learner.weight_sync: cuda_ipc: a replica's weights have other names, dtypes or "
                                  "shapes than the learner's; both must load the same policy with the same policy.dtype")
        if len(receivers) < len(members) and not self.told_elsewhere:
            self.told_elsewhere = True
            print(f"weight sync: cuda_ipc: {len(members) - len(receivers)} of {len(members)} replicas are not on "
                  f"learner rank 0's {'GPU' if sender['device'] == 'cuda' else 'node'}; they load the weights from "
                  f"the object store", flush=True)
        if not receivers:
            return [None] * len(members)
        session, bucket_bytes = uuid.uuid4().hex, self.cfg.learner.weight_sync_bucket_mb << 20
        ray.get(rank0.open_weight_ipc.remote(session, receivers, bucket_bytes), timeout=GROUP_TIMEOUT_S)
        try:
            received = handle.broadcast("receive_weights_ipc", session, receivers, rank0, bucket_bytes,
                                        version, weights_id, timeout_s)
            return received.results(timeout_s=DELIVERY_TIMEOUT_S)
        finally:  # frees rank 0's buckets, also after a failure
            ray.get(rank0.close_weight_ipc.remote(session), timeout=GROUP_TIMEOUT_S)


def last_line(err: Exception) -> str:
    """A remote error's own message: the last line of its traceback."""
    return (str(err).strip().splitlines() or [type(err).__name__])[-1]


class AutoSync:
    """learner.weight_sync auto: the backend that suits where the weights live, chosen at the first
    sync that finds a replica up (the syncs before it go through the object store): cuda_ipc when
    every replica shares rank 0's GPU, collective when every member has a GPU of its own,
    object_store otherwise (CPU replicas, or a mix)."""

    def __init__(self, cfg: RunConfig, learner, rollout):
        self.cfg, self.learner, self.rollout = cfg, learner, rollout
        self.resolved: str | None = None
        self.backend: ObjectStoreSync = ObjectStoreSync(cfg, learner, rollout)

    def sync(self, version: int) -> None:
        if self.resolved is None:
            members = self.rollout.handle.broadcast("weight_member").results(timeout_s=GROUP_TIMEOUT_S)
            if members:
                sender = ray.get(self.learner.rank0.weight_member.remote(), timeout=GROUP_TIMEOUT_S)
                self.resolved = resolve_backend(sender, members)
                self.backend = BACKENDS[self.resolved](self.cfg, self.learner, self.rollout)
                print(f"weight sync: auto chose {self.resolved} for rank 0 on {sender['device']} and "
                      f"{len(members)} replicas on {sorted({m['device'] for m in members})}", flush=True)
        self.backend.sync(version)


def resolve_backend(sender: dict, members: list[dict]) -> str:
    """learner.weight_sync auto's choice for rank 0 (`sender`) and these replicas (member_info)."""
    if sender["device"] == "cuda" and all(m["device"] == "cuda" for m in members):
        if all(colocated(sender, m) for m in members):
            return "cuda_ipc"
        gpus = [(m["node"], m["gpu"]) for m in (sender, *members)]
        if len(set(gpus)) == len(gpus):
            return "collective"
    return "object_store"


class MembersMismatch(ValueError):
    """The members cannot form a group at all; the message names what to change."""


def check_members(sender: dict, members: list[dict]) -> str:
    """The backend for rank 0 (`sender`) and these replicas: NCCL when every member is on a GPU
    (one rank per GPU), gloo otherwise."""
    if any(m["layout"] != sender["layout"] for m in members):
        raise MembersMismatch("learner.weight_sync: collective: a replica's weights have other names, dtypes or "
                              "shapes than the learner's; both must load the same policy with the same policy.dtype")
    everyone = [sender, *members]
    if not all(m["device"] == "cuda" for m in everyone):
        return "gloo"
    gpus = [(m["node"], m["gpu"]) for m in everyone]
    if len(set(gpus)) < len(gpus):
        raise MembersMismatch("learner.weight_sync: collective over NCCL needs every replica and learner rank 0 on "
                              "a GPU of its own, and two of them share one (cluster.replica_gpus below 1, or colocated "
                              "roles); use learner.weight_sync: cuda_ipc when every replica is on rank 0's GPU, else "
                              "object_store")
    return "nccl"


BACKENDS = {"object_store": ObjectStoreSync, "collective": CollectiveSync, "cuda_ipc": CudaIpcSync}


def make_weight_sync(cfg: RunConfig, learner, rollout) -> ObjectStoreSync | AutoSync:
    return {"auto": AutoSync, **BACKENDS}[cfg.learner.weight_sync](cfg, learner, rollout)
