"""The scenario of tests/test_multinode.py, in a process of its own: it builds a Ray cluster of
separate raylets on this machine (`ray.cluster_utils.Cluster`), which needs its own `ray.init`, so
it cannot run inside the test session's cluster.

A head with no role resource (driver, Serve controller), two sim nodes, one inference node and one
learner node; a short strict GRPO run through the real trainer; once step 1 is done, one sim node
crashes (its processes SIGKILLed, nothing unregisters) while it runs episodes and while the
coordinator holds episodes it made. Prints what it saw as one line, `RESULT {json}`, for the test
to check.

    python -m tests.multinode_run --policy DIR --run-dir DIR
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import ray
from ray.experimental import get_object_locations

ROOT = Path(__file__).resolve().parents[1]
# role -> the custom resource its node group advertises (names unlike the roles: the mapping is used)
ROLE_RESOURCES = {"sim": "group_sim", "inference": "group_inference", "learner": "group_learner"}
NODES = {"sim_a": "sim", "sim_b": "sim", "inference": "inference", "learner": "learner"}
TOTAL_STEPS = 4  # the removal waits for its moment in step 2 or 3: a later step re-creates the workers
REMOVAL_WAIT_S = 120.0  # for the moment the removal needs, then remove anyway
CALL_TIMEOUT_S = 60


def build_cluster():
    """-> (cluster, {node name: Node}); the head is "head"."""
    from ray.cluster_utils import Cluster

    # Tiny trajectories (3 images of 64x64) are small enough for Ray to inline them into the driver's
    # memory; production ones (MBs) stay in the object store of the sim node that made them. A low
    # inline limit gives this run the production path, where a lost node can take objects with it.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "_system_config": {"max_direct_call_object_size": 1024}})
    nodes = {"head": cluster.head_node}
    for name, role in NODES.items():
        nodes[name] = cluster.add_node(num_cpus=2, resources={ROLE_RESOURCES[role]: 1}, include_dashboard=False)
    cluster.wait_for_nodes(timeout=120)
    return cluster, nodes


def node_ids(refs) -> list[str]:
    return ray.get(refs, timeout=CALL_TIMEOUT_S)


def placement(rollout, trainer) -> dict[str, list[str]]:
    """role -> the node id of each of its actors, as the actors report it."""
    return {"sim": node_ids([w.node_id.remote() for w in rollout.pool.workers]),
            "inference": rollout.handle.broadcast("node_id").results(timeout_s=CALL_TIMEOUT_S),
            "learner": node_ids([w.node_id.remote() for w in trainer.learner.workers])}


class SimNodeRemoval(threading.Thread):
    """Crashes `victim` during a step that is not the last (the pool finds a dead worker, and replaces
    it, when it fails an episode), at the first moment when one of its env workers runs an episode
    and the coordinator holds a finished episode whose trajectory was made there. It reads the pool
    and coordinator while the trainer's thread changes them: list() copies them whole under the GIL."""

    def __init__(self, cluster, victim, trainer, stop: threading.Event):
        super().__init__(daemon=True)
        self.cluster, self.victim, self.trainer, self.stop = cluster, victim, trainer, stop
        pool = trainer.rollout.pool
        self.there = {i for i, node in enumerate(node_ids([w.node_id.remote() for w in pool.workers]))
                      if node == victim.node_id}
        self.originals = list(pool.workers)
        self.facts: dict = {"removed": False}
        self.made_there: list = []  # refs of the held trajectories made on the victim, at removal

    def _moment(self) -> tuple[list, list]:
        pool, coordinator = self.trainer.rollout.pool, self.trainer.coordinator
        running = [ep for ep, _, i, w in list(pool.pending.values()) if i in self.there and w is self.originals[i]]
        groups = [*list(coordinator.ready), *list(coordinator.open_groups.values())]
        held = [e.ref for g in groups for e in list(g.episodes)]
        where = get_object_locations(held, timeout_ms=5000) if held else {}
        return running, [ref for ref, loc in where.items() if self.victim.node_id in loc["node_ids"]]

    def run(self) -> None:
        deadline = time.monotonic() + REMOVAL_WAIT_S
        running, made_there = [], []
        while not self.stop.is_set() and time.monotonic() < deadline:
            if 1 <= self.trainer.step < TOTAL_STEPS - 1:
                running, made_there = self._moment()
                if running and made_there:
                    break
            time.sleep(0.05)
        if self.stop.is_set():
            return
        self.made_there = made_there
        self.facts.update(removed=True, at_step=self.trainer.step + 1, running_there=len(running),
                          held_made_there=len(made_there), finished_before=self.trainer.coordinator.ledger.finished)
        self.cluster.remove_node(self.victim, allow_graceful=False)  # a crash, not a drain


def scenario(cluster, nodes, policy: str, run_dir: Path) -> dict:
    from common.config_loading import load_config
    from deploy.runtime import Rollout, init_ray
    from deploy.train import GRPOTrainer

    placing = [f"cluster.resources.{role}={name}" for role, name in ROLE_RESOURCES.items()]
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"run_dir={run_dir}", f"cluster.address={cluster.address}", *placing, "cluster.learner_world_size=1",
        "cluster.envs_per_worker=1",  # episodes one after another: most of a rollout is the removal's moment
        "rollout.min_group_success=0.0", "env.max_steps=24", f"total_steps={TOTAL_STEPS}", "checkpoint.every=100"])
    init_ray(cfg)
    ids = {name: node.node_id for name, node in nodes.items()}
    facts: dict = {"nodes": ids, "total_steps": TOTAL_STEPS, "episodes_per_step":
                   cfg.rollout.groups_per_batch * cfg.rollout.group_size, "serve_replicas": cfg.cluster.serve_replicas}
    rollout = Rollout.start(cfg, policy)
    try:
        trainer = GRPOTrainer(cfg, policy, rollout)
    except BaseException:
        rollout.shutdown()
        raise
    stop = threading.Event()
    try:
        facts["placed"] = placement(rollout, trainer)
        victim = next(n for n in ("sim_a", "sim_b") if ids[n] in facts["placed"]["sim"])
        facts["victim"], facts["survivor"] = victim, "sim_b" if victim == "sim_a" else "sim_a"
        removal = SimNodeRemoval(cluster, nodes[victim], trainer, stop)
        removal.start()
        trainer.run(run_dir / "rl_policy")
        stop.set()
        removal.join(timeout=CALL_TIMEOUT_S)
        pool, coordinator = rollout.pool, trainer.coordinator
        # still readable after their node went away: the copies on the driver's node took over
        readable = len(ray.get(removal.made_there, timeout=CALL_TIMEOUT_S)) if removal.made_there else 0
        facts.update(
            removal=removal.facts, made_there_readable=readable, step=trainer.step,
            ledger=vars(coordinator.ledger), held=coordinator.held(), rerun=pool.rerun, replaced=pool.replaced,
            sim_after=node_ids([w.node_id.remote() for w in pool.workers]),
            versions=rollout.handle.broadcast("get_version").results(timeout_s=CALL_TIMEOUT_S),
            policy_lag=[h["rollout/policy_lag"] for h in trainer.history])
    finally:
        stop.set()
        trainer.shutdown()
        rollout.shutdown()
    return facts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", required=True)
    parser.add_argument("--run-dir", required=True, type=Path)
    args = parser.parse_args()
    start = time.monotonic()
    cluster, nodes = build_cluster()
    try:
        facts = scenario(cluster, nodes, args.policy, args.run_dir)
    finally:
        ray.shutdown()
        cluster.shutdown()
    facts["seconds"] = round(time.monotonic() - start, 1)
    print("RESULT " + json.dumps(facts), flush=True)


if __name__ == "__main__":
    main()
