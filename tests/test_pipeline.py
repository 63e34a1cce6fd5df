"""The actor-learner pipeline on a real local Ray cluster: Serve replica, env workers, the
coordinator and a 2-rank DeepSpeed learner on gloo, with the tiny policy."""

import os
import signal
import time

import numpy as np
import pytest
import ray
import torch

from actors.env_pool import Episode
from common.config_loading import load_config
from common.records import Observation
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def pipeline(ray_cluster, tiny_policy_dir, tmp_path_factory):
    from deploy.runtime import Rollout

    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"run_dir={run_dir}", "rollout.min_group_success=0.0",
                                                   "env.max_steps=24", "checkpoint.every=100"])
    rollout = Rollout.start(cfg, str(tiny_policy_dir))
    yield cfg, rollout
    rollout.shutdown()


def _greedy_tokens(handle, obs):
    return np.stack([handle.act.remote(o, 1.0, True).result(timeout_s=60).tokens for o in obs])


def test_one_rl_step_end_to_end_updates_every_replica(pipeline, tiny_policy_dir):
    from deploy.train import GRPOTrainer

    cfg, rollout = pipeline
    rng = np.random.default_rng(0)
    probe = [Observation(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "put the red block in the bowl") for _ in range(2)]
    before = _greedy_tokens(rollout.handle, probe)
    # A random policy fails every episode, so advantages are 0; decoupled weight decay still moves
    # the weights, which is all this test needs to see them reach every replica.
    cfg = cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"lr": 0.05, "weight_decay": 1.0})})
    trainer = GRPOTrainer(cfg, str(tiny_policy_dir), rollout)
    try:
        scalars = trainer.train_step()
        learner_weights = ray.get(trainer.learner.publish_weights())
    finally:
        trainer.shutdown()
    checksum = float(sum(v.double().sum() for v in learner_weights.values()))
    assert rollout.handle.broadcast("weights_checksum").results(timeout_s=30) == pytest.approx([checksum] * cfg.cluster.serve_replicas)
    assert scalars["rollout/episodes"] >= cfg.rollout.groups_per_batch * cfg.rollout.group_size
    assert np.isfinite(scalars["train/loss"]) and scalars["train/grad_norm"] >= 0
    assert rollout.handle.broadcast("get_version").results(timeout_s=30) == [1] * cfg.cluster.serve_replicas
    assert not np.array_equal(before, _greedy_tokens(rollout.handle, probe)), "greedy actions did not change after sync"
    assert (cfg.run_dir / "metrics.jsonl").is_file()
    assert scalars["rollout/policy_lag"] == 0.0 and scalars["policy/version"] == 1


def test_wall_budget_ends_grpo_at_a_step_boundary_and_still_saves_the_policy(pipeline, tiny_policy_dir, tmp_path):
    from deploy.train import GRPOTrainer

    cfg, rollout = pipeline
    cfg = cfg.model_copy(update={"total_steps": 1, "run_dir": tmp_path})
    trainer = GRPOTrainer(cfg, str(tiny_policy_dir), rollout)
    try:
        assert trainer.run(tmp_path / "early", deadline=time.monotonic() - 1) == "wall_budget_minutes"
        assert trainer.step == 0 and (tmp_path / "early" / "config.json").is_file()
        assert trainer.run(tmp_path / "done", deadline=time.monotonic() + 3600) == "total_steps"
        assert trainer.step == 1 and (tmp_path / "done" / "config.json").is_file()
    finally:
        trainer.shutdown()


def _run_to_total_steps(cfg, tiny_policy_dir, rollout):
    """A trainer run to cfg.total_steps (policy in run_dir/rl_policy), then shut down; for its history."""
    from deploy.train import GRPOTrainer

    trainer = GRPOTrainer(cfg, str(tiny_policy_dir), rollout)
    try:
        trainer.run(cfg.run_dir / "rl_policy")
    finally:
        trainer.shutdown()
    return trainer


def test_lr_schedule_reaches_the_learner_step_by_step(pipeline, tiny_policy_dir, tmp_path):
    cfg, rollout = pipeline
    learner = cfg.learner.model_copy(update={"lr": 0.002, "lr_schedule": "linear", "lr_final_ratio": 0.5})
    cfg = cfg.model_copy(update={"learner": learner, "run_dir": tmp_path, "total_steps": 2})
    trainer = _run_to_total_steps(cfg, tiny_policy_dir, rollout)
    # no deadline: progress is step / total_steps, so steps 1 and 2 train at progress 0 and 1/2
    assert [h["train/lr"] for h in trainer.history] == pytest.approx([0.002, 0.0015])


def test_overlapped_steps_train_on_one_version_old_groups_and_report_a_true_env_step_rate(pipeline, tiny_policy_dir, tmp_path):
    cfg, rollout = pipeline
    rollout_cfg = cfg.rollout.model_copy(update={"max_policy_lag": 1})
    cfg = cfg.model_copy(update={"rollout": rollout_cfg, "run_dir": tmp_path, "total_steps": 3})
    trainer = _run_to_total_steps(cfg, tiny_policy_dir, rollout)
    assert not trainer.coordinator.open_groups and not rollout.pool.in_flight, "rollouts left running after GRPO"
    assert [h["policy/version"] for h in trainer.history] == [1, 2, 3]
    assert all(0.0 <= h["rollout/policy_lag"] <= 1.0 for h in trainer.history)
    for h in trainer.history:  # episodes that ran while the learner trained count against the whole step
        most_env_steps = h["rollout/episodes"] * cfg.env.max_steps
        assert h["rollout/env_steps_per_s"] * (h["time/rollout_s"] + h["time/train_s"]) <= most_env_steps * 1.01


def test_a_resumed_run_has_the_weights_sampler_and_surplus_it_saved(pipeline, tiny_policy_dir, tmp_path):
    from safetensors.torch import load_file

    from deploy.train import GRPOTrainer

    cfg, rollout = pipeline
    learner = cfg.learner.model_copy(update={"lr": 0.05, "weight_decay": 1.0})  # weights move
    sampling = cfg.rollout.model_copy(update={"task_sampling": "adaptive_state"})  # per-state counts to resume too
    cfg = cfg.model_copy(update={"learner": learner, "rollout": sampling, "run_dir": tmp_path, "total_steps": 1})
    start = load_file(str(tiny_policy_dir / "model.safetensors"))
    trainer = GRPOTrainer(cfg, str(tiny_policy_dir), rollout)
    try:
        trainer.run(tmp_path / "rl_policy")
        live = ray.get(trainer.learner.publish_weights())
        trainer.save_checkpoint()
        sampler_state = trainer.coordinator.sampler.state()
        surplus_metas, _ = trainer.coordinator.surplus_state()
    finally:
        trainer.shutdown()
    assert sampler_state["counts"], "the step's groups reached the per-state sampler"
    assert trainer.history[0]["sampler/weight/red_in_bowl"] > 0, "adaptive_state logs its task weights"
    saved = load_file(str(tmp_path / "rl_policy" / "model.safetensors"))
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], live[k])]
    assert moved, "the step did not change any weight"
    assert all(torch.equal(saved[k], live[k]) for k in saved)
    resumed_cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"resume": True})})
    resumed = GRPOTrainer(resumed_cfg, str(tiny_policy_dir), rollout)
    try:
        assert resumed.step == 1
        assert resumed.coordinator.sampler.state() == sampler_state
        assert resumed.coordinator.surplus_state()[0] == surplus_metas
        assert torch.equal(ray.get(resumed.learner.publish_weights())[moved[0]], live[moved[0]])
    finally:
        resumed.shutdown()


def test_the_driver_buffer_applies_backpressure_and_still_fills_a_batch(pipeline):
    from actors.coordinator import RolloutCoordinator
    from actors.samplers import make_sampler

    cfg, rollout = pipeline
    capacity_groups = 2
    rollout_cfg = cfg.rollout.model_copy(update={"queue_capacity": capacity_groups * cfg.rollout.group_size})
    pairs = [(t, s) for t, v in rollout.task_info.items() for s in v["train"]]
    coord = RolloutCoordinator(rollout_cfg, rollout.pool, make_sampler(pairs, 0, rollout_cfg))
    held = []
    deadline = time.monotonic() + 300
    while coord.stats.groups_done < 6 and time.monotonic() < deadline:  # asks for far more than the capacity
        coord.pump(want_groups=10, timeout_s=0.2)
        held.append(len(coord.ready) + len(coord.open_groups))
        if len(coord.ready) == capacity_groups:
            coord.ready.pop(0)  # a step takes a group: room for the next
    assert coord.stats.groups_done >= 6 and max(held) == capacity_groups
    assert rollout.pool.in_flight <= capacity_groups * cfg.rollout.group_size
    coord.drain(300)
    assert len(coord.next_batch(2, current_version=0, timeout_s=300)) == 2


def test_trajectories_are_compact_and_freed_slots_do_not_pad(pipeline):
    cfg, rollout = pipeline
    results = rollout.pool.run_all([Episode("red_in_bowl", 0, 1.6, False) for _ in range(4)], timeout_s=300)
    for done in results:
        traj, meta = ray.get(done.ref), done.meta
        assert traj.images.dtype == np.uint8 and traj.images.shape[1:] == (64, 64, 3)
        assert traj.tokens.shape == (meta.num_chunks, 8, 7)
        assert traj.executed.sum() == meta.env_steps <= cfg.env.max_steps
        assert traj.num_chunks == -(-meta.env_steps // 8), "policy queried after the episode ended"


def test_poll_returns_a_finished_episode_without_waiting_for_the_others(pipeline):
    """The driver learns of each episode as it finishes (and can launch the next), not once per
    batch of them."""
    _, rollout = pipeline
    pool = rollout.pool
    ray.get(pool.workers[1].inject_hang.remote(8.0), timeout=30)  # its next env call blocks 8 s (< the deadline)
    for state in range(2):  # one episode per worker: the least loaded takes the next
        pool.submit(Episode("red_in_bowl", state, 1.6, False))
    start = time.monotonic()
    first = pool.poll(60)
    seconds = time.monotonic() - start
    rest = pool.run_all([], timeout_s=120)
    assert len(first) == 1 and seconds < 6, (len(first), seconds)
    assert sorted(d.request.init_state for d in first + rest) == [0, 1]


def test_video_frames_and_the_lockstep_baseline_step_whole_chunks(pipeline):
    cfg, rollout = pipeline
    worker = rollout.pool.workers[0]
    meta_ref, _ = worker.run_episode.remote("red_in_bowl", 3, 1.6, False, True)
    meta = ray.get(meta_ref, timeout=120)
    assert meta.frames.shape == (meta.env_steps, 64, 64, 3)  # one frame per applied action
    # Lock-step queries the policy for every env until the longest limit, finished or not, and
    # counts only the actions it applied.
    out = ray.get(worker.run_lockstep.remote([("red_in_bowl", 0), ("green_in_bowl", 1)], 1.6), timeout=120)
    assert out["queries"] == 2 * -(-cfg.env.max_steps // cfg.policy.action_chunk)
    assert 0 < out["env_steps"] <= 2 * cfg.env.max_steps


def test_sigkilled_env_worker_episode_is_rerun_with_exact_counts(pipeline):
    cfg, rollout = pipeline
    pool = rollout.pool
    rerun, replaced = pool.rerun, pool.replaced
    episodes = [Episode("green_in_bowl", s, 1.6, False) for s in range(40)]
    victim = ray.get(pool.workers[0].pid.remote())
    steps_before = ray.get(pool.workers[0].total_env_steps.remote())
    for ep in episodes:
        pool.submit(ep)
    while ray.get(pool.workers[0].total_env_steps.remote()) == steps_before:  # mid-rollout
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    done = []
    deadline = time.monotonic() + 300
    while pool.in_flight and time.monotonic() < deadline:
        done.extend(pool.poll(1.0))
    assert sorted(d.request.init_state for d in done) == list(range(40)), "every episode exactly once"
    assert pool.replaced == replaced + 1 and pool.rerun > rerun
    assert all(ray.get(d.ref).env_steps == d.meta.env_steps for d in done)
    assert ray.get(pool.workers[0].ready.remote(), timeout=60)


def _demo_loss(policy_dir, cfg, samples) -> float:
    """The BC loss of `samples`' first 8 demo samples (unshifted) under the policy in `policy_dir`."""
    from learner.engine import sft_batch_loss
    from policy.checkpoint import load_policy

    policy = load_policy(policy_dir, policy=cfg.policy)
    idx = np.arange(8)
    tokens = policy.action_tokenizer.actions_to_tokens(samples.chunks[idx], policy.stats).reshape(len(idx), -1)
    with torch.no_grad():
        return float(sft_batch_loss(policy, samples.images[idx], [samples.instructions[i] for i in idx], tokens))


def _moved_weights(before_dir, after_dir) -> list[str]:
    """Names of the weights that differ between two saved policy folders."""
    from safetensors.torch import load_file

    before, after = (load_file(str(d / "model.safetensors")) for d in (before_dir, after_dir))
    return [k for k in before if not torch.equal(before[k], after[k])]


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_demo_bc_term_trains_on_the_demos_when_grpo_has_no_signal(pipeline, tiny_policy_dir, tmp_path, weight):
    from deploy.sft import demo_samples, load_demos
    from deploy.train import GRPOTrainer

    cfg, rollout = pipeline
    env = cfg.env.model_copy(update={"tasks": ["red_in_bowl"]})  # the demos: one, of one task
    terms = {"demo_bc": {"weight": weight, "batch_size": 4}} if weight else {}
    learner = load_config(ROOT / "configs/tiny.yaml", ["learner.lr=0.001", f"learner.loss_terms={terms}"]).learner
    cfg = cfg.model_copy(update={"env": env, "learner": learner, "run_dir": tmp_path, "total_steps": 1})
    trainer = GRPOTrainer(cfg, str(tiny_policy_dir), rollout)
    try:
        scalars = trainer.train_step()
        trainer.learner.save_policy(tmp_path / "after")
    finally:
        trainer.shutdown()
    # the random tiny policy fails every episode: every group is all-fail, every advantage 0, and
    # without weight decay GRPO alone leaves the weights where they were
    assert scalars["rollout/success_rate"] == 0.0 and scalars["train/adv_mean"] == 0.0
    assert {"time/rollout_s", "time/advantages_s", "time/train_s", "time/weight_sync_s"} <= set(scalars)
    moved = _moved_weights(tiny_policy_dir, tmp_path / "after")
    if not weight:
        assert not moved and "train/demo_bc_loss" not in scalars
        return
    assert moved and scalars["train/demo_bc_loss"] > 0
    samples = demo_samples(cfg, load_demos(cfg))
    assert _demo_loss(tmp_path / "after", cfg, samples) < _demo_loss(tiny_policy_dir, cfg, samples)


def test_validation_tracks_the_best_policy_can_serve_it_and_survives_a_resume(pipeline, tiny_policy_dir, tmp_path):
    from safetensors.torch import load_file

    from deploy.train import GRPOTrainer

    cfg, rollout = pipeline
    learner = cfg.learner.model_copy(update={"lr": 0.05, "weight_decay": 1.0})  # weights move every step
    evaluation = cfg.eval.model_copy(update={"validate_every": 1, "validation_states_per_task": 1})
    cfg = cfg.model_copy(update={"learner": learner, "eval": evaluation, "run_dir": tmp_path, "total_steps": 2,
                                 "checkpoint": cfg.checkpoint.model_copy(update={"every": 2})})
    replicas = cfg.cluster.serve_replicas
    checksum = lambda state: float(sum(v.double().sum() for v in state.values()))  # noqa: E731
    trainer = GRPOTrainer(cfg, str(tiny_policy_dir), rollout)
    try:
        trainer.run(tmp_path / "rl_policy")
        live = ray.get(trainer.learner.publish_weights())
        history = trainer.selector.history
        # the random policy fails every validation episode (one per task, train states): the best
        # so far stays step 1's (a tie keeps the earlier), but it is not clearly better than the
        # last, so the run keeps the last policy, and the replicas still serve it
        assert [h["step"] for h in history] == [1, 2] and [h["success"] for h in history] == [0.0, 0.0]
        assert len(history[0]["per_task"]) == len(rollout.task_info)
        assert [h["eval/best_step"] for h in trainer.history] == [1, 1] and not trainer.selector.earlier_is_better()
        last = load_file(str(tmp_path / "rl_policy" / "model.safetensors"))
        assert all(torch.equal(last[k], live[k]) for k in last)
        assert rollout.handle.broadcast("get_version").results(timeout_s=30) == [2] * replicas
        # serving the best one: step 1's weights, under version 1, as its own policy folder
        trainer.serve_best(tmp_path / "best_policy")
    finally:
        trainer.shutdown()
    best = load_file(str(tmp_path / "best_policy" / "model.safetensors"))
    assert all(torch.equal(best[k], v) for k, v in load_file(str(tmp_path / "validated_policy" / "model.safetensors")).items())
    assert any(not torch.equal(best[k], live[k]) for k in best), "step 1's weights are the last ones"
    assert rollout.handle.broadcast("get_version").results(timeout_s=30) == [1] * replicas
    assert rollout.handle.broadcast("weights_checksum").results(timeout_s=30) == pytest.approx([checksum(best)] * replicas)

    resumed = GRPOTrainer(cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"resume": True})}),
                          str(tiny_policy_dir), rollout)
    try:
        assert resumed.step == 2 and resumed.selector.history == history and resumed.selector.best["step"] == 1
        kept = ray.get(resumed.selector.best_weights)
        assert all(torch.equal(kept[k], best[k]) for k in best)
    finally:
        resumed.shutdown()
