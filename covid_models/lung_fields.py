"""Classification on the lung fields: the run's lung segmenter inside the classifier's graph.

A model built with lung fields sees the X-ray with everything outside the lungs (and a margin
around them) blacked out: text markers, collimation edges, the shoulders and the belly, which
is where a model can read a hospital or a processing chain instead of a disease (the shortcut
audit measures how much of the labels can be read there). The step is a frozen block of plain
Keras layers at the model's input, so the saved ``.keras`` file, its TFLite and Core ML exports
and the phone app all run the same pixels through it, and nothing outside the graph has to
repeat it:

    image -> resize to the segmenter's size -> U-Net -> lung probability
          -> dilate (max pool) -> soften (average pool) -> resize back -> weight
    image * weight -> the classifier

The margin keeps the lung edges, the costophrenic angles and a lung the segmenter outlines a
little short; the soft edge keeps the classifier from learning the mask's own outline. A lung
that the segmenter misses entirely (a white-out lung is where a U-Net trained on clearer films
fails) is blacked out too: a missing lung field is then what the classifier sees, so the
training data has to teach it what that means.
"""

from __future__ import annotations

import numpy as np

MARGIN = 4  # pixels of the segmenter's grid the mask grows by (4 of 96: about 4% of the width)
SOFT = 5  # width of the average pool that softens the mask's edge, in the segmenter's pixels
NAME = "lung_fields"


def build_lung_fields(segmenter, input_size: int, *, margin: int = MARGIN, soft: int = SOFT):
    """The lung-field block: raw 0-255 grey ``[input_size, input_size, 1]`` in, the same image with
    everything outside the dilated, softened lung mask scaled towards 0 out. ``segmenter`` (a
    covid_models.segmenter U-Net) is frozen inside it."""
    import keras

    seg_size = int(segmenter.input_shape[1])
    segmenter.trainable = False
    inp = keras.Input((input_size, input_size, 1), name="image")
    x = inp
    if seg_size != input_size:
        # Plain bilinear (no antialiasing): TFLite and Core ML have it as one op, the app runs it as is.
        x = keras.layers.Resizing(seg_size, seg_size, interpolation="bilinear", name="to_segmenter")(x)
    probs = segmenter(x)
    mask = keras.layers.MaxPooling2D(2 * margin + 1, strides=1, padding="same", name="dilate")(probs)
    mask = keras.layers.AveragePooling2D(soft, strides=1, padding="same", name="soften")(mask)
    if seg_size != input_size:
        mask = keras.layers.Resizing(input_size, input_size, interpolation="bilinear", name="to_input")(mask)
    out = keras.layers.Multiply(name="attenuate")([inp, mask])
    return keras.Model(inp, out, name=NAME)


def reference(images: np.ndarray, probs: np.ndarray, *, margin: int = MARGIN, soft: int = SOFT) -> np.ndarray:
    """The block's arithmetic in numpy, for images the size of the segmenter's grid (no resizing):
    ``images`` ``[N, S, S]`` and the segmenter's ``probs`` ``[N, S, S]`` -> attenuated ``[N, S, S]``.
    Pooling windows at the edge cover only the pixels inside the image (Keras' ``same`` padding
    ignores the padding in both the max and the average)."""
    n, s, _ = probs.shape
    out = np.empty_like(probs, dtype="float64")
    for k in range(n):
        dil = _window(probs[k].astype("float64"), 2 * margin + 1, np.max)
        out[k] = _window(dil, soft, np.mean)
    return images.astype("float64") * out


def _window(a: np.ndarray, k: int, fn) -> np.ndarray:
    """``fn`` over each ``k`` x ``k`` window centred as Keras' ``same`` padding centres it (the extra
    pixel of an even window goes after), clipped to the image."""
    before = (k - 1) // 2
    s = a.shape[0]
    res = np.empty_like(a)
    for i in range(s):
        for j in range(s):
            res[i, j] = fn(a[max(0, i - before) : i - before + k, max(0, j - before) : j - before + k])
    return res
