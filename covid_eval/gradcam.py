"""Why the model decided: Grad-CAM maps, a fixed gallery of them, and a shortcut score.

Grad-CAM (Selvaraju et al. 2017; the keras.io recipe "Grad-CAM class activation visualization"):
take the last convolutional activation ``A`` (H' x W' x K) of the network, the gradient of the
class score ``y_c`` (the logit, before the softmax) with respect to it, weight each channel by its
global-average gradient ``alpha_k = mean_ij dy_c/dA_ijk``, sum, keep the positive part, scale to
[0, 1] and upsample bilinearly to the input size.

The models here are ``image -> preprocess -> backbone -> head`` with the backbone a *nested*
keras.applications model (or ``image -> preprocess -> custom_cnn`` with a nested Sequential), so
the inner activation is not an output of the outer model: :func:`gradcam` replays the forward pass
layer by layer, with the nested model split into ``input -> [last conv, output]``, so the tape sees
the activation.

The **shortcut score** (:func:`shortcut_score`) is the share of the Grad-CAM mass that lies
outside the lungs: outside the dataset's lung masks where the source has them, else in the outer
border band of the image (10% of each side), where text markers, hospital labels and collimation
edges sit. A model that reads the lungs scores low; one that looks at markers and edges scores
high. A map spread evenly over the image scores the band's (or the non-lung) area share, the
*baseline* (0.36 for a 10% band), reported beside the score so the number reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from covid_models.ensemble import is_ensemble, member_heatmaps, members_of

log = logging.getLogger(__name__)

BORDER = 0.1  # the border band: 10% of each side
GALLERY_PX = 256  # overlays are at most this many pixels on a side
_POOLING = ("Pooling", "Flatten", "Dropout", "Reshape")


# --------------------------------------------------------------------------------------------
# Grad-CAM


def _is_model(layer) -> bool:
    import keras

    return isinstance(layer, keras.Model)


def _spatial(layer) -> bool:
    """A conv-like layer: a 4-D output (N, H, W, C) that is not a pooling/reshaping step."""
    import keras

    if isinstance(layer, keras.layers.InputLayer) or any(p in type(layer).__name__ for p in _POOLING):
        return False
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):
        return False
    return len(shape) == 4


def target_layer(model, layer_name: str | None = None) -> tuple[Any, Any]:
    """``(owner, layer)``: the activation Grad-CAM reads and the (possibly nested) model holding it.

    The last conv-like layer (4-D output, not pooling) of the innermost model that has one: the
    backbone of a transfer model, the Sequential body of the custom CNN, or ``model`` itself.
    ``layer_name`` picks a layer by name instead (searched in the nested models too).
    """
    nested = [layer for layer in model.layers if _is_model(layer)]
    for owner in [*reversed(nested), model]:
        layers = owner.layers
        if layer_name is not None:
            hits = [layer for layer in layers if layer.name == layer_name]
            if hits:
                return owner, hits[0]
            continue
        convs = [layer for layer in layers if _spatial(layer) and not _is_model(layer)]
        # Skip the frozen 1x1 "preprocess" layer: it is an affine map of the pixels, not a feature.
        convs = [layer for layer in convs if layer.name != "preprocess"]
        if convs:
            return owner, convs[-1]
    raise ValueError(
        f"{model.name}: no convolutional activation found" + (f" named {layer_name!r}" if layer_name else "")
    )


def _layer_names(model) -> str:
    """The explained layer's name (each member's, for an ensemble)."""
    if is_ensemble(model.name):
        return " + ".join(f"{m.name}/{target_layer(m)[1].name}" for m in members_of(model))
    return target_layer(model)[1].name


def _logits_layer(layer, x):
    """A Dense softmax layer's logits (Grad-CAM uses the class score before the softmax)."""
    import keras
    from keras import ops

    if isinstance(layer, keras.layers.Dense) and getattr(layer.activation, "__name__", "") == "softmax":
        y = ops.matmul(ops.cast(x, "float32"), ops.cast(layer.kernel, "float32"))
        return y + ops.cast(layer.bias, "float32") if layer.use_bias else y
    return layer(x, training=False)


def _run_sequence(layers, x, *, logits: bool):
    """Apply ``layers`` in order; with ``logits``, the last one (or a nested model's last layer)
    gives the class logits instead of the softmax."""
    for i, layer in enumerate(layers):
        if logits and i == len(layers) - 1:
            return _final(layer, x)
        x = layer(x, training=False)
    return x


def _final(layer, x):
    """The class logits from the model's last layer (a Dense softmax, or a nested head ending in one)."""
    import keras

    if _is_model(layer):
        inner = [lyr for lyr in layer.layers if not isinstance(lyr, keras.layers.InputLayer)]
        return _run_sequence(inner, x, logits=True)
    return _logits_layer(layer, x)


def _forward(model, owner, layer):
    """A function ``images -> (activation, class logits)``, run under a GradientTape.

    The outer layers before ``owner`` run as they are; ``owner`` (a nested model, or the model
    itself) is split at ``layer``: a Sequential by running its layers up to it, a functional model
    as ``owner.input -> [layer.output, owner.output]`` (the keras.io recipe); the layers after it
    then give the logits.
    """
    import keras

    def body(m):
        return [lyr for lyr in m.layers if not isinstance(lyr, keras.layers.InputLayer)]

    if isinstance(owner, keras.Sequential):
        inner = body(owner)
        i = inner.index(layer)
        before, rest = inner[: i + 1], inner[i + 1 :]
        tap = None
    else:
        before, rest = None, None
        if owner is model:  # a plain functional model: tap the layer and the class layer's input
            final = body(model)[-1]
            tap = keras.Model(model.inputs, [layer.output, final.input], name=f"{model.name}_gradcam")
            rest = [final]
        else:
            tap = keras.Model(owner.inputs, [layer.output, owner.outputs[0]], name=f"{owner.name}_gradcam")
    outer = [] if owner is model else body(model)
    pos = outer.index(owner) if outer else 0
    lead, tail = outer[:pos], [*(rest or []), *outer[pos + 1 :]]
    if not tail:
        raise ValueError(f"{model.name}: the class layer is inside {owner.name}; pass a layer_name outside it")

    def run(x):
        x = _run_sequence(lead, x, logits=False)
        if tap is None:
            act = _run_sequence(before, x, logits=False)
            out = act
        else:
            act, out = tap(x, training=False)
        return act, _run_sequence(tail, out, logits=True)

    return run


def gradcam(model, images, class_index=None, *, layer_name: str | None = None, batch_size: int = 16) -> np.ndarray:
    """Grad-CAM heatmaps ``(N, H, W)`` in [0, 1] at the input resolution.

    Args:
        model: a Keras model of :func:`covid_models.builders.build_model` (nested backbones
            included), or any model ending in a Dense softmax.
        images: ``(N, H, W, C)`` raw pixels as the model takes them.
        class_index: None (the predicted class), an int (that class for every image) or a
            sequence of N ints.
        layer_name: the activation to explain (default: the last conv-like layer, see
            :func:`target_layer`).
    """
    heat, _ = gradcam_with_probs(model, images, class_index, layer_name=layer_name, batch_size=batch_size)
    return heat


def gradcam_with_probs(
    model, images, class_index=None, *, layer_name: str | None = None, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps as :func:`gradcam`, and the model's class probabilities ``(N, classes)``."""
    import tensorflow as tf

    images = np.asarray(images, dtype="float32")
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    if is_ensemble(model.name) and layer_name is None:  # the mean of the members' maps for its class
        probs = model.predict(images, verbose=0, batch_size=batch_size).astype("float32")
        cls = probs.argmax(axis=1) if class_index is None else np.broadcast_to(np.asarray(class_index), (len(images),))
        heat = member_heatmaps(model, images, cls, lambda m, x, c: gradcam(m, x, c, batch_size=batch_size))
        return heat.astype("float32"), probs
    owner, layer = target_layer(model, layer_name)
    run = _forward(model, owner, layer)
    n, h, w = images.shape[:3]
    if class_index is None or np.ndim(class_index) == 0:
        wanted = None if class_index is None else np.full(n, int(class_index))
    else:
        wanted = np.asarray(class_index, dtype="int64")
        if wanted.shape != (n,):
            raise ValueError(f"class_index must have one entry per image ({n}), got {wanted.shape}")
    maps, probs = [], []
    for start in range(0, n, batch_size):
        x = tf.constant(images[start : start + batch_size])
        with tf.GradientTape() as tape:
            raw, logits = run(x)
            logits = tf.cast(logits, tf.float32)
            cls = tf.argmax(logits, axis=1) if wanted is None else tf.constant(wanted[start : start + batch_size])
            score = tf.gather(logits, cls, axis=1, batch_dims=1)
        # Each image's score depends on its own activation only, so one gradient serves the batch.
        grads = tf.cast(tape.gradient(score, raw), tf.float32)
        act = tf.cast(raw, tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2))  # (B, K): global-average-pooled gradients
        cam = tf.nn.relu(tf.einsum("bhwk,bk->bhw", act, weights))
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        cam = tf.math.divide_no_nan(cam, peak)
        cam = tf.image.resize(cam[..., None], (h, w), method="bilinear")[..., 0]
        maps.append(tf.clip_by_value(cam, 0.0, 1.0).numpy())
        probs.append(tf.nn.softmax(logits).numpy())
    return np.concatenate(maps).astype("float32"), np.concatenate(probs).astype("float32")


# --------------------------------------------------------------------------------------------
# Shortcut score


def border_mask(h: int, w: int, border: float = BORDER) -> np.ndarray:
    """True in the outer band: ``border`` of the height at top and bottom, of the width at each side."""
    bh, bw = round(h * border), round(w * border)
    band = np.zeros((h, w), dtype=bool)
    band[:bh, :] = band[h - bh :, :] = True
    band[:, :bw] = band[:, w - bw :] = True
    return band


def shortcut_score(heatmaps, masks=None, border: float = BORDER) -> float:
    """Mean over images of the share of Grad-CAM mass outside the lungs (0 to 1).

    With ``masks`` ((N, H, W), true on the lungs) it is the mass outside each image's mask;
    without, the mass in the outer border band (``border`` of each side), where text markers and
    collimation edges sit. Images whose map is all zero are left out (NaN when all are).
    """
    maps = np.asarray(heatmaps, dtype="float64")
    if maps.ndim == 2:
        maps = maps[None]
    n, h, w = maps.shape
    if masks is None:
        outside = np.broadcast_to(border_mask(h, w, border), maps.shape)
    else:
        m = np.asarray(masks).astype(bool)
        if m.ndim == 2:
            m = m[None]
        if m.shape[1:] != (h, w):
            raise ValueError(f"masks {m.shape[1:]} do not match the heatmaps {(h, w)}")
        outside = np.broadcast_to(~m, maps.shape)
    total = maps.sum(axis=(1, 2))
    share = np.where(outside, maps, 0.0).sum(axis=(1, 2))
    keep = total > 0
    return float(np.mean(share[keep] / total[keep])) if keep.any() else float("nan")


def shortcut_baseline(shape: tuple[int, int], masks=None, border: float = BORDER) -> float:
    """What a uniform map scores: the band's area share, or the mean area share outside the masks."""
    return (
        shortcut_score(np.ones((1, *shape)), masks=None, border=border)
        if masks is None
        else float(np.mean(~np.asarray(masks).astype(bool)))
    )


def method_name(masks_used: bool, border: float = BORDER) -> str:
    return "lung masks" if masks_used else f"border band {round(border * 100)}%"


def shortcut_meaning(score: float | None, baseline: float | None, method: str) -> str:
    """One sentence that makes the number read."""
    where = "outside the lung masks" if method == "lung masks" else "in the image's outer border band"
    what = (
        "outside the lungs"
        if method == "lung masks"
        else "on the borders, where text markers and collimation edges sit"
    )
    if score is None or baseline is None or not np.isfinite(score):
        return f"Shortcut score: not computed. It is the share of the Grad-CAM heat {where}."
    verdict = (
        "well below what a map spread evenly over the image would give: the model looks mostly at the lungs"
        if score < 0.5 * baseline
        else "near or above what a map spread evenly over the image would give: the model may be using "
        f"shortcuts {what}; check the gallery"
    )
    return (
        f"Shortcut score {score:.2f} (a uniform map scores {baseline:.2f}; method: {method}): the share of "
        f"the Grad-CAM heat {where}, {verdict}."
    )


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
# The gallery


def _order_key(seed: int, sha: str) -> str:
    return hashlib.sha256(f"{seed}:{sha}".encode()).hexdigest()


def _slug(label: str) -> str:
    return label.replace(" ", "_").lower()


def _load_images(paths: list[str], size: int, channels: int) -> np.ndarray:
    from covid_models.data import decode_resize

    return (
        np.stack([decode_resize(p, size, channels).numpy() for p in paths])
        if paths
        else np.zeros((0, size, size, channels), "uint8")
    )


def _load_masks(files: list[str | None], size: int) -> np.ndarray | None:
    """Lung masks resized to the input size (True on the lungs); None unless every image has one."""
    if not files or any(not f or not Path(f).is_file() for f in files):
        return None
    from PIL import Image

    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(np.asarray(im.convert("L").resize((size, size), Image.NEAREST)) > 127)
    return np.stack(out)


def _mask_files(split_uri: str, data, rows) -> list[str | None]:
    """Each row's lung mask as a local file, where the dataset's manifest has a ``mask_path``."""
    from covid_data.store import open_store, split_object_uri

    split_store, _ = split_object_uri(split_uri)
    dataset = open_store(split_store.uri.rsplit("/splits/", 1)[0])
    try:
        from covid_data.manifest import read_parquet_bytes

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


def _pool(data, split: str, classes: list[str], pool_per_class: int, seed: int):
    """A fixed, seeded choice of up to ``pool_per_class`` images per class of ``split``."""
    import pandas as pd

    df = data.frames[split]
    key = df["sha256"] if "sha256" in df.columns else df["path"]
    df = df.assign(_order=[_order_key(seed, str(s)) for s in key]).sort_values(["_order", "path"], kind="stable")
    picked = [df[df["label"] == c].head(pool_per_class) for c in classes]
    return pd.concat(picked).drop(columns="_order").reset_index(drop=True)


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
) -> dict[str, Any]:
    """Grad-CAM of one stored model: the gallery PNGs in ``out_dir`` and the shortcut score.

    The images are a fixed, seeded choice of ``pool_per_class`` test images per class (the same
    for every model of a split); the shortcut score is over all of them, and the gallery shows,
    per class, the first ``per_class`` right and the first ``per_class`` wrong predictions among
    them (fewer where there are fewer).
    """
    from covid_data.labels import CLASSES
    from covid_data.store import open_store
    from covid_models.data import load_split_data
    from covid_models.train import load_trained_model, model_slot

    stored = model_slot(model_uri).record()
    if stored is None:
        raise FileNotFoundError(f"{model_uri} holds no complete model (no metrics.json)")
    cfg = stored["config"]
    size, channels = int(cfg["input_size"]), int(cfg.get("channels", 1))
    model = load_trained_model(open_store(model_uri).uri_for("model.keras"))
    data = load_split_data(split_uri, max_per_class=max_per_class)
    split = "test" if data.size("test") else "val"
    rows = _pool(data, split, list(CLASSES), pool_per_class, seed)
    paths = [str(data.root / p) for p in rows["path"]]
    images = _load_images(paths, size, channels)
    heat, probs = gradcam_with_probs(model, images)
    masks = _load_masks(_mask_files(split_uri, data, rows), size) if len(rows) else None
    method = method_name(masks is not None, border)
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
        "model": cfg["model"],
        "split": split,
        "n": len(rows),
        "shortcut_score": None if not np.isfinite(score) else round(score, 4),
        "baseline": round(baseline, 4),
        "method": method,
        "layer": _layer_names(model),
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


# --------------------------------------------------------------------------------------------
# Small PNGs for inline (data: URI) embedding


def small_png(data: bytes, max_px: int, colours: int = 128) -> bytes:
    """``data`` (an image) scaled to at most ``max_px`` on its longer side, as a palette PNG."""
    import io

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
    import io

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
