"""Which task's scene each env worker's idle envs hold, as the env pool sees it: episodes start on
envs that already hold their task's scene where one is idle.

A task switch costs the env a scene build (LIBERO: a whole robosuite env, 2-4 s, as long as a short
episode). A GRPO rollout samples tasks at random, so routing by load alone makes nearly every episode
a switch (tests/test_scene_routing.py simulates it).
"""

from __future__ import annotations

from collections import Counter, deque


class SceneBook:
    """The pool's picture of each worker's envs. A worker hands an episode the idle env that last ran
    its task (env_workers/slot_pool.py); the picture mirrors that hand-off, and where it drifts from
    the workers' own choices it only routes less well."""

    def __init__(self, workers: int, envs_per_worker: int):
        self.envs_per_worker = envs_per_worker
        self.idle = [Counter({None: envs_per_worker}) for _ in range(workers)]  # task (None: unbuilt) -> idle envs
        self.queued: list[deque] = [deque() for _ in range(workers)]  # tasks waiting for one of the worker's envs

    def pick(self, backlog: deque, max_passed_over: int):
        """The backlog episode to start next (None: no env is idle, or nothing waits): the oldest whose
        task an idle env holds, else the oldest. An oldest episode passed over `max_passed_over` times
        goes next whatever its task: no task starves behind a stream of matching ones."""
        if not backlog or not any(+idle for idle in self.idle):
            return None
        held = {task for idle in self.idle for task in +idle}  # tasks an idle env's scene holds
        oldest = backlog[0]
        if oldest.passed_over >= max_passed_over or oldest.task in held:
            return oldest
        ep = next((e for e in backlog if e.task in held), oldest)
        if ep is not oldest:
            oldest.passed_over += 1
        return ep

    def choose(self, task: str, load: list[int], turn: int) -> int:
        """A worker with an idle env holding `task`, else one with an idle env, else the least loaded;
        ties rotate with `turn`."""
        n = len(load)
        return min(range(n), key=lambda i: (not +self.idle[i], not self.idle[i][task], load[i], (i - turn) % n))

    def started(self, worker: int, task: str) -> None:
        idle = self.idle[worker]
        if not +idle:
            self.queued[worker].append(task)
            return
        # the env holding the task, else an unbuilt one, else the task with the most idle envs gives one up
        take = task if idle[task] else None if idle[None] else max(+idle, key=idle.__getitem__)
        idle[take] -= 1

    def finished(self, worker: int, task: str) -> None:
        """An episode of `task` ended: its env idles holding the task, or passes to a queued episode
        (one of the same task first: the env keeps its scene)."""
        queued = self.queued[worker]
        if not queued:
            self.idle[worker][task] += 1
        elif task in queued:
            queued.remove(task)
        else:
            queued.popleft()

    def reset(self, worker: int) -> None:
        """A replaced worker: fresh, unbuilt envs."""
        self.idle[worker] = Counter({None: self.envs_per_worker})
        self.queued[worker].clear()
