"""The slots of an env worker that holds ONE batched env (env_workers/maniskill/batched_env.py): slot
j is scene j of that env, and the worker's episodes run on the slots as on any others (slot_pool.py,
worker.py); only their env calls meet here, in rounds.

- A round is one batched call on the sim thread: every busy slot's chunk (physics of all scenes at
  once), then every reset (partial, per scene), then one render of all scenes for the observations.
- A round starts once every busy slot (one in an episode) has handed in a chunk or a reset. It
  cannot leave a busy slot out: the physics would move that scene while its episode waits for
  actions, and the policy would act on a stale image.
- While a slot waits for its round it counts as idle to the worker's action batcher, so the
  batcher sends the other slots' observations at once rather than waiting for one that cannot ask
  before the round, which itself waits for their actions. The round's slots count as busy again
  together, before any of them asks, so the next round's observations go in one request.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from common.config import EnvConfig
from common.records import ChunkResult, Observation
from env_workers.action_batcher import ActionBatcher
from env_workers.worker import EnvTimeout, HangDrill


class BatchedSlot:
    """Scene `index` of the worker's batched env, with EnvSlot's interface."""

    def __init__(self, rounds: BatchRounds, index: int):
        self.rounds, self.index = rounds, index

    @property
    def env(self):
        return self.rounds.env

    async def reset(self, task: str, init_state: int) -> Observation:
        return await self.rounds.submit(self.index, ("reset", task, int(init_state)))

    async def step_chunk(self, actions: np.ndarray, keep_frames: bool = False) -> ChunkResult:
        return await self.rounds.submit(self.index, ("step", np.asarray(actions, dtype=np.float32), keep_frames))

    def close(self) -> None:
        self.rounds.close()


class BatchRounds:
    def __init__(self, env_cfg: EnvConfig, num_envs: int, executor: ThreadPoolExecutor, drill: HangDrill,
                 batcher: ActionBatcher):
        from env_workers.maniskill.batched_env import BatchedManiSkillEnv

        self.env_cfg, self.executor, self.drill, self.batcher = env_cfg, executor, drill, batcher
        self.env = executor.submit(BatchedManiSkillEnv, env_cfg, num_envs).result()
        self.slots = [BatchedSlot(self, j) for j in range(num_envs)]
        self.busy = 0  # slots in an episode
        self.pending: dict[int, tuple[tuple, asyncio.Future]] = {}  # slot -> (request, its result)
        self.rounds = 0  # batched calls made (read by tests)

    # --- SlotPool's hooks ---
    def slot_busy(self) -> None:
        self.busy += 1
        self.batcher.env_busy()

    def slot_idle(self) -> None:
        self.busy -= 1
        self.batcher.env_idle()
        self._maybe_start()

    async def submit(self, index: int, request: tuple):
        self._check(index, request)
        future = asyncio.get_running_loop().create_future()
        self.pending[index] = (request, future)
        self.batcher.env_idle()  # parked until the round ends
        self._maybe_start()
        try:
            return await future
        except asyncio.CancelledError:
            if self.pending.get(index, (None, None))[1] is future:  # not started: leave the round
                del self.pending[index]
                self.batcher.env_busy()
            raise

    def _check(self, index: int, request: tuple) -> None:
        if index in self.pending:
            raise RuntimeError(f"slot {index} already waits for a round")
        if request[0] == "reset" and request[1] != self.env.task.name:
            raise ValueError(f"this batched env runs {self.env.task.name}, not {request[1]}")
        if request[0] == "step":
            actions = request[1]
            if actions.ndim != 2 or len(actions) == 0 or actions.shape[1] != self.env.action_dim:
                raise ValueError(f"actions must be [k, {self.env.action_dim}] with k >= 1, got shape {actions.shape}")
            if self.env.done[index]:
                raise RuntimeError("episode is over (success or step limit): call reset() first")

    def _maybe_start(self) -> None:
        if self.pending and len(self.pending) >= self.busy:
            batch, self.pending = self.pending, {}
            self.rounds += 1
            asyncio.ensure_future(self._run(batch))

    async def _run(self, batch: dict) -> None:
        chunk = max((len(r[1]) for r, _ in batch.values() if r[0] == "step"), default=0)
        deadline = self.env_cfg.step_timeout_s * (chunk + 1)
        loop = asyncio.get_running_loop()
        requests = {j: r for j, (r, _) in batch.items()}
        try:
            fut = loop.run_in_executor(self.executor, self.drill.wrap(self._round), requests)
            results = await asyncio.wait_for(fut, timeout=deadline)
        except BaseException as err:
            if isinstance(err, asyncio.TimeoutError):
                err = EnvTimeout(f"a batched round of {len(batch)} scenes took longer than {deadline}s "
                                 f"(env.step_timeout_s={self.env_cfg.step_timeout_s}s x {chunk + 1} steps)")
            elif not isinstance(err, Exception):
                err = RuntimeError(repr(err))
            results = {j: err for j in batch}
        for _ in batch:  # every slot of the round is busy again before any of them asks for actions
            self.batcher.env_busy()
        for j, (_, future) in batch.items():
            if future.done():
                continue
            if isinstance(results[j], BaseException):
                future.set_exception(results[j])
            else:
                future.set_result(results[j])

    def _round(self, requests: dict[int, tuple]) -> dict[int, Observation | ChunkResult]:
        """On the sim thread: the chunks, then the resets, then one render of all scenes."""
        env = self.env
        steps = {j: r for j, r in requests.items() if r[0] == "step"}
        resets = {j: r[2] for j, r in requests.items() if r[0] == "reset"}
        applied, frames = np.zeros(env.num_envs, dtype=np.int64), None
        if steps:
            actions = np.zeros((env.num_envs, max(len(r[1]) for r in steps.values()), env.action_dim), np.float32)
            lengths = np.zeros(env.num_envs, dtype=np.int64)
            for j, (_, chunk, _) in steps.items():
                actions[j, :len(chunk)], lengths[j] = chunk, len(chunk)
            applied, frames = env.step_chunks(actions, lengths, keep_frames=any(r[2] for r in steps.values()))
        if resets:
            env.reset_envs(list(resets), list(resets.values()))
        images = env.render() if frames is None or resets else frames[-1]
        observations = dict(zip(requests, env.observations(list(requests), images)))
        results: dict[int, Observation | ChunkResult] = {j: observations[j] for j in resets}
        for j, (_, _, keep) in steps.items():
            mine = [f[j].copy() for f in frames[: applied[j]]] if keep else None
            obs = observations[j]
            if mine:  # the scene's own last frame: later frames of the round are past its episode's end
                obs = Observation(image=mine[-1], instruction=obs.instruction, proprio=obs.proprio)
            results[j] = ChunkResult(observation=obs, success=bool(env.success[j]), done=bool(env.done[j]),
                                     steps=int(applied[j]), frames=mine)
        return results

    def close(self) -> None:
        if self.env.sim is None:
            return
        try:
            self.executor.submit(self.env.close).result(timeout=5)
        except Exception:
            pass
