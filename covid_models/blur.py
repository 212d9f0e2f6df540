"""A fixed Gaussian blur inside the classifier's graph (issue 16 §4, the processing shortcut).

The shared sample's classes passed a JPEG round trip and a 224 px bottleneck in different orders, which
leaves 8x8 JPEG blocks sharp in some classes and softened in others: fine texture a network can read
instead of the lungs. A blur of fixed width in front of the network, in training and inference alike,
removes that band of frequencies from every picture the model sees. Like the other input blocks it is
plain Keras layers (a frozen depthwise convolution), so the ``.keras`` file, its TFLite and Core ML
exports and the phone app run it alike; its (2r + 1)² weights (121 at sigma 1.5) are too few for
TFLite's dynamic-range quantisation, so an ``int8`` export computes it in float32.

The kernel is a normalised Gaussian of radius ``ceil(3 sigma)``; beyond the picture's edge it reads
zeros (Keras' ``same`` padding), as ``scipy.ndimage.gaussian_filter(mode="constant")`` does.
"""

from __future__ import annotations

import math

import numpy as np

NAME = "blur"


def radius(sigma: float) -> int:
    if sigma <= 0:
        raise ValueError(f"the blur's sigma must be positive, got {sigma}")
    return math.ceil(3 * sigma)


def kernel(sigma: float) -> np.ndarray:
    """The normalised 2-D Gaussian, ``(2r + 1, 2r + 1)``, the outer product of the 1-D one."""
    r = radius(sigma)
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    g /= g.sum()
    return np.outer(g, g)


def build_blur(input_size: int, sigma: float, channels: int = 1):
    """The blur block: ``[input_size, input_size, channels]`` in, each channel blurred by a Gaussian of
    ``sigma`` pixels out."""
    import keras

    k = kernel(sigma).astype("float32")
    inp = keras.Input((input_size, input_size, channels), name="image")
    conv = keras.layers.DepthwiseConv2D(k.shape[0], padding="same", use_bias=False, trainable=False, name="gaussian")
    conv.build((None, input_size, input_size, channels))
    conv.set_weights([np.repeat(k[:, :, None, None], channels, axis=2)])
    return keras.Model(inp, conv(inp), name=NAME)
