"""A small Keras U-Net that segments both lungs, its augmentation, training and TFLite export.

The model takes raw pixels (0-255, grayscale, ``size`` x ``size``) like the classifiers, scales
them inside the graph, and returns each pixel's probability of being lung. It is small on
purpose (about 0.3 M parameters, 1.2 MB as float32 TFLite): it has to run in the phone app
before a classifier. The top level has one convolution instead of two because that level costs
most of the compute on a CPU and learns little more than edges.

Augmentation is what lets a segmenter trained at one hospital work at another (a U-Net trained
without it on the Shenzhen masks scored Dice 0.95 there and 0.41 elsewhere). It draws, per image:
a small rotation, zoom and shift, applied to the image and its mask alike; contrast, gamma,
resolution loss, blur or sharpening and noise on the image only. No mirror images: the heart sits
on the patient's left and the left lung is the smaller one, so a flipped chest is not an X-ray the
model will meet, and flips would teach it that the lungs are symmetric.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from covid_data.store import Store, open_store
from covid_models.checkpoints import Checkpoints

UNIT_MARKER = "segmenter.json"  # a segmenter unit's completion marker (covid_eval.segmenter_unit writes it last)
DEFAULT_FILTERS = (8, 16, 32, 64, 64)  # per level, top to bottom (the last is the bottleneck)
CHECKPOINT_EVERY = 50  # batches at most between checkpoints: a kill loses at most this much training


def build_unet(size: int = 96, filters: tuple[int, ...] = DEFAULT_FILTERS, seed: int = 0):
    """The U-Net: raw 0-255 grayscale ``[size, size, 1]`` in, lung probability ``[size, size, 1]`` out.

    ``size`` must be divisible by ``2 ** (len(filters) - 1)`` (each level halves it)."""
    import keras

    levels = len(filters) - 1
    if levels < 1 or size % (2**levels):
        raise ValueError(f"input size {size} is not divisible by 2**{levels} (the U-Net's {levels} poolings)")
    keras.utils.set_random_seed(seed)

    def block(x, f: int, name: str, convs: int = 2):
        for i in range(convs):
            x = keras.layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
            x = keras.layers.BatchNormalization(name=f"{name}_bn{i}")(x)
            x = keras.layers.ReLU(name=f"{name}_relu{i}")(x)
        return x

    inp = keras.Input((size, size, 1), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="scale")(inp)
    skips = []
    for i, f in enumerate(filters[:-1]):
        x = block(x, f, f"down{i}", 1 if i == 0 else 2)
        skips.append(x)
        x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    x = block(x, filters[-1], "bottom")
    for i in reversed(range(levels)):
        x = keras.layers.UpSampling2D(interpolation="bilinear", name=f"up{i}")(x)
        x = keras.layers.Concatenate(name=f"skip{i}")([x, skips[i]])
        x = block(x, filters[i], f"dec{i}", 1 if i == 0 else 2)
    out = keras.layers.Conv2D(1, 1, activation="sigmoid", name="lungs")(x)
    return keras.Model(inp, out, name="lung_unet")


class SegmenterUnitError(ValueError):
    """The segmenter named (for the audit, the app or a lung-field model) is not a complete segmenter unit."""


def segmenter_store(uri: str) -> tuple[Store, str]:
    """(store rooted at the unit, its key) of the complete segmenter unit at ``uri``."""
    store = open_store(uri)
    if not store.exists(UNIT_MARKER):
        raise SegmenterUnitError(f"{uri}: not a complete segmenter unit (no {UNIT_MARKER}); train it first")
    return store, store.uri.rstrip("/").rsplit("/", 1)[-1]


def load_segmenter(uri: str, cache_dir: Path) -> tuple[Any, str, dict[str, Any]]:
    """(model, unit key, record) of the complete segmenter unit at ``uri`` (``segmenters/<key>`` in a store)."""
    import keras

    store, key = segmenter_store(uri)
    record = json.loads(store.read_text(UNIT_MARKER))
    local = store.local_path("model.keras")
    path = local or store.get_file("model.keras", cache_dir / "segmenters" / key / "model.keras")
    return keras.saving.load_model(path, safe_mode=True), key, record


def resize_images(images: list[np.ndarray], size: int) -> np.ndarray:
    """uint8 ``[N, size, size, 1]``: TensorFlow's antialiased bilinear resize, rounded, as the
    classifiers' input pipeline (``covid_models.data.decode_resize``) resizes X-rays."""
    import tensorflow as tf

    out = [
        tf.image.resize(np.asarray(im, "float32")[..., None], (size, size), method="bilinear", antialias=True)
        for im in images
    ]
    return np.clip(np.round(np.stack(out)), 0, 255).astype("uint8")


def resize_masks(masks: list[np.ndarray], size: int) -> np.ndarray:
    """float32 ``{0, 1}`` ``[N, size, size, 1]``: the mask's area share resized, thresholded at one half."""
    return (resize_images([m.astype("uint8") * 255 for m in masks], size) > 127).astype("float32")


def build_augmenter(seed: int = 0) -> Callable:
    """``(images [B,H,W,1] 0-255, masks [B,H,W,1]) -> (images, masks)`` for ``tf.data`` (see the module
    docstring for what it draws and why there are no flips)."""
    import keras
    import tensorflow as tf

    # Image and mask are stacked as two channels so one draw moves both alike.
    geometric = keras.Sequential(
        [
            keras.layers.RandomRotation(0.03, fill_mode="constant", seed=seed),  # about +-10 degrees
            keras.layers.RandomZoom(0.12, fill_mode="constant", seed=seed + 1),
            keras.layers.RandomTranslation(0.06, 0.06, fill_mode="constant", seed=seed + 2),
        ],
        name="segmenter_geometry",
    )
    rng = tf.random.Generator.from_seed(seed + 3)
    k = tf.constant([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = tf.tensordot(k, k, axes=0)[:, :, None, None] / 256.0

    def augment(images, masks):
        both = geometric(tf.concat([images, masks * 255.0], axis=-1), training=True)
        x, m = both[..., :1], tf.cast(both[..., 1:] > 127.5, tf.float32)
        n = tf.shape(x)[0]
        size = tf.shape(x)[1:3]
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        x = tf.clip_by_value(mean + rng.uniform([n, 1, 1, 1], 0.6, 1.4) * (x - mean), 0.0, 255.0)
        x = 255.0 * tf.pow(x / 255.0, rng.uniform([n, 1, 1, 1], 0.65, 1.5))
        # resolution loss: another scanner's or archive's smaller original, resized up again
        small = tf.cast(tf.cast(size, tf.float32) * rng.uniform([], 0.5, 1.0), tf.int32)
        x = tf.image.resize(tf.image.resize(x, small, antialias=True), size)
        blurred = tf.nn.depthwise_conv2d(x, kernel, strides=[1, 1, 1, 1], padding="SAME")
        x = x + rng.uniform([n, 1, 1, 1], -1.0, 1.0) * (x - blurred)  # < 0 blurs, > 0 sharpens
        x = x + rng.normal(tf.shape(x)) * rng.uniform([n, 1, 1, 1], 0.0, 8.0)
        return tf.clip_by_value(x, 0.0, 255.0), m

    return augment


def dice_loss(y_true, y_pred):
    """1 - soft Dice per image, with binary cross-entropy: cross-entropy alone settles on thick,
    blurry borders; Dice alone learns slowly from a random start."""
    import keras
    from keras import ops

    inter = ops.sum(y_true * y_pred, axis=(1, 2, 3))
    total = ops.sum(y_true, axis=(1, 2, 3)) + ops.sum(y_pred, axis=(1, 2, 3))
    dice = (2.0 * inter + 1.0) / (total + 1.0)
    bce = ops.mean(keras.losses.binary_crossentropy(y_true, y_pred), axis=(1, 2))
    return 1.0 - dice + bce


def train_unet(
    images: np.ndarray,
    masks: np.ndarray,
    *,
    steps: int,
    out: Store,
    cache_dir: Path,
    filters: tuple[int, ...] = DEFAULT_FILTERS,
    batch_size: int = 16,
    learning_rate: float = 2e-3,
    augment: bool = True,
    seed: int = 0,
) -> tuple[object, list[dict[str, float]], float]:
    """(model, per-epoch history, training seconds) after about ``steps`` batches.

    An epoch is one pass over the training masks, or ``CHECKPOINT_EVERY`` batches where that is
    less (a large source); the learning rate decays along a cosine over all of them. Every epoch is
    checkpointed in ``out`` (:class:`Checkpoints`), so a killed training resumes at its last epoch; the
    caller clears the checkpoints before completing its unit.
    """
    import keras
    import tensorflow as tf

    size = int(images.shape[1])
    per_epoch = max(1, min(CHECKPOINT_EVERY, math.ceil(len(images) / batch_size)))
    epochs = max(1, math.ceil(steps / per_epoch))
    model = build_unet(size, filters, seed)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, epochs * per_epoch, alpha=0.05)
    model.compile(keras.optimizers.Adam(schedule), loss=dice_loss)
    ds = tf.data.Dataset.from_tensor_slices((images.astype("float32"), masks.astype("float32")))
    ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(batch_size, drop_remainder=len(images) >= batch_size)
    if augment:
        ds = ds.map(build_augmenter(seed), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    backup = Checkpoints(out, "segmenter", cache_dir)
    start = time.perf_counter()
    # shuffle=False: the dataset shuffles itself (Keras would only warn that it cannot)
    model.fit(ds, epochs=epochs, steps_per_epoch=per_epoch, callbacks=backup.callbacks(), shuffle=False, verbose=0)
    seconds = time.perf_counter() - start
    history = backup.history
    backup.clear()  # before the unit's marker: a complete unit holds only its artefacts
    return model, history, seconds


def inference_copy(model, filters: tuple[int, ...]):
    """The trained weights in a fresh, uncompiled U-Net (built with the same ``filters``): the stored
    ``model.keras`` then loads in Keras' safe mode anywhere, without this module's loss function."""
    copy = build_unet(int(model.input_shape[1]), filters)
    copy.set_weights(model.get_weights())
    return copy


def predict(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Lung probabilities ``[N, size, size]`` for uint8 ``[N, size, size, 1]`` images."""
    return np.asarray(model.predict(images.astype("float32"), batch_size=batch_size, verbose=0))[..., 0]


def export_tflite(model, path: Path) -> int:
    """A float32 TFLite flatbuffer with a fixed batch of 1 (LiteRT.js, the phone app's runtime,
    refuses a ``[1, H, W, C]`` tensor for a ``[-1, H, W, C]`` input); returns its size in bytes."""
    import keras
    import tensorflow as tf

    inp = keras.Input(shape=tuple(model.input_shape[1:]), batch_size=1, name="image")
    fixed = keras.Model(inp, model(inp), name=model.name)
    with _quiet():
        path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(fixed).convert())
    return path.stat().st_size


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the converter's hundreds of ``TensorSpec`` lines and absl logs (printed by native code to
    file descriptors 1 and 2) out of the run log; on an error, its last lines go into the exception."""
    printed = io.StringIO()  # Python prints (Keras' export summary), where pytest may have replaced sys.stdout
    with tempfile.TemporaryFile() as sink:
        saved = [(fd, os.dup(fd)) for fd in (1, 2)]
        try:
            for fd, _ in saved:
                os.dup2(sink.fileno(), fd)
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                yield
        except BaseException as e:
            sink.seek(0)
            text = printed.getvalue() + sink.read().decode(errors="replace")
            e.add_note("converter output:\n" + "\n".join(text.splitlines()[-20:]))
            raise
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)


def tflite_predict(path: Path, images: np.ndarray) -> np.ndarray:
    """Lung probabilities ``[N, size, size]`` from the TFLite file, one image at a time as the app runs it."""
    import tensorflow as tf

    with warnings.catch_warnings():  # its deprecation notice: LiteRT's interpreter is the same runtime
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    probs = []
    for img in images:
        interpreter.set_tensor(inp, img[None].astype("float32"))
        interpreter.invoke()
        probs.append(interpreter.get_tensor(out)[0, ..., 0])
    return np.stack(probs)
