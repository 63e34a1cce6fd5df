"""One policy request per worker "round" instead of one per env.

An env worker's envs share one sim thread, so they hand in their observations one after another.
Each Serve request costs a router hop here and a request on the replica (about 3 + 4 CPU-ms on
top of the forward pass, measured on 2 cores), so the batcher holds an observation until every
busy env of this worker waits for actions too and sends them in one request (or once `max_wait_s`
passed with no env joining them: one env is slow, e.g. a reset that builds a scene); the
replica's `@serve.batch` then joins the requests of all workers. Nothing waits for an idle env: a
finished episode's slot goes to the next episode (env_workers/slot_pool.py) or counts as idle at
once.

With `groups` > 1 the busy envs are split into that many requests a round: a request leaves once
1/groups of the busy envs wait, so while its envs wait for actions the sim thread steps the
others. That overlaps simulation with inference where inference runs elsewhere (an accelerator)
and costs one more request per group where it shares the CPU with the sims.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable

from common.records import ActionChunk, Observation

# (observations, temperature, greedy) -> the chunks, one per observation, in order
SendFn = Callable[[list[Observation], float, bool], Awaitable[list[ActionChunk]]]


class ActionBatcher:
    def __init__(self, send: SendFn, max_wait_s: float, timeout_s: float, groups: int = 1):
        self.send = send
        self.max_wait_s = max_wait_s
        self.timeout_s = timeout_s
        self.groups = groups
        self.busy = 0  # envs in an episode: resetting, stepping or asking for actions
        self.asking = 0  # envs inside act(): their observation is pending or its request in flight
        self.pending: list[tuple[Observation, float, bool, asyncio.Future]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.requests = 0  # requests sent (read by tests)

    def env_busy(self) -> None:
        self.busy += 1

    def env_idle(self) -> None:
        self.busy -= 1
        self._maybe_flush()

    async def act(self, observation: Observation, temperature: float, greedy: bool) -> ActionChunk:
        """The chunk for one env's observation; raises TimeoutError after `timeout_s`."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((observation, temperature, greedy, future))
        self.asking += 1
        try:
            self._maybe_flush(joined=True)
            return await asyncio.wait_for(future, timeout=self.timeout_s)
        finally:
            self.asking -= 1

    def _maybe_flush(self, joined: bool = False) -> None:
        if not self.pending:
            return
        if self.asking >= self.busy or len(self.pending) >= math.ceil(self.busy / self.groups):
            self.flush()
        elif joined or self.timer is None:
            # the wait counts from the last env that joined: the sim thread steps the envs one after
            # another, so a round of n envs takes n chunks, and only a gap longer than max_wait
            # means one is slow
            if self.timer is not None:
                self.timer.cancel()
            self.timer = asyncio.get_running_loop().call_later(self.max_wait_s, self.flush)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        pending, self.pending = self.pending, []
        groups: dict[tuple[float, bool], list] = {}
        for item in pending:  # sampling and greedy (or two temperatures) never share a request
            groups.setdefault((item[1], item[2]), []).append(item)
        for (temperature, greedy), items in groups.items():
            self.requests += 1
            asyncio.ensure_future(self._request(items, temperature, greedy))

    async def _request(self, items, temperature: float, greedy: bool) -> None:
        futures = [f for *_, f in items]
        try:
            chunks = await asyncio.wait_for(self.send([o for o, *_ in items], temperature, greedy), timeout=self.timeout_s)
            if len(chunks) != len(items):
                raise RuntimeError(f"the policy service answered {len(chunks)} chunks for {len(items)} observations")
        except BaseException as e:  # every waiter learns of the failure; a cancelled waiter is skipped
            for f in futures:
                if not f.done():
                    f.set_exception(e if isinstance(e, Exception) else RuntimeError(repr(e)))
            return
        for f, chunk in zip(futures, chunks):
            if not f.done():
                f.set_result(chunk)
