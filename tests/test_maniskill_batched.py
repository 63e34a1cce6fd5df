"""The batched ManiSkill env worker (env_workers/maniskill/batched_env.py, env_workers/batched_slots.py)
on real ManiSkill with CPU PhysX, where ManiSkill allows one scene per env (N = 1: the same code
path as physx_cuda's hundreds): batched reset/step shapes, partial resets over consecutive
episodes, seeds, success from evaluate(), the per-scene masking of a chunk (pure bookkeeping, for
N > 1), config errors, one GRPO step end to end, and the benchmark's CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("mani_skill", reason="ManiSkill is installed by `make setup`")

from common.config import EnvConfig  # noqa: E402
from common.config_loading import ConfigError, load_config  # noqa: E402
from env_workers.maniskill.scene_episodes import SceneEpisodes  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

TASK = "PushCube-v1"
SIZE = 64
LIMIT = 10


def _cfg(**kw) -> EnvConfig:
    base = dict(backend="maniskill", suite="maniskill", tasks=[TASK], image_size=SIZE, max_steps=LIMIT,
                num_steps_wait=0, batched=True, init_states={"split": "disjoint", "num_train": 30, "num_eval": 20})
    return EnvConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def env():
    from env_workers.maniskill.batched_env import BatchedManiSkillEnv

    e = BatchedManiSkillEnv(_cfg(), 1)
    yield e
    e.close()


def _chunk(k: int, dx: float = 0.5) -> np.ndarray:
    a = np.zeros((1, k, 7), dtype=np.float32)
    a[..., 0], a[..., 6] = dx, -1.0
    return a


# --- the per-scene bookkeeping of a chunk (pure: N > 1 without a GPU) ---

def test_a_chunk_counts_steps_only_for_scenes_with_an_episode_until_each_ends():
    book = SceneEpisodes(num_envs=4, step_limit=5)
    book.start([0, 1, 2])  # scene 3 has no episode: it holds
    book.steps[2] = 3  # scene 2 is 3 steps into its episode
    lengths = np.array([4, 4, 2, 0])
    live = book.chunk_start(lengths)
    counted = np.zeros(4, dtype=int)
    success_at = {0: 1}  # scene 0 succeeds at its second step
    for k in range(4):
        live = book.still_live(live, k, lengths)
        if not live.any():
            break
        success = np.array([success_at.get(0) == k, False, False, True])  # scene 3 "succeeds" while idle
        book.record(live, success)
        counted += live
    assert counted.tolist() == [2, 4, 2, 0]
    assert book.success.tolist() == [True, False, False, False]  # an idle scene's success does not count
    assert book.done.tolist() == [True, False, True, True]  # 0: success; 2: step limit 5; 3: no episode
    assert book.steps.tolist() == [2, 4, 5, 0]
    with pytest.raises(RuntimeError, match=r"scenes \[0\] have no episode"):
        book.chunk_start(np.array([1, 0, 0, 0]))
    book.start([0])
    assert book.chunk_start(np.array([1, 1, 0, 0])).tolist() == [True, True, False, False]
    assert book.steps[0] == 0 and not book.success[0] and book.steps[1] == 4  # a reset touches its scene only


# --- the batched env on real ManiSkill (physx_cpu, N = 1) ---

def test_batched_reset_and_step_have_batch_shapes(env):
    assert env.num_envs == 1 and env.sim.num_envs == 1 and env.task_names == [TASK]
    env.reset_envs([0], [2])
    images = env.render()
    assert images.shape == (1, SIZE, SIZE, 3) and images.dtype == np.uint8 and images.std() > 0
    assert env.proprio([0]).shape == (1, 8)
    applied, frames = env.step_chunks(_chunk(3), np.array([3]), keep_frames=True)
    assert applied.tolist() == [3] and len(frames) == 3 and frames[0].shape == (1, SIZE, SIZE, 3)
    assert env.episodes.steps.tolist() == [3]
    (obs,) = env.observations([0], env.render())
    assert obs.image.shape == (SIZE, SIZE, 3) and obs.proprio.shape == (8,) and obs.instruction


def test_consecutive_episodes_stop_at_the_limit_and_restart_by_partial_reset(env):
    for episode, seed in enumerate((5, 6)):
        env.reset_envs([0], [seed])
        assert env.init_state.tolist() == [seed] and env.episodes.steps.tolist() == [0] and not env.done[0]
        first, _ = env.step_chunks(_chunk(8), np.array([8]))
        second, _ = env.step_chunks(_chunk(8), np.array([8]))
        assert (first.tolist(), second.tolist()) == ([8], [LIMIT - 8]), episode  # the rest of the chunk is masked
        assert env.done[0] and not env.success[0]
        with pytest.raises(RuntimeError, match="have no episode"):
            env.step_chunks(_chunk(1), np.array([1]))
        # a scene without a chunk only holds: nothing counts
        assert env.step_chunks(_chunk(2), np.array([0]))[0].tolist() == [0]


def test_seeds_reproduce_the_initial_state_and_match_the_cpu_env(env):
    from env_workers.maniskill import ManiSkillEnv

    env.reset_envs([0], [7])
    pose, tcp, image = env.sim.obj.pose.raw_pose.clone(), env.proprio([0]), env.render()
    env.step_chunks(_chunk(4), np.array([4]))
    assert not np.allclose(env.proprio([0]), tcp, atol=1e-3)  # the arm moved
    env.reset_envs([0], [7])
    np.testing.assert_allclose(env.sim.obj.pose.raw_pose.numpy(), pose.numpy(), atol=1e-6)
    np.testing.assert_allclose(env.proprio([0]), tcp, atol=1e-6)
    np.testing.assert_array_equal(env.render(), image)
    env.reset_envs([0], [8])
    assert not np.allclose(env.sim.obj.pose.raw_pose.numpy(), pose.numpy(), atol=1e-4)
    with ManiSkillEnv(_cfg(batched=False)) as single:  # init state i is the same scene as the per-slot CPU env's
        single.reset(TASK, 7)
        np.testing.assert_allclose(single.sim.obj.pose.raw_pose.numpy(), pose.numpy(), atol=1e-6)


def test_success_comes_from_the_tasks_evaluate(env):
    from tests.test_maniskill_env import _solve

    env.reset_envs([0], [3])
    env.step_chunks(_chunk(1, dx=0.0), np.array([1]))
    assert not env.success[0] and not env.check_success()[0]
    _solve(env.sim, TASK)
    assert env.check_success().tolist() == [True]
    applied, _ = env.step_chunks(_chunk(4, dx=0.0), np.array([4]))
    assert applied.tolist() == [1] and env.success[0] and env.done[0]  # ends at the first successful step


def test_a_batched_env_needs_one_batchable_task_and_one_cpu_scene():
    from env_workers.maniskill.batched_env import BatchedManiSkillEnv

    with pytest.raises(ValueError, match=r"^env.tasks: a batched ManiSkill env .* runs one task, got 2"):
        BatchedManiSkillEnv(_cfg(tasks=[TASK, "PullCube-v1"]), 1)
    with pytest.raises(ValueError, match=r"^env.tasks: PegInsertionSide-v1 cannot batch"):
        BatchedManiSkillEnv(_cfg(tasks=["PegInsertionSide-v1"]), 1)
    with pytest.raises(ValueError, match=r"physx_cpu holds one scene per ManiSkill env, got num_envs=2"):
        BatchedManiSkillEnv(_cfg(), 2)


# --- the worker's slots over one batched env: rounds, and the action batcher's count of busy envs ---

def test_batched_slots_run_an_episode_in_rounds_and_park_from_the_action_batcher():
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from env_workers.action_batcher import ActionBatcher
    from env_workers.batched_slots import BatchRounds
    from env_workers.worker import HangDrill

    async def unused_send(observations, temperature, greedy):
        raise AssertionError("no policy request in this test")

    async def episode(rounds, batcher):
        (slot,) = rounds.slots
        rounds.slot_busy()
        obs = await slot.reset(TASK, 3)
        assert obs.image.shape == (SIZE, SIZE, 3) and obs.proprio.shape == (8,)
        waiting = asyncio.ensure_future(slot.step_chunk(_chunk(4)[0], keep_frames=True))
        await asyncio.sleep(0)
        parked = batcher.busy  # while the slot waits for its round, the batcher does not wait for it
        first = await waiting
        assert batcher.busy == 1  # busy again once the round ended
        second = await slot.step_chunk(_chunk(8)[0])
        with pytest.raises(RuntimeError, match="episode is over"):
            await slot.step_chunk(_chunk(1)[0])
        with pytest.raises(ValueError, match="runs PushCube-v1, not PullCube-v1"):
            await slot.reset("PullCube-v1", 3)
        rounds.slot_idle()
        return parked, first, second

    executor = ThreadPoolExecutor(max_workers=1)
    batcher = ActionBatcher(unused_send, max_wait_s=0.5, timeout_s=5.0)
    rounds = BatchRounds(_cfg(), 1, executor, HangDrill(), batcher)
    try:
        parked, first, second = asyncio.run(episode(rounds, batcher))
    finally:
        rounds.close()
        executor.shutdown()
    assert parked == 0 and batcher.busy == 0 and rounds.rounds == 3
    assert first.steps == 4 and len(first.frames) == 4 and not first.done
    np.testing.assert_array_equal(first.observation.image, first.frames[-1])
    assert second.steps == LIMIT - 4 and second.done and not second.success and second.frames is None


# --- config: bad combinations fail before anything starts, naming the field ---

@pytest.mark.parametrize("overrides, field", [
    (["cluster.envs_per_worker=0"], "cluster.envs_per_worker"),
    (["env.sim_backend=physx_cpu", "env.batched=true", "cluster.envs_per_worker=4"], "cluster.envs_per_worker"),
    (["env.num_steps_wait=5"], "env.num_steps_wait"),
    (["cluster.env_worker_gpus=0"], "cluster.env_worker_gpus"),
    (["env.sim_backend=physx_gpu"], "env.sim_backend"),
])
def test_gpu_config_rejects_bad_combinations_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(ROOT / "configs/maniskill_gpu.yaml", overrides)


def test_gpu_config_loads_and_preflight_refuses_tasks_that_cannot_batch():
    from deploy.preflight import PreflightError, check_tasks

    cfg = load_config(ROOT / "configs/maniskill_gpu.yaml")
    assert cfg.env.sim_backend == "physx_cuda" and cfg.env.batched_sim and cfg.cluster.envs_per_worker >= 64
    assert cfg.env.image_size == cfg.policy.image_size == 128
    check_tasks(cfg)
    for tasks in ("[PushCube-v1,PullCube-v1]", "null", "[PegInsertionSide-v1]"):
        with pytest.raises(PreflightError, match=r"^env.tasks: "):
            check_tasks(load_config(ROOT / "configs/maniskill_gpu.yaml", [f"env.tasks={tasks}"]))
    with pytest.raises(ConfigError, match=r"env.sim_backend physx_cuda / env.batched exist for the maniskill backend"):
        load_config(ROOT / "configs/tiny.yaml", ["env.sim_backend=physx_cuda"])


# --- the pipeline: one GRPO step with batched env workers ---

BATCHED = ["env.backend=maniskill", "env.suite=maniskill", f"env.tasks=[{TASK}]", "env.image_size=64",
           "env.num_steps_wait=0", "env.batched=true", "cluster.num_env_workers=2", "cluster.envs_per_worker=1"]


@pytest.fixture(scope="module")
def pipeline(ray_cluster, tiny_policy_dir, tmp_path_factory):
    from tests.backend_pipeline import start_pipeline

    cfg, rollout = start_pipeline(BATCHED, tiny_policy_dir, tmp_path_factory.mktemp("run"))
    yield cfg, rollout
    rollout.shutdown()


def test_one_grpo_step_with_batched_env_workers(pipeline, tiny_policy_dir):
    from tests.backend_pipeline import check_one_grpo_step

    cfg, _ = pipeline
    assert cfg.env.batched_sim
    check_one_grpo_step(*pipeline, tiny_policy_dir, TASK)


def test_batched_worker_trajectories_hold_the_frames_and_stop_at_the_limit(pipeline):
    from tests.backend_pipeline import check_trajectories

    check_trajectories(*pipeline, TASK, init_state=3)


# --- the benchmark's CLI, GPU mode on the CPU path (physx_cpu, N = 1) ---

def test_bench_gpu_mode_runs_the_batched_path_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/bench_maniskill.py"), str(out), "--sim-backend",
                           "physx_cpu", "--num-envs", "1", "--image-size", "32,48", "--tasks", TASK, "--steps", "6"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["batched"]
    assert [(r["num_envs"], r["image_size"]) for r in rows] == [(1, 32), (1, 48)]
    for r in rows:
        assert r["env_steps"] == 6 and r["rendered_steps_per_s"] > 0 and r["sim_backend"] == "physx_cpu"
    assert "rendered steps/s" in proc.stdout


def test_physx_cuda_without_the_physx_gpu_library_fails_offline_naming_the_file(tmp_path, monkeypatch):
    """SAPIEN would fetch PhysX's GPU library from GitHub at the first GPU scene; we refuse instead."""
    import sapien

    from env_workers.maniskill.bootstrap import check_physx_gpu

    monkeypatch.setenv("HOME", str(tmp_path))
    lib = tmp_path / ".sapien" / "physx" / sapien.physx.version() / "libPhysXGpu_64.so"
    with pytest.raises(RuntimeError, match=r"env\.sim_backend physx_cuda needs PhysX's GPU library at .*libPhysXGpu_64\.so"):
        check_physx_gpu()
    assert not lib.parent.exists()  # nothing fetched, nothing created
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    check_physx_gpu()
