"""The current weights of a run, for replicas that start after the run published them.

Serve restarts a dead replica with its construction arguments, i.e. the initial policy at
version 0. Every replica therefore asks this named actor for the current (version, weights) before
it takes requests, and the trainer publishes here before it broadcasts a new version, so a
restarted replica never serves stale weights.

The store holds a reference to the state dict in the object store (no copy of the tensors).
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

    def publish(self, version: int, holder: list) -> int:
        self.version, self.holder = version, holder
        return version

    def current(self) -> tuple[int | None, list]:
        return self.version, self.holder

    def adopt(self) -> int:
        """Own the current copy: an object lives as long as the process that put it, and the learner
        rank that did is about to go while the replicas serve on. One copy of the weights, once."""
        if self.holder:
            self.holder = [ray.put(ray.get(self.holder[0], timeout=600))]
        return self.version


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


def current_weights(app_name: str, timeout_s: float = 60.0) -> tuple[int | None, object]:
    """(version, state-dict ref) the run serves now; (None, None) before any publish or without a store."""
    store = weight_store(app_name)
    if store is None:  # no run has started one (e.g. a replica serving a policy on its own)
        return None, None
    version, holder = ray.get(store.current.remote(), timeout=timeout_s)
    return version, (holder[0] if holder else None)
