"""The out-of-distribution guard: does a picked image look like a frontal chest X-ray at all?

The score is the distance of the image from the training X-rays in the feature space of an
ImageNet MobileNetV2: L2-normalised global-average-pooled features, minus their training mean,
less their projection on the training set's top ``COMPONENTS`` principal components; the score
is the squared norm of that residual (x100). Images unlike chest X-rays (other radiographs,
photographs, screenshots) have features the X-ray subspace cannot explain. The threshold is the
``QUANTILE`` quantile of the scores of the validation split, so about 0.5% of validation X-rays
are flagged by design. The whole computation, image to score, is one TFLite file that the app
runs on the device.

The view check (:mod:`covid_app.view`) is fitted here too, on the same input: training-free cues of a
frontal film whose thresholds are quantiles over the train and validation X-rays; the record keeps it
under ``view``.

A guard is a stored unit, ``guards/<split>/<key>/`` completed by ``guard.json``; the key covers
the settings, the weights file and this module's code, so it is fitted once per split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from covid_app import view as V
from covid_data.store import Store, Unit, as_store
from covid_models.builders import preprocess_layer
from covid_models.data import decode_resize, load_split_data
from covid_models.train_config import file_sha256
from covid_models.weights import MissingWeightsError, resolve_imagenet
from covid_registry.convert import converter_output, log_beside

log = logging.getLogger(__name__)

MARKER = "guard.json"
INPUT_SIZE = 128
COMPONENTS = 64
QUANTILE = 0.995
SCALE = 100.0  # scores of a few units read better than 0.0x
BACKBONE = "mobilenet_v2"
LAYER = "out_relu"  # where the features are taken: MobileNetV2's last layer
METHOD = (
    f"Distance from the training X-rays in the feature space of an ImageNet MobileNetV2 ({INPUT_SIZE} px, "
    f"L2-normalised pooled features): the part the training set's top {COMPONENTS} principal components do "
    f"not explain. Threshold: the {QUANTILE:.1%} quantile of the validation X-rays' scores."
)


class GuardUnavailableError(RuntimeError):
    """The guard cannot be fitted here (its ImageNet weights are missing)."""


def colourfulness(rgb: np.ndarray) -> float:
    """Mean over pixels of (max - min) channel / 255: 0 for a grey image, what the app computes."""
    if rgb.ndim == 2 or rgb.shape[-1] == 1:
        return 0.0
    c = rgb[..., :3].astype(np.float32)
    return float((c.max(-1) - c.min(-1)).mean() / 255.0)


def _weights() -> Path | str:

    try:
        return resolve_imagenet(BACKBONE, INPUT_SIZE)
    except MissingWeightsError as e:
        raise GuardUnavailableError(f"the out-of-distribution guard needs ImageNet MobileNetV2 weights: {e}") from e


def feature_model(weights: Path | str, layer: str | None = None):
    """Image (0..255, grey, ``INPUT_SIZE`` px) -> L2-normalised pooled MobileNetV2 features, taken at
    ``layer`` (default ``LAYER``; the backbone's last blocks hold most of its weights, and the phone
    downloads them)."""
    import keras

    layer = layer or LAYER
    inp = keras.Input((INPUT_SIZE, INPUT_SIZE, 1), name="image")
    x = preprocess_layer("tf", 1)(inp)  # MobileNetV2's preprocess_input, grey -> RGB
    try:
        backbone = keras.applications.MobileNetV2(
            input_shape=(INPUT_SIZE, INPUT_SIZE, 3), include_top=False, weights=str(weights)
        )
    except Exception as e:  # "imagenet" with no network
        raise GuardUnavailableError(f"the guard's ImageNet MobileNetV2 weights could not be loaded ({e})") from e
    if layer != backbone.layers[-1].name:
        backbone = keras.Model(backbone.input, backbone.get_layer(layer).output, name=f"mobilenet_v2_to_{layer}")
    f = keras.layers.GlobalAveragePooling2D()(backbone(x))
    f = f / keras.ops.sqrt(keras.ops.sum(keras.ops.square(f), axis=-1, keepdims=True) + 1e-12)
    return keras.Model(inp, f, name="guard_features")


def score_model(features, mean: np.ndarray, basis: np.ndarray, batch_size: int | None = None):
    """Image -> score, one model: what is exported to TFLite."""
    import keras

    inp = keras.Input((INPUT_SIZE, INPUT_SIZE, 1), batch_size=batch_size, name="image")
    z = features(inp) - keras.ops.convert_to_tensor(mean[None].astype("float32"))
    v = keras.ops.convert_to_tensor(basis.astype("float32"))
    resid = z - keras.ops.matmul(keras.ops.matmul(z, v), keras.ops.transpose(v))
    score = SCALE * keras.ops.sum(keras.ops.square(resid), axis=-1, keepdims=True)
    return keras.Model(inp, score, name="ood_guard")


def fit_subspace(train_features: np.ndarray, components: int = COMPONENTS) -> tuple[np.ndarray, np.ndarray]:
    """(mean, basis) of the training features: basis is (dims, k) with orthonormal columns."""
    mean = train_features.mean(0)
    _, _, vt = np.linalg.svd(train_features - mean, full_matrices=False)
    k = min(components, vt.shape[0])
    return mean, vt[:k].T


def scores(train_mean: np.ndarray, basis: np.ndarray, features: np.ndarray) -> np.ndarray:
    z = features - train_mean
    r = z - (z @ basis) @ basis.T
    return SCALE * (r**2).sum(1)


def _features_and_cues(model, paths: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Features and view cues of ``paths``, from one decode of each file (the guard's input)."""
    import tensorflow as tf

    if not paths:  # a split without test images (80/20/0): an empty list would be traced as floats
        return np.zeros((0, int(model.output.shape[-1])), np.float32), V.cue_arrays([])
    ds = (
        tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
        .map(lambda p: decode_resize(p, INPUT_SIZE, 1), num_parallel_calls=tf.data.AUTOTUNE)
        .batch(64)
    )
    feats, cues = [], []
    for batch in ds:
        x = batch.numpy()
        feats.append(np.asarray(model.predict_on_batch(x.astype("float32"))))
        cues.extend(V.cues(im) for im in x)
    return np.concatenate(feats), {k: np.array([c[k] for c in cues]) for k in ("asymmetry", "midline")}


def guard_key(weights_sha256: str) -> str:
    ident = {
        "size": INPUT_SIZE,
        "layer": LAYER,
        "components": COMPONENTS,
        "quantile": QUANTILE,
        "weights": weights_sha256,
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12],
        # The view check is part of the record: a new definition must not reuse an old guard unit.
        "view": {"version": V.VERSION, "code": hashlib.sha256(Path(V.__file__).read_bytes()).hexdigest()[:12]},
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def guard_unit(store: Store | str, split_hash: str, key: str) -> Unit:
    return Unit(as_store(store), f"guards/{split_hash}/{key}", MARKER)


def ensure_guard(store: Store | str, split_uri: str, split_hash: str) -> dict[str, Any]:
    """The guard of this split (fitted once): its record, with ``uri`` of ``guard.tflite``.

    It is fitted on the whole split even for capped (smoke) runs: it costs seconds, and a guard
    fitted on a few dozen images would flag ordinary X-rays."""
    weights = _weights()
    sha = file_sha256(str(weights)) if weights != "imagenet" else "download"
    unit = guard_unit(store, split_hash, guard_key(sha))
    rec = unit.record()
    if rec is None:
        data = load_split_data(split_uri)
        features = feature_model(weights)
        train, train_cues = _features_and_cues(features, data.files("train")[0])
        mean, basis = fit_subspace(train)
        val_features, val_cues = _features_and_cues(features, data.files("val")[0])
        val = scores(mean, basis, val_features)
        threshold = float(np.quantile(val, QUANTILE))
        test_paths = data.files("test")[0] if data.size("test") else []  # the paper's 80/20 split has none
        test_features, test_cues = _features_and_cues(features, test_paths)
        test = scores(mean, basis, test_features) if len(test_features) else np.zeros(0)
        trainval_cues = {k: np.concatenate([train_cues[k], val_cues[k]]) for k in train_cues}
        with tempfile.TemporaryDirectory(prefix="guard-") as tmp:
            out = Path(tmp) / "guard.tflite"
            export_guard(score_model(features, mean, basis, batch_size=1), out)
            unit.put_file("guard.tflite", out)
            np.savez(Path(tmp) / "subspace.npz", mean=mean, basis=basis)
            unit.put_file("subspace.npz", Path(tmp) / "subspace.npz")
        rec = {
            "file": "guard.tflite",
            "method": METHOD,
            "input_size": INPUT_SIZE,
            "channels": 1,
            "layer": LAYER,
            "components": int(basis.shape[1]),
            "quantile": QUANTILE,
            "threshold": threshold,
            # Photographs are colour; X-rays are grey (0 here). Flag clear colour with a margin.
            "colour_threshold": 0.04,
            "weights": {"kind": "imagenet", "file": str(weights), "sha256": sha},
            "fitted_on": {"split_hash": split_hash, "train": len(train), "val": len(val), "test": len(test)},
            "val_false_alarm": float(np.mean(val > threshold)),
            "test_false_alarm": float(np.mean(test > threshold)) if len(test) else None,
            "view": V.record(trainval_cues, test_cues),
        }
        unit.complete(rec)
        rec = unit.record()
        log.info(
            "fitted the OOD guard: threshold %.3f, test false alarms %s; view check test false alarms %s",
            threshold,
            rec["test_false_alarm"],
            rec["view"]["test_false_alarm"],
        )
    rec = {k: v for k, v in rec.items() if k != "objects"}
    return {**rec, "uri": unit.store.uri_for(unit.key("guard.tflite"))}


def export_guard(model, out: Path) -> None:
    import tensorflow as tf

    with converter_output(log_beside(out), "TFLite converter"):
        out.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())


def tflite_scores(tflite_path: str | Path, images: np.ndarray) -> np.ndarray:
    """Scores of ``images`` (N, S, S, 1; 0..255) by the stored guard, as the app computes them."""
    import tensorflow as tf

    it = tf.lite.Interpreter(model_path=str(tflite_path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    res = []
    for img in images:
        it.set_tensor(inp["index"], img[None].astype("float32"))
        it.invoke()
        res.append(float(it.get_tensor(out["index"]).reshape(-1)[0]))
    return np.asarray(res)
