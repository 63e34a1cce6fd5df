"""OpenVLA's 256-bin action tokenizer and q01/q99 un-normalisation."""

import numpy as np
import pytest

from policy.action_tokenizer import ActionStats, ActionTokenizer, postprocess_gripper, select_unnorm_key

TOK = ActionTokenizer()
STATS = ActionStats(
    q01=np.array([-0.5, -0.2, 0.0, -1.0, -0.1, -0.3, -1.0]),
    q99=np.array([0.5, 0.6, 1.0, 1.0, 0.1, 0.9, 1.0]),
    mask=np.array([True] * 6 + [False]),
)


def test_action_ids_are_the_last_256_of_the_vocab():
    assert TOK.first_id == 31744
    ids = TOK.encode(np.linspace(-1, 1, 10001))
    assert ids.min() == 31744 and ids.max() == 31999


def test_token_31999_decodes_to_the_first_bin_center():
    assert TOK.decode(np.array([31999]))[0] == pytest.approx(-1 + 1 / 255)
    assert TOK.bin_centers.shape == (255,)


def test_normalised_values_round_trip_within_half_a_bin():
    x = np.random.default_rng(0).uniform(-1, 1, 100000)
    err = np.abs(TOK.decode(TOK.encode(x)) - x)
    assert err.max() <= (2 / 255) / 2 + 1e-9


def test_env_values_in_q01_q99_round_trip_within_half_a_bin():
    rng = np.random.default_rng(1)
    a = rng.uniform(STATS.q01, STATS.q99, size=(20000, 7))
    a[:, -1] = rng.uniform(-1, 1, 20000)  # gripper is not normalised
    back = TOK.tokens_to_actions(TOK.actions_to_tokens(a, STATS), STATS)
    half_bin = 0.5 * (2 / 255) * 0.5 * np.where(STATS.mask, STATS.q99 - STATS.q01, 2.0)
    assert np.all(np.abs(back - a) <= half_bin + 1e-7)


def test_unnormalize_matches_the_openvla_formula():
    x = np.array([[-1, 0, 1, 0.5, -0.5, 0.25, 0.7]])
    expected = 0.5 * (x + 1) * (STATS.q99 - STATS.q01 + 1e-8) + STATS.q01
    expected[0, -1] = 0.7  # masked dim passes through
    np.testing.assert_allclose(TOK.unnormalize(x, STATS), expected)


@pytest.mark.parametrize("bad", [0, 2, 31743, 32000, 32063, -1])
def test_ids_outside_the_action_range_are_rejected(bad):
    with pytest.raises(ValueError, match="not action tokens"):
        TOK.decode(np.array([31800, bad]))


def test_index_and_id_conversions_are_inverse():
    idx = np.arange(256)
    assert np.array_equal(TOK.id_to_index(TOK.index_to_id(idx)), idx)


def test_values_beyond_the_range_are_clipped():
    assert TOK.encode(np.array([5.0]))[0] == 31744 and TOK.encode(np.array([-5.0]))[0] == 31999


def test_gripper_is_binarised_and_optionally_inverted():
    a = np.array([[0, 0, 0, 0, 0, 0, 0.3], [0, 0, 0, 0, 0, 0, -0.2]])
    assert postprocess_gripper(a)[:, -1].tolist() == [1.0, -1.0]
    assert postprocess_gripper(a, invert=True)[:, -1].tolist() == [-1.0, 1.0]


def test_unnorm_key_must_be_chosen_explicitly_among_several():
    stats = {"libero_spatial_no_noops": {}, "libero_goal_no_noops": {}}
    assert select_unnorm_key(stats, "libero_goal_no_noops") == "libero_goal_no_noops"
    with pytest.raises(KeyError, match="libero_goal_no_noops.*libero_spatial_no_noops"):
        select_unnorm_key(stats, None)
    with pytest.raises(KeyError, match="it has"):
        select_unnorm_key(stats, "bridge_orig")
    assert select_unnorm_key({"only": {}}, None) == "only"
