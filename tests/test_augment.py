"""Training-time augmentation recipes: what they change, and what they leave alone."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")


def _xrays(n: int = 8, size: int = 64) -> np.ndarray:
    from covid_models.data import decode_resize
    from tests.conftest import sample_files

    files = [f for fs in sample_files(2, seed=11).values() for f in fs][:n]
    return np.stack([decode_resize(str(f), size, 1).numpy() for f in files]).astype("float32")


@pytest.mark.parametrize("recipe", ["full", "acquisition"])
def test_recipes_change_pixels_within_range_and_only_in_training(recipe):
    from covid_models.augment import build_augmenter

    x = _xrays()
    aug = build_augmenter(seed=3, recipe=recipe)
    assert np.array_equal(np.asarray(aug(x, training=False)), x)
    y = np.asarray(aug(x, training=True))
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.min() >= 0.0 and y.max() <= 255.0
    diff = np.abs(y - x).mean(axis=(1, 2, 3))
    assert (diff > 0.5).all(), diff  # every image is changed
    # the same seed gives the same augmentation (reproducible runs)
    again = np.asarray(build_augmenter(seed=3, recipe=recipe)(x, training=True))
    assert np.abs(again - y).max() < 1e-3


def test_acquisition_recipe_adds_noise_and_keeps_the_anatomy_in_place():
    """No flips or rotations: a pixel-wise correlation with the original stays high, while
    high-frequency energy (noise) is added to at least some images."""
    from covid_models.augment import build_augmenter

    x = _xrays(8, 96)
    y = np.asarray(build_augmenter(seed=5, recipe="acquisition")(x, training=True))
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(x, y, strict=True)]
    assert min(corr) > 0.5, corr

    def hf(img):  # mean absolute Laplacian: high-frequency energy
        g = img[..., 0]
        return np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]).mean()

    assert max(hf(b) - hf(a) for a, b in zip(x, y, strict=True)) > 5.0


def test_unknown_recipe_is_refused():
    from covid_models.augment import build_augmenter
    from covid_models.train_config import TrainConfig

    with pytest.raises(ValueError, match="unknown augmentation recipe 'blur'"):
        build_augmenter(recipe="blur")
    with pytest.raises(ValueError, match="unknown augment_recipe 'blur'"):
        TrainConfig(model="custom_cnn", split="s", out="o", augment_recipe="blur")
