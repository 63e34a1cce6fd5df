"""The current weights of a run, for replicas that start after the run published them.

Serve restarts a dead replica with its construction arguments, i.e. the initial policy at
version 0. Every replica therefore asks this named actor for the current (version, weights) before
it takes requests, and the trainer publishes here before it broadcasts a new version, so a
restarted replica never serves stale weights.

The store holds a reference to the state dict in the object store (no copy of the tensors) and
the id of those weights (a replica that holds weights of that id needs no load). The reference may
be to a copy still being made (actors/weight_sync.py): a replica that reads it waits for it. Its
owner is the trainer that asked for it, so it outlives the learner ranks that made it (the demo's
final evaluation serves on after GRPO ends).
"""

from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

NAMESPACE = "vla-grpo"


def store_name(app_name: str) -> str:
    return f"{app_name}-weights"


@ray.remote(num_cpus=0)
class WeightStore:
    def __init__(self):
        self.version: int | None = None
        self.holder: list = []  # [ObjectRef of {name: tensor}]: a list, so Ray passes the ref, not the value
        self.weights_id: str | None = None

    def publish(self, version: int, holder: list, weights_id: str | None = None) -> int:
        """`weights_id`: the id replicas record for these weights (default: the ref's own)."""
        self.version, self.holder = version, holder
        self.weights_id = weights_id or (holder[0].hex() if holder else None)
        return version

    def current(self) -> tuple[int | None, list, str | None]:
        return self.version, self.holder, self.weights_id


def start_weight_store(app_name: str):
    """The run's store (a named actor; an earlier run's on this cluster is reused and overwritten).
    It lives on the driver's node: it must outlive any sim or inference node that goes away, and
    the run ends with the driver anyway."""
    on_driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return WeightStore.options(name=store_name(app_name), namespace=NAMESPACE, get_if_exists=True,
                               lifetime=None, scheduling_strategy=on_driver_node).remote()


def weight_store(app_name: str):
    """The run's store, or None when no run started one (ray.put's `_owner` takes either)."""
    try:
        return ray.get_actor(store_name(app_name), namespace=NAMESPACE)
    except ValueError:
        return None


def current_weights(app_name: str, timeout_s: float = 60.0) -> tuple[int | None, object, str | None]:
    """(version, state-dict ref, weights id) the run serves now; (None, None, None) before any
    publish or without a store."""
    store = weight_store(app_name)
    if store is None:  # no run has started one (e.g. a replica serving a policy on its own)
        return None, None, None
    version, holder, weights_id = ray.get(store.current.remote(), timeout=timeout_s)
    return version, (holder[0] if holder else None), weights_id


def wait_for_current_copy(store, timeout_s: float) -> None:
    """Block until the store's current weights are in the object store: after a sync, rank 0 may
    still be making that copy (actors/weight_sync.py)."""
    _, holder, _ = ray.get(store.current.remote(), timeout=60)
    ray.wait(holder, timeout=timeout_s)
