"""Optional training-time augmentation (off by default, as in the paper).

Small geometric changes and the look of other scanners and hospitals: contrast and gamma,
blur and sharpening, JPEG re-compression. It runs in the input pipeline, never inside the
model, so saved and exported models carry none of it.
"""

from __future__ import annotations

RECIPES = ("full", "acquisition")


def build_augmenter(seed: int = 42, recipe: str = "full"):
    """A callable ``(images float32 0-255 [B,H,W,C], training) -> images`` for ``tf.data``.

    ``full``: small rotations, shifts and zoom; contrast, gamma, blur/sharpening and JPEG.
    ``acquisition``: what another scanner or archive does to an image, and nothing anatomical: small
    shifts and zoom, contrast, gamma, resolution loss (down-then-up sampling), Gaussian noise and JPEG
    re-encoding, each drawn per image over ranges that cover the robustness benchmark's shifts.
    """
    import keras
    import tensorflow as tf

    if recipe not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {recipe!r}; choose from {RECIPES}")
    if recipe == "acquisition":
        return _acquisition_augmenter(seed)

    geometric = keras.Sequential(
        [
            keras.layers.RandomRotation(0.03, fill_mode="constant", seed=seed),  # about +-10 degrees
            keras.layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=seed + 1),
            keras.layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 2),
        ],
        name="augment_geometry",
    )
    rng = tf.random.Generator.from_seed(seed)

    def _blur_or_sharpen(x):
        k = tf.constant([1.0, 4.0, 6.0, 4.0, 1.0])
        k = tf.tensordot(k, k, axes=0)
        k = k / tf.reduce_sum(k)
        channels = tf.shape(x)[-1]
        kernel = tf.tile(k[:, :, None, None], [1, 1, channels, 1])
        blurred = tf.nn.depthwise_conv2d(x, kernel, strides=[1, 1, 1, 1], padding="SAME")
        # amount < 0 blurs, > 0 sharpens (unsharp mask)
        amount = rng.uniform([tf.shape(x)[0], 1, 1, 1], -1.0, 1.0)
        return x + amount * (x - blurred)

    def _jpeg(x):
        def one(img):
            q = rng.uniform([], 60, 95, dtype=tf.int32)
            return tf.cast(tf.image.adjust_jpeg_quality(tf.cast(img, tf.uint8), q), tf.float32)

        return tf.map_fn(one, x, fn_output_signature=tf.float32)

    def augment(x, training: bool = True):
        if not training:
            return x
        x = geometric(x, training=True)
        # per image, around its own mean: wide enough to cover other scanners' +-30% (robustness benchmark)
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        x = mean + rng.uniform([tf.shape(x)[0], 1, 1, 1], 0.6, 1.4) * (x - mean)
        x = tf.clip_by_value(x, 0.0, 255.0)
        gamma = rng.uniform([tf.shape(x)[0], 1, 1, 1], 0.65, 1.5)
        x = 255.0 * tf.pow(tf.clip_by_value(x, 0.0, 255.0) / 255.0, gamma)
        x = _blur_or_sharpen(x)
        x = tf.clip_by_value(x, 0.0, 255.0)
        return _jpeg(x)

    return augment


def _acquisition_augmenter(seed: int):
    import keras
    import tensorflow as tf

    geometric = keras.Sequential(
        [
            keras.layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=seed + 1),
            keras.layers.RandomZoom(0.06, fill_mode="constant", seed=seed + 2),
        ],
        name="augment_acquisition_geometry",
    )
    rng = tf.random.Generator.from_seed(seed)

    def per_image(x, lo, hi):
        return rng.uniform([tf.shape(x)[0], 1, 1, 1], lo, hi)

    def down_up(x):
        # resolution loss: half the images go down to 40-100% of their size and back up
        size = tf.shape(x)[1:3]
        f = rng.uniform([], 0.4, 1.0)
        small = tf.cast(tf.round(tf.cast(size, tf.float32) * f), tf.int32)
        y = tf.image.resize(tf.image.resize(x, small, antialias=True), size)
        keep = tf.cast(per_image(x, 0.0, 1.0) < 0.5, tf.float32)
        return keep * x + (1.0 - keep) * y

    def jpeg(x):
        def one(img):
            q = rng.uniform([], 25, 96, dtype=tf.int32)
            coded = tf.image.adjust_jpeg_quality(tf.cast(img, tf.uint8), q)
            return tf.where(rng.uniform([]) < 0.5, tf.cast(coded, tf.float32), img)

        return tf.map_fn(one, x, fn_output_signature=tf.float32)

    def augment(x, training: bool = True):
        if not training:
            return x
        x = geometric(x, training=True)
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        x = tf.clip_by_value(mean + per_image(x, 0.7, 1.3) * (x - mean), 0.0, 255.0)
        x = 255.0 * tf.pow(x / 255.0, per_image(x, 0.7, 1.45))
        x = down_up(x)
        x = x + per_image(x, 0.0, 12.0) * rng.normal(tf.shape(x))
        x = tf.clip_by_value(x, 0.0, 255.0)
        return jpeg(x)

    return augment
