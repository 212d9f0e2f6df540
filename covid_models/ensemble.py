"""An averaged ensemble of the run's top models, as one more model on the leaderboard.

The ensemble is a Keras model of its own: one grey input at the largest member's size, each
member fed an antialiased bilinear resize of it where its size differs (what training does:
covid_models.data, ``tf.image.resize(..., antialias=True)``), each member's probabilities
temperature-scaled by its own calibration (fitted on validation), then averaged with equal
weights. What is fitted, all on validation: which members (the run's top models by validation
accuracy) and their temperatures. Its validation accuracy therefore flatters it, so it ranks above
its best member only when it beats that member significantly on validation (McNemar's exact test,
p < 0.05), else just below it. Stored as a model slot
(``models/<split hash>/ensemble-<key>/``, ``metrics.json`` last) with the same files and metrics as a
trained model, it ranks, blesses, exports (Core ML, TFLite), explains and ships in the app like one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from covid_data.labels import CLASSES
from covid_data.store import open_store
from covid_models.data import image_dataset, load_split_data
from covid_models.metrics import mcnemar_exact, plot_confusion, split_metrics
from covid_models.stored import StoredModel, model_slot
from covid_models.train import TrainResult

log = logging.getLogger(__name__)

ENSEMBLE = "ensemble"
EPS = 1e-7
# Bump when the construction changes: the slot key hashes it.
RECIPE = "mean of temperature-scaled member probabilities; antialiased bilinear resize to each member's size; v2"


def is_ensemble(name: str) -> bool:
    return name == ENSEMBLE


def resize_matrix(src: int, dst: int) -> np.ndarray:
    """The ``(dst, src)`` matrix ``A`` of an antialiased bilinear resize along one axis: its columns
    are ``tf.image.resize(..., antialias=True)`` of the unit vectors, so that, the resize being
    separable and linear, an ``src`` x ``src`` image ``X`` resizes to ``A @ X @ A.T``."""
    import tensorflow as tf

    units = tf.reshape(tf.eye(src), (src, src, 1, 1))  # src images of src x 1 pixels, one per unit vector
    columns = tf.image.resize(units, (dst, 1), method="bilinear", antialias=True)
    return columns.numpy().reshape(src, dst).T.astype("float32")


def antialiased_resize(x, size: int, name: str):
    """``x`` (``(batch, L, L, 1)``) resized to ``size`` x ``size`` as training resizes (bilinear,
    antialiased), with builtin layers only: the ``ScaleAndTranslate`` op behind
    ``Resizing(antialias=True)`` is no TFLite builtin, while a fixed matrix on each axis
    (Dense, Permute, Reshape) converts to TFLite builtins and Core ML and loads in safe mode."""
    import keras

    src = int(x.shape[1])
    a_t = resize_matrix(src, size).T  # (src, size): Dense's kernel, applied along the last axis
    x = keras.layers.Reshape((src, src), name=f"{name}_squeeze")(x)
    rows = keras.layers.Dense(size, use_bias=False, trainable=False, name=f"{name}_width")
    cols = keras.layers.Dense(size, use_bias=False, trainable=False, name=f"{name}_height")
    x = rows(x)  # X A^T: (src, size)
    x = keras.layers.Permute((2, 1), name=f"{name}_transpose")(x)  # A X^T
    x = cols(x)  # A X^T A^T = (A X A^T)^T
    x = keras.layers.Permute((2, 1), name=f"{name}_back")(x)  # A X A^T
    rows.set_weights([a_t])
    cols.set_weights([a_t])
    return keras.layers.Reshape((size, size, 1), name=name)(x)


def build_ensemble(members: list[tuple[Any, float]], name: str = ENSEMBLE):
    """``members``: (Keras model, temperature) pairs, each taking (H, W, 1) grey pixels. The model
    takes the largest member's size and averages the members' calibrated probabilities."""
    import keras
    from keras import ops

    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
    channels = {int(m.input_shape[-1]) for m, _ in members}
    if channels != {1}:
        raise ValueError(f"ensemble members must take grey (1-channel) input, got channels {sorted(channels)}")
    size = max(int(m.input_shape[1]) for m, _ in members)
    inp = keras.Input(shape=(size, size, 1), name="image")
    outs = []
    for i, (m, t) in enumerate(members):
        x = inp
        s = int(m.input_shape[1])
        if s != size:
            x = antialiased_resize(x, s, name=f"resize_{i}_{s}")
        p = m(x)
        logits = ops.log(ops.clip(ops.cast(p, "float32"), EPS, 1.0)) / float(t)
        outs.append(keras.layers.Activation("softmax", name=f"calibrated_{i}", dtype="float32")(logits))
    out = keras.layers.Average(name="average", dtype="float32")(outs)
    return keras.Model(inp, out, name=name)


def members_of(model) -> list:
    """The member models nested in an ensemble built by :func:`build_ensemble`."""
    import keras

    return [layer for layer in model.layers if isinstance(layer, keras.Model)]


def ensemble_key(members: list[dict[str, Any]]) -> str:
    """Hash of the members' slots (each is content-keyed) and temperatures, and the recipe."""
    text = json.dumps(
        {"recipe": RECIPE, "members": [[m["out"].rstrip("/").rsplit("/", 1)[-1], m["temperature"]] for m in members]},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ensemble_slot_uri(store: str, split_hash: str, members: list[dict[str, Any]]) -> str:
    return open_store(store).uri_for(f"models/{split_hash}/{ENSEMBLE}-{ensemble_key(members)}")


def describe_members(config: dict[str, Any]) -> str:
    parts = [f"{m['model']} ({m['input_size']} px, T={m['temperature']:.2f})" for m in config.get("members", [])]
    return (
        "average of the calibrated probabilities of "
        + ", ".join(parts)
        + "; the members and their temperatures were chosen on validation, nothing trained on top"
    )


def _against_best_member(members: list[dict[str, Any]], val_probs: np.ndarray, data) -> dict[str, Any]:
    """The ensemble against its best member, image by image on validation. Its members were chosen
    and their temperatures fitted on validation, so its validation accuracy flatters it: it ranks
    above that member only when McNemar's exact test says it is better there (p < 0.05); else it
    ranks just below it (``rank_below``)."""
    y = data.files("val")[1]
    best = members[0]  # members come best first by validation accuracy
    member_probs, _ = StoredModel(best["out"]).predict_split(data, "val")
    ens_right, member_right = val_probs.argmax(1) == y, member_probs.argmax(1) == y
    only_ens, only_member = int((ens_right & ~member_right).sum()), int((~ens_right & member_right).sum())
    p = mcnemar_exact(only_ens, only_member)
    better = only_ens > only_member and p < 0.05
    record = {"model": best["model"], "only_ensemble_right": only_ens, "only_member_right": only_member, "p": p}
    return {"val_vs_best_member": record, **({} if better else {"rank_below": best["model"]})}


def build_and_evaluate(members: list[dict[str, Any]], split_uri: str, out: str, max_per_class: int | None = None):
    """Build the ensemble of ``members`` (records with ``model``, ``out`` and ``temperature``),
    score it on validation and test, and publish its slot at ``out`` (``metrics.json`` last).
    Returns the :class:`covid_models.train.TrainResult`; a complete slot is read back, not rebuilt."""
    import keras

    slot = model_slot(out)
    stored = slot.record()
    if stored is not None:
        log.info("the ensemble is already built at %s: nothing to do", slot.uri)
        return TrainResult(**{**stored["result"], "status": "cached", "out": slot.uri})
    t0 = time.perf_counter()
    loaded = [(StoredModel(m["out"]).keras(), float(m["temperature"])) for m in members]
    model = build_ensemble(loaded)
    size = int(model.input_shape[1])
    data = load_split_data(split_uri, max_per_class=max_per_class)
    metrics, val_probs = {}, None
    for split in ("val", "test"):
        if data.size(split):
            ds = image_dataset(data, split, size=size, channels=1, batch_size=32)
            probs = model.predict(ds, verbose=0)
            metrics[split] = split_metrics(probs, data.files(split)[1], data.sources(split))
            val_probs = probs if split == "val" else val_probs
    fair = _against_best_member(members, val_probs, data) if val_probs is not None else {}
    seconds = time.perf_counter() - t0
    member_cfgs = [
        {**{k: m[k] for k in ("model", "out", "temperature")}, "input_size": int(mod.input_shape[1])}
        for m, (mod, _) in zip(members, loaded, strict=True)
    ]
    config = {
        "model": ENSEMBLE,
        "split": split_uri,
        "out": out,
        "input_size": size,
        "channels": 1,
        "epochs": 0,
        "weights": ENSEMBLE,
        "max_per_class": max_per_class,
        "members": member_cfgs,
        "recipe": RECIPE,
    }
    with tempfile.TemporaryDirectory(prefix="covid-ensemble-") as tmp:
        tmp = Path(tmp)
        model.save(tmp / "model.keras")
        slot.put_file("model.keras", tmp / "model.keras")
        for split, m in metrics.items():
            plot_confusion(m["confusion_matrix"], f"{ENSEMBLE}: {split}", tmp / f"confusion_{split}.png")
            slot.put_file(f"confusion_{split}.png", tmp / f"confusion_{split}.png")
        file_bytes = (tmp / "model.keras").stat().st_size
    val, test = metrics.get("val", {}), metrics.get("test")
    result = TrainResult(
        model=ENSEMBLE,
        out=slot.uri,
        status="trained",
        val_accuracy=val.get("accuracy", float("nan")),
        val_loss=val.get("loss", float("nan")),
        test_accuracy=test["accuracy"] if test else None,
        test_macro_f1=test["macro_f1"] if test else None,
        test_covid_sensitivity=test["covid_sensitivity"] if test else None,
        params=int(model.count_params()),
        file_bytes=file_bytes,
        train_seconds=round(seconds, 2),
        epochs=0,
        extra={"members": [m["model"] for m in members], **fair},
    )
    doc = {
        "result": result.to_dict(),
        "config": config,
        "weights": {"kind": ENSEMBLE, "members": [m["model"] for m in members]},
        "classes": list(CLASSES),
        "metrics": json.loads(json.dumps(metrics, default=float)),
    }
    keras.backend.clear_session()
    if not slot.complete(doc):
        return TrainResult(**{**slot.record()["result"], "status": "cached"})
    log.info(
        "ensemble of %s: val accuracy %.4f, test accuracy %s",
        ", ".join(m["model"] for m in members),
        result.val_accuracy,
        "-" if result.test_accuracy is None else f"{result.test_accuracy:.4f}",
    )
    return result


def member_heatmaps(model, images: np.ndarray, class_index: np.ndarray, gradcam_fn) -> np.ndarray:
    """Grad-CAM of an ensemble: the mean of its members' maps for the ensemble's class, each member
    explained on the input it sees (resized as in the model: bilinear, antialiased), renormalised
    to a peak of 1."""
    import tensorflow as tf

    n, h, w = images.shape[:3]
    total = np.zeros((n, h, w), "float32")
    for m in members_of(model):
        s = int(m.input_shape[1])
        x = images if s == h else tf.image.resize(images, (s, s), method="bilinear", antialias=True).numpy()
        heat = gradcam_fn(m, x, class_index)
        if s != h:
            heat = tf.image.resize(heat[..., None], (h, w), method="bilinear").numpy()[..., 0]
        total += heat
    peak = total.max(axis=(1, 2), keepdims=True)
    return np.divide(total, peak, out=np.zeros_like(total), where=peak > 0)
