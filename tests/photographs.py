"""Real photographs that ship with scikit-learn and scikit-image (a cat among them): images that
are not X-rays, for the app's out-of-distribution guard (its test and its benchmark)."""

from __future__ import annotations

import numpy as np

from covid_app.guard import INPUT_SIZE


def photographs() -> dict[str, np.ndarray]:
    """Real photographs shipped by scikit-learn and scikit-image (a cat among them), grey, guard-sized."""
    import skimage.data
    import tensorflow as tf
    from sklearn.datasets import load_sample_images

    pics = dict(zip(("china", "flower"), load_sample_images().images, strict=True))
    for name in ("chelsea", "astronaut", "coffee", "rocket", "cat", "camera", "coins", "moon", "page", "horse"):
        pics[name] = np.asarray(getattr(skimage.data, name)())
    out = {}
    for name, img in pics.items():
        img = (img.astype("uint8") * (255 if img.dtype == bool else 1))[..., None] if img.ndim == 2 else img[..., :3]
        grey = tf.image.rgb_to_grayscale(img) if img.shape[-1] == 3 else img
        out[name] = tf.round(tf.image.resize(grey, (INPUT_SIZE, INPUT_SIZE), antialias=True)).numpy()
    return out
