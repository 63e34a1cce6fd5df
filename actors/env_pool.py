"""The pool of EnvWorker actors as the coordinator sees it: launch episodes, collect the finished
ones, and replace dead workers, re-running their in-flight episodes elsewhere.

Submitted episodes wait in the pool until an env is idle, then start on one that already holds
their task's scene where one is idle (actors/scene_book.py): a LIBERO scene build costs seconds.

The driver calls `run_episode.remote`, so it OWNS every episode's result refs: a worker that
dies loses only the episodes it was running, which are re-submitted with the same request.
A trajectory's bytes, though, live in the object store of the node that ran the episode; an
episode counts as finished only once a copy is on the driver's node, so a sim node that goes
away takes only its unfinished episodes with it (Ray pins the surviving copy in its place).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from actors.scene_book import SceneBook
from common.config import ClusterConfig, EnvConfig
from common.records import EpisodeMeta
from env_workers.worker import EnvWorker


@dataclass
class Episode:
    task: str
    init_state: int
    temperature: float
    greedy: bool
    record_video: bool = False
    attempts: int = 0
    tag: object = None  # caller's bookkeeping (e.g. group id)
    passed_over: int = 0  # dispatches that went to younger episodes whose task an idle env held


@dataclass(frozen=True)
class FinishedEpisode:
    request: Episode
    meta: EpisodeMeta
    ref: ray.ObjectRef  # the Trajectory; the driver owns it, so it outlives the worker that made it


READY_TIMEOUT_S = 300.0  # env builds (LIBERO: seconds each) plus waiting for a node to join


class EnvWorkerPool:
    def __init__(self, env_cfg: EnvConfig, cluster_cfg: ClusterConfig, app_name: str, max_attempts: int = 3):
        self.env_cfg, self.cluster_cfg, self.app_name = env_cfg, cluster_cfg, app_name
        self.max_attempts = max_attempts
        self.workers = [self._spawn() for _ in range(cluster_cfg.num_env_workers)]
        self._wait_ready(READY_TIMEOUT_S)
        # trajectory ref -> (request, meta ref, worker index, the worker that runs it)
        self.pending: dict[ray.ObjectRef, tuple[Episode, ray.ObjectRef, int, object]] = {}
        self.load = [0] * len(self.workers)
        self.scenes = SceneBook(len(self.workers), cluster_cfg.envs_per_worker)
        # episodes wait here, not in the workers' queues, until an env is idle: then the one whose task
        # that env's scene holds goes first (an episode passed over num_slots times goes next, whatever)
        self.backlog: deque[Episode] = deque()
        self.rerun = 0
        self.replaced = 0
        self._rr = itertools.count()

    def _wait_ready(self, timeout_s: float) -> None:
        refs = [w.ready.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if len(ready) < len(refs):  # usually unschedulable: more CPUs asked than the cluster has
            c = self.cluster_cfg
            for w in self.workers:  # do not leave pending actors behind in the cluster
                ray.kill(w)
            raise TimeoutError(
                f"{len(refs) - len(ready)} of {len(refs)} env workers not running after {timeout_s:.0f}s. Asked for: "
                f"cluster.num_env_workers={c.num_env_workers} x cluster.env_worker_cpus={c.env_worker_cpus} CPUs, "
                f"plus cluster.serve_replicas={c.serve_replicas} x cluster.replica_cpus={c.replica_cpus}; the cluster has "
                f"{ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.available_resources().get('CPU', 0):g} free. "
                "Lower those fields (0 CPUs lets roles share cores, as configs/demo.yaml does) or add nodes."
            )
        ray.get(ready, timeout=30)  # surface a worker that failed to start with its own error

    def _spawn(self):
        # SPREAD: over every node that may host sim, so losing one node loses only its share
        opts = {"num_cpus": self.cluster_cfg.env_worker_cpus, "num_gpus": self.cluster_cfg.env_worker_gpus,
                "max_concurrency": self.cluster_cfg.envs_per_worker + 4,
                "scheduling_strategy": "SPREAD"}
        if "sim" in self.cluster_cfg.resources:
            opts["resources"] = {self.cluster_cfg.resources["sim"]: 0.001}
        c = self.cluster_cfg
        return EnvWorker.options(**opts).remote(self.env_cfg, c.envs_per_worker, self.app_name,
                                                batch_max_wait_s=c.worker_batch_wait_ms / 1000.0,
                                                request_groups=c.request_groups_per_worker)

    @property
    def num_slots(self) -> int:
        return len(self.workers) * self.cluster_cfg.envs_per_worker

    def task_info(self) -> dict:
        return ray.get(self.workers[0].task_info.remote(), timeout=120)

    @property
    def in_flight(self) -> int:
        """Episodes submitted and not yet finished: running, queued at a worker, or in the backlog."""
        return len(self.pending) + len(self.backlog)

    def submit(self, ep: Episode, first: bool = False) -> None:
        """Queue an episode (`first`: ahead of the others, as a re-run is); it starts when an env is idle."""
        self.backlog.appendleft(ep) if first else self.backlog.append(ep)
        self._dispatch()

    def _dispatch(self) -> None:
        """Send backlog episodes to idle envs, those whose task an idle env holds first."""
        while (ep := self.scenes.pick(self.backlog, self.num_slots)) is not None:
            self.backlog.remove(ep)
            self._send(ep)

    def _send(self, ep: Episode) -> None:
        index = self.scenes.choose(ep.task, self.load, next(self._rr))
        self.scenes.started(index, ep.task)
        meta_ref, traj_ref = self.workers[index].run_episode.remote(ep.task, ep.init_state, ep.temperature, ep.greedy, ep.record_video)
        ep.attempts += 1
        self.load[index] += 1
        self.pending[traj_ref] = (ep, meta_ref, index, self.workers[index])

    def poll(self, timeout_s: float) -> list[FinishedEpisode]:
        """The episodes finished by now, each with its trajectory copied to this node, as soon as there is
        one (at most `timeout_s` of waiting), so the caller can launch the next ones while the slots are
        still busy; failed ones are re-submitted."""
        if not self.pending:
            self._dispatch()
            return []
        ready, rest = ray.wait(list(self.pending), num_returns=1, timeout=timeout_s)
        if ready and rest:  # and every other one that has finished meanwhile, without waiting
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        done = []
        for traj_ref in ready:
            ep, meta_ref, index, worker = self.pending.pop(traj_ref)
            current = self.workers[index] is worker  # not replaced since this episode was submitted
            try:
                meta = ray.get(meta_ref, timeout=30)
                # the copy is local now (cheap to read), unless its node went away before the copy
                # was made: then this raises ObjectLostError and the episode runs again
                ray.get(traj_ref, timeout=30)
            except (RayActorError, ActorDiedError, ActorUnavailableError):
                if current:  # first failure seen from this worker: replace it once
                    self._replace(index)
                self._retry(ep)
                continue
            except Exception:
                if current:
                    self._ended(index, ep)
                self._retry(ep)  # env timeout or env error: the slot was rebuilt; run it again
                continue
            if current:
                self._ended(index, ep)
            done.append(FinishedEpisode(ep, meta, traj_ref))
        self._dispatch()  # the envs just freed take their next episodes
        return done

    def _ended(self, index: int, ep: Episode) -> None:
        self.load[index] -= 1
        self.scenes.finished(index, ep.task)

    def _retry(self, ep: Episode) -> None:
        if ep.attempts >= self.max_attempts:
            raise RuntimeError(f"episode {ep.task}#{ep.init_state} failed {ep.attempts} times; giving up")
        self.rerun += 1
        self.submit(ep, first=True)

    def _replace(self, index: int) -> None:
        try:
            ray.kill(self.workers[index])
        except Exception:
            pass
        self.workers[index] = self._spawn()
        self.scenes.reset(index)
        self.load[index] = sum(1 for *_, i, w in self.pending.values() if i == index and w is self.workers[index])
        self.replaced += 1

    def run_all(self, episodes: list[Episode], timeout_s: float) -> list[FinishedEpisode]:
        """Submit everything and wait for all of it (evaluation)."""
        for ep in episodes:
            self.submit(ep)
        out, deadline = [], time.monotonic() + timeout_s
        while self.in_flight:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.in_flight} episodes still running or queued after {timeout_s}s")
            out.extend(self.poll(timeout_s=1.0))
        return out

    def total_env_steps(self) -> int:
        return sum(ray.get([w.total_env_steps.remote() for w in self.workers], timeout=30))

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                ray.kill(w)
            except Exception:
                pass
