"""The policy at real size without a real checkpoint, and weights that go straight to their device:
models are built on the meta device, then random-initialised in place or filled file by file
(policy/weights.py)."""

import json
import resource
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from common.config_loading import load_config
from common.records import Observation
from policy.checkpoint import arch_from_config, build_policy, load_policy, save_policy
from policy.modeling import OpenVLAOFTPolicy
from tests.conftest import ROOT


def _obs(n, size=64):
    rng = np.random.default_rng(0)
    return [Observation(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), f"put {'the ' * i}bowl away") for i in range(n)]


def test_oft7b_config_builds_on_the_meta_device_at_the_published_size():
    """configs/oft7b.yaml is OpenVLA-OFT-7B's shape. openvla-7b holds 7,541,237,184 weights; ours has
    2 x 1024 more (transformers' DINOv2 keeps a mask token and a CLS position slot, unused at
    inference; tests/test_openvla_checkpoint.py checks this against the real shapes). Built on meta
    it takes no memory: a real build would need 15 GB in bf16, and float32 would not fit here."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    cfg = load_config(ROOT / "configs/oft7b.yaml", ["policy.device=meta"]).policy
    policy = build_policy(cfg)
    params = list(policy.model.parameters())
    assert sum(p.numel() for p in params) == 7_541_237_184 + 2 * 1024
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in params)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20 < 1.0  # GiB
    text = policy.model.language_model.config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size) == (4096, 32, 32, 11008)
    assert policy.model.language_model.lm_head.weight.shape == (32064, 4096)
    dino, siglip = policy.model.vision_backbone.featurizer.config, policy.model.vision_backbone.fused_featurizer.config
    assert (dino.hidden_size, dino.num_hidden_layers, dino.num_attention_heads, dino.num_register_tokens) == (1024, 24, 16, 4)
    assert (siglip.hidden_size, siglip.num_hidden_layers, siglip.num_attention_heads, siglip.intermediate_size) == (1152, 27, 16, 4304)
    assert policy.model.projector.fc1.weight.shape == (4 * 2176, 2176) and cfg.action_chunk * cfg.action_dims == 56


def test_fused_vision_is_only_for_two_towers():
    with pytest.raises(Exception, match="fused_vision sizes a second tower"):
        load_config(ROOT / "configs/tiny.yaml", ["policy.fused_vision.hidden_size=96"])


def test_meta_built_policy_is_initialised_in_bf16_on_the_cpu_like_an_eager_build(tiny_config):
    """The same path as the 7B one at tiny size: built on meta, storage allocated in bf16 on the CPU,
    every parameter drawn by the model's own init. Each parameter has the eager build's
    distribution: constants (norms, biases) equal, random ones the same spread; a skipped init would
    leave uninitialised memory."""
    cfg = tiny_config.policy.model_copy(update={"vision_backbone": "dinosiglip", "use_proprio": True, "dtype": "bfloat16"})
    policy = build_policy(cfg, seed=3)
    torch.manual_seed(3)
    eager = dict(OpenVLAOFTPolicy(arch_from_config(cfg)).named_parameters())
    for name, p in policy.model.named_parameters():
        assert p.dtype == torch.bfloat16 and p.device.type == "cpu", name
        want = eager[name].detach()
        if want.numel() < 2 or want.std() == 0:
            assert torch.equal(p.float(), want), name
        elif want.numel() >= 256:
            assert 0.8 < p.float().std() / want.std() < 1.25, name
            assert abs(p.float().mean() - want.mean()) < 0.2 * want.std() + 1e-3, name
    again = build_policy(cfg, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(policy.model.state_dict().values(), again.model.state_dict().values()))
    rotary = policy.model.language_model.model.rotary_emb
    assert not rotary.inv_freq.is_meta and torch.isfinite(rotary.inv_freq).all()

    obs = _obs(3)
    proprio = [np.zeros(8, np.float32)] * 3
    with torch.no_grad():
        logits = policy.action_logits([o.image for o in obs], [o.instruction for o in obs], proprio)
    assert logits.dtype == torch.bfloat16 and logits.shape == (3, 56, 256) and torch.isfinite(logits).all()


def _split_into_shards(folder, out, with_index: bool):
    """The folder with its weights in two safetensors files, as save_pretrained shards a large model."""
    shutil.copytree(folder, out)
    state = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    names = sorted(state)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in parts.items():
        save_file({k: state[k] for k in keys}, str(out / file), metadata={"format": "pt"})
    if with_index:
        index = {"metadata": {}, "weight_map": {k: file for file, keys in parts.items() for k in keys}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out, state


@pytest.mark.parametrize("with_index", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_sharded_folder_loads_file_by_file_to_the_same_weights(tiny_policy, tmp_path, with_index, dtype):
    """Loading file by file into a meta-built model gives exactly what loading the one file whole and
    casting gives (the former path), parameter for parameter, and the same actions."""
    single = save_policy(tiny_policy, tmp_path / "single")
    sharded, state = _split_into_shards(single, tmp_path / "sharded", with_index)
    a, b = load_policy(single, dtype=dtype), load_policy(sharded, dtype=dtype)
    want = {k: v.to(torch.float32 if dtype == "float32" else torch.bfloat16) for k, v in state.items()}
    for loaded in (a, b):
        got = loaded.model.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert not any(t.is_meta for t in [*loaded.model.parameters(), *loaded.model.buffers()])
    obs = _obs(2)
    assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(a.act(obs, greedy=True), b.act(obs, greedy=True)))


def test_a_folder_that_does_not_match_the_policy_is_named_before_loading(tiny_policy, tmp_path):
    folder = save_policy(tiny_policy, tmp_path / "p")
    state = load_file(str(folder / "model.safetensors"))
    state.pop("projector.fc1.bias")
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors: projector\.fc1\.bias; unexpected tensors: extra\.weight"):
        load_policy(folder)
