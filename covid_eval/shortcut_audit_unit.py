"""The shortcut audit as a stored unit: a fact about a dataset version and its split, computed once.

``datasets/<version>/audits/<split hash>/<key>/`` in the dataset's store, beside the version's
``dataset.json`` and its ``splits/``, completed by ``audit.json`` written last (the record, with every
object's checksum). Nothing of the complete version is written again: the audit is a new unit
beside it, as a split is. ``<key>`` hashes the split, the segmenter unit, the recipe
(:class:`covid_eval.shortcut_audit.AuditConfig`), the weights and the audit's code, so the same
data, segmenter and recipe find the complete unit and compute nothing; a unit without its marker
(a killed attempt) is computed again and its objects replaced. The unit holds ``examples.png``
(test images of each class, whole and blacked out) and the marker.
"""

from __future__ import annotations

import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from covid_data.labels import CLASSES
from covid_data.split import SplitRef
from covid_data.store import Store, Unit, UnitCompleteError, open_store
from covid_eval.shortcut_audit import (
    AuditConfig,
    audit_arrays,
    audit_key,
    feature_extractor,
    mobilenet_weights,
    segment,
    weights_id,
)
from covid_models.data import decode_file, load_split_data
from covid_models.segmenter import load_segmenter, resize_images, segmenter_store

log = logging.getLogger(__name__)

MARKER = "audit.json"
EXAMPLES = "examples.png"


def audit_unit(store: Store, version: str, split_key: str, key: str) -> Unit:
    return Unit(store, f"datasets/{version}/audits/{split_key}/{key}", MARKER)


def read_images(files: list[str], size: int) -> np.ndarray:
    """uint8 ``[N, size, size]`` grey pixels, read and resized as the classifiers' pipeline reads them."""

    def one(path: str) -> np.ndarray:
        return decode_file(path, Path(path).read_bytes(), 1)[..., 0]

    with ThreadPoolExecutor(4) as pool:
        pixels = list(pool.map(one, files))
    return resize_images(pixels, size)[..., 0]


def examples_png(images: np.ndarray, blacked: np.ndarray, labels: np.ndarray, per_class: int) -> bytes:
    """The first ``per_class`` test images of each class, whole beside blacked out; a row per class,
    its name above it."""
    from PIL import Image, ImageDraw

    side, gap, title = images.shape[1], 4, 14
    rows = []
    for i, name in enumerate(CLASSES):
        cells = [np.zeros((side, 2 * side + gap), "uint8")] * per_class
        for k, j in enumerate(np.flatnonzero(labels == i)[:per_class]):
            cells[k] = np.concatenate([images[j], np.full((side, gap), 255, "uint8"), blacked[j]], axis=1)
        row = np.concatenate([c for cell in cells for c in (cell, np.full((side, 3 * gap), 255, "uint8"))], axis=1)
        head = Image.new("L", (row.shape[1], title), 255)
        ImageDraw.Draw(head).text((2, 1), f"{name}: whole, lungs blacked out", fill=0)
        rows += [np.asarray(head), row]
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(rows, axis=0)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def audit_split(
    split_uri: str,
    segmenter_uri: str,
    config: AuditConfig | None = None,
    *,
    cache_dir: Path | None = None,
    max_per_class: int | None = None,
) -> dict[str, Any]:
    """The shortcut audit of the split at ``split_uri`` with the segmenter unit at ``segmenter_uri``:
    reused when its unit is complete, else computed and completed. Returns the record (the marker's
    content less the checksums) with ``status`` (``computed`` or ``cached``), ``uri`` and ``examples_uri``.

    :class:`covid_models.weights.MissingWeightsError` (saying what to do) when MobileNetV2 features
    are asked for and the weights are missing; :class:`SegmenterUnitError` for an incomplete segmenter."""
    cfg = config or AuditConfig()
    cache = Path(cache_dir or os.environ.get("COVID_CACHE_DIR", Path.home() / ".cache" / "covid-xray"))
    ref = SplitRef.from_uri(split_uri)
    weights = mobilenet_weights(cfg.size) if cfg.features == "mobilenet_v2" else None
    seg_store, seg_key = segmenter_store(segmenter_uri)
    split_key = ref.cache_key(max_per_class)
    store = open_store(ref.store)
    unit = audit_unit(store, ref.version, split_key, audit_key(split_key, seg_key, cfg, weights_id(weights)))
    done = unit.intact_record()
    if done is not None:
        log.info("shortcut audit %s is complete: reused", unit.uri)
        return _with_uri(unit, done, "cached")
    start = time.perf_counter()
    model, _, seg_record = load_segmenter(segmenter_uri, cache)
    data = load_split_data(split_uri, cache, max_per_class)
    images, labels, masks = {}, {}, {}
    for s in ("train", "test"):
        files, labels[s] = data.files(s)
        images[s] = read_images(files, cfg.size)
        masks[s] = segment(model, images[s])
    extractor = feature_extractor(cfg.size, weights) if weights is not None else None
    res = audit_arrays(images, labels, masks, list(CLASSES), cfg, extractor)
    blacked = res.pop("blacked")
    try:
        unit.put_bytes(EXAMPLES, examples_png(images["test"], blacked, labels["test"], cfg.examples_per_class))
    except UnitCompleteError:  # another attempt (a concurrent run) completed the unit meanwhile: its audit stays
        return _with_uri(unit, unit.intact_record() or {}, "cached")
    seconds = time.perf_counter() - start
    record = {
        "kind": "shortcut-audit",
        "config": cfg.to_dict(),
        "dataset_version": ref.version,
        "split_hash": ref.split_hash,
        "split_uri": split_uri,
        "max_per_class": max_per_class,
        "segmenter": {
            "uri": seg_store.uri,
            "key": seg_key,
            "config": seg_record.get("config"),
            "heldout_dice": (seg_record.get("heldout_metrics") or {}).get("dice"),
            "mask_source": (seg_record.get("source") or {}).get("path"),
        },
        "classifier": _classifier(cfg, weights),
        **res,
        "seconds": round(seconds, 1),
    }
    if not unit.complete(record):
        log.warning("another attempt completed %s first; its audit stays", unit.uri)
        return _with_uri(unit, unit.record() or record, "cached")
    log.info("shortcut audit %s: %s (%.0f s)", unit.uri, record["meaning"], seconds)
    return _with_uri(unit, record, "computed")


def _classifier(cfg: AuditConfig, weights: Path | str | None) -> dict[str, Any]:
    if cfg.features == "pixels":
        what = f"logistic regression on the image shrunk to {cfg.pixels}x{cfg.pixels} (block means)"
    else:
        what = f"frozen ImageNet MobileNetV2 at {cfg.size} px, pooled features, logistic regression"
    return {"what": what, "weights": weights_id(weights), "fitted_on": "train", "scored_on": "test"}


def _with_uri(unit: Unit, record: dict[str, Any], status: str) -> dict[str, Any]:
    rec = {k: v for k, v in record.items() if k != "objects"}
    return {**rec, "status": status, "uri": unit.uri, "examples_uri": unit.store.uri_for(unit.key(EXAMPLES))}
