"""Inputs built exactly as OpenVLA's reference code builds them: its TensorFlow center crop, to the
uint8 level, and its prompt ending with the literal id 29871.

tests/fixtures/crop_reference.npz holds TensorFlow's own crops (written by
tests/fixtures/make_crop_reference.py where TensorFlow is installed; the tests need only numpy).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from policy.processor import TOWER_NORMS, ImageProcessor, PromptBuilder, center_crop
from policy.tiny import llama_tokenizer

FIXTURE = np.load(Path(__file__).parent / "fixtures" / "crop_reference.npz")
CROPS = sorted(k for k in FIXTURE.files if ".crop_" in k)  # "<image>.crop_<area>", uint8 [3, H, W]


@pytest.mark.parametrize("key", CROPS)
def test_center_crop_equals_tensorflows_on_every_pixel(key):
    name, area = key.split(".crop_")
    image = torch.from_numpy(FIXTURE[f"{name}.image"])[None]
    out = center_crop(image, float(area), 224)
    assert out.dtype == torch.uint8
    np.testing.assert_array_equal(out[0].numpy(), FIXTURE[key])


def test_processor_normalises_tensorflows_crop_as_the_official_processor_does():
    """OpenVLA hands its processor the cropped uint8 image; to_tensor (/ 255) then Normalize per tower."""
    image = FIXTURE["noise256.image"].transpose(1, 2, 0)  # [256, 256, 3], LIBERO's camera size
    pixels = ImageProcessor.for_towers(["dinov2", "siglip"], 224, center_crop=0.9)(image[None])
    x = torch.from_numpy(FIXTURE["noise256.crop_0.9"]).float()[None] / 255
    want = [(x - torch.tensor(TOWER_NORMS[t][0]).view(1, 3, 1, 1)) / torch.tensor(TOWER_NORMS[t][1]).view(1, 3, 1, 1)
            for t in ("dinov2", "siglip")]
    assert torch.equal(pixels, torch.cat(want, dim=1))


def test_prompt_ends_with_29871_though_this_vocabulary_spells_the_space_otherwise():
    tok = llama_tokenizer()
    assert tok.convert_tokens_to_ids("▁") == 28705  # Mistral's 32k vocabulary: not Llama-2's 29871
    prompts = PromptBuilder(tok)
    assert prompts.ids("Pick up the Bowl") == [1, 560, 28747, 1824, 2992, 1023, 272, 18401, 1388, 298, 3088, 582,
                                               272, 13494, 28804, 13, 2919, 28747, 29871]
    ids, lengths = prompts(["pick up the bowl", "push it"])
    assert ids[torch.arange(2), lengths - 1].tolist() == [29871, 29871]


def _word_tokenizer(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


def test_prompt_end_id_is_literal_and_appended_only_when_missing():
    words = "In: What action should the robot take to push it?\nOut:".split()
    vocab = {"<unk>": 0, "<s>": 1, "▁": 2, **{w: 10 + i for i, w in enumerate(words)}}
    ids = PromptBuilder(_word_tokenizer(vocab)).ids("push it")
    assert ids == [1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 29871]  # not "▁" (2)
    vocab["Out:"] = 29871  # a vocabulary whose prompt already ends with the id: OpenVLA adds none
    assert PromptBuilder(_word_tokenizer(vocab)).ids("push it") == [1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 29871]


def test_a_policy_folder_keeps_the_prompt_end_its_weights_were_trained_with(tiny_policy, tmp_path):
    """New folders end prompts with 29871 and record it; a folder written before the record existed
    keeps its tokenizer's "▁" (the shipped demo base was trained on it)."""
    import json

    from policy.checkpoint import load_policy, save_policy

    folder = save_policy(tiny_policy, tmp_path / "new")
    assert json.loads((folder / "config.json").read_text())["prompt_end_id"] == 29871
    assert load_policy(folder).prompts.ids("pick it up")[-1] == 29871
    config = json.loads((folder / "config.json").read_text())
    del config["prompt_end_id"]
    (folder / "config.json").write_text(json.dumps(config))
    legacy = load_policy(folder)
    assert legacy.prompts.ids("pick it up")[-1] == legacy.tokenizer.convert_tokens_to_ids("▁") == 28705
    assert json.loads((save_policy(legacy, tmp_path / "again") / "config.json").read_text())["prompt_end_id"] == 28705
    base = load_policy(Path(__file__).parents[1] / "policy/pretrained/tabletop_base")
    assert base.prompts.end_id == 28705
