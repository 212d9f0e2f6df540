"""The phone app's model files: the smallest TFLite export of each of the run's top models within its
bounds, and an ensemble computed in the page from its members' files (no file of its own), each checked
against its float32 Keras model.

``app_tflite`` asks ``covid_registry.exports`` for the model's ``tflite-int8`` variant, then the wider
ones (each converted once, stored beside the model as its own unit, its largest |Δp| and top-1
agreement on real test images bounded), and ships the first within its bounds. An ensemble's members are
converted with the temperature each has in the ensemble, and the
page averages their probabilities and applies the ensemble's temperature: the computation of its
Keras graph (``covid_models.ensemble``), which :func:`ensemble_check` compares on the same images.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from covid_app.guard import INPUT_SIZE, feature_model, score_model, tflite_scores
from covid_data.store import Unit, open_store, split_object_uri
from covid_eval.calibration import calibrated_model
from covid_models.stored import StoredModel
from covid_registry.convert import (
    TFLITE_COMPACT_MAX_PROB_DIFF,
    TFLITE_COMPACT_MIN_TOP1_AGREEMENT,
    ExportCheckError,
    agreement,
    export_tflite,
    tflite_probabilities,
)
from covid_registry.exports import ensure_exports, sample_test_images
from covid_registry.tflite_weights import dense_weight_share

log = logging.getLogger(__name__)
# The export variants the page may run, smallest first: the first within its bounds is shipped. Where
# int8 dense weights (a quarter of the dense bytes) go between float16 (half of all) and float32 depends
# on the model's share of dense weights: see app_variants.
APP_TFLITE_ORDER = ("tflite-int8", "tflite-int8-dense", "tflite-fp16", "tflite")
PARITY_IMAGES = 32
EPS = 1e-7  # as covid_eval.calibration and covid_models.ensemble clip probabilities


def local_file(uri: str, fallback: Path) -> Path:
    """A local path of a stored object (downloaded to ``fallback`` when the store is remote)."""
    store, key = split_object_uri(uri)
    return store.local_path(key) or store.get_file(key, fallback)


def _temperature(e: dict[str, Any]) -> float:
    """The calibration temperature an export record was converted with (1 when it has none)."""
    tfl = (e.get("variants") or {}).get("tflite") or {}
    return float(tfl.get("temperature", (e.get("calibration") or {}).get("temperature", 1.0)))


def app_variants(dense_share: float) -> list[str]:
    """The variants to try for a model whose dense kernels are ``dense_share`` of its weights, in the
    order of their expected bytes (of the float32 file): int8 about 1/4, int8-dense ``1 - 3/4 share``,
    float16 1/2, float32 1. Without dense weights to compress, int8-dense would be the float32 file."""
    order = list(APP_TFLITE_ORDER)
    if dense_share <= 0:
        order.remove("tflite-int8-dense")
    elif 1 - 0.75 * dense_share > 0.5:  # dense weights are under two thirds: float16 is smaller
        order.remove("tflite-int8-dense")
        order.insert(order.index("tflite-fp16") + 1, "tflite-int8-dense")
    return order


def app_tflite(model_uri: str, temperature: float, split_uri: str, version: str) -> dict[str, Any]:
    """The TFLite file the page downloads for a model: the smallest of its int8, int8-dense, float16 and
    float32 exports whose agreement with the float32 Keras model on real test images is within its
    bounds (each converted once and stored beside the model as its own unit)."""
    for variant in app_variants(dense_weight_share(StoredModel(model_uri).keras())):
        rec = ensure_exports(
            model_uri,
            [variant],
            split_uri=split_uri,
            version=version,
            metrics={},
            parity_images=PARITY_IMAGES,
            temperature=temperature,
        )[variant]
        if variant == "tflite" or rec["checks"].get("within_bounds"):
            return rec
        log.warning(
            "%s: its %s file is outside its bounds (%s); trying a wider precision", model_uri, variant, rec["checks"]
        )
    raise AssertionError("unreachable: the float32 export raises when it is out of bounds")


def ensemble_probabilities(
    member_files: list[Path], member_sizes: list[int], temperature: float, images: np.ndarray
) -> np.ndarray:
    """What the page computes for an ensemble (app/src/runtime.js ``runEntry``): each member's TFLite
    file on the input resized to its size (antialiased bilinear, unrounded, as the Keras graph
    resizes), the mean of their probabilities, then the ensemble's own temperature."""
    import tensorflow as tf

    size = int(images.shape[1])
    probs = []
    for file, s in zip(member_files, member_sizes, strict=True):
        x = images if s == size else tf.image.resize(images, (s, s), method="bilinear", antialias=True).numpy()
        probs.append(tflite_probabilities(file, x.astype("float32")))
    return combine_members(probs, temperature)


def combine_members(member_probs: list[np.ndarray], temperature: float) -> np.ndarray:
    """The mean of the members' (calibrated) probabilities, then the ensemble's temperature:
    ``softmax(log(clip(p, 1e-7, 1)) / T)``, as the ensemble's calibrated Keras graph and the page do."""
    p = np.mean(np.stack(member_probs).astype("float64"), axis=0)
    if abs(temperature - 1.0) > 1e-9:
        z = np.log(np.clip(p, EPS, 1.0)) / temperature
        z = np.exp(z - z.max(axis=1, keepdims=True))
        p = z / z.sum(axis=1, keepdims=True)
    return p.astype("float32")


def add_tflite(
    unit: Unit, entry: dict[str, Any], e: dict[str, Any], dataset: dict[str, Any], shipped: dict, tmp: Path
) -> None:
    """Put the model's TFLite file in the bundle (an ensemble: its members' files, once each)."""
    version = e.get("version") or "/".join(e["model_uri"].rstrip("/").rsplit("/", 2)[-2:])
    cfg = StoredModel(e["model_uri"]).record["config"]
    if not cfg.get("members"):
        rec = app_tflite(e["model_uri"], _temperature(e), dataset["split"], version)
        entry["bytes"] = _ship(unit, rec, entry["file"], int(cfg["input_size"]), shipped, tmp)
        entry |= {"file": shipped[rec["uri"]][0], "precision": rec["precision"], "checks": rec["checks"]}
        return
    # The ensemble: its members' files (each converted with its temperature in the ensemble), averaged
    # in the page, then the ensemble's temperature: its Keras graph's computation, without its bytes.
    members = []
    for i, m in enumerate(cfg["members"]):
        rec = app_tflite(m["out"], float(m["temperature"]), dataset["split"], version)
        path = f"models/{e['model']}/{i}-{m['model']}.tflite"
        bytes_ = _ship(unit, rec, path, int(m["input_size"]), shipped, tmp)
        members.append({"name": m["model"], "file": shipped[rec["uri"]][0], "input_size": int(m["input_size"])})
        members[-1] |= {"bytes": bytes_, "precision": rec["precision"]}
    temperature = _temperature(e)
    entry.pop("file")
    entry |= {"members": members, "temperature": temperature, "bytes": sum(m["bytes"] for m in members)}
    entry["precision"] = "/".join(sorted({m["precision"] for m in members}))
    entry["checks"] = ensemble_check(e["model_uri"], temperature, members, shipped, dataset["split"])


def _ship(unit: Unit, rec: dict[str, Any], path: str, size: int, shipped: dict, tmp: Path) -> int:
    """Put one export's file in the bundle at ``path`` unless it is there already; its bytes."""
    if rec["uri"] not in shipped:
        local = local_file(rec["uri"], tmp / path.replace("/", "-"))
        unit.put_file(path, local)
        shipped[rec["uri"]] = (path, local, size)
    return shipped[rec["uri"]][1].stat().st_size


def ensemble_check(
    model_uri: str, temperature: float, members: list[dict[str, Any]], shipped: dict, split_uri: str
) -> dict[str, Any]:
    """The page's ensemble (int8 member files averaged) against the ensemble's float32 Keras graph
    on the same real test images as every export check: largest |Δp| and top-1 agreement."""

    stored = StoredModel(model_uri)
    model = calibrated_model(stored.keras(), temperature)
    images = sample_test_images(split_uri, stored.input_size, stored.channels, PARITY_IMAGES, None)
    by_path = {p: local for p, local, _ in shipped.values()}
    probs = ensemble_probabilities(
        [by_path[m["file"]] for m in members], [m["input_size"] for m in members], temperature, images
    )
    found = agreement(probs, model.predict(images, verbose=0))
    bound, floor = TFLITE_COMPACT_MAX_PROB_DIFF["int8"], TFLITE_COMPACT_MIN_TOP1_AGREEMENT["int8"]  # the widest
    if found["max_prob_diff"] > bound or found["top1_agreement"] < floor:
        raise ExportCheckError(
            f"the page's ensemble (its members' int8 files averaged) differs from its Keras graph on {len(images)} "
            f"real test images: {found} (bounds: max |Δp| {bound}, top-1 agreement {floor})"
        )
    return {**found, "max_prob_diff_bound": bound, "images": len(images), "against": "float32 Keras ensemble"}


GUARD_PRECISION = "float16"
GUARD_CHECK_IMAGES = 32
GUARD_MAX_SCORE_DIFF = 0.02  # of the threshold: the float16 guard's score against the float32 guard's


def app_guard(guard: dict[str, Any], split_uri: str) -> dict[str, Any]:
    """The guard as the page downloads it: the float32 guard's graph (its ImageNet MobileNetV2 and fitted
    subspace, threshold unchanged) with float16 weights, half the bytes. A unit of its own inside the
    guard's (``fp16/``, ``export.json`` last), converted once; its scores on real validation X-rays are
    checked against the float32 file's: within 2% of the threshold, and the same images flagged. Outside
    those bounds the unit records the float16 file's figures and the float32 guard ships instead, as a
    model's bundle falls back to its float32 file: a smaller guard is never worth a different flag."""
    folder = open_store(guard["uri"].rsplit("/", 1)[0])
    unit = Unit(folder, "fp16", "export.json")
    rec = unit.record()
    if rec is None:
        images = sample_test_images(split_uri, INPUT_SIZE, 1, GUARD_CHECK_IMAGES, None)
        with tempfile.TemporaryDirectory(prefix="guard-fp16-") as tmp:
            sub = np.load(local_file(folder.uri_for("subspace.npz"), Path(tmp) / "subspace.npz"))
            features = feature_model(guard["weights"]["file"], guard.get("layer"))
            model = score_model(features, sub["mean"], sub["basis"], batch_size=1)
            out = Path(tmp) / "guard.tflite"
            export_tflite(model, out, GUARD_PRECISION)
            ref = tflite_scores(local_file(guard["uri"], Path(tmp) / "f32.tflite"), images)
            got = tflite_scores(out, images)
            t = float(guard["threshold"])
            diff = float(np.abs(got - ref).max() / t)
            same = float(np.mean((got > t) == (ref > t)))
            checks = {
                "max_score_diff_of_threshold": diff,
                "max_score_diff_bound": GUARD_MAX_SCORE_DIFF,
                "same_flag": same,
                "images": len(images),
            }
            if diff <= GUARD_MAX_SCORE_DIFF and same == 1.0:
                unit.put_file("guard.tflite", out)
                unit.complete({"precision": GUARD_PRECISION, "file": "guard.tflite", "checks": checks})
            else:
                log.warning(
                    "the float16 guard differs from the float32 one on %d real X-rays (max |Δscore| %.3f%% of the "
                    "threshold, bound %.0f%%; same flag on %.1f%%): the app ships the float32 guard",
                    len(images), 100 * diff, 100 * GUARD_MAX_SCORE_DIFF, 100 * same,
                )  # fmt: skip
                unit.complete({"precision": "float32", "file": None, "checks": checks, "rejected": GUARD_PRECISION})
        rec = unit.record()
    uri = folder.uri_for(unit.key(rec["file"])) if rec["file"] else guard["uri"]
    return {"uri": uri, "precision": rec["precision"], "checks": rec["checks"], "rejected": rec.get("rejected")}
