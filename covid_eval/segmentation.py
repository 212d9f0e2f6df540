"""How well a lung segmenter agrees with reference masks: Dice and IoU per image, with intervals.

Each image counts once (the mean of per-image scores), so a large pair of lungs does not outweigh
a child's. The 95% interval is a percentile bootstrap over images: the held-out masks are a
sample of the X-rays the segmenter will meet, and that is the uncertainty worth stating.
Predictions are scored at the reference mask's own resolution (the probabilities resized to it),
as the app draws the outline over the image, not at the model's smaller input size.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def dice_iou(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(Dice, IoU) of two boolean masks; both 1.0 when both are empty (nothing to find, nothing found)."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {ref.shape}")
    inter = int(np.logical_and(pred, ref).sum())
    a, b = int(pred.sum()), int(ref.sum())
    if a + b == 0:
        return 1.0, 1.0
    return 2 * inter / (a + b), inter / (a + b - inter)


def bootstrap_interval(values: np.ndarray, *, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values``."""
    values = np.asarray(values, dtype="float64")
    if not len(values):
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def to_reference_size(probs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A probability map ``[h, w]`` resized (bilinear) to the reference mask's ``shape``, thresholded at 0.5."""
    if probs.shape == tuple(shape):
        return probs > 0.5
    import tensorflow as tf  # only here: scoring at the model's own size needs no TensorFlow

    return tf.image.resize(probs[..., None].astype("float32"), shape, method="bilinear").numpy()[..., 0] > 0.5


def segmentation_metrics(
    probs: np.ndarray, refs: list[np.ndarray], ids: list[str], *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Mean Dice and IoU over images with their 95% bootstrap intervals, and each image's scores.

    ``probs``: lung probabilities ``[N, h, w]`` at the model's size; ``refs``: each image's reference
    mask (boolean) at its own size; ``ids`` name the images in the per-image table."""
    if not (len(probs) == len(refs) == len(ids)):
        raise ValueError(f"{len(probs)} predictions, {len(refs)} masks and {len(ids)} ids")
    scores = [dice_iou(to_reference_size(p, r.shape), r) for p, r in zip(probs, refs, strict=True)]
    dice = np.array([s[0] for s in scores])
    iou = np.array([s[1] for s in scores])
    worst = np.argsort(dice)[:5]
    return {
        "images": len(ids),
        "dice": float(dice.mean()),
        "dice_ci95": list(bootstrap_interval(dice, n_boot=n_boot, seed=seed)),
        "dice_median": float(np.median(dice)),
        "iou": float(iou.mean()),
        "iou_ci95": list(bootstrap_interval(iou, n_boot=n_boot, seed=seed)),
        "worst": [{"id": ids[i], "dice": round(float(dice[i]), 4)} for i in worst],
        "per_image": {
            i: {"dice": round(float(d), 5), "iou": round(float(j), 5)} for i, d, j in zip(ids, dice, iou, strict=True)
        },
        "scored_at": "each reference mask's own resolution (probabilities resized bilinear, threshold 0.5)",
    }
