"""The env worker's action batcher: one policy request per worker round, answers routed back to
the right env, never waiting for an env that is not in an episode."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from common.records import ActionChunk, Observation
from env_workers.action_batcher import ActionBatcher


class FakeService:
    """Stands in for the Serve handle: records every request and answers each observation with a
    chunk whose token equals the observation's pixel value."""

    def __init__(self, fail: bool = False, delay_s: float = 0.0):
        self.requests: list[tuple[list[int], float, bool]] = []
        self.fail, self.delay_s = fail, delay_s

    async def send(self, observations, temperature, greedy):
        self.requests.append(([int(o.image[0, 0, 0]) for o in observations], temperature, greedy))
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("replica died")
        return [ActionChunk(tokens=np.full((1, 1), o.image[0, 0, 0]), logprobs=np.zeros((1, 1), np.float32),
                            actions=np.zeros((1, 7), np.float32), policy_version=3) for o in observations]


def batcher_for(service: FakeService, max_wait_s: float = 5.0, timeout_s: float = 5.0) -> ActionBatcher:
    return ActionBatcher(service.send, max_wait_s=max_wait_s, timeout_s=timeout_s)


def obs(value: int) -> Observation:
    return Observation(image=np.full((2, 2, 3), value, np.uint8), instruction="x")


async def env(batcher: ActionBatcher, value: int, rounds: int, greedy: bool = False, step_s: float = 0.0):
    """One env's episode: `rounds` chunks, stepping `step_s` between them."""
    batcher.env_busy()
    got = []
    try:
        for _ in range(rounds):
            await asyncio.sleep(step_s)
            got.append(int((await batcher.act(obs(value), 1.0, greedy)).tokens[0, 0]))
    finally:
        batcher.env_idle()
    return got


def test_one_request_per_round_and_answers_reach_their_env():
    async def main():
        service = FakeService()
        batcher = batcher_for(service)
        got = await asyncio.gather(*[env(batcher, v, rounds=3) for v in (10, 20, 30)])
        return service, batcher, got

    service, batcher, got = asyncio.run(main())
    assert got == [[10] * 3, [20] * 3, [30] * 3]
    # all three envs wait each round, so each round is one request (max_wait of 5 s never fires)
    assert [sorted(r[0]) for r in service.requests] == [[10, 20, 30]] * 3
    assert batcher.requests == 3 and batcher.busy == batcher.asking == 0


def test_a_finished_env_is_not_waited_for():
    async def main():
        service = FakeService()
        batcher = batcher_for(service)
        loop = asyncio.get_running_loop()
        start = loop.time()
        got = await asyncio.gather(env(batcher, 1, rounds=1), env(batcher, 2, rounds=4))
        return service, got, loop.time() - start

    service, got, seconds = asyncio.run(main())
    assert got == [[1], [2] * 4]
    assert [sorted(r[0]) for r in service.requests] == [[1, 2], [2], [2], [2]]
    assert seconds < 1.0  # no round waited for max_wait_s


def test_an_env_still_stepping_is_waited_for_at_most_max_wait():
    async def main():
        service = FakeService()
        batcher = batcher_for(service, max_wait_s=0.05)
        loop = asyncio.get_running_loop()
        start = loop.time()
        # env 2 steps for 1 s before it asks: env 1 must not wait for it longer than max_wait
        t1 = asyncio.ensure_future(env(batcher, 1, rounds=1))
        t2 = asyncio.ensure_future(env(batcher, 2, rounds=1, step_s=1.0))
        await t1
        first = loop.time() - start
        await t2
        return service, first

    service, first = asyncio.run(main())
    assert first < 0.5
    assert [r[0] for r in service.requests] == [[1], [2]]


def test_sampling_and_greedy_never_share_a_request():
    async def main():
        service = FakeService()
        batcher = batcher_for(service)
        return service, await asyncio.gather(env(batcher, 1, 1, greedy=True), env(batcher, 2, 1), env(batcher, 3, 1, greedy=True))

    service, got = asyncio.run(main())
    assert got == [[1], [2], [3]]
    assert sorted((sorted(r[0]), r[2]) for r in service.requests) == [([1, 3], True), ([2], False)]


def test_a_failed_request_reaches_every_waiter():
    async def main():
        batcher = batcher_for(FakeService(fail=True))
        results = await asyncio.gather(env(batcher, 1, 1), env(batcher, 2, 1), return_exceptions=True)
        return batcher, results

    batcher, results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "replica died" in str(r) for r in results)
    assert batcher.busy == batcher.asking == 0


def test_a_hung_service_hits_the_deadline():
    async def main():
        batcher = batcher_for(FakeService(delay_s=10.0), max_wait_s=0.01, timeout_s=0.2)
        return await env(batcher, 1, 1)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(main())


def test_a_slot_handed_to_the_next_episode_is_waited_for():
    """A finished episode's slot goes to a queued one: the other env's next observation waits for
    the newcomer's first one (one request), instead of leaving alone the moment the slot frees."""
    from env_workers.slot_pool import SlotPool

    async def episode(pool, batcher, value, rounds, step_s=0.01):
        slot = await pool.acquire("task")
        try:
            await asyncio.sleep(0.01)  # reset
            for _ in range(rounds):
                await batcher.act(obs(value), 1.0, False)
                await asyncio.sleep(step_s)  # the chunk
        finally:
            pool.release(slot)

    async def main():
        service = FakeService()
        batcher = batcher_for(service)
        pool = SlotPool(["s0", "s1"], on_busy=batcher.env_busy, on_idle=batcher.env_idle)
        # env 2's last chunk ends while env 1 already waits; episode 3 is queued for a slot
        await asyncio.gather(episode(pool, batcher, 1, rounds=3), episode(pool, batcher, 2, rounds=1, step_s=0.05),
                             episode(pool, batcher, 3, rounds=2))
        return service, batcher

    service, batcher = asyncio.run(main())
    # episode 3 takes env 2's slot: env 1 waits for its first observation, every request holds two envs
    assert [sorted(r[0]) for r in service.requests] == [[1, 2], [1, 3], [1, 3]]
    assert batcher.busy == batcher.asking == 0


def test_the_wait_counts_from_the_last_env_that_joined():
    async def main():
        service = FakeService()
        batcher = batcher_for(service, max_wait_s=0.3)
        loop = asyncio.get_running_loop()
        start = loop.time()
        # envs join 0.2 s apart (a sim thread stepping them in turn), env 3 is slow (2 s)
        tasks = [asyncio.ensure_future(env(batcher, v, rounds=1, step_s=s)) for v, s in ((1, 0.0), (2, 0.2), (3, 2.0))]
        await tasks[0]
        first = loop.time() - start
        await asyncio.gather(*tasks)
        return service, first

    service, first = asyncio.run(main())
    assert [sorted(r[0]) for r in service.requests] == [[1, 2], [3]]  # 0.2 s < max_wait: env 2 was waited for
    assert 0.45 < first < 1.5  # sent 0.3 s after env 2 joined, not 0.3 s after env 1, nor when env 3 asked


def test_with_two_groups_half_the_envs_step_while_the_other_half_waits():
    """Inference that costs this process no CPU (an accelerator): with two request groups the sim
    thread steps one half of the envs while the other half's request is answered."""

    def chunk(spans: list) -> None:  # one chunk of steps on the shared sim thread
        start = time.monotonic()
        time.sleep(0.04)
        spans.append((start, time.monotonic()))

    async def run(groups: int, sim) -> tuple[float, list]:
        service = FakeService(delay_s=0.08)
        batcher = batcher_for(service)
        batcher.groups = groups
        loop, spans = asyncio.get_running_loop(), []

        async def sim_env(value: int):
            batcher.env_busy()
            try:
                for _ in range(8):
                    await loop.run_in_executor(sim, chunk, spans)
                    await batcher.act(obs(value), 1.0, False)
            finally:
                batcher.env_idle()

        await asyncio.gather(*[sim_env(v) for v in range(4)])
        idle = sum(max(0.0, b[0] - a[1]) for a, b in zip(spans, spans[1:]))  # sim thread waiting for actions
        return idle, service.requests

    with ThreadPoolExecutor(max_workers=1) as sim:
        one, one_requests = asyncio.run(run(1, sim))
        two, two_requests = asyncio.run(run(2, sim))
    assert {len(r[0]) for r in one_requests} == {4}
    assert max(len(r[0]) for r in two_requests) == 2  # (a lone env at the end, once the others finished)
    # one group: the sim thread waits 0.08 s a round (7 x); two: the other half is answered meanwhile
    assert one > 0.4 and two < one / 2, (one, two)
