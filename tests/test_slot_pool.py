"""The env worker's slot pool: hand-off to a waiting episode, task affinity without starvation, and
the busy count the action batcher reads."""

from __future__ import annotations

import asyncio

from env_workers.slot_pool import SlotPool


class Counter:
    def __init__(self):
        self.busy = 0

    def up(self):
        self.busy += 1

    def down(self):
        self.busy -= 1


def pool_of(names: list[str]) -> tuple[SlotPool, Counter]:
    count = Counter()
    return SlotPool(list(names), on_busy=count.up, on_idle=count.down), count


def test_a_free_slot_that_last_ran_the_task_is_preferred():
    async def main():
        pool, count = pool_of(["s0", "s1", "s2"])
        a, b = await pool.acquire("x"), await pool.acquire("y")
        pool.release(a)
        pool.release(b)
        return a, b, await pool.acquire("y"), await pool.acquire("x"), count.busy

    a, b, again_y, again_x, busy = asyncio.run(main())
    assert (again_y, again_x) == (b, a) and busy == 2


def test_a_released_slot_goes_straight_to_a_waiting_episode_and_stays_busy():
    async def main():
        pool, count = pool_of(["s0"])
        slot = await pool.acquire("x")
        waiter = asyncio.ensure_future(pool.acquire("y"))
        await asyncio.sleep(0)
        busy_while_waiting = count.busy
        pool.release(slot)
        busy_after_hand_off = count.busy  # the env never counted as idle
        got = await waiter
        pool.release(got)
        return slot, got, busy_while_waiting, busy_after_hand_off, count.busy

    slot, got, waiting, handed, idle = asyncio.run(main())
    assert got == slot and (waiting, handed, idle) == (1, 1, 0)


def test_a_hand_off_prefers_the_waiter_of_the_slot_s_task_but_nobody_starves():
    async def main():
        pool, _ = pool_of(["s0"])
        slot = await pool.acquire("x")
        old = asyncio.ensure_future(pool.acquire("y"))  # oldest waiter, another task
        served = []
        for _ in range(3):  # a stream of episodes of the slot's own task
            same = asyncio.ensure_future(pool.acquire("x"))
            await asyncio.sleep(0)
            pool.release(slot)
            await asyncio.sleep(0)
            served.append("x" if same.done() else "y")
            slot = await same if same.done() else await old
            if not same.done():
                break
        return served

    served = asyncio.run(main())
    # max_passed_over = 1 slot: the matching waiter is served once, then the oldest one gets the slot
    assert served == ["x", "y"]


def test_a_cancelled_waiter_gets_no_slot():
    async def main():
        pool, count = pool_of(["s0"])
        slot = await pool.acquire("x")
        gone = asyncio.ensure_future(pool.acquire("x"))
        await asyncio.sleep(0)
        gone.cancel()
        pool.release(slot)  # before the cancelled waiter ran: the slot must not be lost to it
        await asyncio.gather(gone, return_exceptions=True)
        return pool.free, count.busy

    free, busy = asyncio.run(main())
    assert free == ["s0"] and busy == 0
