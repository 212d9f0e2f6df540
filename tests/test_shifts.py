"""The robustness benchmark's acquisition shifts: seeded, shape-preserving, and doing what they say."""

from __future__ import annotations

import numpy as np
import pytest

from covid_eval.shifts import SHIFTS, apply


@pytest.fixture
def images() -> np.ndarray:
    rng = np.random.default_rng(3)
    base = np.linspace(20, 235, 64)[None, :, None] * np.ones((64, 1, 1))
    return np.clip(base[None] + rng.normal(0, 8, (12, 64, 64, 1)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", list(SHIFTS))
def test_every_shift_is_seeded_and_keeps_the_shape(name, images):
    a, b = apply(name, images, seed=0), apply(name, images, seed=0)
    assert a.shape == images.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, images) or name.startswith("invert")  # it changes something


def test_shifts_do_what_they_say(images):
    x = images.astype(float)
    assert apply("gamma 0.7", images).mean() > x.mean() > apply("gamma 1.4", images).mean()  # brighter / darker
    assert apply("contrast +30%", images).std() > x.std() > apply("contrast -30%", images).std()
    n5, n10 = (apply(f"noise sigma {s}", images).astype(float) - x for s in (5, 10))
    assert 4 < n5.std() < 6 and 9 < n10.std() < 11
    inv = apply("invert 5% of images", np.repeat(images, 20, axis=0))  # 240 images: ~12 inverted
    flipped = [(i == 255 - j).all() for i, j in zip(inv, np.repeat(images, 20, axis=0), strict=True)]
    assert 3 <= sum(flipped) <= 25
    assert (
        np.abs(apply("jpeg q30", images).astype(float) - x).mean()
        > np.abs(apply("jpeg q75", images).astype(float) - x).mean()
    )
