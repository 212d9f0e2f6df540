"""The view check: does a picture look like a *frontal* (PA or AP) chest film, or a lateral or turned one?

Training-free, on the guard's input (``INPUT_SIZE`` px grey, integer values 0..255), the same pixels the
page computes (``app/src/view.js`` is this module line for line). The image is reduced to a ``GRID`` x
``GRID`` grid of 4x4 block sums ``B`` (integers); ``S`` is their total. Two cues:

- **asymmetry** = sum over the grid of ``|B[i, j] - B[i, GRID-1-j]|`` / ``S``: the mean difference between a
  block and its mirror image about the vertical midline, relative to the mean block. A frontal film is
  roughly mirror-symmetric; a lateral view (spine at one side, sternum at the other) is not.
- **midline** = (centre-column band - lateral lung bands) - (centre-row band - upper and lower bands), each
  band's mean block relative to the mean block ``S / GRID**2``. Bands span the whole grid: the centre band
  is blocks 14..17, the lateral bands 5..10 and 21..26 (the lung fields of a frontal film), across columns
  for the first term and across rows for the second. A frontal film has a bright mediastinum and spine
  between two darker lungs (first term high) and no bright horizontal band at mid-height (second term
  low); a film turned by 90 degrees swaps the two, and a lateral view has no bright central column.
  Subtracting the row term keeps pictures that are bright in their centre in every direction (a knee,
  a turned film) from passing.

Both are a ratio of two integers computed exactly (Python ints, JS numbers below 2**53), then one
correctly rounded division: Python and the page get the same float, bit for bit. An all-black picture
(``S == 0``) has no cues: asymmetry +inf and midline -inf, so it is flagged.

Thresholds are fitted with the guard, by a rule fixed before measuring: flag when asymmetry is above its
``QUANTILE`` quantile or midline below its ``LOW_QUANTILE`` (1 - ``QUANTILE``) quantile over the split's
train and validation X-rays (about 1% of them are flagged by design).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

VERSION = 1  # bump when a cue's definition changes: it is part of the guard's key
INPUT_SIZE = 128
BLOCK = 4
GRID = INPUT_SIZE // BLOCK
CENTRE = (14, 18)  # half-open block ranges
LATERAL = ((5, 11), (21, 27))
QUANTILE = 0.995
LOW_QUANTILE = round(1 - QUANTILE, 9)  # 0.005, not 0.0050000000000000044
METHOD = (
    f"View check (no training): on the {INPUT_SIZE} px grey input, {BLOCK}x{BLOCK} block sums; flagged when the "
    "left-right asymmetry (mean |block - mirrored block| over the mean block) is above its "
    f"{QUANTILE:.1%} quantile, or the midline cue (a bright central column between darker lung fields, "
    f"less the same across the rows) below its {LOW_QUANTILE:.1%} quantile, over the train and validation "
    "X-rays: a frontal (PA or AP) film is expected."
)


def blocks(image: np.ndarray) -> np.ndarray:
    """(GRID, GRID) int64 block sums of one ``INPUT_SIZE`` px grey image (integer values 0..255)."""
    x = np.asarray(image)
    x = x.reshape(x.shape[0], x.shape[1]) if x.ndim == 3 else x
    if x.shape != (INPUT_SIZE, INPUT_SIZE):
        raise ValueError(f"the view check needs a {INPUT_SIZE}x{INPUT_SIZE} grey image, got {x.shape}")
    xi = np.rint(x).astype(np.int64)  # the guard's input holds integers (it is rounded), float or uint8
    return xi.reshape(GRID, BLOCK, GRID, BLOCK).sum(axis=(1, 3))


def _band(b: np.ndarray, lo: int, hi: int) -> int:
    return int(b[:, lo:hi].sum())


def cues(image: np.ndarray) -> dict[str, float]:
    """{"asymmetry", "midline"} of one image; see the module's text for the definitions."""
    b = blocks(image)
    s = int(b.sum())
    if s == 0:
        return {"asymmetry": float("inf"), "midline": float("-inf")}
    diff = int(np.abs(b - b[:, ::-1]).sum())
    n_c = CENTRE[1] - CENTRE[0]
    n_l = sum(hi - lo for lo, hi in LATERAL)
    t = b.T  # rows as columns: the same bands across the rows

    def contrast(m: np.ndarray) -> int:
        # n_l * centre - n_c * lateral: mean(centre) - mean(lateral), times n_c * n_l * GRID (integers)
        return n_l * _band(m, *CENTRE) - n_c * sum(_band(m, lo, hi) for lo, hi in LATERAL)

    # (mean_c - mean_l) / (S / GRID^2) with mean over n * GRID blocks: GRID * num / (n_c * n_l * S)
    num = GRID * (contrast(b) - contrast(t))
    return {"asymmetry": diff / s, "midline": num / (n_c * n_l * s)}


def cue_arrays(images: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """The cues of many images, as two float arrays."""
    rows = [cues(im) for im in images]
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in ("asymmetry", "midline")}


def fit(trainval: dict[str, np.ndarray]) -> dict[str, float]:
    """Thresholds by the fixed rule: asymmetry's ``QUANTILE`` and midline's ``LOW_QUANTILE`` quantiles."""
    # Over the finite cues: an all-black image's are infinite, and a threshold must be a number that
    # app.json can carry (JSON has no Infinity).
    a, m = (np.asarray(trainval[k], dtype=np.float64) for k in ("asymmetry", "midline"))
    a, m = a[np.isfinite(a)], m[np.isfinite(m)]
    if not len(a) or not len(m):
        raise ValueError("the view check needs X-rays with finite cues to fit its thresholds: none here")
    return {
        "asymmetry_threshold": float(np.quantile(a, QUANTILE)),
        "midline_threshold": float(np.quantile(m, LOW_QUANTILE)),
    }


def flagged(c: dict[str, Any], thresholds: dict[str, Any]) -> np.ndarray | bool:
    """Whether cues (scalars or arrays) are flagged: the page's rule (``view.js::viewFlag``)."""
    a, m = np.asarray(c["asymmetry"]), np.asarray(c["midline"])
    # As the page: a NaN cue is flagged.
    out = ~(a <= thresholds["asymmetry_threshold"]) | ~(m >= thresholds["midline_threshold"])
    return bool(out) if out.ndim == 0 else out


def record(trainval: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict[str, Any]:
    """What ``guard.json`` keeps under ``view``: the definition, thresholds and false-alarm rates."""
    thr = fit(trainval)
    n_test = len(test["asymmetry"])
    return {
        "version": VERSION,
        "method": METHOD,
        "block": BLOCK,
        "centre": list(CENTRE),
        "lateral": [list(b) for b in LATERAL],
        "quantiles": {"asymmetry": QUANTILE, "midline": LOW_QUANTILE},
        **thr,
        "fitted_on": {"trainval": len(trainval["asymmetry"]), "test": n_test},
        "trainval_false_alarm": float(np.mean(flagged(trainval, thr))),
        "test_false_alarm": float(np.mean(flagged(test, thr))) if n_test else None,
    }
