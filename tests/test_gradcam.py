"""Grad-CAM: equal to a hand computation, on nested backbones too; the shortcut score; the fixed
gallery; the report's inline pictures."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from covid_eval.gallery import card_lines
from covid_eval.gradcam import (
    border_mask,
    gradcam,
    gradcam_with_probs,
    shortcut_baseline,
    shortcut_meaning,
    shortcut_score,
    target_layer,
)


def _tiny_nested(stride: int = 2):
    """The builders' structure in miniature: image -> preprocess -> backbone (nested) -> head."""
    import keras

    rng = np.random.default_rng(3)
    inner_in = keras.Input((8, 8, 3))
    act = keras.layers.Conv2D(4, 3, strides=stride, padding="same", activation="relu", name="conv")(inner_in)
    backbone = keras.Model(inner_in, act, name="backbone")
    head = keras.Sequential(
        [
            keras.Input(act.shape[1:]),
            keras.layers.Flatten(),
            keras.layers.Dense(4, activation="softmax", name="predictions"),
        ],
        name="head",
    )
    image = keras.Input((8, 8, 1), name="image")
    pre = keras.layers.Conv2D(3, 1, name="preprocess", trainable=False)
    model = keras.Model(image, head(backbone(pre(image))), name="tiny")
    model.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in model.get_weights()])
    return model, pre, backbone, head


def _hand_gradcam(model, pre, backbone, head, x, cls=None):
    """Grad-CAM by hand: logits = flatten(A) @ W + b, so dlogit_c/dA = W[:, c] reshaped."""
    import tensorflow as tf

    a = backbone(pre(x)).numpy()  # (N, h, w, K)
    kernel, bias = (w.numpy() for w in head.get_layer("predictions").weights)
    logits = a.reshape(len(a), -1) @ kernel + bias
    cls = logits.argmax(axis=1) if cls is None else np.full(len(a), cls)
    maps = []
    for i, c in enumerate(cls):
        grad = kernel[:, c].reshape(a.shape[1:])  # dlogit_c / dA
        alpha = grad.mean(axis=(0, 1))  # (K,)
        cam = np.maximum((a[i] * alpha).sum(axis=-1), 0)
        cam = cam / cam.max() if cam.max() > 0 else cam
        maps.append(cam)
    up = tf.image.resize(np.stack(maps)[..., None].astype("float32"), x.shape[1:3], method="bilinear")[..., 0]
    return up.numpy(), logits


@pytest.mark.parametrize("stride", [1, 2])
def test_gradcam_equals_the_hand_computation(stride):
    model, pre, backbone, head = _tiny_nested(stride)
    x = np.random.default_rng(0).uniform(0, 255, (5, 8, 8, 1)).astype("float32") / 255.0
    assert target_layer(model)[1].name == "conv"
    want, logits = _hand_gradcam(model, pre, backbone, head, x)
    got, probs = gradcam_with_probs(model, x)
    assert got.shape == (5, 8, 8)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(probs, model.predict(x, verbose=0), atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(1), logits.argmax(1))
    want2, _ = _hand_gradcam(model, pre, backbone, head, x, cls=2)  # a given class
    np.testing.assert_allclose(gradcam(model, x, class_index=2), want2, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "layer"), [("mobilenet_v2", "out_relu"), ("vgg16", "block5_conv3"), ("custom_cnn", "conv3")]
)
def test_nested_backbones_give_finite_varied_maps_at_input_size(name, layer):
    import keras

    from covid_models.builders import build_model

    keras.utils.set_random_seed(0)  # a random network's map can be all zero for an image (ReLU): fix the draw
    model = build_model(name, input_size=64, weights="none", trainable="all" if name != "custom_cnn" else "frozen")
    x = np.random.default_rng(1).uniform(0, 255, (3, 64, 64, 1)).astype("float32")
    owner, found = target_layer(model)
    assert found.name == layer and owner.name == ("custom_cnn" if name == "custom_cnn" else "backbone")
    heat, probs = gradcam_with_probs(model, x)
    assert heat.shape == (3, 64, 64) and np.isfinite(heat).all()
    assert heat.min() >= 0 and heat.max() <= 1 and heat.max() > 0.5
    assert (heat.std(axis=(1, 2)) > 1e-3).sum() >= 2  # not constant (an all-zero map is a legitimate answer)
    np.testing.assert_allclose(probs, model.predict(x, verbose=0), atol=1e-4)  # the replayed pass is the model


def test_shortcut_score_on_synthetic_maps():
    h = w = 50
    band = border_mask(h, w)
    assert band.sum() == h * w - 40 * 40  # 10% of each side: 5 px
    assert shortcut_score(band[None].astype(float)) == pytest.approx(1.0)
    assert shortcut_score((~band)[None].astype(float)) == pytest.approx(0.0)
    uniform = np.ones((2, h, w))
    assert shortcut_score(uniform) == pytest.approx(1 - 0.8**2)  # 0.36: the band's area share
    assert shortcut_baseline((h, w)) == pytest.approx(0.36)
    lungs = np.zeros((h, w), bool)
    lungs[10:40, 5:25] = True  # a "lung" of 600 px
    heat = np.zeros((h, w))
    heat[20, 10] = 3.0  # inside
    heat[0, 0] = 1.0  # outside
    assert shortcut_score(heat, masks=lungs) == pytest.approx(0.25)
    assert shortcut_score(uniform, masks=np.stack([lungs, lungs])) == pytest.approx(1 - 600 / 2500)
    assert shortcut_baseline((h, w), masks=lungs[None]) == pytest.approx(1 - 600 / 2500)
    assert np.isnan(shortcut_score(np.zeros((1, h, w))))  # nothing to share
    text = shortcut_meaning(0.05, 0.36, "border band 10%")
    assert "0.05" in text and "0.36" in text and "lungs" in text
    assert "shortcuts" in shortcut_meaning(0.5, 0.36, "border band 10%")


def _model_slot(root: Path, size: int = 32) -> str:
    """A stored model slot (model.keras + metrics.json) of an untrained custom CNN."""
    import keras

    from covid_data.store import Unit, open_store
    from covid_models.builders import build_model

    keras.utils.set_random_seed(7)
    model = build_model("custom_cnn", input_size=size)
    local = root / "model.keras"
    model.save(local)
    slot = Unit(open_store(str(root / "slot")), "", "metrics.json")
    slot.put_file("model.keras", local)
    slot.complete({"config": {"model": "custom_cnn", "input_size": size, "channels": 1}})
    return slot.uri


def _run_folder_pictures(store: str, run_id: str) -> None:
    import tempfile

    from covid_models.metrics import plot_confusion, plot_history
    from covid_registry.run_folder import run_unit

    unit = run_unit(store, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        hist = {
            "loss": [1.2, 0.9, 0.7],
            "val_loss": [1.3, 1.0, 0.9],
            "accuracy": [0.4, 0.6, 0.7],
            "val_accuracy": [0.4, 0.5, 0.6],
        }
        unit.put_file("models/custom_cnn/curves.png", plot_history(hist, "custom_cnn", Path(tmp) / "c.png"))
        cm = [[3, 0, 0, 0], [1, 2, 0, 0], [0, 0, 3, 0], [0, 1, 0, 2]]
        unit.put_file(
            "models/custom_cnn/confusion_test.png", plot_confusion(cm, "custom_cnn: test", Path(tmp) / "m.png")
        )


def test_gallery_is_fixed_and_the_report_shows_it_inline(small_split, tmp_path):
    from PIL import Image

    from covid_data.store import open_store
    from covid_eval.gallery import gallery
    from covid_registry.run_folder import report_markdown, with_card_section
    from tasks.explain import explain_models

    uri = _model_slot(tmp_path)
    a = gallery(uri, small_split, per_class=2, seed=0, out_dir=tmp_path / "a")
    b = gallery(uri, small_split, per_class=2, seed=0, out_dir=tmp_path / "b")
    files = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert files and files == sorted(p.name for p in (tmp_path / "b").glob("*.png"))
    assert [r["file"] for r in a] == [r["file"] for r in b] and [r["path"] for r in a] == [r["path"] for r in b]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
        with Image.open(tmp_path / "a" / f) as im:
            assert max(im.size) <= 256
    assert {r["true"] for r in a} == {"COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"}
    for r in a:  # at most per_class right and per_class wrong per class; titles in the records
        same = [x for x in a if x["true"] == r["true"] and x["correct"] == r["correct"]]
        assert len(same) <= 2 and (r["predicted"] == r["true"]) == r["correct"]
    other = gallery(uri, small_split, per_class=2, seed=1, out_dir=tmp_path / "c")
    assert [r["path"] for r in other] != [r["path"] for r in a] or len(a) < 4  # the seed picks the images

    store, run_id = str(tmp_path / "store"), "20250101T000000Z-test"
    explain = explain_models.fn(store, run_id, small_split, [{"model": "custom_cnn", "out": uri}])
    (rec,) = explain
    assert rec["method"] == "border band 10%" and rec["baseline"] == pytest.approx(
        1 - (26 / 32) ** 2, abs=1e-4
    )  # 3 px of 32
    assert 0 <= rec["shortcut_score"] <= 1 and rec["n"] == 12  # 3 test images per class
    s = open_store(store)
    for p in rec["images"]:
        assert s.exists(f"runs/{run_id}/{p}")
    stored = json.loads(s.read_text(f"runs/{run_id}/gradcam/custom_cnn/gradcam.json"))
    assert stored["shortcut_score"] == rec["shortcut_score"]
    json.dumps(rec)  # a small, plain record

    _run_folder_pictures(store, run_id)
    export = {
        "model": "custom_cnn",
        "config": {"input_size": 32, "weights": "none"},
        "variants": {
            "coreml": {"bytes": 2_000_000, "checks": {"runtime_parity": "skipped"}},
            "tflite": {"bytes": 1_000_000, "checks": {"max_prob_diff": 1e-6}},
        },
    }
    run = {
        "run_id": run_id,
        "dataset": {"dataset_version": "v1", "split_hash": "h1"},
        "preset": {"name": "smoke"},
        "exports": [export],
        "models": {"custom_cnn": f"{store}/runs/{run_id}/models/custom_cnn"},
        "explain": explain,
    }
    plain = report_markdown(run, "| board |")  # the old call: no pictures, same text
    assert "data:image" not in plain and "int8 not built" in plain and "Shortcut score" in plain
    report = report_markdown(run, "| board |", store=store)
    pictures = re.findall(r"!\[([^\]]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", report)
    assert {alt for alt, _ in pictures} == {
        "custom_cnn training curves",
        "custom_cnn confusion matrix, test",
        "Grad-CAM gallery of custom_cnn",
    }
    for _, data in pictures:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.format == "PNG" and max(im.size) <= 600
    assert len(report.encode()) < 600_000, len(report.encode())  # one model; three stay a few MB
    assert "| custom_cnn |" in report and "uniform-map baseline" in report
    small = report_markdown(run, "| board |", store=store, image_budget=10_000)  # over budget: linked
    assert len(small.encode()) < 20_000 and "left out of this report" in small

    card = with_card_section("# m\n\n## Metrics\nx\n\n## Limits\n- y\n", card_lines(rec))
    assert card.index("## Where the model looks") < card.index("## Limits") and "Shortcut score" in card


def test_shortcut_score_uses_the_lung_masks_where_the_source_has_them(tmp_path):
    """A Kaggle-layout source with a lung mask for every image: the score is the Grad-CAM mass
    outside each image's own mask (as stored in the dataset version), not the border band."""
    from PIL import Image

    from covid_data.dataset import fetch_dataset, load_manifest
    from covid_data.split import SplitConfig, write_split
    from covid_data.store import open_store
    from covid_eval.gallery import load_masks
    from tasks.explain import explain_models
    from tests.conftest import make_kaggle_folder

    src = make_kaggle_folder(tmp_path / "src", n_per_class=10, seed=43, masks="all")
    ref = fetch_dataset(str(src), str(tmp_path / "data"))
    data = open_store(ref.store)
    split = write_split(data, ref.version, load_manifest(data, ref.version), SplitConfig(0.6, 0.2, 0.2)).uri
    uri = _model_slot(tmp_path)
    (rec,) = explain_models.fn(
        str(tmp_path / "store"), "20250101T000000Z-masks", split, [{"model": "custom_cnn", "out": uri}]
    )
    assert rec["method"] == "lung masks"
    # the synthetic masks cover two ellipses: the uniform-map baseline is the area outside them
    with Image.open(next((src / "COVID-19_Radiography_Dataset" / "COVID" / "masks").glob("*.png"))) as im:
        lungs = load_masks([im.filename], 32)
    assert rec["baseline"] == pytest.approx(float(np.mean(~lungs)), abs=5e-4)  # stored to 3 places
    assert 0.3 < rec["baseline"] < 0.8 and 0 <= rec["shortcut_score"] <= 1
    band = 1 - (26 / 32) ** 2
    assert abs(rec["baseline"] - band) > 0.05  # the masks, not the band, decided it
