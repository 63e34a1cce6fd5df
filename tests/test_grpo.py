"""Tests for learner/grpo.py: hand-computed advantages, clip-higher, masking, aggregation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from learner.grpo import group_advantages, grpo_chunk_loss, grpo_loss, keep_group, sft_loss, token_mask
from policy.sampling import chosen_log_probs


def _single_token_loss(ratio: float, adv: float):
    """Loss and d loss / d logp for one token with the given ratio and advantage."""
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    old = torch.zeros(1, 1)
    loss, stats = grpo_loss(logp, old, torch.tensor([adv]), torch.ones(1, 1))
    loss.backward()
    return loss.item(), logp.grad.item(), stats


# ---------------------------------------------------------------- advantages


def test_group_advantages_hand_computed_one_of_four():
    # mean .25, deviations [.75, -.25, -.25, -.25], unbiased var (.5625 + 3 * .0625) / 3 = .25 -> std .5
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0, 0, 0, 0]))
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6)  # ~[1.5, -.5, -.5, -.5]
    torch.testing.assert_close(adv, expected)
    assert adv[0].item() == pytest.approx(1.5, abs=1e-5)


def test_group_advantages_interleaved_groups_with_arbitrary_labels():
    # group 7: rewards [1, 0, 1] -> mean 2/3, var (1/9 + 4/9 + 1/9) / 2 = 1/3
    # group 3: rewards [1, 0, 0] -> mean 1/3, same var
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    groups = torch.tensor([7, 3, 7, 3, 7, 3])
    std = math.sqrt(1 / 3) + 1e-6
    expected = torch.tensor([1 / 3, 2 / 3, -2 / 3, -1 / 3, 1 / 3, -1 / 3]) / std
    torch.testing.assert_close(group_advantages(rewards, groups), expected)


def test_group_advantages_one_success_of_eight_uses_unbiased_std():
    # mean 1/8, unbiased var (49/64 + 7 * 1/64) / 7 = 1/8 (the biased one would be 7/64)
    rewards = torch.tensor([1.0] + [0.0] * 7)
    adv = group_advantages(rewards, torch.zeros(8, dtype=torch.long))
    std = math.sqrt(1 / 8) + 1e-6
    assert adv[0].item() == pytest.approx((7 / 8) / std, rel=1e-5)
    assert adv[1].item() == pytest.approx((-1 / 8) / std, rel=1e-5)
    assert adv.sum().item() == pytest.approx(0.0, abs=1e-5)


def test_group_advantages_equal_and_singleton_groups_are_exactly_zero():
    # all-1, all-0, size 1, and a constant non-binary group whose float32 mean (8 * 0.3 / 8) is
    # off by ~3e-8: dividing that rounding error by (std ~3e-8) + 1e-6 would give ~0.03, not 0
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0] + [0.3] * 8)
    groups = torch.tensor([0, 0, 0, 1, 1, 2] + [3] * 8)
    adv = group_advantages(rewards, groups)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv, torch.zeros(14))


def test_equal_reward_group_gives_zero_gradient():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, torch.zeros(4, dtype=torch.long))
    logp = (torch.randn(4, 5) * 0.3).requires_grad_()
    loss, _ = grpo_loss(logp, torch.randn(4, 5) * 0.3, adv, torch.ones(4, 5))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logp.grad, torch.zeros(4, 5))


# ---------------------------------------------------------------- loss


def test_ratio_one_loss_is_minus_mean_advantage_with_masks():
    torch.manual_seed(0)
    b, l = 5, 12
    logp = torch.randn(b, l)
    adv = torch.tensor([1.5, -0.5, 2.0, -3.0, 0.25])
    mask = (torch.rand(b, l) > 0.4).float()
    mask[:, 0] = 1.0  # every trajectory has a valid token
    loss, stats = grpo_loss(logp, logp.clone(), adv, mask)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-7)
    assert stats["clip_fraction"] == 0.0
    assert stats["adv_mean"] == pytest.approx(adv.mean().item())


@pytest.mark.parametrize("ratio", [0.5, 0.79, 0.9, 1.0, 1.1, 1.27])
def test_clip_higher_positive_advantage_unclipped_below_1_28(ratio):
    # A > 0: loss = max(-r, -clip(r)); below 1 + 0.28 (even below 0.8) the unclipped branch wins
    loss, grad, stats = _single_token_loss(ratio, adv=1.0)
    assert loss == pytest.approx(-ratio, rel=1e-5)
    assert grad == pytest.approx(-ratio, rel=1e-5)  # d(-r)/dlogp = -r
    assert stats["clip_fraction"] == 0.0


@pytest.mark.parametrize("ratio", [1.29, 1.5, 3.0])
def test_clip_higher_positive_advantage_clipped_above_1_28(ratio):
    loss, grad, stats = _single_token_loss(ratio, adv=1.0)
    assert grad == 0.0
    assert loss == pytest.approx(-1.28, rel=1e-6)  # the objective stops growing past 1.28
    assert stats["clip_fraction"] == 1.0


@pytest.mark.parametrize("ratio,clipped", [(0.5, True), (0.79, True), (0.81, False), (1.0, False), (1.5, False), (3.0, False)])
def test_clip_negative_advantage_clips_below_0_8(ratio, clipped):
    # A < 0: loss = max(r, clip(r)); below 1 - 0.2 it is flat at 0.8, above 1.28 it keeps growing
    loss, grad, stats = _single_token_loss(ratio, adv=-1.0)
    if clipped:
        assert grad == 0.0
        assert loss == pytest.approx(0.8, rel=1e-6)
        assert stats["clip_fraction"] == 1.0
    else:
        assert grad == pytest.approx(ratio, rel=1e-5)
        assert loss == pytest.approx(ratio, rel=1e-5)
        assert stats["clip_fraction"] == 0.0


def test_clip_bounds_are_configurable():
    logp = torch.tensor([[math.log(1.2)]], requires_grad=True)
    loss, _ = grpo_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), clip_high=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(-1.1, rel=1e-6)
    assert logp.grad.item() == 0.0


def test_masked_tokens_have_zero_gradient_and_do_not_change_loss():
    torch.manual_seed(1)
    b, l = 3, 8
    logp = torch.randn(b, l) * 0.2
    old = logp + torch.randn(b, l) * 0.05  # ratios inside the clip range: every valid token has a gradient
    adv = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.ones(b, l)
    mask[:, 5:] = 0
    mask[1, 2] = 0
    x = logp.clone().requires_grad_()
    loss, stats = grpo_loss(x, old, adv, mask)
    loss.backward()
    assert torch.equal(x.grad[mask == 0], torch.zeros(int((mask == 0).sum())))
    assert (x.grad[mask == 1] != 0).all()
    # garbage (huge, -inf) in masked positions changes neither the loss nor the gradients
    logp2, old2 = logp.clone(), old.clone()
    logp2[mask == 0] = 40.0
    old2[mask == 0] = -float("inf")
    y = logp2.requires_grad_()
    loss2, stats2 = grpo_loss(y, old2, adv, mask)
    loss2.backward()
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-7)
    torch.testing.assert_close(y.grad, x.grad)
    assert stats2 == pytest.approx(stats)


def test_token_mean_per_trajectory_then_mean_over_trajectories():
    # traj 0: 1 valid token, ratio 1.1, A = +1  -> token-mean -1.1
    # traj 1: 4 valid tokens, ratio 1.0, A = -1 -> token-mean +1.0
    # traj 2: no valid tokens, A = +5           -> contributes 0, still counts in the mean
    # loss = (-1.1 + 1.0 + 0) / 3; a global token mean would be (-1.1 + 4) / 5 = 0.58
    logp = torch.zeros(3, 4)
    logp[0, 0] = math.log(1.1)
    mask = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    loss, _ = grpo_loss(logp, torch.zeros(3, 4), torch.tensor([1.0, -1.0, 5.0]), mask)
    assert loss.item() == pytest.approx((-1.1 + 1.0) / 3, rel=1e-5)


def test_chunk_loss_summed_over_any_micro_batches_is_the_trajectory_loss():
    """The learner's micro-batches hold chunks of A tokens, not trajectories: weighting each chunk by
    1 / (its trajectory's valid tokens x B) makes their sum grpo_loss, in value and gradient."""
    torch.manual_seed(2)
    b, t, a = 4, 3, 5  # [B, T, A]: 12 chunks
    logp = torch.randn(b, t * a) * 0.3
    old = logp + torch.randn(b, t * a) * 0.3  # ratios spread over both clip regions
    adv = torch.randn(b)
    mask = (torch.rand(b, t * a) > 0.3).float()
    mask[2] = 0  # one trajectory without valid tokens: weight irrelevant, still counted in B
    full_x = logp.clone().requires_grad_()
    full, full_stats = grpo_loss(full_x, old, adv, mask)
    full.backward()
    chunk_x = logp.clone().requires_grad_()
    rows = lambda x: x.reshape(b * t, a)  # noqa: E731  chunk c of trajectory i is row i * t + c
    weight = (1.0 / (mask.sum(-1).clamp(min=1) * b)).repeat_interleave(t)  # [B * T]
    total, sums = 0.0, {}
    for part in (slice(0, 1), slice(1, 6), slice(6, 12)):  # uneven split, across trajectory boundaries
        loss, s = grpo_chunk_loss(rows(chunk_x)[part], rows(old)[part], adv.repeat_interleave(t)[part],
                                  rows(mask)[part], weight[part])
        loss.backward()
        total += loss.item()
        sums = {k: sums.get(k, 0.0) + v for k, v in s.items()}
    assert total == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(chunk_x.grad, full_x.grad)
    for k in ("clip_fraction", "ratio_mean", "approx_kl"):
        assert sums[k] / sums["tokens"] == pytest.approx(full_stats[k], rel=1e-5)


def test_loss_stats_hand_values():
    # two valid tokens with ratios 2 and 0.5 (A = +1): the 2 is clipped, the .5 is not
    logp = torch.tensor([[math.log(2.0), math.log(0.5), 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = grpo_loss(logp, torch.zeros(1, 3), torch.tensor([1.0]), mask)
    assert loss.item() == pytest.approx((-1.28 - 0.5) / 2, rel=1e-6)
    assert stats["clip_fraction"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx(1.25, rel=1e-6)
    kl = ((2 - 1) - math.log(2) + (0.5 - 1) - math.log(0.5)) / 2
    assert stats["approx_kl"] == pytest.approx(kl, rel=1e-5)
    assert all(isinstance(v, float) for v in stats.values())


# ---------------------------------------------------------------- masks and padding


def test_token_mask_matches_tokens_flattening():
    torch.manual_seed(3)
    b, t, chunk, dims = 2, 3, 4, 7
    tokens = torch.arange(b * t * chunk * dims).reshape(b, t, chunk, dims)
    executed = torch.rand(b, t, chunk) > 0.5
    mask = token_mask(executed, dims)
    assert mask.shape == (b, t * chunk * dims) and mask.dtype == torch.float32
    flat = tokens.reshape(b, -1)
    for i in range(b):
        assert torch.equal(flat[i][mask[i].bool()], tokens[i][executed[i]].reshape(-1))
    # episode ended mid-chunk: only the first 3 actions of the last chunk were stepped
    ex = torch.ones(1, 2, 4, dtype=torch.bool)
    ex[0, 1, 3:] = False
    m = token_mask(ex, dims)
    assert m.sum().item() == (4 + 3) * dims
    assert torch.equal(m[0, : 7 * dims], torch.ones(7 * dims))
    assert torch.equal(m[0, 7 * dims :], torch.zeros(dims))


def test_padded_batch_end_to_end_ratio_one():
    # varying T padded as the engine pads (pad_sequence) -> token_mask -> grpo_loss, logp == old: loss = -mean(A)
    dims, chunk = 2, 3
    lps = [torch.from_numpy(np.random.default_rng(t).normal(size=(t * chunk * dims,)).astype(np.float32)) for t in (1, 3)]
    exe = [torch.ones((t, chunk), dtype=torch.bool) for t in (1, 3)]
    flat_old = pad_sequence(lps, batch_first=True, padding_value=float("nan"))
    mask = token_mask(pad_sequence(exe, batch_first=True), dims)
    assert mask.sum(-1).tolist() == [chunk * dims, 3 * chunk * dims]
    logp = flat_old.clone().requires_grad_()
    adv = torch.tensor([2.0, -1.0])
    loss, _ = grpo_loss(logp, flat_old, adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-0.5)
    assert torch.isfinite(logp.grad).all()


# ---------------------------------------------------------------- dynamic sampling


def test_keep_group_bounds_inclusive():
    assert not keep_group(0 / 8)
    assert keep_group(1 / 8)
    assert keep_group(7 / 8)
    assert not keep_group(8 / 8)
    assert keep_group(0.1) and keep_group(0.9)  # inclusive
    assert not keep_group(0.0999) and not keep_group(0.9001)
    assert keep_group(0.0, low=0.0, high=1.0)


# ---------------------------------------------------------------- entropy and SFT


def test_entropy_under_the_sampling_temperature():
    entropy = lambda logits, t: chosen_log_probs(logits, torch.zeros(logits.shape[:-1], dtype=torch.long), t)[1]  # noqa: E731
    assert entropy(torch.zeros(3, 256), 1.6) == pytest.approx(torch.full((3,), math.log(256)))
    torch.manual_seed(4)
    logits = torch.randn(4, 5, 256) * 3
    h1 = entropy(logits, 1.0)
    h16 = entropy(logits, 1.6)
    assert h1.shape == (4, 5)
    assert (h16 > h1).all() and (h16 <= math.log(256) + 1e-5).all()
    p = F.softmax(logits / 1.6, -1)
    torch.testing.assert_close(h16, -(p * p.log()).sum(-1))
    peaked = torch.full((1, 256), -1e4)
    peaked[0, 3] = 0.0
    assert entropy(peaked, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_sft_loss_matches_cross_entropy():
    torch.manual_seed(5)
    logits = torch.randn(2, 6, 256, requires_grad=True)
    target = torch.randint(0, 256, (2, 6))
    full = sft_loss(logits, target, torch.ones(2, 6))
    torch.testing.assert_close(full, F.cross_entropy(logits.reshape(-1, 256), target.reshape(-1)))
    mask = torch.ones(2, 6)
    mask[1, 3:] = 0
    target_padded = target.clone()
    target_padded[mask == 0] = -100  # masked targets may hold any value
    masked = sft_loss(logits, target_padded, mask)
    keep = mask.bool()
    torch.testing.assert_close(masked, F.cross_entropy(logits[keep], target[keep]))
    masked.backward()
    assert torch.equal(logits.grad[~keep], torch.zeros(3, 256))
