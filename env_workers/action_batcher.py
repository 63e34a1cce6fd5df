"""One policy request per worker "round" instead of one per env.

An env worker's envs share one sim thread, so they hand in their observations one after another.
Each Serve request costs a router hop here and a request on the replica (on 2 cores, about as
much CPU as the forward pass it carries), so the batcher holds an observation until every env of
this worker that is still in an episode waits for actions too (or `max_wait_s` passed) and sends
them in one request; the replica's `@serve.batch` then joins the requests of all workers.
Nothing waits for envs that are not in an episode: a finished env gives its slot back at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from common.records import ActionChunk, Observation

# (observations, temperature, greedy) -> the chunks, one per observation, in order
SendFn = Callable[[list[Observation], float, bool], Awaitable[list[ActionChunk]]]


class ActionBatcher:
    def __init__(self, send: SendFn, max_wait_s: float, timeout_s: float):
        self.send = send
        self.max_wait_s = max_wait_s
        self.timeout_s = timeout_s
        self.producing = 0  # envs in an episode that are resetting or stepping (will ask for actions soon)
        self.pending: list[tuple[Observation, float, bool, asyncio.Future]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.requests = 0  # requests sent (read by tests)

    def episode_started(self) -> None:
        self.producing += 1

    def episode_ended(self) -> None:
        self.producing -= 1
        self._maybe_flush()

    async def act(self, observation: Observation, temperature: float, greedy: bool) -> ActionChunk:
        """The chunk for one env's observation; raises TimeoutError after `timeout_s`."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((observation, temperature, greedy, future))
        self.producing -= 1
        try:
            self._maybe_flush()
            return await asyncio.wait_for(future, timeout=self.timeout_s)
        finally:
            self.producing += 1

    def _maybe_flush(self) -> None:
        if not self.pending:
            return
        if self.producing <= 0:
            self.flush()
        elif self.timer is None:
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
