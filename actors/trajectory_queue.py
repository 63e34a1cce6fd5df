"""A bounded queue actor of finished-episode ObjectRefs (never payloads) with backpressure.

Items are small dicts: the episode's meta (task, init state, success, policy version, ...) plus
`ref`, a one-element list holding the Trajectory's ObjectRef (a bare ref argument would be
resolved by Ray; inside a list it travels as a ref, and its owner stays the caller that launched
the rollout, so a dead env worker cannot take finished episodes with it).
"""

from __future__ import annotations

import asyncio
import collections

import ray


@ray.remote(num_cpus=0)
class TrajectoryQueue:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: collections.deque = collections.deque()
        self.changed = asyncio.Condition()
        self.dropped_stale = 0

    async def put(self, item: dict, timeout_s: float | None = None) -> bool:
        """Blocks while the queue is full (backpressure); False if `timeout_s` passed first."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: len(self.items) < self.capacity), timeout_s)
            except asyncio.TimeoutError:
                return False
            self.items.append(item)
            self.changed.notify_all()
            return True

    async def get(self, max_items: int, timeout_s: float = 0.0) -> list[dict]:
        """Up to `max_items`, waiting at most `timeout_s` for the first one."""
        async with self.changed:
            if not self.items and timeout_s > 0:
                try:
                    await asyncio.wait_for(self.changed.wait_for(lambda: len(self.items) > 0), timeout_s)
                except asyncio.TimeoutError:
                    return []
            out = [self.items.popleft() for _ in range(min(max_items, len(self.items)))]
            self.changed.notify_all()
            return out

    async def drop_older_than(self, min_version: int) -> int:
        """Remove items produced by a policy older than `min_version`; returns how many."""
        async with self.changed:
            keep = [it for it in self.items if it["policy_version"] >= min_version]
            dropped = len(self.items) - len(keep)
            self.items = collections.deque(keep)
            self.dropped_stale += dropped
            self.changed.notify_all()
            return dropped

    def size(self) -> int:
        return len(self.items)
