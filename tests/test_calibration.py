"""Temperature scaling: fitted on validation, never worse there, and carried by the exports."""

from __future__ import annotations

import numpy as np
import pytest

from covid_eval.calibration import (
    apply_temperature,
    calibrate,
    calibrated_model,
    ensure_calibration,
    fit_temperature,
)
from covid_models.metrics import expected_calibration_error


def _overconfident(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """70% right, always ~99% sure: the textbook case for T > 1."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    pred = np.where(rng.random(n) < 0.7, y, (y + rng.integers(1, 4, n)) % 4)
    logits = rng.normal(0, 0.3, (n, 4))
    logits[np.arange(n), pred] += 5.0
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True), y


def test_temperature_one_is_the_identity_and_the_class_never_changes():
    p, _ = _overconfident()
    np.testing.assert_allclose(apply_temperature(p, 1.0), p, atol=1e-9)
    for t in (0.5, 2.0, 7.0):
        q = apply_temperature(p, t)
        np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-12)
        assert (q.argmax(1) == p.argmax(1)).all()


def test_overconfident_model_gets_a_temperature_above_one_and_a_lower_ece():
    p, y = _overconfident()
    t = fit_temperature(p, y)
    assert t > 1.5
    assert expected_calibration_error(apply_temperature(p, t), y) < 0.5 * expected_calibration_error(p, y)
    # fitted on one half, it carries to the other (no peeking)
    q, z = _overconfident(seed=1)
    assert expected_calibration_error(apply_temperature(q, t), z) < expected_calibration_error(q, z)


def _groups(*groups: tuple[float, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels): per group, ``n`` images at confidence ``conf`` of which ``right`` are right."""
    ps, ys = [], []
    for conf, n, right in groups:
        ps.append(np.tile([conf] + [(1 - conf) / 3] * 3, (n, 1)))
        ys.append(np.r_[np.zeros(right, int), np.ones(n - right, int)])
    return np.vstack(ps), np.concatenate(ys)


def test_a_temperature_that_would_raise_validation_ece_is_not_applied():
    # Under-confident at 0.95 (10 of 10 right), calibrated at 0.6 (6 of 10): the likelihood wants
    # T < 1, which sharpens the second group too and raises ECE by about 2 points.
    p, y = _groups((0.95, 10, 10), (0.6, 10, 6))
    fitted = fit_temperature(p, y)
    assert fitted < 0.9
    assert expected_calibration_error(apply_temperature(p, fitted), y) > expected_calibration_error(p, y) + 0.01
    t, note = calibrate(p, y)
    assert t == 1.0 and note.endswith("not applied") and f"{fitted:.3f}" in note


def test_a_calibrated_model_keeps_its_fitted_temperature_despite_float_noise():
    # Calibrated in every bin: the fitted T is 1 up to the optimiser's tolerance, and the ECE it
    # gives differs from T = 1 by float noise only; that is no reason to refuse it.
    p, y = _groups((0.75, 8, 6), (0.95, 20, 19))
    t, note = calibrate(p, y)
    assert abs(t - 1.0) < 1e-3 and note.startswith("fitted on validation")


@pytest.fixture(scope="module")
def trained(small_split, tmp_path_factory):
    from covid_models.train import TrainConfig, train_model

    out = tmp_path_factory.mktemp("cal") / "custom_cnn"
    cfg = TrainConfig(model="custom_cnn", split=small_split, out=str(out), input_size=32, epochs=3, patience=0,
                      weights="none", verbose=0)  # fmt: skip
    train_model(cfg)
    return str(out), small_split


def test_real_model_validation_ece_does_not_get_worse_and_is_stored_once(trained):
    model_uri, split = trained
    rec = ensure_calibration(model_uri, split)
    assert rec["val"]["ece_after"] <= rec["val"]["ece_before"] + 1e-12
    assert rec["val"]["nll_after"] <= rec["val"]["nll_before"] + 1e-9  # what the fit minimises
    assert rec["test"]["n"] > 0 and 0.05 <= rec["temperature"] <= 20
    assert ensure_calibration(model_uri, split) == rec  # complete: read back, not refitted


def test_exports_carry_the_temperature(trained, tmp_path):
    from covid_models.data import image_dataset, load_split_data
    from covid_models.stored import load_trained_model
    from covid_registry.exports import ensure_exports

    model_uri, split = trained
    t = 2.5  # any temperature: the TFLite file must give exactly the scaled Keras probabilities
    both = ensure_exports(model_uri, ["coreml", "tflite"], split_uri=split, version="t", metrics={}, temperature=t)
    assert both["coreml"]["temperature"] == t and both["coreml"]["checks"]["labels"][0] == "COVID"
    v = both["tflite"]
    assert v["temperature"] == t and v["checks"]["max_prob_diff"] < 1e-5
    import tensorflow as tf

    model = load_trained_model(f"{model_uri}/model.keras")
    x = next(iter(image_dataset(load_split_data(split), "test", size=32, channels=1, batch_size=4)))[0].numpy()
    it = tf.lite.Interpreter(model_path=v["uri"])
    it.allocate_tensors()
    got = []
    for img in x:
        it.set_tensor(it.get_input_details()[0]["index"], img[None])
        it.invoke()
        got.append(it.get_tensor(it.get_output_details()[0]["index"])[0])
    np.testing.assert_allclose(got, apply_temperature(model.predict(x, verbose=0), t), atol=1e-5)
    assert calibrated_model(model, 1.0) is model
    # Another temperature is another export unit: the T = 2.5 file is never handed out for T = 1.
    plain = ensure_exports(model_uri, ["tflite"], split_uri=split, version="t", metrics={}, temperature=1.0)["tflite"]
    assert plain["temperature"] == 1.0 and plain["uri"] != v["uri"] and "-t2.5/" in v["uri"]
    again = ensure_exports(model_uri, ["tflite"], split_uri=split, version="t", metrics={}, temperature=t)["tflite"]
    assert again["uri"] == v["uri"]  # complete: read back, not converted again
