"""A shortcut audit of the data (issue 16 §3, after Maguolo and Nanni 2021): black out the lungs, train
a small classifier on what is left, and see whether it still tells the classes apart.

Where it scores far above chance, the labels can be read from outside the lungs (text markers,
collimation, patient position, the per-source processing the shared sample's README describes), and
a classifier trained on these images may learn that instead of the lungs.

What is blacked out (:func:`cover`): the segmenter's predicted lungs (probability > 0.5), then the
convex hull of both lungs (a lung the segmenter misses in part, e.g. a white consolidated lobe, and the
mediastinum between them), dilated by ``margin`` (a share of the image side). The margin and the hull
err on the side of hiding too much: a segmenter trained elsewhere places a lung border a few pixels
off (its worst held-out Shenzhen images score Dice 0.85-0.89), and what leaks through the border is
lung, which would make the audit's figure mean nothing. Hiding too much only pushes the figure
towards chance, so a figure far above chance stays a finding.

The classifier (:func:`features` then :func:`fit_and_score`): frozen ImageNet MobileNetV2, its pooled
features, and a logistic regression fitted on the train split, scored once on the test split; or, with
``features="pixels"``, the image shrunk to ``pixels`` x ``pixels`` (no weights needed: tests, or a
machine without the weights file). The same classifier on the un-masked images is the reference, and
one on the black region alone (the mask's shape) says whether the segmenter's output itself carries
the label.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from covid_models import segmenter as segmenter_module
from covid_models.builders import preprocess_layer
from covid_models.metrics import wilson_interval
from covid_models.segmenter import predict, resize_images
from covid_models.weights import MissingWeightsError, resolve_imagenet

AUDIT_VERSION = 1  # bump when the audit changes in a way the config does not show
FEATURE_KINDS = ("mobilenet_v2", "pixels")
MIN_COVER = 0.10  # an image whose cover is smaller: the segmenter found (almost) no lungs


@dataclass(frozen=True)
class AuditConfig:
    """The audit's recipe: how the lungs are blacked out and which small classifier reads the rest."""

    size: int = 160  # px the images are blacked out and classified at (MobileNetV2: ~2 min for 3,800 on 2 cores)
    margin: float = 0.05  # dilation, as a share of the image side: 8 px at 160, 15 px at the 299 px originals
    hull: bool = True  # black out the convex hull of both lungs, not only the predicted pixels
    # "lungs": each image's own cover; "fixed": one region for every image (where the train split's covers
    # agree), so the black region's shape says nothing; lungs off the usual place then show through
    region: str = "lungs"
    features: str = "mobilenet_v2"  # or "pixels" (no weights)
    pixels: int = 32  # side of the shrunken image for "pixels" features, and for the black-region control
    c: float = 1.0  # inverse L2 strength of the logistic regression
    seed: int = 0
    examples_per_class: int = 2  # test images shown blacked out in examples.png

    def __post_init__(self):
        if self.features not in FEATURE_KINDS:
            raise ValueError(f"features must be one of {FEATURE_KINDS}, got {self.features!r}")
        if self.region not in ("lungs", "fixed"):
            raise ValueError(f"region must be 'lungs' or 'fixed', got {self.region!r}")
        if not 0 <= self.margin < 0.5:
            raise ValueError(f"margin is a share of the image side in [0, 0.5), got {self.margin}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> AuditConfig:
        return cls(**{k: v for k, v in (d or {}).items() if k != "audit_version"})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "audit_version": AUDIT_VERSION}


# -- what is blacked out ---------------------------------------------------------------------------
def segment(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Boolean lung masks ``[N, H, W]`` for uint8 ``[N, H, W]`` images: each image resized to the
    segmenter's input, its lung probability resized back (bilinear) and thresholded at one half."""
    import tensorflow as tf

    size = int(model.input_shape[1])
    probs = predict(model, resize_images(list(images), size), batch_size=batch_size)
    back = tf.image.resize(probs[..., None], images.shape[1:3], method="bilinear").numpy()[..., 0]
    return back > 0.5


def _hull(mask: np.ndarray) -> np.ndarray:
    """The convex hull of the mask's two largest blobs (both lungs; a stray speck elsewhere would
    stretch the hull over half the image), filled."""
    from PIL import Image, ImageDraw
    from scipy import ndimage
    from scipy.spatial import ConvexHull, QhullError

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    keep = [i + 1 for i in np.argsort(sizes)[::-1][:2] if sizes[i] >= 0.1 * sizes.max()]
    ys, xs = np.nonzero(np.isin(labels, keep))
    pts = np.stack([xs, ys], axis=1)
    try:
        corners = pts[ConvexHull(pts).vertices]
    except (QhullError, ValueError):  # a line or a handful of pixels: no area to hull
        return mask
    canvas = Image.new("1", mask.shape[::-1], 0)
    ImageDraw.Draw(canvas).polygon([tuple(map(float, p)) for p in corners], fill=1, outline=1)
    return np.asarray(canvas, bool) | mask


def cover(masks: np.ndarray, margin: float, hull: bool = True) -> np.ndarray:
    """What is blacked out, per image: the lungs (hulled when ``hull``), dilated by ``margin`` x the side."""
    from scipy import ndimage

    radius = margin * masks.shape[-1]
    out = []
    for m in np.asarray(masks, bool):
        m = _hull(m) if hull else m
        if radius > 0 and m.any():
            m = ndimage.distance_transform_edt(~m) <= radius  # a disc of the radius around every lung pixel
        out.append(m)
    return np.stack(out)


def black_out(images: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """The images with every covered pixel set to 0 (black)."""
    return np.where(covered, 0, images).astype(images.dtype)


# -- the small classifier --------------------------------------------------------------------------
def mobilenet_weights(size: int) -> Path | str:
    """The ImageNet MobileNetV2 weights (``covid_models.weights``); the error says what to do without them."""
    try:
        return resolve_imagenet("mobilenet_v2", size)
    except MissingWeightsError as e:
        raise MissingWeightsError(
            f"the shortcut audit's classifier needs ImageNet MobileNetV2 weights: {e} Or audit with "
            "features='pixels' (a logistic regression on shrunken pixels; no weights, weaker)."
        ) from e


def weights_id(weights: Path | str | None) -> str | None:
    """What the unit's key records of the weights: a file's sha256 (short), or Keras' download."""
    if weights is None or str(weights) == "imagenet":
        return None if weights is None else "imagenet (Keras download)"
    return hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16]


def feature_extractor(size: int, weights: Path | str) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 ``[N, size, size]`` -> pooled frozen MobileNetV2 features ``[N, 1280]``."""
    import keras

    inp = keras.Input((size, size, 1), name="image")
    x = preprocess_layer("tf", 1)(inp)  # MobileNetV2's preprocess_input, grey to three channels
    backbone = keras.applications.MobileNetV2(input_shape=(size, size, 3), include_top=False, weights=str(weights))
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(backbone(x)), name="audit_features")
    return lambda images: np.asarray(model.predict(images[..., None].astype("float32"), batch_size=64, verbose=0))


def shrink(images: np.ndarray, side: int) -> np.ndarray:
    """``[N, side * side]`` float features: each image's block means (area resize), scaled to 0-1."""
    n, h, w = images.shape
    ys, xs = np.linspace(0, h, side + 1).astype(int), np.linspace(0, w, side + 1).astype(int)
    x = np.asarray(images, "float32") / 255.0
    rows = np.add.reduceat(x, ys[:-1], axis=1) / np.diff(ys)[None, :, None]
    return (np.add.reduceat(rows, xs[:-1], axis=2) / np.diff(xs)[None, None, :]).reshape(n, -1)


def features(images: np.ndarray, cfg: AuditConfig, extractor: Callable | None = None) -> np.ndarray:
    """The classifier's input for uint8 ``[N, H, W]`` images (``extractor``: MobileNetV2's, built once)."""
    if cfg.features == "pixels":
        return shrink(images, cfg.pixels)
    if extractor is None:
        raise ValueError("MobileNetV2 features need the extractor (feature_extractor)")
    return extractor(images)


def fit_and_score(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, classes: list[str], c: float
) -> dict[str, Any]:
    """A standardised logistic regression fitted on the train split and scored once on the test split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    clf.fit(x_train, y_train)
    return score(y_test, clf.predict(x_test), classes)


def score(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy with its Wilson 95% interval, per-class recall and the confusion matrix (rows: true)."""
    from sklearn.metrics import confusion_matrix

    y, pred = np.asarray(y), np.asarray(pred)
    correct = int((y == pred).sum())
    cm = confusion_matrix(y, pred, labels=list(range(len(classes))))
    support = cm.sum(axis=1)
    return {
        "n": int(len(y)),
        "correct": correct,
        "accuracy": correct / len(y),
        "accuracy_ci95": list(wilson_interval(correct, len(y))),
        "recall": {c: (float(cm[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
    }


def chance(y_test: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """What guessing scores: always the test split's most common class, and one class in K at random."""
    counts = np.bincount(np.asarray(y_test), minlength=len(classes))
    top = int(counts.argmax())
    return {"majority": float(counts[top] / counts.sum()), "majority_class": classes[top], "uniform": 1 / len(classes)}


def meaning(masked: dict[str, Any], base: dict[str, Any], shape: dict[str, Any] | None = None) -> str:
    """One line that makes the figure read. "Above chance" needs the interval's lower end above the
    majority-class share, so a small test split cannot cry wolf. ``shape``: the black region alone,
    named when it reads the labels too (then part of the figure is the segmenter's, not the images')."""
    acc, (lo, hi), majority = masked["accuracy"], masked["accuracy_ci95"], base["majority"]
    figure = f"{acc:.1%} (95% CI {lo:.1%}-{hi:.1%}) with the lungs blacked out against {majority:.1%} chance"
    if shape and shape["accuracy_ci95"][0] > majority:
        figure += f"; the black region's shape alone reads {shape['accuracy']:.1%}"
    if lo > majority:
        return (
            f"labels readable from outside the lungs: {(acc - majority) * 100:.0f} points above chance, {figure}; "
            "a classifier may learn markers, collimation or processing instead of the lungs"
        )
    return f"labels not readable from outside the lungs: {figure} (not above it)"


def audit_arrays(
    images: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    masks: dict[str, np.ndarray],
    classes: list[str],
    cfg: AuditConfig,
    extractor: Callable | None = None,
) -> dict[str, Any]:
    """The audit on uint8 ``[N, H, W]`` images of the ``train`` and ``test`` splits with their lung
    masks (boolean, same shape): the lungs blacked out, the classifier fitted on train and scored on
    test, with the un-masked reference, the black region alone, chance and what the figure means.
    Returns the figures and, under ``"blacked"``, the blacked-out test images (for the examples)."""
    covered = {s: cover(masks[s], cfg.margin, cfg.hull) for s in ("train", "test")}
    fixed = covered["train"].mean(axis=0) >= 0.5  # the pixels most train images cover
    if cfg.region == "fixed":  # one region for every image alike
        covered = {s: np.broadcast_to(fixed, covered[s].shape) for s in ("train", "test")}
    # Where the segmenter found (almost) no lungs, the fixed region stands in: an image whose lungs stay
    # in view would read as "from outside the lungs".
    missed = {s: covered[s].mean(axis=(1, 2)) < MIN_COVER for s in ("train", "test")}
    covered = {s: np.where(missed[s][:, None, None], fixed, covered[s]) for s in ("train", "test")}
    blacked = {s: black_out(images[s], covered[s]) for s in ("train", "test")}

    def run(pixels: dict[str, np.ndarray], kind: AuditConfig = cfg) -> dict[str, Any]:
        f = {s: features(pixels[s], kind, extractor) for s in ("train", "test")}
        return fit_and_score(f["train"], labels["train"], f["test"], labels["test"], classes, cfg.c)

    base = chance(labels["test"], classes)
    masked, unmasked = run(blacked), run(images)
    region = {s: (covered[s] * 255).astype("uint8") for s in ("train", "test")}
    shape_only = run(region, AuditConfig(**{**asdict(cfg), "features": "pixels"}))
    share = {s: covered[s].mean(axis=(1, 2)) for s in ("train", "test")}
    both = np.concatenate([share["train"], share["test"]])
    y_all = np.concatenate([labels["train"], labels["test"]])
    return {
        "masked": masked,
        "unmasked": unmasked,
        "mask_only": shape_only,
        "chance": base,
        "meaning": meaning(masked, base, shape_only),
        "blacked_out": {
            "mean_share": float(both.mean()),
            "min_share": float(both.min()),
            "max_share": float(both.max()),
            "images_under_10pct": int((both < MIN_COVER).sum()),  # even the fixed region covers less
            "fixed_region_stood_in": int(missed["train"].sum() + missed["test"].sum()),  # no lungs found
            "per_class": {c: float(both[y_all == i].mean()) for i, c in enumerate(classes) if (y_all == i).any()},
        },
        "n": {s: int(len(labels[s])) for s in ("train", "test")},
        "blacked": blacked["test"],
    }


def audit_key(split_hash: str, segmenter_key: str, cfg: AuditConfig, weights: str | None) -> str:
    """The unit's key: the split (its hash names the dataset version's images and assignment), the
    segmenter unit, the recipe, the weights and the code that reads, segments and scores."""
    # This module, the unit's (reading the images; a sibling file, not imported: it imports this one)
    # and the segmenter's (resizing, predicting).
    sources = (Path(__file__), Path(__file__).with_name("shortcut_audit_unit.py"), Path(segmenter_module.__file__))
    code = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    doc = {"split": split_hash, "segmenter": segmenter_key, **cfg.to_dict(), "weights": weights, "code": code}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def report_lines(audit: dict[str, Any] | None) -> list[str]:
    """The run report's paragraph on the audit (nothing when the run did not audit)."""
    if not audit:
        return []
    head = "**Shortcut audit** (lungs blacked out, a small classifier on the rest; after Maguolo and Nanni 2021):"
    if audit.get("status") == "failed" or "masked" not in audit:
        return ["", f"{head} not computed: {audit.get('reason') or audit.get('error')}"]
    m, u, b = audit["masked"], audit["unmasked"], audit["blacked_out"]
    lo, hi = m["accuracy_ci95"]
    cap = f", the split capped at {audit['max_per_class']} images per class" if audit.get("max_per_class") else ""
    return [
        "",
        f"{head} {audit['meaning']}.",
        "",
        f"Test accuracy {m['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}, n={m['n']}{cap}) with {b['mean_share']:.0%} "
        f"of each image blacked out on average; the same classifier on the whole images {u['accuracy']:.3f}; on the "
        f"black region's shape alone {audit['mask_only']['accuracy']:.3f}; chance {audit['chance']['majority']:.3f} "
        f"(majority class), {audit['chance']['uniform']:.3f} (1/K). Stored with the dataset version: `{audit['uri']}`.",
    ]
