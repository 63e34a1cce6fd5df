"""Official OpenVLA / OpenVLA-OFT checkpoint folders load into our policy (policy/openvla_layout.py).

The folders written here follow the official layout exactly: timm parameter names (LayerScale
exported as `scale_factor`), safetensors shards + `model.safetensors.index.json`, the OpenVLAConfig
fields of config.json, PrismaticImageProcessor's preprocessor_config.json, LIBERO-style
`dataset_statistics.json`. The vision towers carry the deterministic weights for which
tests/fixtures/timm_towers.safetensors holds timm's own outputs (tests/timm_reference.py), so the
name map is checked by numbers, not only by names.
"""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import timm_reference as ref
from common.config import PolicyConfig
from common.records import Observation
from policy.checkpoint import build_policy, load_policy, save_policy
from policy.modeling import OpenVLAOFTPolicy
from policy.openvla_layout import convert_state_dict, official_arch
from policy.processor import ImageProcessor, center_crop
from policy.tiny import llama_tokenizer

S = ref.IMAGE_SIZE
TEXT = {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16", "vocab_size": 32064,
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
POLICY = PolicyConfig(action_chunk=2, action_dims=7)


def _stats(scale: float) -> dict:
    q01 = [-scale * (i + 1) for i in range(6)] + [0.0]
    q99 = [scale * (i + 2) for i in range(6)] + [1.0]
    action = {"q01": q01, "q99": q99, "min": q01, "max": q99, "mean": [0.0] * 7, "std": [1.0] * 7,
              "mask": [True] * 6 + [False]}
    proprio = {k: [0.0] * 8 for k in ("q01", "q99", "min", "max", "mean", "std")}
    return {"action": action, "proprio": proprio, "num_transitions": 100, "num_trajectories": 10}


STATS = {"libero_spatial_no_noops": _stats(0.1), "libero_10_no_noops": _stats(0.3)}


def _fixture() -> tuple[dict, dict]:
    with safe_open(str(ref.FIXTURE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, {k: v for k, v in f.metadata().items()}


def official_tensors() -> dict[str, torch.Tensor]:
    """Every tensor of a (tiny) OpenVLA checkpoint under its official name."""
    _, meta = _fixture()
    state = {}
    for slot in ref.TOWERS:
        for name, shape in json.loads(meta[slot])["tensors"]:  # the real timm names, recorded by timm
            official = name.replace(".gamma", ".scale_factor")  # OpenVLA's HF export renames LayerScale.gamma
            state[f"vision_backbone.{slot}.{official}"] = torch.from_numpy(ref.fill(f"{slot}.{name}", tuple(shape)))
    gen = torch.Generator().manual_seed(0)
    vision, llm = 128 + 144, TEXT["hidden_size"]
    for fc, (o, i) in {"fc1": (4 * vision, vision), "fc2": (llm, 4 * vision), "fc3": (llm, llm)}.items():
        state[f"projector.{fc}.weight"] = torch.randn(o, i, generator=gen) / i**0.5
        state[f"projector.{fc}.bias"] = 0.02 * torch.randn(o, generator=gen)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TEXT.items() if k not in ("model_type", "torch_dtype")}))
    state.update({f"language_model.{k}": v.detach().clone() for k, v in lm.state_dict().items()})
    return state


def official_config() -> dict:
    return {
        "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                     "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"},
        "model_type": "openvla", "vision_backbone_id": "dinosiglip-vit-so-224px", "llm_backbone_id": "llama2-7b-pure",
        "arch_specifier": "no-align+fused-gelu-mlp", "use_fused_vision_backbone": True,
        "image_resize_strategy": "resize-naive", "image_sizes": [S, S],
        "timm_model_ids": [ref.TOWERS["featurizer"][0], ref.TOWERS["fused_featurizer"][0]],
        "timm_override_act_layers": [None, None], "hf_llm_id": "meta-llama/Llama-2-7b-hf", "llm_max_length": 2048,
        "pad_token_id": 32000, "pad_to_multiple_of": 64, "n_action_bins": 256, "output_projector_states": False,
        "norm_stats": {"bridge_orig": _stats(1.0)}, "text_config": TEXT, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
    }


def official_preprocessor() -> dict:
    means, stds = [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]], [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]]
    return {
        "auto_map": {"AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor"},
        "image_processor_type": "PrismaticImageProcessor", "processor_class": "PrismaticProcessor",
        "image_resize_strategy": "resize-naive", "input_sizes": [[3, S, S]] * 2, "interpolations": ["bicubic"] * 2,
        "means": means, "stds": stds, "use_fused_vision_backbone": True,
        "tvf_crop_params": [{"output_size": [S, S]}] * 2, "tvf_do_letterbox": False, "tvf_letterbox_fill": None,
        "tvf_normalize_params": [{"inplace": False, "mean": m, "std": s} for m, s in zip(means, stds)],
        "tvf_resize_params": [{"antialias": True, "interpolation": 3, "max_size": None, "size": [S, S]}] * 2,
    }


def write_official(folder, state=None, config=None, sharded=True):
    folder.mkdir(parents=True)
    state = official_tensors() if state is None else state
    if sharded:  # as save_pretrained shards a 7B model: vision + projector, then the language model
        shards = {"model-00001-of-00002.safetensors": {k: v for k, v in state.items() if not k.startswith("language_model.")},
                  "model-00002-of-00002.safetensors": {k: v for k, v in state.items() if k.startswith("language_model.")}}
        for name, part in shards.items():
            save_file(part, str(folder / name), metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": {k: name for name, part in shards.items() for k in part}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    else:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config or official_config(), indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(official_preprocessor(), indent=2))
    (folder / "dataset_statistics.json").write_text(json.dumps(STATS, indent=2))
    llama_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return write_official(tmp_path_factory.mktemp("openvla") / "openvla-7b-oft-libero")


@pytest.fixture(scope="module")
def loaded(official):
    return load_policy(official, unnorm_key="libero_spatial_no_noops", policy=POLICY)


def _obs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Observation(rng.integers(0, 256, (S, S, 3), dtype=np.uint8), "put the bowl on the plate") for _ in range(n)]


def test_towers_reproduce_timm_outputs(loaded):
    """Second-to-last block patches (what OpenVLA feeds the projector, prefix tokens dropped), the
    normed last block and the pooled output all match timm's own forward pass."""
    expected, _ = _fixture()
    x = torch.from_numpy(ref.pixels())
    vision = loaded.model.vision_backbone
    with torch.no_grad():
        for slot, prefix in (("featurizer", 5), ("fused_featurizer", 0)):  # DINOv2: CLS + 4 registers
            out = getattr(vision, slot)(pixel_values=x, output_hidden_states=True)
            torch.testing.assert_close(out.hidden_states[-2][:, prefix:], expected[f"{slot}.patches"], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(out.last_hidden_state, expected[f"{slot}.final"], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(out.pooler_output, expected[f"{slot}.pooled"], atol=2e-5, rtol=1e-5)
        fused = vision(torch.cat([x, x], dim=1))
    want = torch.cat([expected["featurizer.patches"], expected["fused_featurizer.patches"]], dim=-1)
    torch.testing.assert_close(fused, want, atol=2e-5, rtol=1e-5)


def test_architecture_comes_from_config_and_weight_shapes(loaded):
    arch = loaded.model.config
    assert arch.vision_backbone == "dinosiglip" and arch.image_size == S and arch.patch_size == 14
    assert arch.vision == dict(hidden_size=128, num_layers=3, num_heads=2, intermediate_size=512, hidden_act="gelu")
    assert arch.fused_vision == dict(hidden_size=144, num_layers=3, num_heads=2, intermediate_size=538, hidden_act="gelu")
    assert arch.vocab_size == 32000 and loaded.model.language_model.lm_head.weight.shape[0] == 32064
    assert (arch.text_config["num_hidden_layers"], arch.text_config["num_key_value_heads"]) == (2, 2)
    assert (arch.action_chunk, arch.action_dims, arch.attention) == (2, 7, "bidirectional")
    assert loaded.image_processor.means[0] == [0.485, 0.456, 0.406] and loaded.image_processor.stds[1] == [0.5] * 3


def test_actions_are_unnormalised_with_the_chosen_statistics(loaded):
    chunks = loaded.act(_obs(3), greedy=True)
    stats = STATS["libero_spatial_no_noops"]["action"]
    q01, q99, mask = np.array(stats["q01"]), np.array(stats["q99"]), np.array(stats["mask"])
    centers = (np.linspace(-1, 1, 256)[:-1] + np.linspace(-1, 1, 256)[1:]) / 2

    def by_hand(tokens):
        norm = centers[np.clip(32000 - tokens - 1, 0, 254)]  # OpenVLA: highest id = lowest bin
        return np.where(mask, 0.5 * (norm + 1) * (q99 - q01 + 1e-8) + q01, norm)  # gripper dim left as is

    for chunk in chunks:
        assert chunk.tokens.shape == (2, 7) and chunk.tokens.min() >= 31744 and chunk.tokens.max() <= 31999
        np.testing.assert_allclose(chunk.actions, by_hand(chunk.tokens), rtol=1e-6, atol=1e-6)
    every_id = np.repeat(np.arange(31744, 32000)[:, None], 7, axis=1)  # [256, 7]: all bins, all dims
    np.testing.assert_allclose(loaded.action_tokenizer.tokens_to_actions(every_id, loaded.stats), by_hand(every_id))


def test_openvla_7b_sizes_come_out_of_its_config_and_shapes():
    """openvla-7b's real shapes (meta tensors, no memory) and its config.json, whose text_config keeps
    only the fields that differ from Llama-2-7B's defaults, give the published 7.5B architecture."""
    _, meta = _fixture()
    widths = {"featurizer": (24, {128: 1024, 384: 3072, 512: 4096}),
              "fused_featurizer": (27, {144: 1152, 432: 3456, 288: 2304, 538: 4304})}
    state = {}
    for slot, (depth, big) in widths.items():
        for name, shape in json.loads(meta[slot])["tensors"]:
            if re.match(r"blocks\.[12]\.", name):
                continue  # block 0 stands for every block
            shape = [256 if name == "pos_embed" and d == 16 else big.get(d, d) for d in shape]  # 16 x 16 patches
            for i in range(depth if name.startswith("blocks.") else 1):
                official = re.sub(r"^blocks\.0\.", f"blocks.{i}.", name).replace(".gamma", ".scale_factor")
                state[f"vision_backbone.{slot}.{official}"] = torch.empty(shape, device="meta")
    for fc, (o, i) in {"fc1": (8704, 2176), "fc2": (4096, 8704), "fc3": (4096, 4096)}.items():
        state[f"projector.{fc}.weight"] = torch.empty(o, i, device="meta")
        state[f"projector.{fc}.bias"] = torch.empty(o, device="meta")
    with torch.device("meta"):
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=32064, pad_token_id=32000))
    state.update({f"language_model.{k}": v for k, v in lm.state_dict().items()})
    config = {**official_config(), "image_sizes": [224, 224],
              "text_config": {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16", "vocab_size": 32064}}
    arch = official_arch(config, state, PolicyConfig())
    assert arch.vision == dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, hidden_act="gelu")
    assert arch.fused_vision == dict(hidden_size=1152, num_layers=27, num_heads=16, intermediate_size=4304, hidden_act="gelu")
    assert arch.num_patches == 256 and arch.vocab_size == 32000 and arch.text_config["num_attention_heads"] == 32
    with torch.device("meta"):
        model = OpenVLAOFTPolicy(arch)
    targets = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(convert_state_dict(state, targets, arch.tower_names)) == set(targets)  # every tensor used, every parameter filled
    assert 7.4e9 < sum(v.numel() for v in state.values()) < 7.7e9


def test_missing_or_unknown_unnorm_key_lists_the_keys(official):
    with pytest.raises(KeyError, match="libero_10_no_noops.*libero_spatial_no_noops"):
        load_policy(official, unnorm_key=None, policy=POLICY)
    with pytest.raises(KeyError, match=r"'bridge'.*it has: \['libero_10_no_noops', 'libero_spatial_no_noops'\]"):
        load_policy(official, unnorm_key="bridge", policy=POLICY)
    with pytest.raises(KeyError, match="did you mean 'libero_spatial_no_noops'"):
        load_policy(official, unnorm_key="libero_spatial", policy=POLICY)


def test_config_norm_stats_are_used_without_dataset_statistics(tmp_path, official):
    folder = tmp_path / "openvla-7b"
    shutil.copytree(official, folder)
    (folder / "dataset_statistics.json").unlink()
    pol = load_policy(folder, policy=POLICY)  # one key in config.json norm_stats: no unnorm_key needed
    assert pol.unnorm_key == "bridge_orig" and pol.stats.q99[0] == 2.0


def test_pickle_files_in_the_folder_are_refused_unopened(tmp_path, official):
    for name in ("action_head--150000_checkpoint.pt", "pytorch_model.bin"):
        folder = tmp_path / name
        shutil.copytree(official, folder)
        (folder / name).write_bytes(b"not even a pickle")  # never opened: refused by name
        with pytest.raises(ValueError, match=f"pickle files \\['{name}'\\]"):
            load_policy(folder, unnorm_key="libero_10_no_noops", policy=POLICY)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("vision_backbone.fused_featurizer.attn_pool.kv.weight"),
     r"missing tensors: vision_backbone\.fused_featurizer\.attn_pool\.kv\.weight"),
    (lambda s: s.pop("vision_backbone.featurizer.blocks.1.ls2.scale_factor"),
     r"missing tensors: vision_backbone\.featurizer\.blocks\.1\.ls2\.scale_factor"),
    (lambda s: s.update({"proprio_projector.fc1.weight": torch.zeros(4, 8)}),
     r"unexpected tensors \(OpenVLA-OFT's proprio projector.*: proprio_projector\.fc1\.weight"),
    (lambda s: s.update({"vision_backbone.featurizer.pos_embed": torch.zeros(1, 9, 128)}),
     r"vision_backbone\.featurizer\.pos_embed \(1, 9, 128\) -> .*position_embeddings needs \(1, 17, 128\)"),
])
def test_missing_unexpected_or_misshapen_tensors_are_named(tmp_path, edit, message):
    state = official_tensors()
    edit(state)
    folder = write_official(tmp_path / "ckpt", state, sharded=False)
    with pytest.raises(ValueError, match=message):
        load_policy(folder, unnorm_key="libero_10_no_noops", policy=POLICY)


def test_config_that_disagrees_with_the_weights_names_the_field(tmp_path):
    config = official_config()
    config["text_config"] = {**TEXT, "num_hidden_layers": 3}
    folder = write_official(tmp_path / "ckpt", config=config, sharded=False)
    with pytest.raises(ValueError, match="text_config.num_hidden_layers is 3, the weights say 2"):
        load_policy(folder, unnorm_key="libero_10_no_noops", policy=POLICY)


def test_index_naming_a_missing_shard_fails(tmp_path, official):
    folder = tmp_path / "ckpt"
    shutil.copytree(official, folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="names shard model-00002-of-00002.safetensors"):
        load_policy(folder, unnorm_key="libero_10_no_noops", policy=POLICY)


def test_loaded_official_policy_round_trips_through_our_format(tmp_path, loaded):
    obs = _obs(2, seed=1)
    args = ([o.image for o in obs], [o.instruction for o in obs])
    again = load_policy(save_policy(loaded, tmp_path / "ours"), unnorm_key="libero_spatial_no_noops")
    with torch.no_grad():
        assert torch.equal(loaded.action_logits(*args), again.action_logits(*args))
    assert again.model.config.fused_vision == loaded.model.config.fused_vision


def test_center_crop_samples_the_central_area_like_tf_crop_and_resize():
    """A horizontal ramp (pixel value = column) shows where each output column samples: bilinear
    sampling of a linear image is exact, so column j must read lo + j * side / (size - 1).
    (tests/test_reference_parity.py compares with TensorFlow's own output, pixel by pixel.)"""
    ramp = np.tile(np.arange(256, dtype=np.uint8), (256, 1))[None, ..., None].repeat(3, -1)  # [1, 256, 256, 3]
    out = center_crop(torch.from_numpy(ramp).permute(0, 3, 1, 2), 0.9, 224)[0, 0]  # [224, 224] uint8
    side = 0.9**0.5
    want = torch.linspace((1 - side) / 2, (1 + side) / 2, 224, dtype=torch.float64) * 255
    assert torch.all((out.double() - want[None, :]).abs() <= 1)  # to the uint8 level
    assert out[0, 0] > 5 and out[0, -1] < 250  # the border is cut away

    proc = ImageProcessor.for_towers(["siglip"], 224, center_crop=0.9)
    assert torch.equal(proc(ramp)[0, 0], (out.float() / 255 - 0.5) / 0.5)
    x = torch.from_numpy(ramp[0, :, :, 0]).float() / 255
    assert torch.equal(ImageProcessor.for_towers(["siglip"], 256)(ramp)[0, 0], (x - 0.5) / 0.5)  # no crop


def test_center_crop_setting_travels_with_the_policy(tmp_path, loaded, official):
    own = build_policy(PolicyConfig(vision_backbone="siglip", center_crop=0.9))
    folder = save_policy(own, tmp_path / "p")
    assert load_policy(folder).image_processor.center_crop == 0.9
    assert load_policy(folder, policy=PolicyConfig(center_crop=0.8)).image_processor.center_crop == 0.8
    assert loaded.image_processor.center_crop is None  # official folders do not say; the config does
    crop = POLICY.model_copy(update={"center_crop": 0.9})
    assert load_policy(official, "libero_10_no_noops", policy=crop).image_processor.center_crop == 0.9


def test_letterbox_preprocessing_is_refused(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**official_preprocessor(), "image_resize_strategy": "letterbox"}))
    with pytest.raises(ValueError, match="image_resize_strategy 'letterbox' is not supported"):
        ImageProcessor.load(tmp_path)
