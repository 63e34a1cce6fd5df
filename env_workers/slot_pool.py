"""The env slots of one worker: which episode gets which env, and when an env counts as busy.

- Hand-off: a finished episode gives its slot straight to an episode waiting for one, so the env
  never counts as idle in between; the worker's action batcher keeps waiting for it (its next
  observation follows a reset) instead of sending the other envs' observations without it.
- Task affinity: an episode takes the slot whose env last ran its task where it can. A slot-freeing
  rollout moves tasks between envs, and a task switch costs a scene build (tabletop: a sim and a
  GL renderer per layout; LIBERO: a whole robosuite env, 2-4 s).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

Slot = TypeVar("Slot")


class _Waiter:
    def __init__(self, task: str, future: asyncio.Future):
        self.task, self.future = task, future
        self.passed_over = 0  # hand-offs that went to a younger waiter with a matching slot


class SlotPool(Generic[Slot]):
    def __init__(self, slots: list[Slot], on_busy: Callable[[], None], on_idle: Callable[[], None]):
        self.free = list(slots)
        self.last_task: dict[int, str] = {}  # id(slot) -> the task its env last reset to
        self.waiters: list[_Waiter] = []  # oldest first
        self.on_busy, self.on_idle = on_busy, on_idle
        self.max_passed_over = len(slots)  # then the oldest waiter takes the next slot, matching or not

    async def acquire(self, task: str) -> Slot:
        """A slot for an episode of `task`, preferring one whose env last ran it."""
        if self.free:  # (never free slots and waiters at once: a released slot goes to a waiter first)
            slot = next((s for s in self.free if self.last_task.get(id(s)) == task), self.free[0])
            self.free.remove(slot)
            self.on_busy()
            return self._assign(slot, task)
        waiter = _Waiter(task, asyncio.get_running_loop().create_future())
        self.waiters.append(waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter in self.waiters:
                self.waiters.remove(waiter)
            elif waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result())  # handed over just as we were cancelled
            raise

    def release(self, slot: Slot) -> None:
        """The slot goes to a waiting episode (the env stays busy) or back to the free list."""
        self.waiters = [w for w in self.waiters if not w.future.done()]  # cancelled, not yet unlisted
        if not self.waiters:
            self.free.append(slot)
            self.on_idle()
            return
        oldest = self.waiters[0]
        match = next((w for w in self.waiters if w.task == self.last_task.get(id(slot))), oldest)
        if oldest.passed_over >= self.max_passed_over:
            match = oldest  # bounded unfairness: no waiter starves behind a stream of matching tasks
        if match is not oldest:
            oldest.passed_over += 1
        self.waiters.remove(match)
        match.future.set_result(self._assign(slot, match.task))

    def _assign(self, slot: Slot, task: str) -> Slot:
        self.last_task[id(slot)] = task
        return slot
