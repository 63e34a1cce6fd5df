"""The env worker's action batcher: one policy request per worker round, answers routed back to
the right env, never waiting for an env that is not in an episode."""

from __future__ import annotations

import asyncio

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
    batcher.episode_started()
    got = []
    try:
        for _ in range(rounds):
            await asyncio.sleep(step_s)
            got.append(int((await batcher.act(obs(value), 1.0, greedy)).tokens[0, 0]))
    finally:
        batcher.episode_ended()
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
    assert batcher.requests == 3 and batcher.producing == 0


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
    assert batcher.producing == 0


def test_a_hung_service_hits_the_deadline():
    async def main():
        batcher = batcher_for(FakeService(delay_s=10.0), max_wait_s=0.01, timeout_s=0.2)
        return await env(batcher, 1, 1)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(main())
