"""The learner checkpoints weights, optimizer and RNG, and resumes exactly: killing it after a
checkpoint and resuming gives the same next losses as an uninterrupted run (CPU, fixed seeds).
And its step does not depend on how a batch is split into micro-batches."""

import numpy as np
import pytest
import ray

from common.config_loading import load_config
from common.records import Trajectory
from learner.checkpoints import CheckpointManager, load_trajectories, save_trajectories
from tests.conftest import ROOT


def _batch(seed: int, n: int = 8) -> list[Trajectory]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = int(rng.integers(2, 5))
        executed = np.ones((T, 8), bool)
        executed[-1, int(rng.integers(1, 8)):] = False
        out.append(Trajectory(task="red_in_bowl", init_state=i // 4, instruction="put the red block in the bowl",
                              images=rng.integers(0, 256, (T, 64, 64, 3), dtype=np.uint8),
                              tokens=rng.integers(31744, 32000, (T, 8, 7)),
                              logprobs=rng.uniform(-6.5, -4.5, (T, 8, 7)).astype(np.float32),
                              executed=executed, success=i % 4 < 2, env_steps=int(executed.sum()), policy_version=0))
    return out


def _run_steps(group, batches, stats_seen=None):
    losses = []
    for trajs in batches:
        refs = [ray.put(t) for t in trajs]
        adv = np.array([1.0 if t.success else -1.0 for t in trajs], dtype=np.float32)
        stats = ray.get(group.grpo_step_async(refs, adv, np.arange(len(refs))))[0]
        losses.append(stats["loss"])
        if stats_seen is not None:
            stats_seen.append(stats)
    return losses


def _demo_samples(n: int = 6) -> dict:
    """learner.loss_terms.demo_bc's samples: random demo frames and action chunks in [-1, 1]."""
    from learner.sft_data import DemoSamples

    rng = np.random.default_rng(5)
    samples = DemoSamples(images=rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8),
                          instructions=["put the red block in the bowl"] * n, chunks=rng.uniform(-1, 1, (n, 8, 7)),
                          proprio=None, max_shift=2, scene=None)
    return {"demo_bc": samples}


@pytest.mark.parametrize("term", [False, True], ids=["grpo", "demo_bc"])
def test_killed_learner_resumes_with_identical_losses(ray_cluster, tiny_policy_dir, tmp_path, term):
    from learner.group import LearnerGroup

    extra = ["learner.loss_terms={demo_bc: {weight: 0.5, batch_size: 4}}"] if term else []
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"run_dir={tmp_path}", "learner.lr=0.001", *extra])
    samples = _demo_samples() if term else {}
    batches = [_batch(s) for s in range(4)]

    straight = LearnerGroup(cfg)
    straight.setup_grpo(tiny_policy_dir, 0, samples)
    seen: list[dict] = []
    expected = _run_steps(straight, batches, seen)
    straight.shutdown()
    assert all(("demo_bc_loss" in s) == term for s in seen)

    first = LearnerGroup(cfg)
    first.setup_grpo(tiny_policy_dir, 0, samples)
    assert _run_steps(first, batches[:2]) == pytest.approx(expected[:2], abs=0)
    first.save_state(tmp_path / "ckpt", {"step": 2})
    first.shutdown()  # the learner dies after its checkpoint

    resumed = LearnerGroup(cfg)
    resumed.setup_grpo(tiny_policy_dir, 123, samples)  # fresh RNG: everything must come from disk
    if term:  # a truncated DeepSpeed file names the checkpoint; the intact copy still resumes exactly
        import shutil

        shutil.copytree(tmp_path / "ckpt", tmp_path / "broken")
        states = sorted((tmp_path / "broken").rglob("*model_states.pt"))[0]
        states.write_bytes(states.read_bytes()[:64])
        with pytest.raises(Exception, match=rf"checkpoint folder {tmp_path / 'broken'} is unreadable"):
            resumed.load_state(tmp_path / "broken")
    assert resumed.load_state(tmp_path / "ckpt")["step"] == 2
    assert _run_steps(resumed, batches[2:]) == pytest.approx(expected[2:], abs=0)
    resumed.shutdown()
    assert len(set(expected)) == 4, "losses should differ from step to step"


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    assert mgr.latest() is None
    for step in (1, 2, 3):
        tmp = mgr.begin(step)
        (tmp / "payload").write_text(str(step))
        assert mgr.latest() is None or mgr.latest().name != f"step_{step:06d}"  # not visible until committed
        mgr.commit(tmp, {"step": step})
    assert mgr.latest().name == "step_000003"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000002", "step_000003"]
    mgr.begin(4)  # a crash mid-write leaves only a .tmp folder behind
    assert mgr.latest().name == "step_000003"


def test_surplus_trajectories_round_trip_without_pickle(tmp_path):
    trajs = _batch(7, n=3)
    save_trajectories(trajs, tmp_path / "surplus")
    back = load_trajectories(tmp_path / "surplus")
    for a, b in zip(trajs, back):
        assert (a.task, a.init_state, a.success, a.env_steps) == (b.task, b.init_state, b.success, b.env_steps)
        for k in ("images", "tokens", "logprobs", "executed"):
            assert np.array_equal(getattr(a, k), getattr(b, k))


def test_truncated_checkpoint_files_are_named_in_the_error(tmp_path):
    from common.files import UnreadableFile

    save_trajectories(_batch(3, n=2), tmp_path / "surplus")
    victim = sorted((tmp_path / "surplus").glob("*.npz"))[1]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(UnreadableFile, match=rf"checkpoint file {victim} is unreadable"):
        load_trajectories(tmp_path / "surplus")


def test_sft_in_one_pass_takes_the_same_step_as_micro_batched(ray_cluster, tiny_policy_dir, tmp_path):
    """sft.micro_batch_size (a whole batch per forward/backward, faster on CPU) only changes how
    the gradient is summed: losses and weights match the learner's micro-batch split."""
    from learner.group import LearnerGroup

    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8), rng.integers(31744, 32000, (8, 8 * 7)))
               for _ in range(3)]
    instructions = ["put the red block in the bowl"] * 8
    results = []
    for micro in ([], ["sft.micro_batch_size=4"]):  # 2 ranks: 4 samples each, in 2 passes or 1
        cfg = load_config(ROOT / "configs/tiny.yaml", [f"run_dir={tmp_path}", "sft.batch_size=8", "learner.micro_batch_chunks=2",
                                                       "sft.lr=0.001", *micro])
        group = LearnerGroup(cfg)
        try:
            group.setup_sft(tiny_policy_dir, 0)
            losses = [group.sft_step(images, instructions, tokens)["loss"] for images, tokens in batches]
            weights = ray.get(group.publish_weights())
        finally:
            group.shutdown()
        results.append((losses, weights))
    (split_losses, split_weights), (whole_losses, whole_weights) = results
    assert len(set(split_losses)) == 3, "losses should change from step to step"
    assert whole_losses[0] == pytest.approx(split_losses[0], rel=1e-6)  # same weights before the first step
    assert whole_losses == pytest.approx(split_losses, rel=1e-4)
    # Adam divides by sqrt(v): where a gradient is ~0, summation-order rounding can move an element by
    # a visible part of one step (lr 1e-3; one element in 4 M was 1.6e-5 off on one CPU); a wrong
    # gradient would be off by about a whole step on many elements
    for name, w in split_weights.items():
        np.testing.assert_allclose(whole_weights[name].numpy(), w.numpy(), rtol=1e-3, atol=1e-4, err_msg=name)


def test_zero_stage_0_and_optimizer_offload_take_the_same_steps_and_report_the_grad_norm(ray_cluster, tiny_policy_dir,
                                                                                          tmp_path):
    """learner.zero_stage 0 (no ZeRO: what one rank needs, without ZeRO's flat-buffer copies) and ZeRO-2
    with learner.offload_optimizer (the fp32 partition and Adam's state in host memory, stepped there)
    train like stage 2 on 2 gloo ranks (micro-batched, all-reduced, clipped) and log the same pre-clip
    gradient norm, which DeepSpeed does not keep without ZeRO."""
    from learner.group import LearnerGroup

    batches = [_batch(s) for s in range(3)]
    results = {}
    variants = {"zero2": ["learner.zero_stage=2"], "zero0": ["learner.zero_stage=0"],
                "offload": ["learner.zero_stage=2", "learner.offload_optimizer=true"]}
    for variant, overrides in variants.items():
        # grad_clip 0.2 < the norms here (0.3-0.4): the clipped path is the one compared
        cfg = load_config(ROOT / "configs/tiny.yaml", [f"run_dir={tmp_path}", "learner.lr=0.001", "learner.grad_clip=0.2",
                                                       *overrides])
        group = LearnerGroup(cfg)
        try:
            group.setup_grpo(tiny_policy_dir, 0, {})
            seen: list[dict] = []
            losses = _run_steps(group, batches, seen)
            weights = ray.get(group.publish_weights())
        finally:
            group.shutdown()
        results[variant] = (losses, [s["grad_norm"] for s in seen], weights)
    losses2, norms2, weights2 = results["zero2"]
    assert len(set(losses2)) == 3
    assert all(n > 0.2 for n in norms2), "the test needs clipping to act"
    for variant in ("zero0", "offload"):
        losses, norms, weights = results[variant]
        assert losses == pytest.approx(losses2, rel=1e-5), variant
        assert norms == pytest.approx(norms2, rel=1e-4), variant
        for name, w in weights2.items():
            np.testing.assert_allclose(weights[name].numpy(), w.numpy(), rtol=1e-3, atol=1e-4, err_msg=f"{variant} {name}")


def test_optimizer_offload_that_would_not_fit_host_memory_stops_before_allocating():
    """7.54 B weights need ~112 GiB of host memory for one rank; the check runs before DeepSpeed
    allocates anything, so the error is one line instead of the kernel killing the learner."""
    import psutil

    from common.config import LearnerConfig
    from learner.engine import offload

    cfg = LearnerConfig(zero_stage=2, offload_optimizer=True)
    too_many = int(2 * psutil.virtual_memory().available / 16)  # twice what this machine could hold
    with pytest.raises(MemoryError, match=r"^learner.offload_optimizer keeps \d+ GiB in host memory .* train LoRA"):
        offload(cfg, too_many)
    assert offload(cfg, too_many, world_size=4)["offload_optimizer"]["device"] == "cpu"  # a quarter each fits
    assert offload(cfg.model_copy(update={"offload_optimizer": False}), too_many) == {}
