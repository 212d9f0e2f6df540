"""The phone formats of a trained model, stored beside it and converted once.

Each format is its own stored unit under the model's slot, ``exports/<variant>[-t<temperature>]/`` with
``export.json`` written last: ``coreml`` (fp16 ML Program), ``coreml-int8`` (8-bit weights),
``tflite`` (float32), and the phone app's smaller TFLite files ``tflite-fp16`` (float16 weights),
``tflite-int8`` (dynamic-range int8 weights) and ``tflite-int8-dense`` (int8 weights in the dense layers
only, computed in float32), each checked against the float32 Keras model (largest
probability difference and top-1 agreement on real test images: a float32 file outside its bound is an
error; a smaller one is stored with ``within_bounds`` false, and the app ships a wider precision). A run
that needs a
variant the model does not have yet converts only that one; a complete variant is never converted or
written again (Core ML packages carry fresh UUIDs, so a second conversion would never match the first
byte for byte).
"""

from __future__ import annotations

import logging
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covid_data.store import Unit, open_store
from covid_eval.calibration import calibrated_model
from covid_models.data import load_split_data, make_dataset
from covid_models.stored import StoredModel
from covid_registry.convert import (
    COREML_INT8_MAX_PROB_DIFF,
    COREML_MAX_PROB_DIFF,
    TFLITE_COMPACT_MAX_PROB_DIFF,
    TFLITE_COMPACT_MIN_TOP1_AGREEMENT,
    TFLITE_MAX_PROB_DIFF,
    ExportCheckError,
    agreement,
    convert_coreml,
    coreml_parity,
    export_tflite,
    int8_dense_from_float32,
    tflite_probabilities,
)

log = logging.getLogger(__name__)

MARKER = "export.json"
VARIANTS = ("coreml", "coreml-int8", "tflite", "tflite-fp16", "tflite-int8", "tflite-int8-dense")
TFLITE_VARIANTS = {
    "tflite": "float32",
    "tflite-fp16": "float16",
    "tflite-int8": "int8",
    "tflite-int8-dense": "int8-dense",
}


def export_prefix(variant: str, temperature: float = 1.0) -> str:
    """``exports/<variant>`` for uncalibrated probabilities (T = 1), else ``exports/<variant>-t<T>``: the
    temperature is built into the graph, so an export with another temperature is another unit."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown export {variant!r}; choose from {VARIANTS}")
    t = float(temperature)
    return f"exports/{variant}" if abs(t - 1.0) < 1e-9 else f"exports/{variant}-t{t:.6g}"


def export_slot(model_uri: str, variant: str, temperature: float = 1.0) -> Unit:
    return Unit(open_store(model_uri), export_prefix(variant, temperature), MARKER)


def wanted_variants(int8: bool) -> list[str]:
    return ["coreml", *(["coreml-int8"] if int8 else []), "tflite"]


def parity_sample(frame: pd.DataFrame, n: int, seed: int = 0) -> list[int]:
    """Row positions of ``n`` images drawn class by class in turn (seeded), so that every class is
    in the parity check (the first batch of a path-sorted split is one class)."""
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(idx)) for _, idx in sorted(frame.groupby("label").indices.items())]
    out: list[int] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(int(q.pop(0)))
    return out


def sample_test_images(split_uri: str, input_size: int, channels: int, n: int, max_per_class: int | None) -> np.ndarray:
    data = load_split_data(split_uri, max_per_class=max_per_class)
    split = "test" if data.size("test") else "val"
    files, _ = data.files(split)
    picked = [files[i] for i in parity_sample(data.frames[split], n)]
    ds = make_dataset(picked, np.zeros(len(picked), dtype="int32"), size=input_size, channels=channels, batch_size=n)
    return next(iter(ds.take(1)))[0].numpy()


def _convert(
    variant: str,
    model,
    name: str,
    tmp: Path,
    *,
    version: str,
    metrics: dict,
    images: np.ndarray,
    float32_file: Path | None = None,
) -> dict:
    """Convert and check one variant into ``tmp``; the record of what was made. ``float32_file``: the
    model's stored float32 TFLite file at the same temperature, which ``tflite-int8-dense`` is made from
    without converting again."""
    if variant.startswith("coreml"):
        q = "int8" if variant == "coreml-int8" else None
        file = f"{name}{'-int8' if q else ''}.mlpackage"
        rec = convert_coreml(model, tmp / file, model_name=name, version=version, metrics=metrics, quantize=q)
        checks = dict(rec.checks)
        if platform.system() == "Darwin":  # the Core ML runtime exists only on macOS
            diff = coreml_parity(Path(rec.path), model, images)
            checks["runtime_max_prob_diff"] = diff
            bound = COREML_INT8_MAX_PROB_DIFF if q else COREML_MAX_PROB_DIFF
            checks["runtime_bound"] = bound
            if diff > bound:
                raise ExportCheckError(
                    f"Core ML package of {name}{' (int8)' if q else ''} differs from Keras by {diff:.2e} in "
                    f"probability on {len(images)} real test images (bound {bound:.0e})"
                )
        else:
            checks.setdefault("runtime_parity", "unchecked: the Core ML runtime exists only on macOS")
        return {"file": file, "bytes": rec.bytes, "precision": rec.precision, "checks": checks}
    precision = TFLITE_VARIANTS[variant]
    file = f"{name}.tflite" if precision == "float32" else f"{name}-{precision}.tflite"
    if precision == "int8-dense" and float32_file is not None:
        rec = int8_dense_from_float32(float32_file, tmp / file)
    else:
        rec = export_tflite(model, tmp / file, precision)
    found = agreement(tflite_probabilities(Path(rec.path), images), model.predict(images, verbose=0))
    diff, top1 = found["max_prob_diff"], found["top1_agreement"]
    bound = TFLITE_MAX_PROB_DIFF if precision == "float32" else TFLITE_COMPACT_MAX_PROB_DIFF[precision]
    floor = 1.0 if precision == "float32" else TFLITE_COMPACT_MIN_TOP1_AGREEMENT[precision]
    within = diff <= bound and top1 >= floor
    if not within and precision == "float32":
        raise ExportCheckError(
            f"TFLite export of {name} differs from Keras by {diff:.2e} in probability on {len(images)} real "
            f"test images (bound {TFLITE_MAX_PROB_DIFF:.0e})"
        )
    if not within:  # stored with its figures all the same: the app then ships a wider precision
        log.warning(
            "TFLite export of %s with %s weights is outside its bounds on %d real test images: max |Δp| %.2e "
            "(bound %.0e), top-1 agreement %.3f (floor %s)",
            name, precision, len(images), diff, bound, top1, floor,
        )  # fmt: skip
    return {
        "file": file,
        "bytes": rec.bytes,
        "precision": rec.precision,
        "input_shape": [1, *images.shape[1:]],  # fixed batch: what LiteRT.js runs
        "checks": {
            "max_prob_diff": diff,
            "top1_agreement": top1,
            "max_prob_diff_bound": bound,
            "top1_agreement_floor": floor,
            "within_bounds": within,
            "images": len(images),
            "sample": "seeded, every class in turn",
        },
    }


def ensure_exports(
    model_uri: str,
    variants: list[str],
    *,
    split_uri: str,
    version: str,
    metrics: dict[str, Any],
    parity_images: int = 32,
    max_per_class: int | None = None,
    temperature: float = 1.0,
) -> dict[str, dict[str, Any]]:
    """``{variant: record}`` for each wanted variant, converting only those not yet complete.

    ``temperature`` (covid_eval.calibration) is built into the exported graph, so every format
    gives calibrated probabilities."""
    slots = {v: export_slot(model_uri, v, temperature) for v in variants}
    records = {v: s.record() for v, s in slots.items()}
    todo = [v for v, r in records.items() if r is None]
    if not todo:
        log.info("exports %s of %s are already stored: not converted again", variants, model_uri)
        return {v: _with_uri(slots[v], r) for v, r in records.items()}
    stored = StoredModel(model_uri)
    if not stored.unit.is_complete():
        raise FileNotFoundError(f"{model_uri} holds no complete model (no metrics.json): nothing to export")
    name = stored.name
    model = calibrated_model(stored.keras(), temperature)
    images = sample_test_images(split_uri, stored.input_size, stored.channels, parity_images, max_per_class)
    for v in todo:
        with tempfile.TemporaryDirectory(prefix=f"export-{v}-") as tmp:
            float32 = _float32_file(model_uri, temperature, Path(tmp)) if v == "tflite-int8-dense" else None
            rec = _convert(
                v, model, name, Path(tmp), version=version, metrics=metrics, images=images, float32_file=float32
            )
            slot = slots[v]
            slot.put_tree(rec["file"], Path(tmp) / rec["file"])
            slot.complete(
                {"variant": v, "prefix": slot.prefix, "model": name, "version": version, "temperature": temperature}
                | rec
            )
        records[v] = slot.record()
        log.info("exported %s as %s: %.1f MB", name, v, records[v]["bytes"] / 1e6)
    return {v: _with_uri(slots[v], r) for v, r in records.items()}


def _float32_file(model_uri: str, temperature: float, tmp: Path) -> Path | None:
    """A local copy (or path) of the model's complete float32 TFLite export at ``temperature``, if any."""
    slot = export_slot(model_uri, "tflite", temperature)
    rec = slot.record()
    if rec is None:
        return None
    key = slot.key(rec["file"])
    return slot.store.local_path(key) or slot.store.get_file(key, tmp / "float32" / rec["file"])


def _with_uri(slot: Unit, record: dict[str, Any]) -> dict[str, Any]:
    rec = {k: v for k, v in record.items() if k != "objects"}
    return {**rec, "uri": slot.store.uri_for(slot.key(record["file"]))}
