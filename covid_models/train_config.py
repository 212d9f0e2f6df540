"""What one training is: its settings, the weights it starts from, and the key of its model slot.

A trained model is stored at ``models/<split hash>/<model>-<key>/`` and reused whenever the key
matches. The key hashes the *fully resolved* settings (every field, defaults included), the
checksum of the weights file that will actually be loaded, a fingerprint of the training code and
the TensorFlow and Keras versions, so a changed default, a different weights file or new training
code never reuses a model trained under the old ones. The settings include the device the model
trains on (``device``: ``cpu:1``, ``gpu:1``, ``multi-gpu:N``, ``tpu:N``; covid_models.strategy),
resolved from ``auto`` when the configs are planned: a TPU training and a CPU training of the same
settings are different models in different slots, and the training refuses to run on a device other
than its config's.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import asdict, dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

from covid_models.augment import RECIPES
from covid_models.builders import MODEL_NAMES, check_head, is_transfer
from covid_models.data import pipeline_version
from covid_models.segmenter import segmenter_store
from covid_models.strategy import AUTO, canonical_device, resolve_device
from covid_models.weights import keras_file_names, resolve_imagenet

# Settings that say where things are, not what is trained.
_NOT_TRAINING = ("model", "split", "out", "cache_dir", "verbose")
# Modules whose code decides what a training produces (hashed into every slot key).
_TRAINING_CODE = (
    "augment.py",
    "builders.py",
    "checkpoints.py",
    "data.py",
    "metrics.py",
    "feature_cache.py",
    "lung_fields.py",
    "equalize.py",
    "blur.py",
    "strategy.py",  # distribution and mixed precision
    "train.py",
    "train_config.py",
)

HELP: dict[str, str] = {
    "input_size": "square input size in pixels (the paper: 299)",
    "channels": "image channels fed to the model: 1 (grayscale, converted inside the model) or 3",
    "epochs": "maximum epochs of the first phase (head, or the whole custom CNN)",
    "learning_rate": "learning rate of the first phase",
    "optimizer": "adam, sgd or rmsprop",
    "batch_size": "global batch size (default: 16 per replica, as in the paper)",
    "patience": "early stopping patience in epochs on --monitor, best weights restored (0: off)",
    "monitor": "the validation quantity early stopping watches (val_loss or val_accuracy)",
    "weights": "transfer backbones: imagenet (head on the frozen backbone, then optional fine-tuning), scratch "
    "(random initialisation, every layer trained) or a weights file path; none only for custom_cnn",
    "head": "transfer models: flatten (the paper's flatten, Dense 256, Dense 256) or pooled (global average "
    "pooling, then the same dense layers: a model a phone downloads in a fraction of the bytes)",
    "fine_tune_layers": "after the head converges, train the top N backbone layers (0: no fine-tuning)",
    "fine_tune_epochs": "epochs of the fine-tuning phase",
    "fine_tune_learning_rate": "learning rate of the fine-tuning phase",
    "augment": "augment training images in every phase: small rotations, shifts and zoom; contrast, gamma, blur and "
    "sharpening (the look of other scanners)",
    "fine_tune_augment": "augment only in the fine-tuning phase (the head still trains on cached features)",
    "augment_recipe": "full (geometry, contrast, gamma, blur/sharpening, JPEG) or acquisition (what other scanners "
    "do: small shifts, contrast, gamma, resolution loss, noise, JPEG)",
    "feature_cache": "frozen backbone without augmentation: train the head on cached backbone features",
    "max_per_class": "at most this many images per class and split (quick runs; the test set is then capped)",
    "cache_dir": "local cache of decoded images, features and staged files (default ~/.cache/covid-xray)",
    "seed": "random seed of initialisation, shuffling and augmentation",
    "op_determinism": "TensorFlow op determinism (tf.config.experimental.enable_op_determinism) in the training "
    "process: the same seed then trains the same model (its cost: BENCHMARKS.md, 'Op determinism')",
    "device": "the hardware this training is for, part of its slot key: auto (what this process selects: "
    "COVID_DEVICE, else TPU variables, else the GPUs), cpu, gpu, multi-gpu:N or tpu:N (N replicas); a training "
    "that selects another device stops with an error",
    "lung_fields": "URI of a complete lung segmenter unit (<store>/segmenters/<key>; grey input only): the model "
    "classifies the picture with everything outside the lungs blacked out, the segmenter frozen inside its graph",
    "equalize": "histogram equalisation inside the model's graph (grey input only): each image mapped through its "
    "own cumulative histogram before the network sees it, in training, export and the app alike",
    "blur_sigma": "a fixed Gaussian blur of this many pixels of the model's input inside its graph, before the "
    "network, in training, export and the app alike (0: none)",
    "verbose": "Keras progress output: 0 silent, 1 progress bar, 2 one line per epoch",
}


@dataclass
class TrainConfig:
    model: str
    split: str  # URI of a split.parquet
    out: str  # store URI for this model's artefacts
    input_size: int = 299
    channels: int = 1
    epochs: int = 30
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    batch_size: int | None = None  # default: 16 per replica (the paper)
    patience: int = 5  # early stopping on `monitor`, best weights restored; 0 = off
    monitor: str = "val_loss"
    # "imagenet" | "scratch" (random initialisation, every layer trained) | a weights file;
    # "none" only for the custom CNN, which has no backbone
    weights: str = "imagenet"
    head: str = "flatten"  # covid_models.builders.HEADS; transfer models only (check_head)
    fine_tune_layers: int = 0  # after the head converges, train the top N backbone layers ...
    fine_tune_epochs: int = 0  # ... for this many epochs ...
    fine_tune_learning_rate: float = 1e-5  # ... at this rate
    augment: bool = False
    fine_tune_augment: bool = False  # augmentation in the fine-tuning phase only
    augment_recipe: str = "full"  # covid_models.augment.RECIPES
    feature_cache: bool = True  # frozen backbone, no augmentation: train the head on cached features
    max_per_class: int | None = None  # at most this many images per class and split (quick runs)
    cache_dir: str | None = None
    seed: int = 42
    op_determinism: bool = False  # process-wide, so per model: each trains in its own process (runner.py)
    # "cpu:1" | "gpu:1" | "multi-gpu:N" | "tpu:N", or "auto": what this process would select
    # (resolved when configs are planned; the slot key never hashes "auto")
    device: str = AUTO
    lung_fields: str | None = None  # a segmenter unit's URI: classify on the lung fields (covid_models.lung_fields)
    equalize: bool = False  # histogram equalisation inside the model (covid_models.equalize)
    blur_sigma: float = 0.0  # a fixed Gaussian blur of this many input pixels inside the model; 0 = none
    verbose: int = 2  # Keras progress: 2 = one line per epoch (readable in Prefect logs)

    def __post_init__(self):
        self.device = canonical_device(self.device)  # one spelling per device: "gpu" and "gpu:1" share a key
        if self.augment_recipe not in RECIPES:
            raise ValueError(f"unknown augment_recipe {self.augment_recipe!r}; choose from {RECIPES}")
        if self.model not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.model!r}; choose from {', '.join(MODEL_NAMES)}")
        check_head(self.model, self.head)
        if self.lung_fields and self.channels != 1:
            raise ValueError(f"lung_fields needs grey input (channels=1), got channels={self.channels}")
        if self.equalize and self.channels != 1:
            raise ValueError(f"equalize needs grey input (channels=1), got channels={self.channels}")
        if self.blur_sigma < 0:
            raise ValueError(f"blur_sigma must be 0 (no blur) or positive, got {self.blur_sigma}")
        if self.equalize and self.lung_fields:
            # The segmenter learned raw pictures, and half of a lung-field picture is black: neither order holds.
            raise ValueError("equalize and lung_fields cannot be combined: choose one")
        if is_transfer(self.model) and self.weights == "none":
            # A head on a frozen random backbone learns next to nothing, and would be published as "vgg16".
            raise ValueError(
                f"weights='none' for {self.model} would train a head on a frozen random backbone: use "
                "weights='imagenet' (with its file), weights='scratch' (random initialisation, every layer "
                "trained) or a weights file"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**d)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def resolve_weights(cfg: TrainConfig) -> dict[str, Any]:
    """The weights this training will start from: kind, file and its sha256 where there is one.

    For ``imagenet`` this is the local file Keras would load (see covid_models.weights); where
    none exists and downloads are allowed, the Keras file name stands in for the checksum.
    """

    if not is_transfer(cfg.model) or cfg.weights == "none":
        return {"kind": "none", "file": None, "sha256": None}
    if cfg.weights == "scratch":
        return {"kind": "scratch", "file": None, "sha256": None}
    if cfg.weights == "imagenet":
        resolved = resolve_imagenet(cfg.model, cfg.input_size)
        if resolved == "imagenet":
            return {"kind": "imagenet", "file": keras_file_names(cfg.model, cfg.input_size)[0], "sha256": "download"}
        return {"kind": "imagenet", "file": str(resolved), "sha256": _cached_sha256(str(resolved))}
    path = Path(cfg.weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} for {cfg.model} does not exist")
    return {"kind": "file", "file": str(path), "sha256": _cached_sha256(str(path))}


def lung_fields_fingerprint(cfg: TrainConfig) -> str | None:
    """``<unit key>-<sha256 of its model.keras>`` of the lung-field segmenter, None without one."""
    if not cfg.lung_fields:
        return None
    return _segmenter_fingerprint(cfg.lung_fields)


@cache
def _segmenter_fingerprint(uri: str) -> str:
    store, key = segmenter_store(uri)
    return f"{key}-{hashlib.sha256(store.read_bytes('model.keras')).hexdigest()[:12]}"


@cache
def _cached_sha256(path: str) -> str:
    return file_sha256(path)


@cache
def code_version() -> str:
    """A fingerprint of the training code (see ``_TRAINING_CODE``)."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in _TRAINING_CODE:
        p = here / name
        h.update(name.encode() + b"\0" + (p.read_bytes() if p.exists() else b"") + b"\0")
    # The decoders in covid_data make the pixels too.
    h.update(b"pixels\0" + pipeline_version().encode())
    return h.hexdigest()[:12]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    """The installed TensorFlow and Keras versions (part of the slot key, recorded with each model)."""
    return {name: _version(name) for name in ("tensorflow", "keras")}


def training_identity(cfg: TrainConfig) -> dict[str, Any]:
    """Everything that decides what a training produces (hashed into the slot key)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in _NOT_TRAINING}
    # A config built without planning ("auto") is keyed on the device this process would select.
    settings["device"] = resolve_device(cfg.device)
    # The segmenter's bytes, not where its unit lies: a moved store keeps its models' keys.
    settings["lung_fields"] = lung_fields_fingerprint(cfg)
    weights = resolve_weights(cfg)
    return {
        "model": cfg.model,
        "settings": settings,
        "weights": {"kind": weights["kind"], "sha256": weights["sha256"]},
        "code": code_version(),
        # The same code on another TensorFlow or Keras can train differently (kernels, defaults).
        "runtime": library_versions(),
    }


def slot_key(cfg: TrainConfig) -> str:
    identity = json.dumps(training_identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(identity.encode()).hexdigest()[:12]
