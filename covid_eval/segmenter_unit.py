"""The lung segmenter as a stored unit: trained once per mask source and recipe, scored, exported, carded.

``segmenters/<key>/`` in the store, completed by ``segmenter.json`` written last (the marker lists
every object's checksum, as a classifier's ``metrics.json`` does). ``<key>`` hashes the mask
source's content (every image and mask, byte for byte) and the recipe, so the same masks and
recipe find the complete unit and train nothing, while other masks or another recipe get a unit
of their own. A unit without its marker (a killed training) is trained again and its objects
replaced; the training itself resumes from its last epoch (``covid_models.checkpoints``). A
complete unit is never written again.

The unit holds ``model.keras``, ``lung_unet.tflite`` (float32, batch 1, checked against Keras on
held-out images), ``heldout.json`` (the seeded split: which masks were held out),
``evaluation.json`` (Dice and IoU per held-out image), ``history.csv`` and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covid_data.lung_masks import MaskPair, find_mask_pairs, fingerprint, heldout_split, read_pair
from covid_data.store import Store, Unit, open_store
from covid_eval.segmentation import segmentation_metrics
from covid_models.segmenter import (
    DEFAULT_FILTERS,
    UNIT_MARKER,
    export_tflite,
    inference_copy,
    predict,
    resize_images,
    resize_masks,
    tflite_predict,
    train_unet,
)

log = logging.getLogger(__name__)

MARKER = UNIT_MARKER  # covid_models.segmenter reads units too (the lung fields inside a classifier)
TFLITE_FILE = "lung_unet.tflite"
TFLITE_MAX_PROB_DIFF = 1e-3  # float32 TFLite against Keras, as for the classifiers' exports
GOALS = {"dice": 0.95, "tflite_bytes": 2_000_000, "app_ms_per_image": 50}  # issue 16 §2
RECIPE_VERSION = 1  # bump when training changes in a way the config does not show


class SegmenterExportError(RuntimeError):
    """The TFLite export does not predict what the Keras model predicts."""


@dataclass(frozen=True)
class SegmenterConfig:
    """The recipe. The defaults reach Dice 0.958 on held-out Shenzhen masks (BENCHMARKS.md, "Lung segmenter")."""

    size: int = 96
    filters: tuple[int, ...] = DEFAULT_FILTERS
    steps: int = 700
    batch_size: int = 16
    learning_rate: float = 2e-3
    augment: bool = True
    heldout: float = 0.2
    seed: int = 42
    parity_images: int = 8

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SegmenterConfig:
        """From :meth:`to_dict`'s form (or a flow parameter): lists back to tuples, the version dropped."""
        d = {k: v for k, v in (d or {}).items() if k != "recipe_version"}
        return cls(**{**d, **({"filters": tuple(d["filters"])} if "filters" in d else {})})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "filters": list(self.filters), "recipe_version": RECIPE_VERSION}


def segmenter_key(source_fingerprint: str, config: SegmenterConfig) -> str:
    doc = json.dumps({"source": source_fingerprint, **config.to_dict()}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def segmenter_unit(store: Store, key: str) -> Unit:
    return Unit(store, f"segmenters/{key}", MARKER)


def _with_uri(unit: Unit, record: dict[str, Any], status: str) -> dict[str, Any]:
    rec = {k: v for k, v in record.items() if k != "objects"}
    return {**rec, "status": status, "uri": unit.uri, "tflite_uri": unit.store.uri_for(unit.key(TFLITE_FILE))}


def _read(pairs: list[MaskPair], size: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(images uint8, masks {0, 1}) at the model's size, and the masks at their own size (for scoring).
    Each pair is resized as it is read, so a large source (the Kaggle release's 21,000 masks) never
    sits in memory at full size."""
    images, masks, native = [], [], []
    for p in pairs:
        image, mask = read_pair(p)
        images.append(resize_images([image], size)[0])
        masks.append(resize_masks([mask], size)[0])
        native.append(mask)
    return np.stack(images), np.stack(masks), native


def train_segmenter_unit(
    masks: str | Path,
    store: str | Store,
    config: SegmenterConfig | None = None,
    *,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """The segmenter unit of the mask source ``masks`` in ``store``: reused when complete, else
    trained, scored on the held-out masks, exported and completed. Returns its record (the marker's
    content less the checksums) with ``status`` (``trained`` or ``cached``) and ``uri``.

    :class:`covid_data.lung_masks.MaskSourceError` names the folder or file when the source is
    not usable (no masks, a mask without its image, a file that does not decode, a mask that is
    not a binary lung mask)."""
    cfg = config or SegmenterConfig()
    store = store if isinstance(store, Store) else open_store(str(store))
    pairs = find_mask_pairs(masks)
    source_fp = fingerprint(pairs)
    unit = segmenter_unit(store, segmenter_key(source_fp, cfg))
    done = unit.intact_record()
    if done is not None:
        log.info("lung segmenter %s is complete: reused, not trained again", unit.uri)
        return _with_uri(unit, done, "cached")
    train, held = heldout_split(pairs, cfg.heldout, cfg.seed)
    # Everything is read and checked before training, so a bad file stops the run in seconds.
    x_held, _, held_masks = _read(held, cfg.size)
    x_train, y_train, _ = _read(train, cfg.size)
    log.info("lung segmenter: %d masks to train on, %d held out, %d px", len(train), len(held), cfg.size)
    cache = Path(cache_dir or os.environ.get("COVID_CACHE_DIR", Path.home() / ".cache" / "covid-xray"))
    model, history, seconds = train_unet(
        x_train,
        y_train,
        steps=cfg.steps,
        out=store.child(unit.prefix),
        cache_dir=cache,
        filters=cfg.filters,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        augment=cfg.augment,
        seed=cfg.seed,
    )
    probs = predict(model, x_held)
    metrics = segmentation_metrics(probs, held_masks, [p.id for p in held], seed=cfg.seed)
    with tempfile.TemporaryDirectory(prefix="segmenter-") as tmp:
        tmp = Path(tmp)
        tflite = _export_checked(model, tmp / TFLITE_FILE, x_held[: cfg.parity_images], probs[: cfg.parity_images])
        inference_copy(model, cfg.filters).save(tmp / "model.keras")
        unit.put_file("model.keras", tmp / "model.keras")
        unit.put_file(TFLITE_FILE, tmp / TFLITE_FILE)
    split = {"seed": cfg.seed, "share": cfg.heldout, "heldout": [p.id for p in held], "train": [p.id for p in train]}
    unit.put_text("heldout.json", json.dumps(split, indent=2))
    unit.put_text("evaluation.json", json.dumps(metrics, indent=2))
    unit.put_text("history.csv", _history_csv(history))
    record = {
        "kind": "lung-segmenter",
        "config": cfg.to_dict(),
        "source": {
            "path": str(masks),
            "fingerprint": source_fp,
            "pairs": len(pairs),
            "train": len(train),
            "heldout": len(held),
        },
        "params": int(model.count_params()),
        "train_seconds": round(seconds, 1),
        "epochs": len(history),
        "heldout_metrics": {k: v for k, v in metrics.items() if k != "per_image"},
        "external_metrics": None,  # no second mask source has been scored yet
        "tflite": tflite,
        "goals": GOALS,
        "runtime": _runtime(),
    }
    unit.put_text("MODEL_CARD.md", model_card(record))
    if not unit.complete(record):
        log.warning("another attempt completed %s first; its segmenter stays", unit.uri)
        return _with_uri(unit, unit.record() or record, "cached")
    m = record["heldout_metrics"]
    log.info(
        "lung segmenter %s: held-out Dice %.4f [%.4f, %.4f], IoU %.4f; TFLite %.2f MB; trained in %.0f s",
        unit.uri,
        m["dice"],
        *m["dice_ci95"],
        m["iou"],
        tflite["bytes"] / 1e6,
        seconds,
    )
    return _with_uri(unit, record, "trained")


def _export_checked(model, path: Path, images: np.ndarray, keras_probs: np.ndarray) -> dict[str, Any]:
    size = export_tflite(model, path)
    start = time.perf_counter()
    lite = tflite_predict(path, images)
    ms = 1000 * (time.perf_counter() - start) / max(1, len(images))
    diff = float(np.abs(lite - keras_probs).max())
    if diff > TFLITE_MAX_PROB_DIFF:
        raise SegmenterExportError(
            f"TFLite segmenter differs from Keras by {diff:.2e} in lung probability on {len(images)} held-out "
            f"images (bound {TFLITE_MAX_PROB_DIFF:.0e})"
        )
    return {
        "file": TFLITE_FILE,
        "bytes": size,
        "precision": "float32",
        "input_shape": [1, *images.shape[1:]],
        "checks": {"max_prob_diff": diff, "images": len(images), "bound": TFLITE_MAX_PROB_DIFF},
        "ms_per_image_here": round(ms, 1),
    }


def _history_csv(history: list[dict[str, float]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["epoch", "seconds", "loss"], extrasaction="ignore")
    w.writeheader()
    w.writerows({**h, "epoch": int(h["epoch"])} for h in history)
    return buf.getvalue()


def _runtime() -> dict[str, Any]:
    import keras
    import tensorflow as tf

    return {"device": "cpu", "cpus": os.cpu_count(), "tensorflow": tf.__version__, "keras": keras.__version__}


def _ci(m: dict[str, Any], name: str) -> str:
    lo, hi = m[f"{name}_ci95"]
    return f"{m[name]:.3f} (95% CI {lo:.3f}-{hi:.3f})"


def model_card(record: dict[str, Any]) -> str:
    """The segmenter's card (Markdown): what it is, what it was trained and scored on, how it did."""
    cfg, src, m, lite = record["config"], record["source"], record["heldout_metrics"], record["tflite"]
    goal = record["goals"]
    ok = "meets" if m["dice"] >= goal["dice"] else "misses"
    size_ok = "meets" if lite["bytes"] <= goal["tflite_bytes"] else "misses"
    worst = ", ".join(f"{w['id']} ({w['dice']:.3f})" for w in m["worst"])
    return f"""# Model card: lung segmenter (U-Net)

Research use only: not a medical device and not for diagnosis.

## What it does
Marks the pixels of both lungs on a frontal chest X-ray. Input: {cfg["size"]}x{cfg["size"]} grayscale, raw
pixels 0-255 (scaled inside the graph); output: each pixel's probability of being lung. A small U-Net
({record["params"]:,} parameters, filters {cfg["filters"]}) meant to run before a classifier in the phone app.

## Data
- Mask source: `{src["path"]}` ({src["pairs"]} X-rays with lung masks; content sha256 `{src["fingerprint"][:16]}…`).
- Held out: {src["heldout"]} masks ({cfg["heldout"]:.0%} of each finding or class folder, seed {cfg["seed"]}), never
  trained on; their ids are in `heldout.json`. Trained on the other {src["train"]}.

## Training
{record["epochs"]} epochs (about {cfg["steps"]} batches of {cfg["batch_size"]}), Adam at {cfg["learning_rate"]:g}
with cosine decay, soft Dice + cross-entropy loss, {record["train_seconds"]:.0f} s on
{record["runtime"]["cpus"]} CPU cores.
Augmentation {"on" if cfg["augment"] else "off"}: rotation (about ±10°), zoom and shift applied to image and mask
alike; contrast, gamma, resolution loss, blur or sharpening and noise on the image. No mirror images: the
heart and the smaller left lung make a flipped chest an X-ray the model never meets.

## Figures on the held-out masks ({m["images"]} images)
| metric | mean (95% bootstrap interval over images) |
|---|---|
| Dice | {_ci(m, "dice")} |
| IoU | {_ci(m, "iou")} |

Scored at {m["scored_at"]}. Goal Dice ≥ {goal["dice"]}: it {ok} it here. Worst images: {worst}.

**Another hospital's masks: not measured.** The held-out masks come from the same source as the training
masks; a segmenter trained on one hospital scored 0.95 there and 0.41 at another in an earlier check, so the
figures above say nothing about other sources until a second mask source is scored.

## Export
`{lite["file"]}`: TensorFlow Lite, {lite["precision"]}, input {lite["input_shape"]}, {lite["bytes"] / 1e6:.2f} MB (goal
≤ {goal["tflite_bytes"] / 1e6:.0f} MB: it {size_ok} it). Largest lung-probability difference from Keras on
{lite["checks"]["images"]} held-out images: {lite["checks"]["max_prob_diff"]:.1e}.
{lite["ms_per_image_here"]} ms per image with the TFLite interpreter on the training machine (the app's
goal, ≤ {goal["app_ms_per_image"]} ms, is measured in the browser by `benchmarks/app.py`, not here).

## Limits
- One mask source's X-rays and its annotators' idea of where a lung ends; other sources may differ in both.
- A mask that misses lung behind the heart or below the diaphragm is the reference's convention, not an error
  the model can fix.
"""
