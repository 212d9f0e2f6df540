"""The fixed Grad-CAM gallery of a stored model, and the small pictures the report embeds.

:func:`explain_model` takes a fixed, seeded choice of test images per class (the same for every
model of a split), computes their Grad-CAM maps and the shortcut score (:mod:`covid_eval.gradcam`,
over the dataset's lung masks where the source has them, else the lung segmenter's masks where the run
has one, else the border band), and draws a
gallery of right and wrong predictions per class as PNG overlays. :func:`write_index` stores the
record beside them (``gradcam.json``); :func:`card_lines` is a model card's section from it;
:func:`small_png` and :func:`contact_sheet` make the report's inline (``data:`` URI) pictures.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from covid_data.dataset import default_cache_dir
from covid_data.labels import CLASSES
from covid_data.manifest import read_parquet_bytes
from covid_data.split import SplitRef
from covid_eval.gradcam import (
    BORDER,
    gradcam_with_probs,
    layer_names,
    method_name,
    shortcut_baseline,
    shortcut_meaning,
    shortcut_score,
)
from covid_eval.shortcut_audit import cover, segment
from covid_eval.shortcut_audit_unit import load_segmenter
from covid_models.data import decode_resize, load_split_data
from covid_models.stored import StoredModel

GALLERY_PX = 256  # overlays are at most this many pixels on a side


# --------------------------------------------------------------------------------------------
# Choosing and loading the images


log = logging.getLogger(__name__)


def _order_key(seed: int, sha: str) -> str:
    return hashlib.sha256(f"{seed}:{sha}".encode()).hexdigest()


def _slug(label: str) -> str:
    return label.replace(" ", "_").lower()


def load_images(paths: list[str], size: int, channels: int) -> np.ndarray:
    """Local image files decoded and resized as in training, ``(N, size, size, channels)`` uint8."""
    return (
        np.stack([decode_resize(p, size, channels).numpy() for p in paths])
        if paths
        else np.zeros((0, size, size, channels), "uint8")
    )


def load_masks(files: list[str | None], size: int) -> np.ndarray | None:
    """Lung masks resized to the input size (True on the lungs); None unless every image has one."""
    if not files or any(not f or not Path(f).is_file() for f in files):
        return None
    from PIL import Image

    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(np.asarray(im.convert("L").resize((size, size), Image.NEAREST)) > 127)
    return np.stack(out)


def segmenter_masks(segmenter_uri: str, images: np.ndarray, cache_dir: Path | None = None) -> np.ndarray:
    """The lung segmenter unit's masks (True on the lungs) of ``images`` (uint8 ``[N, H, W, C]``, the model's
    input), at their size: where a dataset ships no masks, the shortcut score still measures "outside the lungs"."""
    model, _, _ = load_segmenter(segmenter_uri, Path(cache_dir) if cache_dir else default_cache_dir())
    grey = images[..., 0] if images.shape[-1] == 1 else np.rint(images.astype("float32").mean(axis=-1))
    # The hull of both lungs, as the audit covers them: the segmenter misses white, consolidated lobes, and
    # heat on disease inside the lungs is not a shortcut.
    return cover(segment(model, grey.astype("uint8")), margin=0.0)


def _mask_files(split_uri: str, data, rows) -> list[str | None]:
    """Each row's lung mask as a local file, where the dataset's manifest has a ``mask_path``."""
    dataset = SplitRef.from_uri(split_uri).dataset_store()
    try:
        manifest = read_parquet_bytes(dataset.read_bytes("manifest.parquet"))
    except FileNotFoundError:
        return [None] * len(rows)
    if "mask_path" not in manifest.columns:
        return [None] * len(rows)
    by_path = dict(zip(manifest["path"], manifest["mask_path"], strict=True))
    out: list[str | None] = []
    for p in rows["path"]:
        key = by_path.get(p)
        if not isinstance(key, str) or not key:
            out.append(None)
            continue
        local = dataset.local_path(key)
        if local is None:  # gs://: staged beside the images
            local = data.root / key
            if not local.is_file():
                dataset.get_file(key, local)
        out.append(str(local))
    return out


def _pool(data, split: str, classes: list[str], pool_per_class: int, seed: int):
    """A fixed, seeded choice of up to ``pool_per_class`` images per class of ``split``."""
    import pandas as pd

    df = data.frames[split]
    key = df["sha256"] if "sha256" in df.columns else df["path"]
    df = df.assign(_order=[_order_key(seed, str(s)) for s in key]).sort_values(["_order", "path"], kind="stable")
    picked = [df[df["label"] == c].head(pool_per_class) for c in classes]
    return pd.concat(picked).drop(columns="_order").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# The gallery


def overlay_png(image: np.ndarray, heat: np.ndarray, title: str, out: Path, px: int = GALLERY_PX) -> Path:
    """The image in grey with the heatmap in colour (jet, 40%), titled; at most ``px`` pixels a side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = np.asarray(image, dtype="float32")
    grey = img[..., 0] if img.shape[-1] == 1 else img.mean(axis=-1)
    dpi = 100
    fig = plt.figure(figsize=(px / dpi, px / dpi), dpi=dpi)
    ax = fig.add_axes((0.0, 0.0, 1.0, 0.86))
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="bilinear")
    ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0, interpolation="bilinear")
    ax.set_axis_off()
    fig.text(0.5, 0.93, title, ha="center", va="center", fontsize=7)
    fig.savefig(out, dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return out


def explain_model(
    model_uri: str,
    split_uri: str,
    out_dir: Path,
    *,
    per_class: int = 2,
    seed: int = 0,
    pool_per_class: int = 32,
    max_per_class: int | None = None,
    border: float = BORDER,
    segmenter_uri: str | None = None,
) -> dict[str, Any]:
    """Grad-CAM of one stored model: the gallery PNGs in ``out_dir`` and the shortcut score.

    The score is over the dataset's lung masks where every pooled image has one, else over the masks
    of the segmenter unit at ``segmenter_uri`` where given, else over the border band.

    The images are a fixed, seeded choice of ``pool_per_class`` test images per class (the same
    for every model of a split); the shortcut score is over all of them, and the gallery shows,
    per class, the first ``per_class`` right and the first ``per_class`` wrong predictions among
    them (fewer where there are fewer).
    """
    stored = StoredModel(model_uri)
    size, channels = stored.input_size, stored.channels
    model = stored.keras()
    data = load_split_data(split_uri, max_per_class=max_per_class)
    split = "test" if data.size("test") else "val"
    rows = _pool(data, split, list(CLASSES), pool_per_class, seed)
    paths = [str(data.root / p) for p in rows["path"]]
    images = load_images(paths, size, channels)
    heat, probs = gradcam_with_probs(model, images)
    masks = load_masks(_mask_files(split_uri, data, rows), size) if len(rows) else None
    from_segmenter = masks is None and segmenter_uri is not None and len(rows) > 0
    if from_segmenter:
        try:
            masks = segmenter_masks(segmenter_uri, images)
        except Exception as e:  # an explanation never fails for want of an outline: the border band instead
            log.warning("lung segmenter %s could not outline the images (%s): border band instead", segmenter_uri, e)
            masks, from_segmenter = None, False
    method = method_name(masks is not None, border, segmenter=from_segmenter)
    score = shortcut_score(heat, masks, border) if len(rows) else float("nan")
    baseline = shortcut_baseline((size, size), masks, border)
    pred = probs.argmax(axis=1)
    truth = rows["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for ci, c in enumerate(CLASSES):
        for right in (True, False):
            idx = [i for i in range(len(rows)) if truth[i] == ci and (pred[i] == ci) == right][:per_class]
            for k, i in enumerate(idx):
                name = f"{_slug(c)}-{'right' if right else 'wrong'}-{k + 1}.png"
                p_pred = float(probs[i, pred[i]])
                title = f"true {c} / pred {CLASSES[pred[i]]} ({p_pred:.2f})"
                overlay_png(images[i], heat[i], title, out_dir / name)
                one = shortcut_score(heat[i], None if masks is None else masks[i], border)
                records.append(
                    {
                        "file": name,
                        "path": str(rows["path"][i]),
                        "sha256": str(rows["sha256"][i]) if "sha256" in rows.columns else None,
                        "true": c,
                        "predicted": CLASSES[pred[i]],
                        "probability": round(p_pred, 4),
                        "correct": bool(right),
                        "shortcut": None if not np.isfinite(one) else round(one, 4),
                    }
                )
    return {
        "model": stored.name,
        "split": split,
        "n": len(rows),
        "shortcut_score": None if not np.isfinite(score) else round(score, 4),
        "baseline": round(baseline, 4),
        "method": method,
        "layer": layer_names(model),
        "gallery": records,
    }


def gallery(
    model_uri: str,
    split_uri: str,
    per_class: int = 2,
    seed: int = 0,
    *,
    out_dir: Path | None = None,
    pool_per_class: int = 32,
    max_per_class: int | None = None,
) -> list[dict[str, Any]]:
    """The fixed Grad-CAM gallery of a stored model: PNG overlays in ``out_dir`` (a temporary
    folder when None, whose paths are then in each record's ``png``) and one record per image."""
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="gradcam-"))
    res = explain_model(
        model_uri,
        split_uri,
        out,
        per_class=per_class,
        seed=seed,
        pool_per_class=pool_per_class,
        max_per_class=max_per_class,
    )
    return [{**r, "png": str(out / r["file"])} for r in res["gallery"]]


def write_index(out_dir: Path, result: dict[str, Any]) -> Path:
    """``gradcam.json`` beside the PNGs: the score, its method and baseline, and the gallery."""
    path = Path(out_dir) / "gradcam.json"
    path.write_text(json.dumps(result, indent=1, default=float))
    return path


def card_lines(record: dict[str, Any] | None) -> list[str]:
    """Markdown lines for a model card's "Where the model looks" section (from an explain record)."""
    if not record:
        return []
    lines = ["", "## Where the model looks", ""]
    if record.get("error"):
        return [*lines, f"Grad-CAM was not computed: {record['error']}"]
    lines.append(shortcut_meaning(record.get("shortcut_score"), record.get("baseline"), record.get("method", "")))
    lines += [
        "",
        f"Grad-CAM over {record.get('n', '?')} fixed test images; the gallery ("
        f"{len(record.get('images', []))} images, right and wrong predictions per class) is in the run folder "
        f"under `gradcam/{record.get('model')}/`. A low score does not prove the model is right for the right "
        "reasons, and a high one is a reason to look, not a verdict.",
    ]
    return lines


# --------------------------------------------------------------------------------------------
# Small PNGs for inline (data: URI) embedding


def small_png(data: bytes, max_px: int, colours: int = 128) -> bytes:
    """``data`` (an image) scaled to at most ``max_px`` on its longer side, as a palette PNG."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        im.thumbnail((max_px, max_px), Image.LANCZOS)
        im = im.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
        return buf.getvalue()


def contact_sheet(pngs: list[bytes | None], columns: int = 4, cell_px: int = 160, colours: int = 128) -> bytes:
    """Several images in one palette PNG, ``columns`` a row, each at most ``cell_px`` a side
    (a None leaves its cell blank)."""
    from PIL import Image

    cells: list = []
    for data in pngs:
        if data is None:
            cells.append(None)
            continue
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            im.thumbnail((cell_px, cell_px), Image.LANCZOS)
            cells.append(im.copy())
    if not any(cells):
        raise ValueError("no images for a contact sheet")
    cols = min(columns, len(cells))
    rows = -(-len(cells) // cols)
    sheet = Image.new("RGB", (cols * cell_px, rows * cell_px), "white")
    for i, im in enumerate(cells):
        if im is None:
            continue
        r, c = divmod(i, cols)
        sheet.paste(im, (c * cell_px + (cell_px - im.width) // 2, r * cell_px + (cell_px - im.height) // 2))
    sheet = sheet.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
