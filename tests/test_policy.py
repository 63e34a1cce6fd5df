"""The tiny OpenVLA-OFT-style policy: parallel decoding, sampling, log-probs, save/load."""


import numpy as np
import pytest
import torch

from common.records import Observation
from policy.checkpoint import build_policy, load_policy, save_policy
from policy.sampling import tempered_log_probs


def _obs(n, seed=0, instruction="put the red block in the bowl"):
    rng = np.random.default_rng(seed)
    return [Observation(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), instruction) for _ in range(n)]


def test_tiny_policy_has_a_few_million_parameters(tiny_policy):
    n = sum(p.numel() for p in tiny_policy.model.parameters())
    assert 1e6 < n < 20e6


def test_one_forward_pass_gives_every_action_logit(tiny_policy):
    obs = _obs(3)
    logits = tiny_policy.action_logits([o.image for o in obs], [o.instruction for o in obs])
    assert logits.shape == (3, 56, 256)


def test_sampled_tokens_always_lie_in_the_action_range(tiny_policy):
    gen = torch.Generator().manual_seed(0)
    for chunk in tiny_policy.act(_obs(8), temperature=5.0, generator=gen):
        assert chunk.tokens.shape == (8, 7)
        assert chunk.tokens.min() >= 31744 and chunk.tokens.max() <= 31999
        assert np.isfinite(chunk.actions).all()


def test_greedy_decoding_is_deterministic(tiny_policy):
    a = tiny_policy.act(_obs(4), greedy=True)
    b = tiny_policy.act(_obs(4), greedy=True)
    for x, y in zip(a, b):
        assert np.array_equal(x.tokens, y.tokens)


def test_sampled_log_probs_match_a_direct_log_softmax(tiny_policy):
    obs = _obs(4, seed=3)
    chunks = tiny_policy.act(obs, temperature=1.6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = tiny_policy.action_logits([o.image for o in obs], [o.instruction for o in obs])
    direct = torch.log_softmax(logits / 1.6, dim=-1)
    idx = torch.tensor(np.stack([c.tokens.reshape(-1) for c in chunks])) - 31744
    expected = direct.gather(-1, idx[..., None])[..., 0].numpy()
    np.testing.assert_allclose(np.stack([c.logprobs.reshape(-1) for c in chunks]), expected, atol=1e-5)
    lp, ent = tiny_policy.token_log_probs([o.image for o in obs], [o.instruction for o in obs], idx + 31744, 1.6)
    np.testing.assert_allclose(lp.detach().numpy(), expected, atol=1e-5)
    assert (ent > 0).all() and (ent <= np.log(256) + 1e-4).all()


def test_temperature_sampling_follows_the_tempered_distribution():
    logits = torch.tensor([[[2.0, 0.0, -1.0] + [-30.0] * 253]])
    from policy.sampling import choose_actions

    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(256)
    for _ in range(3000):
        idx, _ = choose_actions(logits, 1.6, greedy=False, generator=gen)
        counts[idx[0, 0]] += 1
    expected = tempered_log_probs(logits, 1.6).exp()[0, 0]
    assert torch.allclose(counts[:3] / 3000, expected[:3], atol=0.03)


def test_save_then_load_gives_identical_logits(tiny_policy, tmp_path):
    obs = _obs(2)
    folder = save_policy(tiny_policy, tmp_path / "ckpt")
    assert {"config.json", "model.safetensors", "dataset_statistics.json", "preprocessor_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    loaded = load_policy(folder)
    with torch.no_grad():
        a = tiny_policy.action_logits([o.image for o in obs], [o.instruction for o in obs])
        b = loaded.action_logits([o.image for o in obs], [o.instruction for o in obs])
    assert torch.equal(a, b)
    assert loaded.prompts.ids("pick it") == tiny_policy.prompts.ids("pick it")


def test_loading_a_folder_without_weights_or_config_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="local disk"):
        load_policy(tmp_path)


@pytest.mark.parametrize("cut", ["header", "data"])
def test_a_truncated_weights_file_is_named(tiny_policy, tmp_path, cut):
    from common.files import UnreadableFile

    folder = save_policy(tiny_policy, tmp_path / "ckpt")
    victim = folder / "model.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[:100] if cut == "header" else data[: len(data) // 2])
    with pytest.raises(UnreadableFile, match=rf"policy weights file {victim} is unreadable"):
        load_policy(folder)


def test_attention_is_bidirectional_over_the_action_chunk(tiny_config):
    """OFT reads action logits with bidirectional attention: the logits at the last prompt token
    depend on what FOLLOWS it (the stop token). With the causal ablation they do not."""
    obs = _obs(1)
    args = ([o.image for o in obs], [o.instruction for o in obs])
    for attention, should_change in (("bidirectional", True), ("causal", False)):
        pol = build_policy(tiny_config.policy.model_copy(update={"attention": attention}), seed=0)
        with torch.no_grad():
            inputs = pol.model_inputs(*args)
            a = pol.model.action_logits(*inputs, stop_token_id=2)[0, 0]
            b = pol.model.action_logits(*inputs, stop_token_id=3)[0, 0]
        assert (not torch.allclose(a, b)) == should_change, attention


def test_padding_does_not_change_a_samples_logits(tiny_policy):
    """Prompts of different lengths share a batch; each row must equal its unbatched result."""
    short, long = _obs(1, instruction="push it")[0], _obs(1, instruction="put the red block in the bowl and then the blue one")[0]
    with torch.no_grad():
        batched = tiny_policy.action_logits([short.image, long.image], [short.instruction, long.instruction])
        alone = tiny_policy.action_logits([short.image], [short.instruction])
    torch.testing.assert_close(batched[0], alone[0], atol=1e-4, rtol=1e-4)


def test_prompt_follows_openvla_format(tiny_policy):
    ids = tiny_policy.prompts.ids("Pick up the Bowl")
    text = tiny_policy.tokenizer.decode(ids[1:-1])
    assert ids[0] == tiny_policy.tokenizer.bos_token_id
    assert ids[-1] == 29871  # OpenVLA's literal prompt end (Llama-2's "▁"), whatever the vocabulary
    assert text.startswith("In: What action should the robot take to pick up the bowl?") and text.endswith("Out:")


def test_fused_two_tower_backbone_stacks_six_channels(tiny_config):
    pol = build_policy(tiny_config.policy.model_copy(update={"vision_backbone": "dinosiglip"}), seed=0)
    pixels, ids, lengths = pol.model_inputs([o.image for o in _obs(2)], ["a", "b"])
    assert pixels.shape[1] == 6
    assert pol.model.projector.fused and hasattr(pol.model.projector, "fc3")
    assert pol.model.action_logits(pixels, ids, lengths).shape == (2, 56, 256)


def test_proprio_token_is_read_when_enabled(tiny_config, tmp_path):
    pol = build_policy(tiny_config.policy.model_copy(update={"use_proprio": True}), seed=0)
    obs = _obs(2)
    images, instructions = [o.image for o in obs], [o.instruction for o in obs]
    with pytest.raises(ValueError, match="proprio"):
        pol.action_logits(images, instructions)
    p0, p1 = np.zeros((2, 8), np.float32), np.full((2, 8), 0.5, np.float32)
    with torch.no_grad():
        a, b = pol.action_logits(images, instructions, p0), pol.action_logits(images, instructions, p1)
        assert not torch.allclose(a, b)
        loaded = load_policy(save_policy(pol, tmp_path / "p"))
        assert torch.equal(loaded.action_logits(images, instructions, p1), b)
    chunks = pol.act([Observation(o.image, o.instruction, p) for o, p in zip(obs, p1)], greedy=True)
    assert len(chunks) == 2 and chunks[0].tokens.shape == (8, 7)


def test_a_split_action_head_trains_the_same_and_saves_the_hf_layout(tiny_policy):
    """The learner trains the head's 256 action rows as their own parameter (the other rows are
    never read): AdamW steps give the same weights as on the whole head, and state_dict() /
    load_state_dict() keep the HF layout (no extra key; the rows live in lm_head.weight)."""
    import copy

    obs = _obs(4)
    images, instructions = [o.image for o in obs], [o.instruction for o in obs]
    target = torch.randint(0, 256, (4, 56))
    models = [copy.deepcopy(tiny_policy.model) for _ in range(2)]
    models[1].split_action_head()
    head = models[1].language_model.lm_head.weight
    assert not head.requires_grad and models[1].action_head.shape == (256, head.shape[1])
    assert sum(p.numel() for p in models[1].parameters() if p.requires_grad) < \
        sum(p.numel() for p in models[0].parameters() if p.requires_grad) - head.shape[0] * head.shape[1] + 300 * head.shape[1]
    for model in models:
        # weight decay 0 (the learner's default): with decay, only the whole head's never-read rows would shrink
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        inputs = tiny_policy.model_inputs(images, instructions)
        for _ in range(3):
            logits = model.action_logits(*inputs)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), target.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    whole, split = models[0].state_dict(), models[1].state_dict()
    assert whole.keys() == split.keys()
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(whole["language_model.lm_head.weight"], tiny_policy.model.state_dict()["language_model.lm_head.weight"])

    fresh = copy.deepcopy(tiny_policy.model)
    fresh.split_action_head()
    fresh.load_state_dict(whole)  # the HF layout loads into a split head
    with torch.no_grad():
        torch.testing.assert_close(fresh.action_logits(*inputs), models[0].action_logits(*inputs))


@pytest.mark.parametrize("backbone", ["siglip", "dinosiglip"])
def test_upscaled_policy_reads_a_nearest_upscaled_image_as_the_original_reads_the_small_one(tiny_config, tmp_path, backbone):
    from policy.checkpoint import upscale_images

    pol = build_policy(tiny_config.policy.model_copy(update={"vision_backbone": backbone}), seed=0)
    big = upscale_images(pol, 2)
    arch, big_arch = pol.model.config, big.model.config
    assert (big_arch.image_size, big_arch.patch_size) == (2 * arch.image_size, 2 * arch.patch_size)
    assert big_arch.num_patches == arch.num_patches and big.image_processor.image_size == 2 * arch.image_size
    obs = _obs(2)
    small_images = [o.image for o in obs]
    big_images = [im.repeat(2, axis=0).repeat(2, axis=1) for im in small_images]
    with torch.no_grad():
        a = pol.action_logits(small_images, [o.instruction for o in obs])
        b = big.action_logits(big_images, [o.instruction for o in obs])
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        # saved and loaded, it keeps its 2x images and gives the same logits
        again = load_policy(save_policy(big, tmp_path / "big"))
        torch.testing.assert_close(again.action_logits(big_images, [o.instruction for o in obs]), b)
    assert upscale_images(pol, 1) is pol
    with pytest.raises(ValueError, match="positive integer"):
        upscale_images(pol, 0)
