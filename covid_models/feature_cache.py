"""Backbone features cached on disk, for training a head on a frozen transfer backbone.

The backbone runs once over a split's images; every epoch of the head then reads the cached
outputs. The cache is keyed by split, model, input size, channels, the weights actually
loaded and the training code's fingerprint, and written atomically under a name unique to the
writer, so two processes computing the same features never corrupt each other's file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from covid_models.data import SplitData, image_dataset
from covid_models.equalize import LEVELS
from covid_models.train_config import TrainConfig, code_version, lung_fields_fingerprint, resolve_weights

log = logging.getLogger(__name__)


def weights_fingerprint(cfg: TrainConfig) -> str:
    w = resolve_weights(cfg)
    if w["kind"] == "none":
        return f"none-seed{cfg.seed}"  # random weights depend on the seed
    return f"{w['kind']}-{(w['sha256'] or '')[:12]}"


def feature_path(cache: Path, data: SplitData, cfg: TrainConfig, split: str) -> Path:
    # code_version: the pixels (data.py) and the backbone (builders.py) that made the features
    key = (
        f"{data.split_hash}-{cfg.model}-{cfg.input_size}px-{cfg.channels}ch-{weights_fingerprint(cfg)}-{code_version()}"
    )
    if cfg.lung_fields:  # the backbone saw the lung fields, not the whole picture
        key += f"-lungs-{lung_fields_fingerprint(cfg)}"
    if cfg.blur_sigma:  # the backbone saw blurred pictures
        key += f"-blur{cfg.blur_sigma:g}"
    if cfg.equalize:  # the backbone saw equalised pictures
        key += f"-equalized{LEVELS}"
    return cache / "features" / key / f"{split}.npy"


def compute_features(extractor, data: SplitData, split: str, cfg: TrainConfig, cache: Path, batch: int) -> np.ndarray:
    """Backbone outputs for every image of a split, from the cache or computed and cached."""
    path = feature_path(cache, data, cfg, split)
    if path.exists():
        log.info("features of %s/%s from cache %s", cfg.model, split, path)
        return np.load(path)
    ds = image_dataset(
        data, split, size=cfg.input_size, channels=cfg.channels, batch_size=batch, cache_dir=cache, repeat=False
    )
    feats = extractor.predict(ds, verbose=cfg.verbose)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{split}.", suffix=".npy.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, feats)
        os.replace(tmp, path)  # atomic: readers see a whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return feats
