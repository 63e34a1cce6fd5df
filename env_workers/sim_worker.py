"""SimWorker: an env worker that never asks a policy, for the rollout benchmarks' baselines.

It hosts the same envs as EnvWorker (`EnvSlot`: one sim thread per worker, the same per-step
deadline, the same action conventions) and is placed the same way, but its actions come from
elsewhere:
  - `run_random`: every env steps random action chunks, episode after episode (resets included),
    for a while or a number of episodes: the simulation ceiling, what the workers reach when
    inference costs nothing;
  - `reset` / `step`: a driver steps all envs of all workers together with one batched forward per
    step in between (the lock-step baseline, scripts/bench_rollout.py).
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray

from common.config import ClusterConfig, EnvConfig
from common.records import ChunkResult, Observation
from env_workers.worker import EnvSlot, SimClock, sim_seconds, to_env_actions

READY_TIMEOUT_S = 300.0  # env builds (LIBERO: seconds each), as for the EnvWorkerPool


@ray.remote
class SimWorker:
    def __init__(self, env_cfg: EnvConfig, num_envs: int, seed: int = 0):
        import torch

        torch.set_num_threads(1)  # as EnvWorker: one core per worker
        self.env_cfg = env_cfg
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sim")
        self.clock = SimClock()
        self.slots = [EnvSlot(env_cfg, self.executor, clock=self.clock) for _ in range(num_envs)]
        self.rng = np.random.default_rng(seed)

    def ready(self) -> bool:
        return True

    def task_info(self) -> dict:
        env = self.slots[0].env
        return {t: {"instruction": env.instruction(t), "train": env.init_states(t, "train")} for t in env.task_names}

    async def run_random(self, requests: list[tuple[str, int]], chunk: int, seconds: float | None = None,
                         episodes: int | None = None) -> dict:
        """Env j runs episodes of requests[j] (reset included) with uniform random action chunks
        (policy convention, converted as EnvWorker converts) until `seconds` have passed (the episode
        in progress stops there) or it has run `episodes` whole episodes; every applied step counts."""
        deadline = math.inf if seconds is None else time.monotonic() + seconds
        limit = math.inf if episodes is None else episodes
        counts = await asyncio.gather(*(self._random_episodes(slot, request, deadline, limit, chunk)
                                        for slot, request in zip(self.slots, requests)))
        return {"env_steps": sum(c[0] for c in counts), "episodes": sum(c[1] for c in counts)}

    async def _random_episodes(self, slot: EnvSlot, request: tuple[str, int], deadline: float, limit: float, chunk: int):
        steps = episodes = 0
        action_dim = slot.env.action_dim
        while time.monotonic() < deadline and episodes < limit:
            await slot.call("reset", *request)
            done = False
            while not done and time.monotonic() < deadline:
                actions = self.rng.uniform(-1.0, 1.0, (chunk, action_dim)).astype(np.float32)
                result = await slot.step_chunk(to_env_actions(self.env_cfg.backend, actions))
                steps, done = steps + result.steps, result.done
            episodes += done
        return steps, episodes

    async def reset(self, requests: list[tuple[str, int]]) -> list[Observation]:
        """Env j starts requests[j] = (task, init state); their first observations, in order."""
        return [await slot.call("reset", task, state) for slot, (task, state) in zip(self.slots, requests)]

    async def step(self, chunks: list[np.ndarray | None]) -> list[ChunkResult | None]:
        """Env j applies chunks[j] (policy actions; None = leave env j as it is), one env after another."""
        return [None if actions is None else await slot.step_chunk(to_env_actions(self.env_cfg.backend, actions))
                for slot, actions in zip(self.slots, chunks)]

    def sim_seconds(self) -> dict:
        return sim_seconds(self.clock, self.slots)

    def close(self) -> None:
        for slot in self.slots:
            slot.close()
        self.executor.shutdown(wait=False)


def spawn_sim_workers(env_cfg: EnvConfig, cluster_cfg: ClusterConfig, seed: int = 0) -> list:
    """cluster.num_env_workers SimWorkers of cluster.envs_per_worker envs, with the CPUs and node
    placement of the EnvWorkerPool's workers; returns once every env is built."""
    if env_cfg.batched_sim:
        raise ValueError("env.sim_backend: SimWorkers drive one env per slot; a batched ManiSkill env "
                         "(physx_cuda / env.batched) runs in EnvWorkers only")
    opts: dict = {"num_cpus": cluster_cfg.env_worker_cpus}
    if "sim" in cluster_cfg.resources:
        opts["resources"] = {cluster_cfg.resources["sim"]: 0.001}
    workers = [SimWorker.options(**opts).remote(env_cfg, cluster_cfg.envs_per_worker, seed + i)
               for i in range(cluster_cfg.num_env_workers)]
    try:
        ray.get([w.ready.remote() for w in workers], timeout=READY_TIMEOUT_S)
    except BaseException:
        kill_workers(workers)
        raise
    return workers


def kill_workers(workers: list) -> None:
    for w in workers:
        try:
            ray.kill(w)
        except Exception:
            pass
