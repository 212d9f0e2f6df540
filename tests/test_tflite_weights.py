"""Int8 dense weights in a float32 TFLite file (covid_registry.tflite_weights), run by the real TFLite
interpreter: the file reads back as the float32 graph with each large dense kernel rounded to int8 per
output unit, and nothing else changed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from covid_app.app_models import app_variants
from covid_registry.convert import export_tflite, tflite_probabilities
from covid_registry.tflite_weights import MIN_ELEMENTS, dense_weight_share, int8_dense_weights, quantize_per_row


def test_rows_are_scaled_to_their_largest_magnitude():
    w = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [0.3, 0.1, -0.3]], np.float32)
    q, scale = quantize_per_row(w)
    np.testing.assert_allclose(scale, [2 / 127, 1.0, 0.3 / 127], rtol=1e-6)
    assert q.dtype == np.int8
    assert q.tolist() == [[64, -127, 32], [0, 0, 0], [127, 42, -127]]  # 63.5 -> 64, 31.75 -> 32, 42.33 -> 42
    assert np.abs(q * scale[:, None] - w).max() <= scale.max() / 2 + 1e-7


def _model(seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(16, 3, activation="relu")(inp)
    x = keras.layers.Flatten()(x)  # 14,400 features: a 14,400 x 80 kernel (1.15M values) and an 80 x 4 one
    x = keras.layers.Dense(80, activation="relu", name="big")(x)
    out = keras.layers.Dense(4, activation="softmax", name="small")(x)
    return keras.Model(inp, out)


def _tensors(path):
    import tensorflow as tf

    it = tf.lite.Interpreter(model_path=str(path))
    return it.get_tensor_details()


def test_the_large_dense_kernel_is_int8_and_the_file_computes_with_its_rounded_weights(tmp_path):
    model = _model()
    images = np.random.default_rng(1).uniform(0, 1, (6, 32, 32, 1)).astype("float32")
    f32 = export_tflite(model, tmp_path / "m.tflite")
    small = export_tflite(model, tmp_path / "m-int8-dense.tflite", "int8-dense")
    assert small.precision == "int8-dense"
    assert small.bytes < f32.bytes - 0.7 * 14400 * 80 * 4  # the large kernel shrank to a quarter

    int8 = [t for t in _tensors(small.path) if t["dtype"] == np.int8]
    (kernel,) = int8  # only the large kernel: the conv and the 320-value kernel stay float32
    assert list(kernel["shape"]) == [80, 14400]
    assert len(kernel["quantization_parameters"]["scales"]) == 80  # one scale per output unit
    assert not any(t["dtype"] == np.int8 for t in _tensors(f32.path))

    # The same graph with the rounded kernel, in Keras: what the int8-dense file must compute.
    w, b = model.get_layer("big").get_weights()
    q, scale = quantize_per_row(w.T)  # TFLite stores dense kernels as [out, in]
    model.get_layer("big").set_weights([(q * scale[:, None]).T.astype("float32"), b])
    expected = model.predict(images, verbose=0)
    got = tflite_probabilities(small.path, images)
    np.testing.assert_allclose(got, expected, atol=2e-6)
    # ... and it differs from the float32 file (the rounding is real), by little
    diff = np.abs(got - tflite_probabilities(f32.path, images)).max()
    assert 0 < diff < 1e-2


def test_a_file_without_large_dense_kernels_is_left_as_it_is(tmp_path):
    import keras

    inp = keras.Input((8,))
    model = keras.Model(inp, keras.layers.Dense(4, activation="softmax")(inp))
    assert MIN_ELEMENTS > 8 * 4  # its kernel is too small to compress
    export_tflite(model, tmp_path / "m.tflite")
    data = (tmp_path / "m.tflite").read_bytes()
    out, n = int8_dense_weights(data)
    assert n == 0 and dense_weight_share(model) == 0.0


def test_the_app_tries_int8_dense_where_it_is_expected_to_be_smaller():
    model = _model()
    share = dense_weight_share(model)
    total = sum(int(np.prod(w.shape)) for w in model.weights)
    assert share == pytest.approx(14400 * 80 / total)  # the 320-value kernel is too small to count
    # a flatten head of most of the weights: int8-dense (1 - 3/4 share) before float16 (1/2)
    assert app_variants(0.87) == ["tflite-int8", "tflite-int8-dense", "tflite-fp16", "tflite"]
    assert app_variants(0.5) == ["tflite-int8", "tflite-fp16", "tflite-int8-dense", "tflite"]
    assert app_variants(0.0) == ["tflite-int8", "tflite-fp16", "tflite"]


def test_the_int8_dense_export_is_made_from_the_stored_float32_file(small_split, tmp_path, monkeypatch):
    """``tflite-int8-dense`` of a model whose float32 TFLite export is stored is that file with its dense
    weights rounded (no second conversion), checked against the Keras model like every export."""
    import keras

    from covid_data.store import Unit, open_store
    from covid_models.builders import build_model
    from covid_registry import exports
    from covid_registry.convert import int8_dense_from_float32

    keras.utils.set_random_seed(3)
    build_model("custom_cnn", input_size=96, weights="none").save(tmp_path / "m.keras")
    slot = Unit(open_store(str(tmp_path / "slot")), "", "metrics.json")
    slot.put_file("model.keras", tmp_path / "m.keras")
    cfg = {"model": "custom_cnn", "input_size": 96, "channels": 1, "epochs": 0, "weights": "none"}
    slot.complete({"config": cfg, "result": {"model": "custom_cnn"}, "metrics": {}})
    kw = {"split_uri": small_split, "version": "v", "metrics": {}, "parity_images": 8, "temperature": 1.5}
    f32 = exports.ensure_exports(slot.uri, ["tflite"], **kw)["tflite"]

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(exports, "export_tflite", no_conversion)
    rec = exports.ensure_exports(slot.uri, ["tflite-int8-dense"], **kw)["tflite-int8-dense"]
    assert rec["precision"] == "int8-dense" and rec["checks"]["within_bounds"] and rec["checks"]["images"] == 8
    local = open_store(str(tmp_path / "slot")).local_path
    f32_path = local(f32["uri"].split("/slot/", 1)[1])
    again = int8_dense_from_float32(f32_path, tmp_path / "again.tflite")
    assert Path(again.path).read_bytes() == local(rec["uri"].split("/slot/", 1)[1]).read_bytes()
    share = dense_weight_share(keras.models.load_model(tmp_path / "m.keras"))
    assert share > 0.3 and rec["bytes"] < f32["bytes"] * (1 - 0.7 * share)  # its dense kernels: a quarter
