"""EnvWorker: a Ray actor hosting several envs of any backend.

Each `run_episode` call takes an env slot (env_workers/slot_pool.py), loops observation -> policy
service -> action chunk -> env steps until the episode ends, and gives the slot back at once, so a
finished env never waits for the others (no lock-step padding to the step limit, no inference for
finished envs). Concurrency = number of slots; further calls queue on the actor, and a finished
episode hands its slot straight to the next. The observations of the worker's envs that wait for
actions go to the policy service in one request (action_batcher.py).

Every env call runs on the worker's one sim thread under a deadline: GL contexts are bound to the
thread that made them, and software GL (llvmpipe) crashes when several threads of one process
render at once. A call that times out rebuilds the thread and all envs, and the episode fails
(the caller re-runs it).

With a batched env (`env.sim_backend: physx_cuda`, or `env.batched` on the CPU) the worker holds
ONE ManiSkill env of num_envs scenes instead, and slot j is scene j (batched_slots.py): the
episodes run the same way, their env calls meet in batched rounds.
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray

from common.config import EnvConfig
from common.records import ChunkResult, EpisodeMeta, Trajectory
from env_workers.action_batcher import ActionBatcher
from env_workers.slot_pool import SlotPool
from policy.action_tokenizer import postprocess_gripper

GRIPPER = {"tabletop": dict(binarize=True, invert=False)}


def to_env_actions(backend: str, actions: np.ndarray) -> np.ndarray:
    """Policy actions -> the simulator's convention. LIBERO and ManiSkill (which takes LIBERO's env
    actions): OpenVLA's gripper in [0, 1] (1 = open) becomes -1 = open / +1 = close
    (env_workers/libero/conventions.py, env_workers/maniskill/conventions.py)."""
    if backend == "maniskill":  # per arm: bimanual tasks take 7 dims per arm
        from env_workers.maniskill.conventions import openvla_to_env

        return openvla_to_env(actions)
    if backend == "libero":
        from env_workers.libero.conventions import openvla_to_libero

        return openvla_to_libero(actions)
    return postprocess_gripper(actions, **GRIPPER[backend])


def sim_seconds(clock: SimClock, slots: list) -> dict:
    """The sim thread's busy time so far and, where the env times them (LIBERO), its renders'."""
    render = [getattr(getattr(s, "env", None), "render_seconds", None) for s in slots]
    return {"busy": clock.busy_s, "render": None if None in render else sum(render)}


class EnvTimeout(RuntimeError):
    pass


def _after_sleep(fn, seconds: float, *args):
    time.sleep(seconds)
    return fn(*args)


class HangDrill:
    """Fault drill (EnvWorker.inject_hang): the worker's next env call, whichever env makes it,
    blocks its sim thread first."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        if not self.seconds:
            return fn
        fn, self.seconds = functools.partial(_after_sleep, fn, self.seconds), 0.0
        return fn


class SimClock:
    """Wall time a worker's sim thread spends inside env calls (benchmarks: a sim thread that is
    slower per env step than in the sim-only run waits for a core or for the GPU, one that is busy
    for less of the wall time waits for actions). Only the sim thread adds to it."""

    def __init__(self):
        self.busy_s = 0.0

    def timed(self, fn):
        def run(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.busy_s += time.perf_counter() - start

        return run


class EnvSlot:
    def __init__(self, env_cfg: EnvConfig, executor: ThreadPoolExecutor, drill: HangDrill | None = None,
                 clock: SimClock | None = None):
        self.env_cfg = env_cfg
        self.executor = executor
        self.env = self.executor.submit(self._make).result()
        self.drill = drill or HangDrill()  # a worker's envs share its drill; alone (SimWorker), one that never fires
        self.clock = clock or SimClock()  # a worker's envs share its sim thread's clock

    def _make(self):
        from env_workers.factory import make_env

        return make_env(self.env_cfg)

    async def call(self, fn_name: str, *args, steps: int = 1):
        """env.<fn_name>(*args) on the sim thread, with a deadline of env.step_timeout_s per env step."""
        loop = asyncio.get_running_loop()
        fn = self.clock.timed(self.drill.wrap(getattr(self.env, fn_name)))
        fut = loop.run_in_executor(self.executor, fn, *args)
        deadline = self.env_cfg.step_timeout_s * steps
        try:
            return await asyncio.wait_for(fut, timeout=deadline)
        except asyncio.TimeoutError:
            raise EnvTimeout(f"env.{fn_name} took longer than {deadline}s "
                             f"(env.step_timeout_s={self.env_cfg.step_timeout_s}s x {steps} steps)") from None

    async def reset(self, task: str, init_state: int):
        return await self.call("reset", task, init_state)

    async def step_chunk(self, actions: np.ndarray, keep_frames: bool = False) -> ChunkResult:
        # One sim-thread hop per chunk instead of per step; the deadline grows with the chunk.
        return await self.call("step_chunk", actions, keep_frames, steps=len(actions))

    def close(self):
        try:
            self.executor.submit(self.env.close).result(timeout=5)
        except Exception:
            pass


@ray.remote
class EnvWorker:
    def __init__(self, env_cfg: EnvConfig, num_envs: int, app_name: str, policy_timeout_s: float = 60.0,
                 batch_max_wait_s: float = 0.5, request_groups: int = 1):
        import torch

        torch.set_num_threads(1)
        self.env_cfg = env_cfg
        self.app_name = app_name
        self.policy_timeout_s = policy_timeout_s
        # one for the worker's life: it counts busy envs across slot rebuilds; it needs no event loop
        # until the first episode, and sends through self.act_many, set by then
        self.batcher = ActionBatcher(self._send, batch_max_wait_s, policy_timeout_s, request_groups)
        self.num_envs = num_envs
        self.drill = HangDrill()
        self.clock = SimClock()
        self._build_slots()
        self.act_many = None  # the policy service's act_many (a Serve handle)
        self.env_steps = 0

    def _build_slots(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sim")
        if self.env_cfg.batched_sim:  # one ManiSkill env of num_envs scenes; slot j is scene j
            from env_workers.batched_slots import BatchRounds

            rounds = BatchRounds(self.env_cfg, self.num_envs, self.executor, self.drill, self.batcher)
            self.slots = rounds.slots
            self.pool = SlotPool(self.slots, on_busy=rounds.slot_busy, on_idle=rounds.slot_idle)
            return
        self.slots = [EnvSlot(self.env_cfg, self.executor, self.drill, self.clock) for _ in range(self.num_envs)]
        self.pool = SlotPool(self.slots, on_busy=self.batcher.env_busy, on_idle=self.batcher.env_idle)

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        import os

        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this worker runs on (placement checks)."""
        return ray.get_runtime_context().get_node_id()

    def task_info(self) -> dict:
        env = self.slots[0].env
        return {t: {"instruction": env.instruction(t), "train": env.init_states(t, "train"), "eval": env.init_states(t, "eval")}
                for t in env.task_names}

    def _lazy_init(self):
        if self.act_many is None:
            from ray import serve

            # bound once: `handle.act_many` builds a new method handle on every attribute access
            self.act_many = serve.get_deployment_handle("Policy", app_name=self.app_name).act_many

    async def _send(self, observations, temperature: float, greedy: bool):
        return await self.act_many.remote(observations, temperature, greedy)

    @ray.method(num_returns=2)
    async def run_episode(self, task: str, init_state: int, temperature: float, greedy: bool, record_video: bool = False):
        """-> (EpisodeMeta, Trajectory). Two returns so the caller can read `meta` (tiny) without
        pulling the images of the trajectory."""
        while True:
            self._lazy_init()
            pool = self.pool
            slot = await pool.acquire(task)
            try:
                return await self._episode(slot, task, init_state, temperature, greedy, record_video)
            except (EnvTimeout, RuntimeError, asyncio.CancelledError) as err:
                if pool is self.pool:
                    if isinstance(err, EnvTimeout):  # first timeout seen: abandon the stuck thread, rebuild every env
                        self.executor.shutdown(wait=False, cancel_futures=True)
                        self._build_slots()
                    raise
                # another env of this worker hung (its envs share one sim thread) and the envs were rebuilt
                # under this episode: no fault of its own, so it starts again on a new env, not as a failed attempt
            finally:
                pool.release(slot)

    async def _episode(self, slot: EnvSlot, task, init_state, temperature, greedy, record_video):
        start = time.perf_counter()
        obs = await slot.reset(task, init_state)
        images, tokens, logprobs, executed, versions, frames, proprio = [], [], [], [], [], [], []
        steps, success, done = 0, False, False
        while not done:
            chunk = await self.batcher.act(obs, temperature, greedy)  # deadline: policy_timeout_s
            images.append(obs.image)
            proprio.append(obs.proprio)
            tokens.append(chunk.tokens)
            logprobs.append(chunk.logprobs)
            versions.append(chunk.policy_version)
            result = await slot.step_chunk(to_env_actions(self.env_cfg.backend, chunk.actions), record_video)
            ran = np.zeros(chunk.tokens.shape[0], dtype=bool)
            ran[: result.steps] = True
            steps += result.steps
            obs = result.observation
            if record_video:
                frames.extend(result.frames)
            success, done = bool(result.success), result.done
            executed.append(ran)
        self.env_steps += steps
        traj = Trajectory(task=task, init_state=init_state, instruction=obs.instruction, images=np.stack(images),
                          tokens=np.stack(tokens), logprobs=np.stack(logprobs), executed=np.stack(executed),
                          success=success, env_steps=steps, policy_version=min(versions),
                          proprio=None if proprio[0] is None else np.stack(proprio).astype(np.float32))
        meta = EpisodeMeta(task=task, init_state=init_state, success=success, env_steps=steps,
                           policy_version=min(versions), num_chunks=len(images), seconds=time.perf_counter() - start,
                           frames=np.stack(frames) if record_video and frames else None)
        return meta, traj

    async def run_lockstep(self, requests: list[tuple[str, int]], temperature: float) -> dict:
        """Baseline for benchmarks: the original's lock-step rollout. All envs step together and
        keep querying the policy until the step limit, even after their episode ended."""
        if self.env_cfg.batched_sim:
            raise NotImplementedError("run_lockstep drives one env per slot; a batched env steps its scenes in rounds")
        self._lazy_init()
        pool = self.pool
        slots = [await pool.acquire(t) for t, _ in requests]
        try:
            obs = [await s.reset(t, i) for s, (t, i) in zip(slots, requests)]
            done, useful, queries, offered = [False] * len(slots), 0, 0, 0
            limit = max(self.env_cfg.step_limit(t) for t, _ in requests)
            while offered < limit:  # one policy query per env per chunk, up to the longest limit
                chunks = await asyncio.wait_for(self._send(obs, temperature, False), timeout=self.policy_timeout_s)
                queries += len(chunks)
                offered += len(chunks[0].actions)
                for j, (slot, chunk) in enumerate(zip(slots, chunks)):
                    if done[j]:
                        continue  # the env is finished: the original pads, costing the inference above
                    result = await slot.step_chunk(to_env_actions(self.env_cfg.backend, chunk.actions))
                    useful += result.steps
                    obs[j], done[j] = result.observation, result.done
            self.env_steps += useful
            return {"env_steps": useful, "queries": queries}
        finally:
            for s in slots:
                pool.release(s)

    def total_env_steps(self) -> int:
        return self.env_steps

    def sim_seconds(self) -> dict:
        return sim_seconds(self.clock, self.slots)

    def inject_hang(self, seconds: float) -> None:
        """Fault drill: the worker's next env call blocks its sim thread for `seconds` (past
        env.step_timeout_s, it times out: the slots are rebuilt and the episode re-runs)."""
        self.drill.seconds = seconds

    def close(self):
        for slot in self.slots:
            slot.close()
        self.executor.shutdown(wait=False)
