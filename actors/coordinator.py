"""The rollout coordinator: GRPO groups, dynamic sampling, surplus, and the policy-lag filter.

Runs in the driver (it owns every episode ref). One call of `next_batch` returns exactly
`groups_per_batch` groups whose success rate lies inside [min, max] success; groups completed
beyond that are kept for the next step (the original discards them). Episodes flow
env workers -> TrajectoryQueue (refs + meta) -> here, where they are grouped by (task, init state).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray

from actors.env_pool import Episode, EnvWorkerPool
from actors.samplers import AdaptiveTaskSampler, InitStateSampler
from common.config import RolloutConfig
from learner.grpo import keep_group


@dataclass
class Group:
    key: tuple[str, int]
    items: list[dict] = field(default_factory=list)  # meta + {"ref": [ObjectRef]}

    @property
    def success_rate(self) -> float:
        return sum(it["success"] for it in self.items) / max(len(self.items), 1)

    @property
    def policy_version(self) -> int:
        return min(it["policy_version"] for it in self.items)


@dataclass
class RolloutStats:
    groups_done: int = 0
    groups_kept: int = 0
    groups_filtered: int = 0
    groups_stale: int = 0
    episodes: int = 0
    successes: int = 0
    env_steps: int = 0
    seconds: float = 0.0
    per_task: dict = field(default_factory=dict)  # task -> [successes, episodes]


class RolloutCoordinator:
    def __init__(self, cfg: RolloutConfig, pool: EnvWorkerPool, queue, sampler: InitStateSampler | AdaptiveTaskSampler):
        self.cfg, self.pool, self.queue, self.sampler = cfg, pool, queue, sampler
        self.open_groups: dict[int, Group] = {}
        self.ready: list[Group] = []  # complete groups that passed dynamic sampling
        self._next_group_id = 0
        self.stats = RolloutStats()

    def _launch_group(self) -> None:
        task, init_state = self.sampler.next()
        gid = self._next_group_id
        self._next_group_id += 1
        self.open_groups[gid] = Group((task, init_state))
        for _ in range(self.cfg.group_size):
            self.pool.submit(Episode(task, init_state, self.cfg.temperature, greedy=False, tag=gid))

    def _groups_in_flight(self) -> int:
        return len(self.open_groups)

    def pump(self, want_groups: int, timeout_s: float = 0.2) -> None:
        """Keep env slots busy with groups until `want_groups` are ready, move finished episodes
        through the queue, and close complete groups (dynamic sampling)."""
        slots_in_groups = max(1, self.pool.num_slots // self.cfg.group_size)
        while len(self.ready) + self._groups_in_flight() < want_groups or (
            len(self.ready) < want_groups and self._groups_in_flight() < slots_in_groups
        ):
            self._launch_group()
        for ep, meta, traj_ref in self.pool.poll(timeout_s):
            item = {k: v for k, v in meta.items() if k != "frames"}
            item["ref"], item["group"] = [traj_ref], ep.tag
            ray.get(self.queue.put.remote(item, timeout_s=60), timeout=90)
        for item in ray.get(self.queue.get.remote(10_000), timeout=60):
            self._add(item)

    def _add(self, item: dict) -> None:
        group = self.open_groups[item["group"]]
        group.items.append(item)
        s = self.stats
        s.episodes += 1
        s.successes += int(item["success"])
        s.env_steps += item["env_steps"]
        per = s.per_task.setdefault(item["task"], [0, 0])
        per[0] += int(item["success"])
        per[1] += 1
        if len(group.items) == self.cfg.group_size:
            del self.open_groups[item["group"]]
            s.groups_done += 1
            kept = keep_group(group.success_rate, self.cfg.min_group_success, self.cfg.max_group_success)
            self.sampler.observe(group.key[0], group.success_rate, init_state=group.key[1])
            if kept:
                self.ready.append(group)
                s.groups_kept += 1
            else:
                s.groups_filtered += 1

    def drain(self, timeout_s: float) -> None:
        """Finish the groups in flight; they are kept or filtered as usual."""
        deadline = time.monotonic() + timeout_s
        while self.open_groups:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout: {len(self.open_groups)} groups still in flight after {timeout_s:.0f}s")
            self.pump(0)

    def drop_stale(self, current_version: int) -> int:
        """Drop ready groups older than the allowed lag. Surplus groups may lag one version even in
        strict mode (they were sampled by the policy that the step just trained from)."""
        max_lag = max(self.cfg.max_policy_lag, 1 if self.cfg.keep_surplus else 0)
        fresh = [g for g in self.ready if current_version - g.policy_version <= max_lag]
        dropped = len(self.ready) - len(fresh)
        self.ready = fresh
        self.stats.groups_stale += dropped
        return dropped

    def next_batch(self, groups: int, current_version: int, timeout_s: float, drain: bool = True) -> list[Group]:
        """Exactly `groups` kept groups. In strict on-policy mode (`drain`), groups already in
        flight are finished before returning, so no rollout runs while the learner trains."""
        self.stats = RolloutStats()
        start = time.monotonic()
        self.drop_stale(current_version)
        rounds = 0
        while len(self.ready) < groups:
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"rollout: {len(self.ready)}/{groups} groups after {timeout_s:.0f}s")
            before = self.stats.groups_done
            self.pump(groups)
            rounds += self.stats.groups_done - before
            if rounds > self.cfg.max_rounds * groups:
                raise RuntimeError(
                    f"dynamic sampling kept {len(self.ready)} of {self.stats.groups_done} groups; the policy "
                    "succeeds always or never on these tasks (RL needs some successes and some failures)"
                )
        if drain:
            self.drain(timeout_s)
        batch, self.ready = self.ready[:groups], (self.ready[groups:] if self.cfg.keep_surplus else [])
        self.stats.seconds = time.monotonic() - start
        return batch
