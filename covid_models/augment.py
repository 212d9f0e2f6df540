"""Optional training-time augmentation (off by default, as in the paper).

Small geometric changes and the look of other scanners and hospitals: contrast and gamma,
blur and sharpening, JPEG re-compression. It runs in the input pipeline, never inside the
model, so saved and exported models carry none of it.
"""

from __future__ import annotations


def build_augmenter(seed: int = 42):
    """A callable ``(images float32 0-255 [B,H,W,C], training) -> images`` for ``tf.data``."""
    import keras
    import tensorflow as tf

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
