"""The averaged ensemble: a real Keras model whose probabilities are the mean of its members'
temperature-scaled ones, stored as a model slot that ranks, exports and explains like the others."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")


def _slot(root: Path, name: str, size: int, seed: int) -> str:
    """A complete model slot holding an untrained (seeded) model."""
    import keras

    from covid_data.store import Unit, open_store
    from covid_models.builders import build_model

    keras.utils.set_random_seed(seed)
    model = build_model(name, input_size=size, weights="none")
    local = root / f"{name}.keras"
    model.save(local)
    slot = Unit(open_store(str(root / f"slot-{name}")), "", "metrics.json")
    slot.put_file("model.keras", local)
    slot.complete({"config": {"model": name, "input_size": size, "channels": 1}, "result": {"model": name}})
    return slot.uri


def _softmax_t(p: np.ndarray, t: float) -> np.ndarray:
    z = np.log(np.clip(p, 1e-7, 1.0)) / t
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    return [
        {"model": "mobilenet_v2", "out": _slot(root, "mobilenet_v2", 48, 1), "temperature": 1.7},
        {"model": "custom_cnn", "out": _slot(root, "custom_cnn", 32, 2), "temperature": 0.8},
    ]


def test_ensemble_is_the_mean_of_calibrated_members_and_a_stored_slot(members, small_split, tmp_path):
    import tensorflow as tf

    from covid_data.labels import CLASSES
    from covid_data.store import open_store
    from covid_eval.gradcam import gradcam, gradcam_with_probs
    from covid_models.data import image_dataset, load_split_data
    from covid_models.ensemble import build_and_evaluate, describe_members, ensemble_slot_uri
    from covid_models.metrics import classification_metrics
    from covid_models.stored import load_trained_model, model_slot
    from covid_registry.convert import export_tflite, tflite_parity
    from covid_registry.model_card import describe_weights, model_card

    out = ensemble_slot_uri(str(tmp_path / "store"), "h1", members)
    assert out != ensemble_slot_uri(str(tmp_path / "store"), "h1", [members[0], {**members[1], "temperature": 0.9}])
    # What a kill mid-build leaves (objects, no marker) is replaced, never trusted.
    open_store(out).put_bytes("model.keras", b"half a model")
    result = build_and_evaluate(members, small_split, out)
    assert result.model == "ensemble" and result.status == "trained" and result.epochs == 0
    stored = model_slot(out).record()
    cfg = stored["config"]
    assert cfg["input_size"] == 48 and cfg["channels"] == 1
    assert [(m["model"], m["input_size"], m["temperature"]) for m in cfg["members"]] == [
        ("mobilenet_v2", 48, 1.7),
        ("custom_cnn", 32, 0.8),
    ]

    # By hand: each member on its own input (the custom CNN's an antialiased bilinear resize of the
    # 48 px image, as training resizes).
    data = load_split_data(small_split)
    xs = np.concatenate([x.numpy() for x, _ in image_dataset(data, "val", size=48, channels=1, batch_size=32)])
    a = load_trained_model(open_store(members[0]["out"]).uri_for("model.keras"))
    b = load_trained_model(open_store(members[1]["out"]).uri_for("model.keras"))
    small = tf.image.resize(xs, (32, 32), method="bilinear", antialias=True).numpy()
    expected = (_softmax_t(a.predict(xs, verbose=0), 1.7) + _softmax_t(b.predict(small, verbose=0), 0.8)) / 2
    ens = load_trained_model(open_store(out).uri_for("model.keras"))  # safe mode: no Lambda layers
    got = ens.predict(xs, verbose=0)
    assert np.abs(got - expected).max() < 1e-5
    y = data.files("val")[1]
    assert stored["metrics"]["val"]["accuracy"] == pytest.approx(classification_metrics(expected, y)["accuracy"])
    assert result.val_accuracy == stored["metrics"]["val"]["accuracy"]
    assert set(stored["metrics"]) == {"val", "test"} and len(stored["metrics"]["test"]["confusion_matrix"]) == len(
        CLASSES
    )

    text = describe_weights("ensemble", cfg, stored.get("weights"))
    assert text == describe_members(cfg) and "mobilenet_v2 (48 px, T=1.70)" in text and "custom_cnn (32 px" in text

    card = model_card("ensemble", stored["metrics"], cfg, {"version": "v", "split_hash": "h1", "counts": {}})
    assert text in card and "temperatures were fitted on validation" in card and "epochs max" not in card
    # Chosen and calibrated on validation, it ranks above its best member only by a significant win there.
    fair = stored["result"]["extra"]["val_vs_best_member"]
    best_right = a.predict(xs, verbose=0).argmax(1) == y  # the best member alone (T does not change its class)
    ens_right = expected.argmax(1) == y
    assert fair["model"] == "mobilenet_v2"
    assert (fair["only_ensemble_right"], fair["only_member_right"]) == (
        int((ens_right & ~best_right).sum()),
        int((~ens_right & best_right).sum()),
    )
    significant = fair["only_ensemble_right"] > fair["only_member_right"] and fair["p"] < 0.05
    assert ("rank_below" in stored["result"]["extra"]) == (not significant)

    again = build_and_evaluate(members, small_split, out)  # complete: read back, never rebuilt
    assert again.status == "cached" and again.val_accuracy == result.val_accuracy

    # One file for phones: the TFLite export gives the same probabilities, with builtin ops only
    # (no Flex or custom op: ScaleAndTranslate, behind an antialiased Resizing layer, is not one).
    rec = export_tflite(ens, tmp_path / "ensemble.tflite")
    assert tflite_parity(Path(rec.path), ens, xs[:4]) < 1e-5
    interpreter = tf.lite.Interpreter(
        model_path=rec.path,
        experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert {"FULLY_CONNECTED", "TRANSPOSE"} <= ops, ops  # the resize, as fixed matrices
    assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM" or "RESIZE" in op], ops

    # Grad-CAM of the ensemble: the mean of its members' maps for the ensemble's class, peak 1.
    heat, probs = gradcam_with_probs(ens, xs[:3])
    cls = probs.argmax(axis=1)
    ha = gradcam(a, xs[:3], cls)
    hb = tf.image.resize(gradcam(b, small[:3], cls)[..., None], (48, 48), method="bilinear").numpy()[..., 0]
    total = ha + hb
    want = total / np.maximum(total.max(axis=(1, 2), keepdims=True), 1e-12)
    assert heat.shape == (3, 48, 48) and np.abs(heat - want).max() < 1e-4
    assert np.abs(probs - expected[:3]).max() < 1e-5


def test_in_graph_resize_is_the_antialiased_resize_training_uses():
    """The ensemble's resize layers give what covid_models.data gives a member at its size:
    tf.image.resize(bilinear, antialias=True), on a real X-ray at the largest member's size."""
    import keras
    import tensorflow as tf

    from covid_models.data import decode_resize
    from covid_models.ensemble import antialiased_resize
    from tests.conftest import sample_files

    path = next(iter(sample_files(1, seed=3).values()))[0]
    big = decode_resize(str(path), 224, 1).numpy().astype("float32")[None]  # (1, 224, 224, 1), 0-255
    for size in (160, 64):
        inp = keras.Input(shape=(224, 224, 1))
        layer = keras.Model(inp, antialiased_resize(inp, size, name=f"resize_{size}"))
        got = layer.predict(big, verbose=0)
        want = tf.image.resize(big, (size, size), method="bilinear", antialias=True).numpy()
        plain = tf.image.resize(big, (size, size), method="bilinear").numpy()
        assert got.shape == (1, size, size, 1)
        assert np.abs(got - want).max() < 1e-2  # float rounding on 0-255 pixels
        assert np.abs(plain - want).max() > 1.0  # the test can tell an aliased resize apart
        assert not any(w.trainable for w in layer.weights)  # a fixed map: never trained or fine-tuned


def test_build_ensemble_task_picks_the_best_on_validation(members, small_split, tmp_path):
    from covid_eval.calibration import calibration_unit
    from tasks.models import build_ensemble

    for m in members:  # stored calibrations, as export_model would have written them
        if calibration_unit(m["out"]).record() is None:
            calibration_unit(m["out"]).complete({"temperature": m["temperature"], "method": "temperature scaling"})
    records = [
        {"model": "custom_cnn", "status": "trained", "out": members[1]["out"], "val_accuracy": 0.5},
        {"model": "vgg16", "status": "skipped", "out": None, "val_accuracy": None},
        {"model": "mobilenet_v2", "status": "cached", "out": members[0]["out"], "val_accuracy": 0.7},
        {"model": "resnet50", "status": "failed", "out": None, "val_accuracy": None},
    ]
    store = str(tmp_path / "store")
    rec = build_ensemble.fn(records, 3, small_split, "h2", store, None)
    assert rec["model"] == "ensemble" and rec["status"] == "trained"
    stored = json.loads(Path(rec["out"], "metrics.json").read_text())
    assert [m["model"] for m in stored["config"]["members"]] == ["mobilenet_v2", "custom_cnn"]  # by validation
    assert [m["temperature"] for m in stored["config"]["members"]] == [1.7, 0.8]
    assert build_ensemble.fn(records, 0, small_split, "h2", store, None) is None  # switched off
    assert build_ensemble.fn(records[:2], 3, small_split, "h2", store, None) is None  # one trained model
