"""Temperature scaling: calibrated probabilities for every published model.

One temperature ``T`` per model, fitted on the validation split by minimising the negative log
likelihood (Guo et al., 2017): ``p' = softmax(log p / T)``. It never changes the predicted class,
so accuracy, the ranking and the champion comparison are untouched; only the confidence moves.
When the fitted temperature would not lower the validation ECE, ``T = 1`` is kept and the record
says so. The test split is reported, never used to fit.

The calibration is a stored unit under the model slot, ``calibration/`` completed by
``calibration.json``; the exports (Core ML, TFLite, and so the phone app) carry the temperature.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from covid_data.store import Unit, open_store
from covid_models.data import load_split_data
from covid_models.metrics import expected_calibration_error
from covid_models.stored import CALIBRATION_MARKER, StoredModel

log = logging.getLogger(__name__)

# ECE differences below this are float noise (a fitted T of 1.000001 on a calibrated model), not a change.
ECE_TOLERANCE = 1e-6
MARKER = CALIBRATION_MARKER.rsplit("/", 1)[-1]  # calibration/calibration.json: StoredModel reads it
EPS = 1e-7
LOG_T_BOUNDS = (-3.0, 3.0)  # T in [0.05, 20]


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row-wise, in float64."""
    z = np.log(np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0)) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], EPS, 1.0))))


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the negative log likelihood of ``y`` (bounded, 1-D search)."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(
        lambda log_t: nll(apply_temperature(probs, float(np.exp(log_t))), y), bounds=LOG_T_BOUNDS, method="bounded"
    )
    return float(np.exp(res.x))


def summary(probs: np.ndarray, y: np.ndarray, temperature: float) -> dict[str, float]:
    cal = apply_temperature(probs, temperature)
    return {
        "ece_before": expected_calibration_error(probs, y),
        "ece_after": expected_calibration_error(cal, y),
        "nll_before": nll(probs, y),
        "nll_after": nll(cal, y),
        "n": int(len(y)),
    }


def calibrate(val_probs: np.ndarray, val_y: np.ndarray) -> tuple[float, str]:
    """(temperature, note): fitted on validation; 1.0 when that would not lower validation ECE."""
    t = fit_temperature(val_probs, val_y)
    before = expected_calibration_error(val_probs, val_y)
    after = expected_calibration_error(apply_temperature(val_probs, t), val_y)
    if after > before + ECE_TOLERANCE:
        return 1.0, f"the fitted temperature {t:.3f} raised validation ECE ({before:.4f} -> {after:.4f}): not applied"
    return t, f"fitted on validation (n={len(val_y)}) by negative log likelihood"


def calibration_unit(model_uri: str) -> Unit:
    return Unit(open_store(model_uri), "calibration", MARKER)


def _predictions(model_uri: str, split_uri: str, max_per_class: int | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    model = StoredModel(model_uri)
    data = load_split_data(split_uri, max_per_class=max_per_class)
    out = {}
    for split in ("val", "test"):
        if data.size(split):
            probs, frame = model.predict_split(data, split)
            out[split] = (probs, frame["y"].to_numpy(dtype="int32"))
    return out


def ensure_calibration(model_uri: str, split_uri: str, max_per_class: int | None = None) -> dict[str, Any]:
    """The model's calibration record (fitted once, then read back)."""
    unit = calibration_unit(model_uri)
    rec = unit.record()
    if rec is None:
        preds = _predictions(model_uri, split_uri, max_per_class)
        if "val" not in preds:
            raise ValueError(f"{split_uri} has no validation split: nothing to fit a temperature on")
        t, note = calibrate(*preds["val"])
        rec = {"temperature": t, "method": "temperature scaling", "note": note}
        rec |= {split: summary(p, y, t) for split, (p, y) in preds.items()}
        unit.complete(rec)
        rec = unit.record()
        log.info("calibration of %s: T=%.3f, val ECE %.4f -> %.4f", model_uri, t, rec["val"]["ece_before"],
                 rec["val"]["ece_after"])  # fmt: skip
    return {k: v for k, v in rec.items() if k != "objects"}


def calibrated_model(model, temperature: float):
    """``model`` with its probabilities temperature-scaled (``model`` itself when T is 1)."""
    if abs(float(temperature) - 1.0) < 1e-9:
        return model
    import keras

    inp = keras.Input(shape=tuple(model.input_shape[1:]), name="image")
    p = model(inp)
    logits = keras.ops.log(keras.ops.clip(p, EPS, 1.0)) / float(temperature)
    out = keras.layers.Activation("softmax", name="calibrated", dtype="float32")(logits)
    return keras.Model(inp, out, name=model.name)
