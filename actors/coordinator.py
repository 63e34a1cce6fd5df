"""The rollout coordinator: GRPO groups, dynamic sampling, surplus, the policy-lag filter, and the
driver's trajectory buffer.

Runs in the driver, which launches every episode and so owns every trajectory's ObjectRef: a
dead env worker cannot take finished episodes with it. The coordinator's groups of finished
episodes ARE the trajectory queue; no actor sits in between. Backpressure: no group is launched
while the groups held and in flight would pass `rollout.queue_capacity` trajectories.

One call of `next_batch` returns exactly `groups_per_batch` groups whose success rate lies inside
[min, max] success; groups completed beyond that are kept for the next step (the original
discards them).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from actors.env_pool import Episode, EnvWorkerPool, FinishedEpisode
from actors.samplers import AdaptiveTaskSampler, InitStateSampler
from common.config import RolloutConfig
from common.records import EpisodeMeta
from learner.grpo import keep_group


@dataclass
class Group:
    key: tuple[str, int]  # (task, init state)
    episodes: list[FinishedEpisode] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return sum(e.meta.success for e in self.episodes) / max(len(self.episodes), 1)

    @property
    def policy_version(self) -> int:
        return min(e.meta.policy_version for e in self.episodes)


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


@dataclass
class EpisodeLedger:
    """Every finished episode since the coordinator started, by where it went. At all times
    finished == trained + filtered + stale + discarded + the episodes held in groups."""

    finished: int = 0
    trained: int = 0  # in a batch handed to the learner
    filtered: int = 0  # in a group dynamic sampling dropped
    stale: int = 0  # in a group older than the allowed policy lag
    discarded: int = 0  # surplus dropped with keep_surplus: false


class RolloutCoordinator:
    def __init__(self, cfg: RolloutConfig, pool: EnvWorkerPool, sampler: InitStateSampler | AdaptiveTaskSampler):
        self.cfg, self.pool, self.sampler = cfg, pool, sampler
        self.open_groups: dict[int, Group] = {}
        self.ready: list[Group] = []  # complete groups that passed dynamic sampling
        self._next_group_id = 0
        self.version = 0  # the learner's current weight version (next_batch, drop_stale)
        self.stats = RolloutStats()
        self.ledger = EpisodeLedger()

    def _launch_group(self) -> None:
        task, init_state = self.sampler.next()
        gid = self._next_group_id
        self._next_group_id += 1
        self.open_groups[gid] = Group((task, init_state))
        for _ in range(self.cfg.group_size):
            self.pool.submit(Episode(task, init_state, self.cfg.temperature, greedy=False, tag=gid))

    def _room_for_a_group(self) -> bool:
        """Backpressure: held + in-flight trajectories stay within queue_capacity."""
        return (len(self.ready) + len(self.open_groups) + 1) * self.cfg.group_size <= self.cfg.queue_capacity

    def buffered(self) -> int:
        """Finished trajectories held in ready groups (the surplus, between steps)."""
        return sum(len(g.episodes) for g in self.ready)

    def pump(self, want_groups: int, timeout_s: float = 0.2) -> None:
        """Keep env slots busy with groups until `want_groups` are ready, collect finished episodes,
        and close complete groups (dynamic sampling)."""
        slots_in_groups = max(1, self.pool.num_slots // self.cfg.group_size)
        while self._room_for_a_group() and (
            len(self.ready) + len(self.open_groups) < want_groups
            or (len(self.ready) < want_groups and len(self.open_groups) < slots_in_groups)
        ):
            self._launch_group()
        for done in self.pool.poll(timeout_s):
            self.add(done)

    def add(self, done: FinishedEpisode) -> None:
        """One finished episode joins its group; a complete group is kept or filtered."""
        group, meta = self.open_groups[done.request.tag], done.meta
        group.episodes.append(done)
        s = self.stats
        self.ledger.finished += 1
        s.episodes += 1
        s.successes += int(meta.success)
        s.env_steps += meta.env_steps
        per = s.per_task.setdefault(meta.task, [0, 0])
        per[0] += int(meta.success)
        per[1] += 1
        if len(group.episodes) == self.cfg.group_size:
            del self.open_groups[done.request.tag]
            s.groups_done += 1
            if self.version - group.policy_version > self.cfg.max_policy_lag:
                # sampled in part by weights older than the lag allows (e.g. a replica that restarted
                # on its initial weights): never trained on, and no evidence about the current policy
                s.groups_stale += 1
                self.ledger.stale += len(group.episodes)
                return
            kept = keep_group(group.success_rate, self.cfg.min_group_success, self.cfg.max_group_success)
            self.sampler.observe(group.key[0], group.success_rate, init_state=group.key[1])
            if kept:
                self.ready.append(group)
                s.groups_kept += 1
            else:
                s.groups_filtered += 1
                self.ledger.filtered += len(group.episodes)

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
        self.version = current_version
        max_lag = max(self.cfg.max_policy_lag, 1 if self.cfg.keep_surplus else 0)
        fresh = [g for g in self.ready if current_version - g.policy_version <= max_lag]
        dropped = len(self.ready) - len(fresh)
        kept = {id(g) for g in fresh}
        self.ledger.stale += sum(len(g.episodes) for g in self.ready if id(g) not in kept)
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
        batch, rest = self.ready[:groups], self.ready[groups:]
        self.ready = rest if self.cfg.keep_surplus else []
        self.ledger.trained += sum(len(g.episodes) for g in batch)
        self.ledger.discarded += 0 if self.cfg.keep_surplus else sum(len(g.episodes) for g in rest)
        self.stats.seconds = time.monotonic() - start
        return batch

    def held(self) -> int:
        """Finished episodes in ready and open groups (the ledger's balance)."""
        return sum(len(g.episodes) for g in [*self.ready, *self.open_groups.values()])

    # --- checkpoints: the surplus as metadata (state.json) plus its trajectories (saved apart) ------
    def surplus_state(self) -> tuple[list[list[dict]], list]:
        """-> (per ready group, its episodes' metadata; the trajectory refs in the same order)."""
        metas = [[{k: v for k, v in dataclasses.asdict(e.meta).items() if k != "frames"} for e in g.episodes]
                 for g in self.ready]
        return metas, [e.ref for g in self.ready for e in g.episodes]

    def restore_surplus(self, metas: list[list[dict]], refs: list) -> None:
        """The inverse of `surplus_state`, with refs to the reloaded trajectories."""
        known = {f.name for f in dataclasses.fields(EpisodeMeta)}
        refs = iter(refs)
        self.ready = []
        for group in metas:
            episodes = [EpisodeMeta(**{k: v for k, v in m.items() if k in known}) for m in group]
            self.ready.append(Group((episodes[0].task, episodes[0].init_state), [
                FinishedEpisode(Episode(m.task, m.init_state, self.cfg.temperature, greedy=False), m, next(refs))
                for m in episodes]))
        self.ledger.finished += self.held()
