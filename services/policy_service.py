"""The policy inference service: a Ray Serve deployment with dynamic batching across every env
worker, versioned weights, and an atomic hot-swap between batches.

Env workers send the observations of their envs that wait for actions in one request (`act_many`,
env_workers/action_batcher.py); `@serve.batch` groups concurrent requests of all workers into one
forward pass. Sampling (training) and greedy (eval) requests can share a batch window; they
are decoded separately. `set_weights` runs on the replica's event loop like the batch handler,
so a swap can never interleave with a forward pass: a batch sees one version, whole. With
learner.weight_sync: collective the weights arrive by broadcast instead (`receive_weights`,
actors/weight_group.py), with cuda_ipc through shared-memory handles of learner rank 0's buffers
(`receive_weights_ipc`, actors/weight_ipc.py); both are received on the event loop the same way.
A replica that Serve (re)starts mid-run loads the run's current weights first
(services/weight_store.py).
"""

from __future__ import annotations

import asyncio
import os
import time
import zlib

import ray
import torch
from ray import serve
from ray.util import metrics

from common.records import ActionChunk, Observation
from services.weight_store import current_weights

APP_NAME = "vla-policy"


@serve.deployment(name="Policy", max_ongoing_requests=256,
                  logging_config={"enable_access_log": False, "log_level": "WARNING"})
class PolicyDeployment:
    def __init__(self, policy_path: str, policy_cfg: dict, version: int = 0, seed: int = 0,
                 max_batch_size: int = 64, batch_wait_timeout_s: float = 0.005):
        from common.config import PolicyConfig
        from policy.checkpoint import actor_device, load_policy

        torch.set_num_threads(1)
        cfg = PolicyConfig.model_validate(policy_cfg)
        # a replica granted a GPU (cluster.replica_gpus > 0) loads straight onto it and serves from it
        self.policy = load_policy(policy_path, unnorm_key=cfg.unnorm_key, dtype=cfg.dtype, policy=cfg,
                                  device=actor_device(cfg))
        self.policy.model.eval()
        if cfg.compile:  # compiles lazily, once per batch shape, on the first requests
            self.policy.model.compile_blocks()
        if cfg.cuda_graphs:  # on a GPU replica; captured lazily, once per batch shape
            self.policy.use_cuda_graphs(max_batch_size)
        self.version = version
        self.weights_id: str | None = None  # which published weights this replica's equal (a sync's id)
        self.weight_group = None  # actors/weight_group.py: WeightGroup, once the driver forms one
        self.loads = {"object_store": 0, "collective": 0, "cuda_ipc": 0}  # how it got its weights, so far
        # a replica that (re)starts after the run published weights serves those, not its initial ones
        self._load_current()
        replica = serve.get_replica_context().replica_id.unique_id
        self.generator = torch.Generator(device=self.policy.device).manual_seed(seed * 1_000_003 + zlib.crc32(replica.encode()))
        self.act_batch.set_max_batch_size(max_batch_size)
        self.act_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_size_hist = metrics.Histogram(
            "vla_inference_batch_size", "observations per forward pass", boundaries=[1, 2, 4, 8, 16, 32, 64, 128]
        )
        self.latency_hist = metrics.Histogram(
            "vla_inference_latency_seconds", "forward pass latency", boundaries=[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2]
        )
        self.served = 0
        self.batches = 0

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def act_batch(self, requests: list[tuple[list[Observation], float, bool]]) -> list[list[ActionChunk]]:
        """Each request carries one env worker's waiting observations; all requests of the batch
        window share one forward pass per (greedy, temperature)."""
        start = time.perf_counter()
        modes: dict[tuple[bool, float], list[tuple[int, int]]] = {}  # (greedy, T) -> (request, observation)
        for r, (observations, temperature, greedy) in enumerate(requests):
            modes.setdefault((greedy, temperature), []).extend((r, j) for j in range(len(observations)))
        out: list[list[ActionChunk | None]] = [[None] * len(observations) for observations, _, _ in requests]
        for (greedy, temperature), idx in sorted(modes.items()):
            chunks = self.policy.act([requests[r][0][j] for r, j in idx], temperature=temperature, greedy=greedy,
                                     version=self.version, generator=self.generator)
            for (r, j), c in zip(idx, chunks):
                out[r][j] = c
        n = sum(len(idx) for idx in modes.values())
        self.batch_size_hist.observe(n)
        self.latency_hist.observe(time.perf_counter() - start)
        self.served += n
        self.batches += 1
        return out

    async def act_many(self, observations: list[Observation], temperature: float = 1.6,
                       greedy: bool = False) -> list[ActionChunk]:
        """One chunk per observation, in order (an env worker's batch of waiting envs)."""
        return await self.act_batch((list(observations), temperature, greedy))

    async def act(self, observation: Observation, temperature: float = 1.6, greedy: bool = False) -> ActionChunk:
        return (await self.act_batch(([observation], temperature, greedy)))[0]

    def _load_current(self) -> None:
        """The weights the run serves now (services/weight_store.py), if it published any."""
        current, state_ref, weights_id = current_weights(APP_NAME)
        if current is not None:
            self.policy.model.load_state_dict(ray.get(state_ref, timeout=600), strict=True)
            self.version, self.weights_id = current, weights_id
            self.loads["object_store"] += 1

    async def set_weights(self, version: int, state_ref_holder: list, weights_id: str) -> int:
        """Swap to `version`, the weights `weights_id`. The state dict arrives by object-store ref
        (wrapped in a list so Serve passes the ref, not the value); loading it is synchronous, hence
        atomic w.r.t. batches. A replica that holds these weights already (a collective or CUDA-IPC
        delivery brought them) only takes the version."""
        if weights_id != self.weights_id:
            self.policy.model.load_state_dict(ray.get(state_ref_holder[0], timeout=600), strict=True)
            self.weights_id = weights_id
            self.loads["object_store"] += 1
        self.version = version
        return version

    # --- learner.weight_sync: collective, cuda_ipc (actors/weight_sync.py drives these) ------------
    async def weight_member(self) -> dict:
        """Who this replica is, where its weights live and which formation of the broadcast group
        it is in."""
        from actors.weight_group import member_info

        group = self.weight_group
        return {"replica": serve.get_replica_context().replica_id.unique_id,
                "group": group.spec.group_id if group is not None else None,
                **member_info(self.policy.model.state_dict())}

    async def join_weight_group(self, spec, ranks: dict[str, int]) -> str | None:
        """Join the formation `spec` under this replica's rank in `ranks` (None: started after the
        driver counted the members; it joins the next one). The old formation is dropped."""
        from actors.weight_group import WeightGroup

        rank = ranks.get(serve.get_replica_context().replica_id.unique_id)
        self.weight_group = None
        if rank is None:
            return None
        # off the event loop: batches go on while the members connect
        self.weight_group = await asyncio.to_thread(WeightGroup, spec, rank)
        return serve.get_replica_context().replica_id.unique_id

    async def receive_weights(self, group_id: str, version: int, weights_id: str) -> int | None:
        """Receive rank 0's broadcast into the model and swap to `version`. Synchronous on the event
        loop like set_weights, so no batch runs on half-received weights; a broadcast that fails
        midway is repaired from the store's whole weights (actors/weight_sync.py) before the loop
        runs a batch again. None: not a member of `group_id` (set_weights delivers instead)."""
        group = self.weight_group
        if group is None or group.spec.group_id != group_id:
            return None
        try:
            group.receive(self.policy.model.state_dict())
        except Exception:
            self.weight_group = None
            self._load_current()
            raise
        self.version, self.weights_id = version, weights_id
        self.loads["collective"] += 1
        return version

    async def receive_weights_ipc(self, session: str, receivers: list[str], sender, bucket_bytes: int,
                                  version: int, weights_id: str, timeout_s: float) -> int | None:
        """Copy rank 0's weights from its shared buckets (`sender`: its actor; delivery `session`)
        into the model and swap to `version`. Synchronous on the event loop like receive_weights,
        with the same repair from the object-store copy when a delivery fails midway; every bucket
        comes within `timeout_s` or the delivery fails. None: not among `receivers` (another node
        or GPU than rank 0: set_weights delivers instead)."""
        from actors.weight_ipc import receive

        replica = serve.get_replica_context().replica_id.unique_id
        if replica not in receivers:
            return None

        def fetch(bucket: int) -> bytes | None:
            return ray.get(sender.weight_ipc_next.remote(session, replica, bucket), timeout=timeout_s)

        try:
            receive(self.policy.model.state_dict(), bucket_bytes, fetch, timeout_s)
        except Exception:
            self._load_current()
            raise
        self.version, self.weights_id = version, weights_id
        self.loads["cuda_ipc"] += 1
        return version

    async def get_version(self) -> int:
        return self.version

    async def pid(self) -> int:
        """The replica's process id (fault drills)."""
        return os.getpid()

    async def node_id(self) -> str:
        """The Ray node this replica runs on (placement checks)."""
        return ray.get_runtime_context().get_node_id()

    async def weights_checksum(self) -> float:
        return float(sum(p.double().sum() for p in self.policy.model.state_dict().values()))

    async def weights_digest(self) -> tuple[str, str]:
        """(replica id, a digest of every byte of the served weights): replicas with equal digests
        serve bitwise equal weights (actors/weight_group.py: state_digest)."""
        from actors.weight_group import state_digest

        return serve.get_replica_context().replica_id.unique_id, state_digest(self.policy.model.state_dict())

    async def stats(self) -> dict:
        return {"version": self.version, "served": self.served, "batches": self.batches,
                "mean_batch_size": self.served / max(self.batches, 1), "weight_loads": dict(self.loads),
                "replica": serve.get_replica_context().replica_id.unique_id}


def start_policy_service(policy_path: str, cluster_cfg, policy_cfg, seed: int = 0):
    """Deploy the policy app and return its handle. When a replica fails to start, the error's last
    line is the replica's own exception (not Serve's "Deploying application ... failed")."""
    options = {"num_replicas": cluster_cfg.serve_replicas,
               "ray_actor_options": {"num_cpus": cluster_cfg.replica_cpus, "num_gpus": cluster_cfg.replica_gpus}}
    if "inference" in cluster_cfg.resources:
        options["ray_actor_options"]["resources"] = {cluster_cfg.resources["inference"]: 0.001}
    app = PolicyDeployment.options(**options).bind(
        str(policy_path), policy_cfg.model_dump(mode="json"), 0, seed,
        cluster_cfg.inference_max_batch, cluster_cfg.inference_batch_wait_ms / 1000.0
    )
    try:
        return serve.run(app, name=APP_NAME, route_prefix=None,
                         logging_config={"enable_access_log": False, "log_level": "WARNING"})
    except RuntimeError as err:
        raise RuntimeError(f"the policy service did not start ({err}); a replica failed with:\n"
                           f"{replica_error(APP_NAME)}") from None


def replica_error(app_name: str) -> str:
    """The last line of the replica's traceback that Serve recorded: the exception itself."""
    try:
        app = serve.status().applications[app_name]
        messages = [d.message for d in app.deployments.values() if d.message] or [app.message]
    except Exception as err:  # the controller itself is gone
        return f"(Serve status unavailable: {err})"
    lines = [line.strip() for line in messages[0].splitlines() if line.strip()]
    return lines[-1] if lines else "(no message recorded)"


def broadcast_weights(handle, version: int, state_ref, weights_id: str, replicas: int, timeout_s: float = 300.0) -> None:
    """Every one of `replicas` replicas swaps to `version`, the weights `weights_id` of `state_ref`
    (DeploymentHandle.broadcast). A replica that is down or still starting misses a broadcast; it
    loads the store's weights when it starts, so the broadcast is retried until all `replicas`
    report `version`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            versions = handle.broadcast("set_weights", version, [state_ref], weights_id).results(timeout_s=timeout_s)
        except Exception as err:  # a replica died mid-call: Serve replaces it
            versions = [f"error: {type(err).__name__}"]
        if len(versions) == replicas and set(versions) == {version}:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"weight sync: after {timeout_s:.0f}s the replicas report {versions}, expected "
                               f"{replicas} x version {version}")
        time.sleep(1.0)
