"""A fixed Gaussian blur inside the classifier's graph (issue 16 §4, the processing shortcut).

The block against a worked case and scipy's Gaussian filter on real X-rays, what it is for (the sample's
8x8 JPEG block grid, 3.4 pixels at 128 px, is gone from what the network sees while the lungs are not),
the same pixels from Keras, the saved file and TFLite, and a training that keys, saves and describes it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from covid_models import blur
from covid_models.builders import build_model
from tests.input_blocks import resized_xrays, saved_and_reloaded


def _xrays(n_per_class: int, size: int) -> np.ndarray:
    return resized_xrays(n_per_class, size, seed=13)


def _blurred(images: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(blur.build_blur(images.shape[1], sigma).predict(images, verbose=0))


def _scipy(images: np.ndarray, sigma: float) -> np.ndarray:
    r = blur.radius(sigma)
    return np.stack(
        [ndimage.gaussian_filter(im.astype("float64"), sigma, mode="constant", truncate=r / sigma) for im in images]
    )


def test_one_bright_pixel_spreads_into_the_kernel_and_a_flat_picture_stays_flat_inside():
    """Worked by hand for sigma 1: radius 3, the 1-D weights exp(-k^2/2) / sum for k = -3..3 (sum 2.5059
    to 4 places), the centre weight squared 0.1592 (1/(2 pi) to 3 places); the kernel sums to 1, so a flat
    picture keeps its value wherever the kernel stays inside it, and reads zeros beyond the edge."""
    img = np.zeros((1, 15, 15, 1), "float32")
    img[0, 7, 7, 0] = 1000.0
    out = _blurred(img, 1.0)[0, ..., 0]
    g = np.exp(-0.5 * np.arange(-3, 4) ** 2)
    assert g.sum() == pytest.approx(2.5059, abs=1e-4)
    assert out[7, 7] == pytest.approx(1000 / g.sum() ** 2, rel=1e-5) == pytest.approx(159.2, abs=0.1)
    assert out[7, 9] == pytest.approx(1000 * np.exp(-2) / g.sum() ** 2, rel=1e-5)
    assert out[7, 11] == 0.0 and out.sum() == pytest.approx(1000, rel=1e-5)

    flat = np.full((1, 15, 15, 1), 80.0, "float32")
    out = _blurred(flat, 1.0)[0, ..., 0]
    np.testing.assert_allclose(out[3:-3, 3:-3], 80.0, rtol=1e-6)
    assert out[0, 0] == pytest.approx(
        80.0 * (g[3:].sum() / g.sum()) ** 2, rel=1e-5
    )  # about half its weight is beyond the edge


def test_the_block_is_scipys_gaussian_filter_on_real_xrays():
    x = _xrays(1, 64)
    for sigma in (0.8, 1.5):
        np.testing.assert_allclose(_blurred(x, sigma)[..., 0], _scipy(x[..., 0], sigma), atol=2e-3)


def test_the_jpeg_block_grid_goes_and_the_lungs_stay():
    """A grid of the 299 px JPEG blocks' period at 128 px (8 * 128 / 299 = 3.4 px) added to a real X-ray: the
    blur of sigma 1.5 leaves under 3% of it, while the X-ray keeps its structure (correlation with itself
    unblurred above 0.95 inside the edge)."""
    x = _xrays(1, 128)[:1]
    period = 8 * 128 / 299
    grid = 20.0 * np.cos(2 * np.pi * np.arange(128) / period)[None, None, :, None] * np.ones((1, 128, 1, 1))
    left = _blurred((x + grid).astype("float32"), 1.5) - _blurred(x, 1.5)
    inner = (slice(None), slice(8, -8), slice(8, -8))
    assert np.abs(left[inner]).max() < 0.03 * 20.0
    assert np.abs(grid[inner]).max() == pytest.approx(20.0, rel=0.01)
    assert np.corrcoef(_blurred(x, 1.5)[inner].ravel(), x[inner].ravel())[0, 1] > 0.95


def test_sigma_must_be_positive_and_zero_means_no_block():
    from covid_models.train_config import TrainConfig

    with pytest.raises(ValueError, match="positive"):
        blur.kernel(0.0)
    with pytest.raises(ValueError, match="blur_sigma"):
        TrainConfig(model="custom_cnn", split="s", out="o", blur_sigma=-1.0)
    assert blur.NAME not in {layer.name for layer in build_model("custom_cnn", input_size=32, weights="none").layers}


@pytest.mark.slow  # two TFLite conversions: about half a minute
def test_keras_the_saved_file_and_tflite_see_the_same_blurred_pixels(tmp_path):
    import keras

    from covid_registry.convert import export_tflite, tflite_probabilities

    model = build_model("custom_cnn", input_size=40, weights="none", blur_sigma=1.5)
    x = _xrays(2, 40)
    again, p = saved_and_reloaded(model, x, tmp_path)  # the network sees the block, and so does the file
    for precision, tolerance in (("float32", 1e-5), ("int8", 2e-2)):
        export_tflite(again, tmp_path / f"m-{precision}.tflite", precision)
        np.testing.assert_allclose(tflite_probabilities(tmp_path / f"m-{precision}.tflite", x), p, atol=tolerance)
    block = keras.Model(model.input, model.get_layer(blur.NAME)(model.input))
    export_tflite(block, tmp_path / "block.tflite", "int8")  # too few weights to quantise: float32 as Keras
    np.testing.assert_allclose(
        tflite_probabilities(tmp_path / "block.tflite", x)[..., 0], _scipy(x[..., 0], 1.5), atol=2e-3
    )


@pytest.mark.slow  # one epoch of a 32 px custom CNN: about half a minute
def test_a_blurred_training_is_keyed_saved_and_described(small_split, tmp_path):
    import keras

    from covid_models.data import load_split_data
    from covid_models.describe import describe_weights
    from covid_models.feature_cache import feature_path
    from covid_models.train import train_model
    from covid_models.train_config import TrainConfig, slot_key

    common = dict(model="custom_cnn", split=small_split, input_size=32, epochs=1, cache_dir=str(tmp_path / "c"))
    cfg = TrainConfig(out=str(tmp_path / "blur"), blur_sigma=1.5, **common)
    assert slot_key(cfg) != slot_key(TrainConfig(out=str(tmp_path / "b2"), blur_sigma=1.0, **common))
    result = train_model(cfg)
    assert result.status == "trained"
    out = Path(result.out.removeprefix("file://"))
    model = keras.saving.load_model(out / "model.keras", safe_mode=True)
    x = _xrays(1, 32)
    seen = np.asarray(keras.Model(model.input, model.get_layer(blur.NAME)(model.input)).predict(x, verbose=0))
    np.testing.assert_allclose(seen[..., 0], _scipy(x[..., 0], 1.5), atol=2e-3)  # trained, not changed
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["blur_sigma"] == 1.5
    assert "a fixed Gaussian of sigma 1.5" in describe_weights("custom_cnn", config)

    data = load_split_data(small_split, tmp_path / "c")
    mn = dict(model="mobilenet_v2", split=small_split, out="o", input_size=32, weights="scratch")
    assert feature_path(tmp_path, data, TrainConfig(**mn, blur_sigma=1.5), "train") != feature_path(
        tmp_path, data, TrainConfig(**mn), "train"
    )
