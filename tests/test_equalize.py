"""Histogram equalisation inside the classifier's graph (issue 16 §4).

The block against a worked case and a numpy reference, what it is for (a change of exposure no longer
changes the picture the network sees), the same pixels from Keras, the saved file, TFLite at every
precision the app ships and Core ML, and a real training that keys, saves and describes it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from covid_models import equalize
from covid_models.builders import build_model
from tests.input_blocks import resized_xrays, saved_and_reloaded


def _xrays(n_per_class: int, size: int) -> np.ndarray:
    return resized_xrays(n_per_class, size, seed=9)


def _equalise(images: np.ndarray) -> np.ndarray:
    block = equalize.build_equalizer(images.shape[1])
    return np.asarray(block.predict(images, verbose=0))


def test_every_grey_level_once_maps_to_itself_shifted_by_half_a_level():
    """Worked by hand: a 16x16 image holding each of 0..255 once has 4/256 of its pixels in each of the 64
    levels, so its cumulative histogram is (x + 1/2) / 256 at every x and the block gives (x + 1/2) * 255/256.
    A flat image is all in one level: its pixels go to 255 times how far through that level they are."""
    ramp = np.arange(256, dtype="float32").reshape(1, 16, 16, 1)
    out = _equalise(ramp)[0, ..., 0]
    np.testing.assert_allclose(out, (ramp[0, ..., 0] + 0.5) * 255 / 256, atol=2e-3)

    flat = np.full((1, 8, 8, 1), 100.0, "float32")  # level 25 spans 99.5..103.5: 0.5 of 4 through it
    np.testing.assert_allclose(_equalise(flat), 255 * 0.5 / 4, atol=1e-4)


def test_the_block_is_the_reference_on_real_xrays():
    x = _xrays(2, 48)
    out = _equalise(x)[..., 0]
    np.testing.assert_allclose(out, equalize.reference(x[..., 0]), atol=2e-3)
    # It equalises: each picture's grey levels now spread evenly (deciles within 8 grey levels of uniform's)
    deciles = np.percentile(out.reshape(len(out), -1), np.arange(10, 100, 10), axis=1).T
    assert np.abs(deciles - np.arange(10, 100, 10) * 2.55).max() < 8
    assert np.abs(np.percentile(x.reshape(len(x), -1), 50, axis=1) - 127.5).max() > 8  # they did not before


def test_a_change_of_exposure_barely_changes_what_the_network_sees():
    """Gamma and contrast move a real X-ray's pixels by more than 8 grey levels on average; after
    equalisation the two pictures differ by under 2.5 (what is left is the 64 levels' binning and clipping)."""
    x = _xrays(1, 64)
    darker = 255.0 * (x / 255.0) ** 1.4
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    flatter = mean + 0.7 * (x - mean)
    for shifted in (darker, flatter):
        assert np.abs(shifted - x).mean() > 8
        assert np.abs(_equalise(shifted) - _equalise(x)).mean() < 2.5


def test_levels_must_divide_the_grey_range():
    with pytest.raises(ValueError, match="divide 256"):
        equalize.knots(48)


def test_grey_input_only_and_not_with_the_lung_fields():
    from covid_models.train_config import TrainConfig

    with pytest.raises(ValueError, match="channels=1"):
        TrainConfig(model="custom_cnn", split="s", out="o", channels=3, equalize=True)
    with pytest.raises(ValueError, match="cannot be combined"):
        TrainConfig(model="custom_cnn", split="s", out="o", equalize=True, lung_fields="x")
    with pytest.raises(ValueError, match="channels=1"):
        build_model("custom_cnn", input_size=32, channels=3, weights="none", equalize=True)


@pytest.mark.slow  # a TFLite conversion at three precisions and a Core ML one: about a minute
def test_keras_the_saved_file_tflite_and_core_ml_see_the_same_equalised_pixels(tmp_path):
    import keras
    import tensorflow as tf

    from covid_registry.convert import convert_coreml, export_tflite, tflite_probabilities

    model = build_model("custom_cnn", input_size=40, weights="none", equalize=True)
    x = _xrays(2, 40)
    again, p = saved_and_reloaded(model, x, tmp_path)  # the network sees the block, and so does the file

    for precision, tolerance in (("float32", 1e-5), ("float16", 1e-3), ("int8", 2e-2)):
        export_tflite(again, tmp_path / f"m-{precision}.tflite", precision)
        np.testing.assert_allclose(tflite_probabilities(tmp_path / f"m-{precision}.tflite", x), p, atol=tolerance)

    # The int8 file stores the network's weights as int8 and keeps the block's in float32 (too small to
    # quantise), so its pixels are Keras' exactly; the block alone, exported at int8, is the reference.
    it = tf.lite.Interpreter(model_path=str(tmp_path / "m-int8.tflite"))
    kinds = [(d["name"], d["dtype"]) for d in it.get_tensor_details()]
    block_tensors = [dtype for name, dtype in kinds if f"/{equalize.NAME}" in name]
    assert len(block_tensors) >= 8 and not any(dtype == np.int8 for dtype in block_tensors), kinds
    assert any(dtype == np.int8 for name, dtype in kinds if "conv" in name)
    block = keras.Model(model.input, model.get_layer(equalize.NAME)(model.input))
    export_tflite(block, tmp_path / "block.tflite", "int8")
    np.testing.assert_allclose(
        tflite_probabilities(tmp_path / "block.tflite", x)[..., 0], equalize.reference(x[..., 0]), atol=2e-3
    )

    import coremltools as ct

    rec = convert_coreml(again, tmp_path / "m.mlpackage", model_name="custom_cnn", version="t", metrics={})
    spec = ct.models.MLModel(rec.path, skip_model_load=True).get_spec()
    blocks = [b for f in spec.mlProgram.functions.values() for b in f.block_specializations.values()]
    ops = {op.type for b in blocks for op in b.operations}
    assert {"reduce_mean", "mul", "sub"} <= ops, ops


@pytest.mark.slow  # one epoch of a 32 px custom CNN: about half a minute
def test_an_equalised_training_is_keyed_saved_and_described(small_split, tmp_path):
    import keras

    from covid_models.describe import describe_weights
    from covid_models.train import train_model
    from covid_models.train_config import TrainConfig, slot_key

    common = dict(model="custom_cnn", split=small_split, input_size=32, epochs=1, cache_dir=str(tmp_path / "c"))
    cfg = TrainConfig(out=str(tmp_path / "eq"), equalize=True, **common)
    assert slot_key(cfg) != slot_key(TrainConfig(out=str(tmp_path / "plain"), **common))
    result = train_model(cfg)
    assert result.status == "trained"
    out = Path(result.out.removeprefix("file://"))
    model = keras.saving.load_model(out / "model.keras", safe_mode=True)
    assert [layer.name for layer in model.layers][1] == equalize.NAME
    x = _xrays(1, 32)
    seen = np.asarray(keras.Model(model.input, model.get_layer(equalize.NAME)(model.input)).predict(x, verbose=0))
    np.testing.assert_allclose(seen[..., 0], equalize.reference(x[..., 0]), atol=2e-3)  # trained, not changed
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["equalize"] is True
    assert "histogram-equalised inside the model" in describe_weights("custom_cnn", config)

    # A transfer model's cached backbone features are keyed on the equalisation too.
    from covid_models.data import load_split_data
    from covid_models.feature_cache import feature_path

    data = load_split_data(small_split, tmp_path / "c")
    mn = dict(model="mobilenet_v2", split=small_split, out="o", input_size=32, weights="scratch")
    assert feature_path(tmp_path, data, TrainConfig(**mn, equalize=True), "train") != feature_path(
        tmp_path, data, TrainConfig(**mn), "train"
    )
