"""The SFT image-shift augmentation (learner/sft_data.random_shift)."""

import numpy as np

from learner.sft_data import random_shift


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
    out = random_shift(images, 2, np.random.default_rng(1))
    assert out.shape == images.shape and out.dtype == np.uint8
    offsets = {_offset(a, b, 2) for a, b in zip(images, out)}
    assert offsets == {(dy, dx) for dy in range(5) for dx in range(5)}  # independent per image, all 25 occur


def test_zero_shift_returns_the_images_unchanged():
    images = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    assert random_shift(images, 0, np.random.default_rng(0)) is images


def test_a_marker_pixel_moves_by_at_most_the_shift():
    images = np.zeros((50, 16, 16, 3), dtype=np.uint8)
    images[:, 8, 8] = 255
    out = random_shift(images, 3, np.random.default_rng(2))
    for img in out:
        ys, xs = np.nonzero(img[..., 0])
        assert len(ys) == 1 and abs(ys[0] - 8) <= 3 and abs(xs[0] - 8) <= 3
