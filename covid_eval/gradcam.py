"""Why the model decided: Grad-CAM maps and a shortcut score (the maths; no files, no drawing).

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
outside the lungs: outside the dataset's lung masks where the source has them (else the run's lung
segmenter's masks, where it has one), else in the outer
border band of the image (10% of each side), where text markers, hospital labels and collimation
edges sit. A model that reads the lungs scores low; one that looks at markers and edges scores
high. A map spread evenly over the image scores the band's (or the non-lung) area share, the
*baseline* (0.36 for a 10% band), reported beside the score so the number reads.

The fixed gallery of a stored model (choosing and loading the images, the PNG overlays, the
record) is :mod:`covid_eval.gallery`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from covid_models.ensemble import is_ensemble, member_heatmaps, members_of

BORDER = 0.1  # the border band: 10% of each side
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


def layer_names(model) -> str:
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


SEGMENTER_MASKS = "segmenter lung masks"  # the run's lung segmenter's masks, where the dataset has none


def method_name(masks_used: bool, border: float = BORDER, segmenter: bool = False) -> str:
    if not masks_used:
        return f"border band {round(border * 100)}%"
    return SEGMENTER_MASKS if segmenter else "lung masks"


def uses_masks(method: str) -> bool:
    return method in ("lung masks", SEGMENTER_MASKS)


def shortcut_meaning(score: float | None, baseline: float | None, method: str) -> str:
    """One sentence that makes the number read."""
    where = "in the image's outer border band"
    if uses_masks(method):
        where = "outside the lung segmenter's masks" if method == SEGMENTER_MASKS else "outside the lung masks"
    what = "outside the lungs" if uses_masks(method) else "on the borders, where text markers and collimation edges sit"
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
