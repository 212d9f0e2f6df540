"""Finding ImageNet weights: a local folder first, then Keras' own download.

``imagenet`` looks in the weights folder (``COVID_WEIGHTS_DIR``, default Keras' cache
``$KERAS_HOME/models``, i.e. ``~/.keras/models``) for the file Keras would download, then lets
Keras download it (unless ``COVID_WEIGHTS_DOWNLOAD=0``). When neither works the error names the
expected file and how to supply it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# Keras' file name for each application's no-top ImageNet weights.
_KERAS_FILES = {
    "vgg16": "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "vgg19": "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "densenet169": "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "densenet201": "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "inception_v3": "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "inception_resnet_v2": "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
}
_MOBILENET_ROWS = (96, 128, 160, 192, 224)
# Where Keras publishes each file: https://storage.googleapis.com/tensorflow/keras-applications/<folder>/<file>
_KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/keras-applications"
_KERAS_FOLDERS = {
    "vgg16": "vgg16",
    "vgg19": "vgg19",
    "densenet169": "densenet",
    "densenet201": "densenet",
    "inception_v3": "inception_v3",
    "inception_resnet_v2": "inception_resnet_v2",
    "resnet50": "resnet",
    "mobilenet_v2": "mobilenet_v2",
}


class MissingWeightsError(FileNotFoundError):
    """ImageNet weights are neither in the local folder nor downloadable."""


def weights_dir() -> Path:
    env = os.environ.get("COVID_WEIGHTS_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser() / "models"


def download_allowed() -> bool:
    return os.environ.get("COVID_WEIGHTS_DOWNLOAD", "1").lower() not in ("0", "false", "no")


def keras_file_names(model: str, input_size: int) -> list[str]:
    """File names that hold this model's no-top ImageNet weights, Keras' own first."""
    if model == "mobilenet_v2":
        rows = input_size if input_size in _MOBILENET_ROWS else 224  # Keras' own fallback
        names = []
        # The no-top convolution weights fit any input size; the 224 file is the usual one.
        for r in dict.fromkeys([rows, 224]):
            names += [
                f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{r}_no_top.h5",
                f"mobilenet_v2_1.0_{r}_no_top.weights.h5",  # Keras 3 format, as converted here
            ]
        return names
    return [
        _KERAS_FILES[model],
        _KERAS_FILES[model]
        .replace("_weights_tf_dim_ordering_tf_kernels", "")
        .replace("_notop.h5", "_no_top.weights.h5"),
    ]


def resolve_imagenet(model: str, input_size: int) -> str | Path:
    """A local weights file for ``model``, or ``"imagenet"`` to let Keras download it."""
    folder = weights_dir()
    names = keras_file_names(model, input_size)
    for name in names:
        if (folder / name).is_file():
            log.info("ImageNet weights for %s from %s", model, folder / name)
            return folder / name
    if download_allowed():
        return "imagenet"
    raise missing_weights(model, folder / names[0], "downloads are disabled (COVID_WEIGHTS_DOWNLOAD=0)")


def missing_weights(model: str, expected: Path, why: str) -> MissingWeightsError:
    return MissingWeightsError(
        f"ImageNet weights for {model} are not available: expected the file {expected.name} in "
        f"{expected.parent}, and {why}. Download it from Keras' weight store into that folder "
        f"(or set COVID_WEIGHTS_DIR to a folder that holds it), or pass weights=<path to a weights file>."
    )


def local_imagenet(model: str, input_size: int) -> Path:
    """The local file holding ``model``'s ImageNet weights, fetching Keras' file into the weights
    folder first when none is there and downloads are allowed.

    Raises :class:`MissingWeightsError` (naming the file and the folder) when the file is neither
    here nor downloadable."""
    found = resolve_imagenet(model, input_size)
    if found != "imagenet":
        return Path(found)
    folder = weights_dir()
    names = keras_file_names(model, input_size)
    import keras

    url = f"{_KERAS_ORIGIN}/{_KERAS_FOLDERS[model]}/{names[0]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return Path(keras.utils.get_file(names[0], url, cache_dir=str(folder), cache_subdir="."))
    except Exception as e:  # no network, proxy, TLS, ...
        raise missing_weights(model, folder / names[0], f"downloading it from {url} failed ({e})") from e
