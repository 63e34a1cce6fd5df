"""The SFT image-shift augmentation (learner/sft_data.random_shift) and the labels that follow a shifted
scene under absolute control (shift_labels, env_scene_shift, the tabletop camera's pixel scale)."""

import numpy as np

import pytest

from common.config import EnvConfig
from common.records import SceneShift
from env_workers.factory import env_scene_shift, make_env
from learner.sft_data import random_shift, sft_batch, shift_labels
from policy.action_tokenizer import ActionStats, ActionTokenizer


def _offset(src: np.ndarray, out: np.ndarray, max_shift: int) -> tuple[int, int]:
    """The (dy, dx) of the edge-padded crop of src that equals out."""
    padded = np.pad(src, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
    h, w = src.shape[:2]
    hits = [(dy, dx) for dy in range(2 * max_shift + 1) for dx in range(2 * max_shift + 1)
            if np.array_equal(padded[dy:dy + h, dx:dx + w], out)]
    assert len(hits) == 1, hits
    return hits[0]


def test_each_image_is_an_edge_padded_shift_within_bounds_and_all_shifts_occur():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(400, 12, 10, 3), dtype=np.uint8)
    out, _ = random_shift(images, 2, np.random.default_rng(1))
    assert out.shape == images.shape and out.dtype == np.uint8
    offsets = {_offset(a, b, 2) for a, b in zip(images, out)}
    assert offsets == {(dy, dx) for dy in range(5) for dx in range(5)}  # independent per image, all 25 occur


def test_zero_shift_returns_the_images_unchanged():
    images = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    out, content = random_shift(images, 0, np.random.default_rng(0))
    assert out is images and not content.any()


def test_a_marker_pixel_moves_by_at_most_the_shift():
    images = np.zeros((50, 16, 16, 3), dtype=np.uint8)
    images[:, 8, 8] = 255
    out, content = random_shift(images, 3, np.random.default_rng(2))
    for img, (rows, cols) in zip(out, content):
        ys, xs = np.nonzero(img[..., 0])
        assert len(ys) == 1 and abs(ys[0] - 8) <= 3 and abs(xs[0] - 8) <= 3
        assert (ys[0] - 8, xs[0] - 8) == (rows, cols)  # the returned content shift is the marker's move


SCENE = SceneShift(metres_per_col=0.01, metres_per_row=-0.02, action_dims=(0, 1), action_per_metre=(4.0, 5.0),
                   proprio_dims=(0, 1))


def test_shift_labels_moves_position_targets_and_proprio_with_the_scene_only():
    chunks = np.random.default_rng(0).uniform(-0.5, 0.5, size=(3, 4, 7))
    proprio = np.random.default_rng(1).uniform(-0.1, 0.1, size=(3, 8)).astype(np.float32)
    content = np.array([[0, 0], [2, -1], [-3, 4]])  # (rows, cols)
    moved, moved_proprio = shift_labels(chunks, proprio, content, SCENE)
    world_x, world_y = content[:, 1] * 0.01, content[:, 0] * -0.02
    np.testing.assert_allclose(moved[:, :, 0] - chunks[:, :, 0], np.repeat(4.0 * world_x[:, None], 4, 1))
    np.testing.assert_allclose(moved[:, :, 1] - chunks[:, :, 1], np.repeat(5.0 * world_y[:, None], 4, 1))
    np.testing.assert_array_equal(moved[:, :, 2:], chunks[:, :, 2:])
    np.testing.assert_allclose(moved_proprio[:, 0] - proprio[:, 0], world_x, atol=1e-7)
    np.testing.assert_allclose(moved_proprio[:, 1] - proprio[:, 1], world_y, atol=1e-7)
    np.testing.assert_array_equal(moved_proprio[:, 2:], proprio[:, 2:])
    assert moved[0] is not chunks[0] and np.array_equal(moved[0], chunks[0])  # zero shift, inputs untouched


def test_sft_batch_tokens_follow_the_shift_only_when_the_env_gives_a_scene_shift():
    stats = ActionStats(q01=np.full(7, -1.0), q99=np.full(7, 1.0), mask=np.array([False] * 3 + [True] * 4))
    tokenizer = ActionTokenizer(vocab_size=32000)
    images = np.random.default_rng(0).integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    chunks = np.zeros((6, 2, 7))
    idx = np.arange(6)
    _, fixed, _ = sft_batch(images, chunks, None, idx, 3, None, stats, tokenizer, np.random.default_rng(5))
    _, followed, _ = sft_batch(images, chunks, None, idx, 3, SCENE, stats, tokenizer, np.random.default_rng(5))
    _, content = random_shift(images, 3, np.random.default_rng(5))
    assert (fixed == tokenizer.actions_to_tokens(chunks, stats).reshape(6, -1)).all()
    expect = tokenizer.actions_to_tokens(shift_labels(chunks, None, content, SCENE)[0], stats).reshape(6, -1)
    np.testing.assert_array_equal(followed, expect)
    assert (followed != fixed).any()


def test_only_absolute_tabletop_control_moves_labels():
    assert env_scene_shift(EnvConfig(backend="tabletop", suite="tabletop", control="delta")) is None
    scene = env_scene_shift(EnvConfig(backend="tabletop", suite="tabletop", control="absolute", image_size=64))
    assert scene.action_dims == (0, 1) and scene.proprio_dims == (0, 1)
    np.testing.assert_allclose(scene.action_per_metre, (4.0, 5.0))  # the [-0.25, 0.25] x [-0.2, 0.2] box -> [-1, 1]


MASKS = {"red": lambda im: (im[..., 0] > 150) & (im[..., 1] < 80) & (im[..., 2] < 80),
         "green": lambda im: (im[..., 1] > 150) & (im[..., 0] < 80) & (im[..., 2] < 80)}


# blocks in view (the home gripper hides part of red_on_yellow's red one): front right, far right
@pytest.mark.parametrize("block", ["red", "green"])
@pytest.mark.parametrize("image_size", [64, 128])
def test_the_tabletop_pixel_scale_matches_how_a_block_moves_in_the_rendered_image(image_size, block):
    """A block of different init states moves in the real render by its world offset / pixel scale."""
    task = "red_in_bowl"
    from env_workers.tabletop.tasks import get_task

    cfg = EnvConfig(backend="tabletop", suite="tabletop", control="absolute", image_size=image_size)
    scene = env_scene_shift(cfg)
    env = make_env(cfg)
    layout = get_task(task).layout
    seen = []
    for state in range(20):
        image = env.reset(task, state).image.astype(int)
        rows, cols = np.nonzero(MASKS[block](image))
        seen.append((np.asarray(layout.sample(state)[block][:2]), cols.mean(), rows.mean()))
    env.close()
    world = np.array([xy for xy, _, _ in seen])
    pixels = np.array([[c, r] for _, c, r in seen])
    # least-squares pixels-per-metre of the rendered moves, per axis, against the predicted one
    fit = [np.polyfit(world[:, k], pixels[:, k], 1)[0] for k in (0, 1)]
    predicted = [1.0 / scene.metres_per_col, 1.0 / scene.metres_per_row]
    assert np.ptp(pixels, axis=0).min() > 0.015 * image_size, np.ptp(pixels, axis=0)  # the blocks did move
    np.testing.assert_allclose(fit, predicted, rtol=0.15)  # the scale is the centre's; perspective
