"""The paper's nine models, built by name with one signature.

Every model takes raw pixels (0-255, grayscale or RGB) and ends in a 4-way softmax:

    image -> preprocess -> backbone -> head

``preprocess`` is a frozen 1x1 convolution that computes exactly the application's own
``preprocess_input`` (channel order, mean, scale) and turns a grayscale image into the three
channels the ImageNet backbones expect, so saved and exported models need no outside
preprocessing. The transfer head is the paper's flatten -> Dense 256 -> Dense 256 -> softmax
(``head="flatten"``) or the same dense layers on globally average-pooled features (``head="pooled"``):
on MobileNetV2 at 224 px the flatten holds 16M of the model's 18.4M parameters, the pooled head 0.4M,
which is what a phone downloads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covid_models.blur import NAME as BLUR
from covid_models.blur import build_blur
from covid_models.equalize import NAME as EQUALIZE
from covid_models.equalize import build_equalizer
from covid_models.lung_fields import NAME as LUNG_FIELDS
from covid_models.weights import keras_file_names, missing_weights, resolve_imagenet, weights_dir

log = logging.getLogger(__name__)

NUM_CLASSES = 4
HEAD_UNITS = 256
HEADS = ("flatten", "pooled")  # the paper's head, and its dense layers on pooled features

# preprocess_input modes of keras.applications.imagenet_utils
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68])
_TORCH_MEAN = np.array([0.485, 0.456, 0.406])
_TORCH_STD = np.array([0.229, 0.224, 0.225])


@dataclass(frozen=True)
class Architecture:
    name: str
    application: str  # keras.applications attribute, "" for the custom CNN
    module: str  # keras.applications submodule holding preprocess_input
    mode: str  # "caffe" | "tf" | "torch" | "unit"
    min_size: int

    @property
    def transfer(self) -> bool:
        """A keras.applications backbone (ImageNet weights possible), not the custom CNN."""
        return bool(self.application)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture("custom_cnn", "", "", "unit", 24),
        Architecture("vgg16", "VGG16", "vgg16", "caffe", 32),
        Architecture("vgg19", "VGG19", "vgg19", "caffe", 32),
        Architecture("mobilenet_v2", "MobileNetV2", "mobilenet_v2", "tf", 32),
        Architecture("densenet169", "DenseNet169", "densenet", "torch", 32),
        Architecture("densenet201", "DenseNet201", "densenet", "torch", 32),
        Architecture("inception_v3", "InceptionV3", "inception_v3", "tf", 75),
        Architecture("inception_resnet_v2", "InceptionResNetV2", "inception_resnet_v2", "tf", 75),
        Architecture("resnet50", "ResNet50", "resnet", "caffe", 32),
    ]
}
MODEL_NAMES: tuple[str, ...] = tuple(ARCHITECTURES)


def preprocess_affine(mode: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) with ``out = x @ kernel + bias`` equal to ``preprocess_input`` on RGB.

    For one input channel the kernel is the RGB kernel applied to a grey pixel (r = g = b).
    """
    if mode == "caffe":  # RGB -> BGR, minus the ImageNet mean
        a, b = np.eye(3)[::-1], -_CAFFE_MEAN_BGR
    elif mode == "tf":  # [-1, 1]
        a, b = np.eye(3) / 127.5, -np.ones(3)
    elif mode == "torch":  # [0, 1], minus mean, over std
        a, b = np.diag(1.0 / (255.0 * _TORCH_STD)), -_TORCH_MEAN / _TORCH_STD
    elif mode == "unit":  # [0, 1], keeps the channel count
        return np.eye(channels) / 255.0, np.zeros(channels)
    else:
        raise ValueError(f"unknown preprocessing mode {mode!r}")
    if channels == 1:
        a = a.sum(axis=0, keepdims=True)
    elif channels != 3:
        raise ValueError(f"images must have 1 or 3 channels, got {channels}")
    return a, b


def preprocess_layer(mode: str, channels: int):
    import keras

    kernel, bias = preprocess_affine(mode, channels)
    layer = keras.layers.Conv2D(kernel.shape[1], 1, name="preprocess", trainable=False, dtype="float32", use_bias=True)
    layer.build((None, None, None, channels))
    layer.set_weights([kernel.reshape(1, 1, *kernel.shape).astype("float32"), bias.astype("float32")])
    return layer


def application_preprocess(name: str) -> Callable:
    """The application's own ``preprocess_input`` (for tests and comparisons)."""
    import keras

    arch = ARCHITECTURES[name]
    if not arch.module:
        return lambda x: x / 255.0
    return getattr(keras.applications, arch.module).preprocess_input


def check_head(name: str, head: str) -> None:
    """ValueError unless ``head`` is one of :data:`HEADS` and ``name`` has a head to choose."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {', '.join(HEADS)}")
    if not ARCHITECTURES[name].transfer and head != "flatten":
        raise ValueError(f"{name} is the paper's own network: its head is not an option (got head={head!r})")


def _head(input_shape: tuple[int, ...], num_classes: int, kind: str = "flatten"):
    import keras

    reduce = (
        keras.layers.Flatten(name="flatten") if kind == "flatten" else keras.layers.GlobalAveragePooling2D(name="pool")
    )
    return keras.Sequential(
        [
            keras.Input(input_shape),
            reduce,
            keras.layers.Dense(HEAD_UNITS, activation="relu", name="fc1"),
            keras.layers.Dense(HEAD_UNITS, activation="relu", name="fc2"),
            keras.layers.Dense(num_classes, activation="softmax", name="predictions", dtype="float32"),
        ],
        name="head",
    )


def _custom_cnn_body(input_shape: tuple[int, ...], num_classes: int):
    """The paper's network, exactly: BN on the input, three conv/pool stages, dropout head."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input(input_shape),
            layers.BatchNormalization(name="input_bn"),
            layers.Conv2D(32, 3, activation="relu", name="conv1"),
            layers.MaxPooling2D(name="pool1"),
            layers.Conv2D(64, 3, activation="relu", name="conv2"),
            layers.MaxPooling2D(name="pool2"),
            layers.Conv2D(128, 3, activation="relu", name="conv3"),
            layers.MaxPooling2D(name="pool3"),
            layers.Flatten(name="flatten"),
            layers.Dropout(0.3, name="dropout1"),
            layers.Dropout(0.2, name="dropout2"),
            layers.Dense(256, activation="relu", name="fc1"),
            layers.Dropout(0.15, name="dropout3"),
            layers.Dense(num_classes, activation="softmax", name="predictions", dtype="float32"),
        ],
        name="custom_cnn",
    )


def _backbone(arch: Architecture, input_size: int, weights: str | Path | None):
    import keras

    app = getattr(keras.applications, arch.application)
    shape = (input_size, input_size, 3)
    if weights in (None, "none"):
        return app(include_top=False, weights=None, input_shape=shape)
    if weights == "imagenet":
        resolved = resolve_imagenet(arch.name, input_size)
        if resolved == "imagenet":
            try:
                return app(include_top=False, weights="imagenet", input_shape=shape)
            except Exception as e:  # no network, proxy, TLS, ...
                raise missing_weights(
                    arch.name, weights_dir() / _expected_name(arch.name, input_size), f"the download failed ({e})"
                ) from e
        weights = resolved
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} for {arch.name} does not exist")
    return app(include_top=False, weights=str(path), input_shape=shape)


def _expected_name(name: str, input_size: int) -> str:

    return keras_file_names(name, input_size)[0]


def build_model(
    name: str,
    *,
    input_size: int = 299,
    channels: int = 1,
    num_classes: int = NUM_CLASSES,
    weights: str | Path | None = "imagenet",
    trainable: str | int = "frozen",
    head: str = "flatten",
    lung_fields=None,
    equalize: bool = False,
    blur_sigma: float = 0.0,
):
    """Build one of the nine models.

    Args:
        name: one of :data:`MODEL_NAMES`.
        input_size: square input size in pixels (the paper: 299).
        channels: 1 (grayscale X-rays, the default) or 3.
        weights: ``"imagenet"``, ``"none"`` or a weights file (ignored by ``custom_cnn``).
        trainable: ``"frozen"`` (backbone frozen, the default for transfer models), ``"all"``,
            or an int N: only the top N backbone layers train (fine-tuning; batch
            normalisation layers stay frozen).
        head: transfer models only: ``"flatten"`` (the paper's) or ``"pooled"`` (see :data:`HEADS`).
        lung_fields: a block from :func:`covid_models.lung_fields.build_lung_fields` (grey input only):
            the model then classifies the picture with everything outside the lungs blacked out.
        equalize: histogram equalisation as the model's first step (grey input only; see
            :mod:`covid_models.equalize`).
        blur_sigma: a fixed Gaussian blur of this many input pixels before the network (0: none; see
            :mod:`covid_models.blur`).
    """
    import keras

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    arch = ARCHITECTURES[name]
    if input_size < arch.min_size:
        raise ValueError(f"{name} needs an input of at least {arch.min_size}px, got {input_size}")
    inputs = keras.Input((input_size, input_size, channels), name="image")
    x = inputs
    if lung_fields is not None:
        if channels != 1:
            raise ValueError(f"lung fields need grey input (channels=1), got channels={channels}")
        x = lung_fields(x)
    if blur_sigma:
        x = build_blur(input_size, blur_sigma, channels)(x)
    if equalize:
        if channels != 1:
            raise ValueError(f"equalisation needs grey input (channels=1), got channels={channels}")
        x = build_equalizer(input_size)(x)
    x = preprocess_layer(arch.mode, channels)(x)
    check_head(name, head)
    if not arch.transfer:
        outputs = _custom_cnn_body(tuple(x.shape[1:]), num_classes)(x)
        return keras.Model(inputs, outputs, name=name)
    backbone = _backbone(arch, input_size, weights)
    backbone.name = "backbone"
    set_trainable(backbone, trainable)
    features = backbone(x)
    outputs = _head(tuple(features.shape[1:]), num_classes, head)(features)
    return keras.Model(inputs, outputs, name=name)


def set_trainable(backbone, trainable: str | int) -> None:
    """Apply the trainable policy to a backbone (see :func:`build_model`)."""
    import keras

    if trainable == "frozen":
        backbone.trainable = False
        return
    backbone.trainable = True
    if trainable == "all":
        for layer in backbone.layers:
            layer.trainable = True
        return
    n = int(trainable)
    for i, layer in enumerate(backbone.layers):
        top = i >= len(backbone.layers) - n
        layer.trainable = top and not isinstance(layer, keras.layers.BatchNormalization)


def features_input(model):
    """The tensor the backbone's preprocessing reads: the model's input through the blocks before it
    (lung fields, blur, equalisation), in the model's order."""
    x = model.input
    for layer in model.layers:
        if layer.name in (LUNG_FIELDS, BLUR, EQUALIZE):
            x = layer(x)
    return x


def parts(model) -> tuple:
    """(preprocess, backbone, head) layers of a transfer model."""
    return model.get_layer("preprocess"), model.get_layer("backbone"), model.get_layer("head")


def is_transfer(name: str) -> bool:
    return ARCHITECTURES[name].transfer
