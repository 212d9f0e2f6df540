"""Histogram equalisation inside the classifier's graph (issue 16 §4).

Hospitals expose, window and process X-rays differently, and a model can read a class from an
image's overall brightness and contrast instead of its lungs. Equalising each image maps its grey
levels through its own cumulative histogram, so that every image the model sees spreads its pixels
evenly over 0-255 whatever its exposure. The step is a frozen block of plain Keras layers at the
model's input (no custom layer: the ``.keras`` file loads anywhere), so the pipeline, the TFLite and
Core ML exports and the phone app all run it, and nothing outside the graph has to repeat it.

Global equalisation, not CLAHE: one histogram per image is a few 1x1 convolutions, clips and a
mean, which every runtime here has as plain ops; CLAHE's tiles and their interpolation are not.

With ``K`` levels of width ``w = 256 / K`` and knots ``t_k = k w - 1/2`` (k = 0..K), the block
computes for each image

    h_k  = mean over pixels of  clip(t_{k+1} + 1/2 - x, 0, 1) - clip(t_k + 1/2 - x, 0, 1)
    y(x) = 255 * sum_k h_k * clip((x - t_k) / w, 0, 1)

``h_k`` is the share of pixels in level ``k`` (a pixel within half a grey level of a boundary is
split between the two: a soft edge, so that the tiny float differences between runtimes cannot
move a pixel from one level to the next); ``y`` is the cumulative histogram, linear between the
knots, scaled to 0-255. Every weight is a constant of at most ``K`` values, below the size at which
TFLite's dynamic-range quantisation stores weights as int8, so an ``int8`` export computes the
block in float32 exactly as Keras does.
"""

from __future__ import annotations

import numpy as np

LEVELS = 64  # 4 grey levels a bin: finer changes the picture by less than a grey level
NAME = "equalize"


def knots(levels: int = LEVELS) -> np.ndarray:
    """The ``levels + 1`` knots ``t_k = k * 256 / levels - 1/2``."""
    if levels < 2 or 256 % levels:
        raise ValueError(f"levels must divide 256 and be at least 2, got {levels}")
    return np.arange(levels + 1) * (256.0 / levels) - 0.5


def build_equalizer(input_size: int, *, levels: int = LEVELS):
    """The equalisation block: raw 0-255 grey ``[input_size, input_size, 1]`` in, the image mapped
    through its own cumulative histogram (0-255) out."""
    import keras

    t = knots(levels).astype("float32")
    w = np.float32(256.0 / levels)
    inp = keras.Input((input_size, input_size, 1), name="image")

    def frozen_1x1(name: str, kernel: np.ndarray, bias: np.ndarray | None):
        """A constant 1x1 convolution; ``kernel`` is ``[in, out]``."""
        layer = keras.layers.Conv2D(kernel.shape[1], 1, name=name, use_bias=bias is not None, trainable=False)
        layer.build((None, None, None, kernel.shape[0]))
        layer.set_weights(
            [kernel[None, None].astype("float32")] + ([bias.astype("float32")] if bias is not None else [])
        )
        return layer

    def clip01(name: str):
        return keras.layers.ReLU(max_value=1.0, name=name)

    ones = np.ones((1, levels), "float32")
    # clip(t + 1/2 - x, 0, 1): 1 for pixels below the knot, 0 above it, linear within half a grey level
    below_upper = clip01("below_upper")(frozen_1x1("upper_knots", -ones, t[1:] + 0.5)(inp))
    below_lower = clip01("below_lower")(frozen_1x1("lower_knots", -ones, t[:-1] + 0.5)(inp))
    in_level = keras.layers.Subtract(name="in_level")([below_upper, below_lower])
    histogram = keras.layers.GlobalAveragePooling2D(keepdims=True, name="histogram")(in_level)
    # clip((x - t_k) / w, 0, 1): how far each pixel has come through level k
    ramps = clip01("ramps")(frozen_1x1("level_ramps", ones / w, -t[:-1] / w)(inp))
    weighted = keras.layers.Multiply(name="weighted")([ramps, histogram])
    out = frozen_1x1("to_grey", np.full((levels, 1), 255.0, "float32"), None)(weighted)
    return keras.Model(inp, out, name=NAME)


def reference(images: np.ndarray, *, levels: int = LEVELS) -> np.ndarray:
    """The block's arithmetic in numpy: ``images`` ``[N, H, W]`` raw 0-255 -> equalised ``[N, H, W]``."""
    t = knots(levels)
    w = 256.0 / levels
    x = images.astype("float64")[..., None]
    below = np.clip(t + 0.5 - x, 0.0, 1.0)  # [N, H, W, K+1]
    h = (below[..., 1:] - below[..., :-1]).mean(axis=(1, 2), keepdims=True)
    ramps = np.clip((x - t[:-1]) / w, 0.0, 1.0)
    return 255.0 * (ramps * h).sum(axis=-1)
