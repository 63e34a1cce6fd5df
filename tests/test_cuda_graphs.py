"""policy.cuda_graphs on the CPU: the bucket padding that the graphs replay gives every real row the
plain forward's logits and actions, the learner's forwards stay eager, and the config refuses graphs
for CPU replicas. The capture itself runs on the GPU box (scripts/bench_inference.py --cuda-graphs
reports the graphed logits' distance from the eager ones)."""

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.records import Observation
from policy.cuda_graphs import GraphedActionLogits, buckets, pad_rows

INSTRUCTIONS = ["put the red block in the bowl", "push the cube", "stack the green block on the red block"]


def test_buckets_waste_at_most_a_third_of_a_batch():
    assert buckets(64) == [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64]
    assert buckets(20) == [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20]
    assert buckets(1) == [1]
    graphed = GraphedActionLogits(torch.nn.Linear(1, 1), 64, capture=False)
    assert [graphed.bucket(n) for n in (1, 5, 9, 33, 64, 65)] == [1, 5, 12, 40, 64, None]
    assert all((graphed.bucket(n) - n) / graphed.bucket(n) <= 1 / 3 for n in range(1, 65))


def test_pad_rows_repeats_the_first_row():
    x = torch.arange(6).reshape(3, 2)
    assert pad_rows(x, 5).tolist() == [[0, 1], [2, 3], [4, 5], [0, 1], [0, 1]]
    assert pad_rows(torch.tensor([7, 8]), 4).tolist() == [7, 8, 7, 7]
    assert pad_rows(None, 4) is None and pad_rows(x, 3) is x


def _observations(n: int, seed: int = 0) -> list[Observation]:
    rng = np.random.default_rng(seed)
    return [Observation(image=rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), instruction=INSTRUCTIONS[i % 3])
            for i in range(n)]


@pytest.mark.parametrize("rows", [3, 9, 13])
def test_bucket_padded_forward_gives_each_row_the_plain_logits_and_actions(tiny_policy, rows):
    """3 rows are a bucket of their own, 9 pad to 12 and 13 to 16 (mixed prompt lengths: the masked
    path); the real rows' logits equal the unpadded batch's to float32 rounding, and greedy actions
    are identical."""
    obs = _observations(rows)
    images, texts = [o.image for o in obs], [o.instruction for o in obs]
    with torch.no_grad():
        plain = tiny_policy.action_logits(images, texts)
        want = tiny_policy.act(obs, greedy=True)
        tiny_policy.graphed = GraphedActionLogits(tiny_policy.model, 16, capture=False)
        try:
            got = tiny_policy.action_logits(images, texts)
            acts = tiny_policy.act(obs, greedy=True)
        finally:
            tiny_policy.graphed = None
    assert got.shape == plain.shape == (rows, 56, 256)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(acts, want):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.actions, b.actions)


def test_forwards_with_autograd_stay_eager(tiny_policy):
    """The learner's log-prob forwards never go through the graphs (a replay keeps no autograd graph)."""
    calls = []

    class Counting(GraphedActionLogits):
        def __call__(self, *args, **kwargs):
            calls.append(torch.is_grad_enabled())
            return super().__call__(*args, **kwargs)

    obs = _observations(2)
    tiny_policy.graphed = Counting(tiny_policy.model, 8, capture=False)
    try:
        ids = torch.full((2, 56), tiny_policy.action_tokenizer.first_id, dtype=torch.long)
        logp, _ = tiny_policy.token_log_probs([o.image for o in obs], [o.instruction for o in obs], ids, 1.6)
        assert logp.requires_grad and calls == []
        with torch.no_grad():
            tiny_policy.act(obs)
        assert calls == [False]
    finally:
        tiny_policy.graphed = None


def test_graphs_need_gpu_replicas():
    with pytest.raises(ValueError, match=r"policy.cuda_graphs needs GPU replicas: set cluster.replica_gpus"):
        RunConfig.model_validate({"policy": {"cuda_graphs": True}, "cluster": {"replica_gpus": 0}})
    RunConfig.model_validate({"policy": {"cuda_graphs": True}, "cluster": {"replica_gpus": 0.5}})


def test_a_policy_off_the_gpu_stays_eager(tiny_policy):
    """use_cuda_graphs decides by the policy's device: a CPU replica or HTTP server asked for graphs runs eager."""
    tiny_policy.use_cuda_graphs(8)
    assert tiny_policy.graphed is None
