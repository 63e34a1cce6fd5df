"""The learner's micro-batches are bounded in chunks (learner.micro_batch_chunks), not trajectories:
the loss and gradient of a mini-batch do not depend on the bound, on how episode lengths split
over ranks, or on activation checkpointing; and no forward ever sees more samples than the bound.

Real DeepSpeed ranks (gloo, CPU) in Ray actors; the policy's forward is wrapped by a spy that
records its batch sizes and DeepSpeed's step by one that reads the accumulated gradients."""

import numpy as np
import pytest
import ray
import torch

from common.config_loading import load_config
from common.records import Trajectory
from learner.loss_terms import TermBatch
from tests.conftest import ROOT

INSTRUCTION = "put the red block in the bowl"


def _trajs(lengths: list[int], seed: int = 0) -> list[Trajectory]:
    """Trajectories of these chunk counts; the last chunk of each ends mid-way (masked actions)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, T in enumerate(lengths):
        executed = np.ones((T, 8), bool)
        executed[-1, int(rng.integers(1, 8)):] = False
        out.append(Trajectory(task="red_in_bowl", init_state=i, instruction=INSTRUCTION,
                              images=rng.integers(0, 256, (T, 64, 64, 3), dtype=np.uint8),
                              tokens=rng.integers(31744, 32000, (T, 8, 7)),
                              logprobs=rng.uniform(-6.5, -4.5, (T, 8, 7)).astype(np.float32),
                              executed=executed, success=i % 2 == 0, env_steps=int(executed.sum()), policy_version=0))
    return out


def _term(n: int, seed: int = 1) -> TermBatch:
    rng = np.random.default_rng(seed)
    return TermBatch("demo_bc", 0.5, rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8), [INSTRUCTION] * n,
                     rng.integers(31744, 32000, (n, 56)), None)


def _ranks(world: int) -> list:
    """`world` learner ranks in one gloo group; each builds a fresh policy and engine per `build`."""

    @ray.remote(num_cpus=1)
    class Rank:
        def __init__(self, rank: int):
            self.rank = rank

        def address(self):
            import socket

            with socket.socket() as s:
                s.bind(("", 0))
                return ray.util.get_node_ip_address(), s.getsockname()[1]

        def join(self, addr: str, port: int) -> None:
            from learner.engine import init_distributed

            init_distributed(self.rank, world, addr, port, "gloo")

        def _policy(self, cfg, policy_dir: str):
            from policy.checkpoint import load_policy

            torch.manual_seed(0)
            policy = load_policy(policy_dir, dtype=cfg.policy.dtype, policy=cfg.policy)
            policy.model.train()
            return policy

        def build(self, cfg, policy_dir: str) -> None:
            from deepspeed.utils import safe_get_full_grad

            from learner.engine import LearnerEngine

            policy = self._policy(cfg, policy_dir)
            self.forward_sizes: list[int] = []
            logits = policy.action_logits

            def forward_spy(images, *args, **kwargs):  # every forward of the policy goes through action_logits
                self.forward_sizes.append(len(images))
                return logits(images, *args, **kwargs)

            policy.action_logits = forward_spy
            self.attn_calls = 0  # an LM block's attention runs once per forward, twice when checkpointed

            def count(*_):
                self.attn_calls += 1

            policy.model.language_model.model.layers[0].self_attn.register_forward_hook(count)
            self.engine = LearnerEngine(policy, cfg.learner, cfg.learner.lr, cfg.learner.micro_batch_chunks)
            ds = self.engine.engine
            step = ds.step
            self.grads: list[dict] = []

            def step_spy(*args, **kwargs):  # the all-reduced, accumulated gradient the optimiser is about to use
                full = {n: safe_get_full_grad(p) for n, p in ds.module.named_parameters() if p.requires_grad}
                self.grads.append({n: g.detach().clone() for n, g in full.items() if g is not None})
                return step(*args, **kwargs)

            ds.step = step_spy

        def grpo(self, trajs, advantages, batch_trajs: int, terms, temperature: float, old=None) -> dict:
            self.forward_sizes.clear()
            self.attn_calls = 0
            s = self.engine.grpo_minibatch(trajs, advantages, temperature, batch_trajs, old, terms)
            return {"loss": s.loss, "grad_norm": s.grad_norm, "extra": s.extra, "grads": self.grads[-1],
                    "forward_sizes": list(self.forward_sizes), "attn_calls": self.attn_calls, "steps": len(self.grads),
                    "weights": self.engine.weights()}

        def recompute(self, trajs, temperature: float) -> tuple[list, list]:
            self.forward_sizes.clear()
            return self.engine.recompute_logprobs(trajs, temperature), list(self.forward_sizes)

        def reference(self, cfg, policy_dir: str, trajs, advantages, terms, temperature: float) -> dict:
            """The objective computed the plain way: every chunk in one forward, padded per trajectory,
            grpo_loss (token-mean per trajectory, mean over trajectories) + weight x cross-entropy."""
            from torch.nn.utils.rnn import pad_sequence

            from learner.engine import sft_batch_loss
            from learner.grpo import grpo_loss, token_mask

            policy = self._policy(cfg, policy_dir)
            policy.model.split_action_head()
            images = np.concatenate([t.images for t in trajs])
            tokens = torch.from_numpy(np.concatenate([t.tokens.reshape(t.num_chunks, -1) for t in trajs]))
            logp, _ = policy.token_log_probs(images, [t.instruction for t in trajs for _ in range(t.num_chunks)],
                                             tokens, temperature)
            sizes = [t.num_chunks for t in trajs]
            logp = pad_sequence([c.reshape(-1) for c in torch.split(logp, sizes)], batch_first=True)  # [B, L]
            old = pad_sequence([torch.from_numpy(t.logprobs.reshape(-1)) for t in trajs], batch_first=True)
            mask = token_mask(pad_sequence([torch.from_numpy(t.executed) for t in trajs], batch_first=True), 7)
            loss, _ = grpo_loss(logp, old, torch.as_tensor(advantages), mask, cfg.learner.clip_low, cfg.learner.clip_high)
            for term in terms:
                loss = loss + term.weight * sft_batch_loss(policy, term.images, term.instructions, term.tokens)
            loss.backward()
            grads = {n: p.grad.detach().clone() for n, p in policy.model.named_parameters() if p.grad is not None}
            return {"loss": float(loss.detach()), "grads": grads}

    ranks = [Rank.remote(r) for r in range(world)]
    addr, port = ray.get(ranks[0].address.remote(), timeout=60)
    ray.get([r.join.remote(addr, port) for r in ranks], timeout=120)
    return ranks


def _cfg(tmp_path, *overrides):
    return load_config(ROOT / "configs/tiny.yaml", [f"run_dir={tmp_path}", "cluster.learner_world_size=1",
                                                    "learner.grad_clip=1000", *overrides])


def _assert_grads_close(got: dict, want: dict) -> None:
    assert set(want) <= set(got), set(want) - set(got)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_loss_and_gradient_do_not_depend_on_micro_batch_chunks(ray_cluster, tiny_policy_dir, tmp_path, stage):
    trajs = _trajs([1, 4, 2, 5])  # 12 chunks of unequal trajectories
    advantages = np.array([1.0, -0.5, 0.8, -1.3], dtype=np.float32)
    terms = [_term(3)]
    [rank] = _ranks(1)
    try:
        cfg = _cfg(tmp_path, f"learner.zero_stage={stage}")
        want = ray.get(rank.reference.remote(cfg, tiny_policy_dir, trajs, advantages, terms, 1.6), timeout=300)
        for chunks in (1, 3, 1000):
            ray.get(rank.build.remote(_cfg(tmp_path, f"learner.zero_stage={stage}", f"learner.micro_batch_chunks={chunks}"),
                                      tiny_policy_dir), timeout=300)
            got = ray.get(rank.grpo.remote(trajs, advantages, len(trajs), terms, 1.6), timeout=300)
            assert got["steps"] == 1, "one optimiser step per mini-batch"
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
            _assert_grads_close(got["grads"], want["grads"])
            # every chunk and term sample is forwarded once, never more than `chunks` at a time
            assert sum(got["forward_sizes"]) == 12 + 3
            assert max(got["forward_sizes"]) == min(chunks, 12)
            assert len(got["forward_sizes"]) <= -(-15 // chunks) + 1  # a micro-batch may hold GRPO chunks and term samples
            assert got["attn_calls"] == len(got["forward_sizes"]), "no recompute without gradient_checkpointing"
    finally:
        ray.kill(rank)


def test_recomputed_old_logprobs_are_bounded_and_are_the_current_policys(ray_cluster, tiny_policy_dir, tmp_path):
    trajs = _trajs([3, 1, 4])
    [rank] = _ranks(1)
    try:
        results = {}
        for chunks in (1000, 2):
            ray.get(rank.build.remote(_cfg(tmp_path, f"learner.micro_batch_chunks={chunks}"), tiny_policy_dir), timeout=300)
            results[chunks] = ray.get(rank.recompute.remote(trajs, 1.6), timeout=300)
        # as old log-probs of the same weights: every ratio is 1 (learner.recompute_old_logprobs)
        step = ray.get(rank.grpo.remote(trajs, np.array([1.0, -1.0, 0.5], dtype=np.float32), 3, [], 1.6,
                                        results[2][0]), timeout=300)
    finally:
        ray.kill(rank)
    assert step["extra"]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert step["extra"]["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert step["extra"]["clip_fraction"] == 0.0
    (small, small_sizes), (whole, whole_sizes) = results[2], results[1000]
    assert small_sizes == [2, 2, 2, 2] and whole_sizes == [8]
    for a, b, t in zip(small, whole, trajs):
        assert a.shape == t.tokens.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_two_ranks_with_unequal_episode_lengths_take_the_one_rank_step(ray_cluster, tiny_policy_dir, tmp_path):
    """Rank 0 gets 11 chunks, rank 1 gets 2: ZeRO-2 reduces inside every backward, so rank 1 must
    run as many backwards as rank 0 (smaller ones, and one at weight 0) or both ranks hang."""
    trajs = _trajs([6, 1, 5, 1])
    advantages = np.array([1.0, -0.5, 0.8, -1.3], dtype=np.float32)
    terms = [_term(4)]
    cfg = _cfg(tmp_path, "learner.micro_batch_chunks=3", "learner.lr=0.001")

    [one] = _ranks(1)
    try:
        ray.get(one.build.remote(cfg, tiny_policy_dir), timeout=300)
        single = ray.get(one.grpo.remote(trajs, advantages, 4, terms, 1.6), timeout=300)
    finally:
        ray.kill(one)

    cfg2 = _cfg(tmp_path, "learner.micro_batch_chunks=3", "learner.lr=0.001", "cluster.learner_world_size=2")
    ranks = _ranks(2)
    try:
        ray.get([r.build.remote(cfg2, tiny_policy_dir) for r in ranks], timeout=300)
        # each rank draws its own term samples: here the halves of the one rank's
        halves = [TermBatch("demo_bc", 0.5, terms[0].images[r::2], terms[0].instructions[r::2], terms[0].tokens[r::2], None)
                  for r in range(2)]
        out = ray.get([ranks[r].grpo.remote(trajs[r::2], advantages[r::2], 4, [halves[r]], 1.6) for r in range(2)],
                      timeout=180)  # a rank left waiting in a collective would time out here
    finally:
        for r in ranks:
            ray.kill(r)

    # rank 0: 11 chunks + 2 term samples in 5 micro-batches of <= 3; rank 1: 2 + 2 in 4 of 1 and one at weight 0
    assert [o["forward_sizes"] for o in out] == [[3, 3, 3, 2, 2], [1, 1, 1, 1, 1]]
    assert np.mean([o["loss"] for o in out]) == pytest.approx(single["loss"], rel=1e-5)
    for o in out:
        assert o["steps"] == 1
        assert o["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)
        _assert_grads_close(o["grads"], single["grads"])
        for name, w in single["weights"].items():
            np.testing.assert_allclose(o["weights"][name].numpy(), w.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


def test_gradient_checkpointing_recomputes_blocks_for_the_same_gradient(ray_cluster, tiny_policy_dir, tmp_path):
    trajs = _trajs([2, 3])
    advantages = np.array([1.0, -1.0], dtype=np.float32)
    [rank] = _ranks(1)
    try:
        cfg = _cfg(tmp_path, "learner.micro_batch_chunks=2")
        want = ray.get(rank.reference.remote(cfg, tiny_policy_dir, trajs, advantages, [], 1.6), timeout=300)
        ray.get(rank.build.remote(_cfg(tmp_path, "learner.micro_batch_chunks=2", "learner.gradient_checkpointing=true"),
                                  tiny_policy_dir), timeout=300)
        got = ray.get(rank.grpo.remote(trajs, advantages, 2, [], 1.6), timeout=300)
    finally:
        ray.kill(rank)
    assert got["attn_calls"] == 2 * len(got["forward_sizes"]) == 2 * 3, "each block recomputed in the backward"
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    _assert_grads_close(got["grads"], want["grads"])
