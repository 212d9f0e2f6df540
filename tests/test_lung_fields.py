"""Classification on the lung fields (issue 16 §2): the segmenter inside the classifier's graph.

The block's arithmetic against a hand case and a numpy reference, the same pixels from Keras, the
saved file, TFLite and Core ML, and a real training with a real (tiny) segmenter unit whose weights
must come out of the classifier's training untouched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from covid_eval.segmenter_unit import SegmenterConfig, train_segmenter_unit
from covid_models import lung_fields
from covid_models.builders import build_model
from covid_models.segmenter import build_unet, resize_images
from tests.conftest import sample_files

TINY = SegmenterConfig(size=32, filters=(4, 8, 16), steps=4, batch_size=4, parity_images=2)


def _xrays(n_per_class: int, size: int, seed: int = 5) -> np.ndarray:
    """Real X-rays of the shared sample, resized as the pipeline resizes them: float32 [N, size, size, 1]."""
    from PIL import Image

    files = [f for fs in sample_files(n_per_class, seed).values() for f in fs]
    return resize_images([np.asarray(Image.open(f).convert("L")) for f in files], size).astype("float32")


def _identity_segmenter(size: int):
    """A stand-in 'segmenter' whose lung probability is the pixel / 255: a mask drawn in the picture."""
    import keras

    inp = keras.Input((size, size, 1))
    return keras.Model(inp, keras.layers.Rescaling(1 / 255.0)(inp), name="lung_unet")


def test_one_lung_pixel_grows_by_the_margin_and_fades_over_the_soft_edge():
    """Worked by hand (margin 4, soft 5): a single lung pixel dilates to a 9x9 square of 1; the 5x5
    average is 1 two pixels inside it, 3/5 on its edge, 1/5 two pixels out, 0 three out; a corner
    pixel of the square gets (3/5)^2. The background (10 of 255 everywhere else) is 10/255 of lung."""
    s, c, bg = 32, 16, 10.0
    img = np.full((1, s, s, 1), bg, "float32")
    img[0, c, c, 0] = 255.0
    block = lung_fields.build_lung_fields(_identity_segmenter(s), s)
    out = np.asarray(block.predict(img, verbose=0))[0, ..., 0]
    b = bg / 255.0

    def expect(fraction_in: float) -> float:  # the share of the 5x5 window inside the square, the rest background
        return bg * (fraction_in + (1 - fraction_in) * b)

    assert out[c, c] == pytest.approx(255.0, rel=1e-6)  # the lung pixel itself keeps its value
    assert out[c, c + 2] == pytest.approx(expect(1.0), rel=1e-5)
    assert out[c, c + 4] == pytest.approx(expect(3 / 5), rel=1e-5)
    assert out[c, c + 6] == pytest.approx(expect(1 / 5), rel=1e-5)
    assert out[c, c + 7] == pytest.approx(expect(0.0), rel=1e-5)
    assert out[c - 4, c + 4] == pytest.approx(expect(9 / 25), rel=1e-5)
    assert out[0, 0] == pytest.approx(bg * b, rel=1e-5)
    ref = lung_fields.reference(img[..., 0], img[..., 0] / 255.0)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_the_block_is_the_reference_on_real_xrays_with_a_real_unet():
    """A seeded U-Net (untrained: its probabilities vary over the picture, which is what is tested) at the
    block's own size, on real X-rays: Keras' pooling at the edges is the numpy reference's."""
    seg = build_unet(32, (4, 8, 16), seed=3)
    x = _xrays(2, 32)
    probs = np.asarray(seg.predict(x, verbose=0))[..., 0]
    assert probs.std() > 0.01  # a flat map would not test the pooling
    out = np.asarray(lung_fields.build_lung_fields(seg, 32).predict(x, verbose=0))[..., 0]
    np.testing.assert_allclose(out, lung_fields.reference(x[..., 0], probs), rtol=1e-5, atol=1e-3)
    assert not np.allclose(out, x[..., 0])  # it did black something out


@pytest.mark.slow  # a TFLite and a Core ML conversion: about a minute
def test_keras_the_saved_file_tflite_and_core_ml_see_the_same_lung_fields(tmp_path):
    """A lung-field custom CNN whose input (40 px) is not the segmenter's (32 px): the resizes run in the
    graph. The saved .keras file and the float32 TFLite file give Keras' probabilities; Core ML converts it
    with the lung fields inside (its predictions need macOS: checked there by the export's own parity)."""
    import keras

    from covid_registry.convert import export_tflite, tflite_probabilities

    seg = build_unet(32, (4, 8, 16), seed=4)
    model = build_model("custom_cnn", input_size=40, weights="none", lung_fields=lung_fields.build_lung_fields(seg, 40))
    x = _xrays(2, 40)
    p = np.asarray(model.predict(x, verbose=0))
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_array_equal(np.asarray(again.predict(x, verbose=0)), p)
    assert again.get_layer("lung_fields").get_layer("lung_unet").trainable is False

    export_tflite(again, tmp_path / "m.tflite", "float32")
    np.testing.assert_allclose(tflite_probabilities(tmp_path / "m.tflite", x), p, atol=1e-5)

    # Whatever the classifier sees comes through the block: blacking the block's output out changes it.
    body = keras.Model(model.get_layer("preprocess").input, model.output)
    assert not np.allclose(np.asarray(body.predict(x, verbose=0)), p, atol=1e-4)

    import coremltools as ct

    from covid_registry.convert import convert_coreml

    rec = convert_coreml(again, tmp_path / "m.mlpackage", model_name="custom_cnn", version="t", metrics={})
    spec = ct.models.MLModel(rec.path, skip_model_load=True).get_spec()
    blocks = [b for f in spec.mlProgram.functions.values() for b in f.block_specializations.values()]
    ops = {op.type for b in blocks for op in b.operations}
    assert {"max_pool", "avg_pool", "mul"} <= ops and ops & {"upsample_bilinear", "resize_bilinear", "resize"}, ops


def test_grey_input_only_and_a_segmenter_unit_that_is_not_complete_is_named(tmp_path):
    from covid_models.segmenter import SegmenterUnitError
    from covid_models.train_config import TrainConfig, slot_key

    with pytest.raises(ValueError, match="channels=1"):
        TrainConfig(model="custom_cnn", split="s", out="o", channels=3, lung_fields="x")
    half = tmp_path / "segmenters" / "killed"
    half.mkdir(parents=True)
    (half / "model.keras").write_bytes(b"half")
    with pytest.raises(SegmenterUnitError, match="killed"):
        slot_key(TrainConfig(model="custom_cnn", split="s", out="o", lung_fields=str(half)))


@pytest.fixture(scope="module")
def segmenter(shenzhen_few, tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("lung-fields-segmenter")
    return train_segmenter_unit(shenzhen_few, base / "store", TINY, cache_dir=base / "cache")["uri"]


@pytest.mark.slow  # a segmenter and a classifier trained: about a minute and a half
def test_a_lung_field_training_keeps_the_segmenter_it_was_given(small_split, segmenter, tmp_path):
    """A real training (custom CNN, 32 px, one epoch) with a real segmenter unit: its own slot key, the
    unit's segmenter frozen inside the saved model (weights unchanged by the classifier's training), and
    the saved model's lung fields equal to a block built from the unit."""
    import keras

    from covid_models.describe import describe_weights
    from covid_models.feature_cache import feature_path
    from covid_models.segmenter import load_segmenter
    from covid_models.train import train_model
    from covid_models.train_config import TrainConfig, slot_key

    common = dict(model="custom_cnn", split=small_split, input_size=32, epochs=1, cache_dir=str(tmp_path / "c"))
    cfg = TrainConfig(out=str(tmp_path / "lungs"), lung_fields=segmenter, **common)
    plain = TrainConfig(out=str(tmp_path / "plain"), **common)
    assert slot_key(cfg) != slot_key(plain)
    moved = TrainConfig(out=str(tmp_path / "lungs"), lung_fields=segmenter + "/", **common)
    assert slot_key(moved) == slot_key(cfg)  # keyed on the segmenter's bytes, not how its URI is spelt

    result = train_model(cfg)
    assert result.status == "trained"
    saved = keras.saving.load_model(Path(result.out.removeprefix("file://")) / "model.keras", safe_mode=True)
    unit_seg, key, _ = load_segmenter(segmenter, tmp_path / "c")
    inside = saved.get_layer("lung_fields").get_layer("lung_unet")
    for a, b in zip(inside.get_weights(), unit_seg.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = _xrays(1, 32)
    np.testing.assert_allclose(
        saved.get_layer("lung_fields").predict(x, verbose=0),
        lung_fields.build_lung_fields(unit_seg, 32).predict(x, verbose=0),
        rtol=1e-6,
        atol=1e-4,
    )
    meta = json.loads((Path(result.out.removeprefix("file://")) / "metrics.json").read_text())
    assert meta["config"]["lung_fields"] == segmenter
    said = describe_weights("custom_cnn", meta["config"])  # what the cards and the app say the model is
    assert said.startswith("trained from scratch")
    assert f"lung fields: the picture outside the lungs that segmenter {key} finds" in said

    # A transfer model's cached backbone features are keyed on the lung fields too.
    from covid_models.data import load_split_data

    data = load_split_data(small_split, tmp_path / "c")
    mn = dict(model="mobilenet_v2", split=small_split, out="o", input_size=32, weights="scratch")
    assert feature_path(tmp_path, data, TrainConfig(**mn, lung_fields=segmenter), "train") != feature_path(
        tmp_path, data, TrainConfig(**mn), "train"
    )
