"""One trained model as stored: its slot opened once, its Keras model loaded when first needed.

A model slot (``runs/<id>/models/<name>/`` or a training cache slot) holds ``model.keras``,
``metrics.json`` (written last: the slot's completion marker, with the training config), and,
once later stages have run, ``calibration/`` (the temperature) and ``exports/<variant>/``. Every
stage that predicts with a stored model (blessing, calibration, the ensemble, exports, external
evaluation, Grad-CAM, the app bundle) goes through :class:`StoredModel`, so a model is always
read the same way: Keras' safe mode, the pipeline's own decoding and resizing, its own size and
channels.
"""

from __future__ import annotations

import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covid_data.store import Store, Unit, open_store, split_object_uri
from covid_models.data import SplitData, image_dataset, load_split_data, make_dataset

MODEL_FILE = "model.keras"
MARKER = "metrics.json"
CALIBRATION_MARKER = "calibration/calibration.json"
EXPORT_MARKER = "export.json"


class ModelLoadError(RuntimeError):
    """A slot whose ``model.keras`` is missing, truncated or not a Keras file."""


def model_slot(uri: str | Store) -> Unit:
    """The stored unit of one trained model (complete once ``metrics.json`` exists)."""
    return Unit(uri if isinstance(uri, Store) else open_store(uri), "", MARKER)


def load_keras_file(store: Store, key: str = MODEL_FILE):
    """Load a ``.keras`` object of ``store`` with Keras' safe mode on (no code in the file runs)."""
    import keras  # heavy: only the stages that predict pay for it

    with tempfile.TemporaryDirectory() as tmp:
        path = store.get_file(key, Path(tmp) / Path(key).name)
        return keras.saving.load_model(path, safe_mode=True)


def load_trained_model(uri: str):
    """Load a stored ``model.keras`` by its object URI (safe mode)."""
    store, key = split_object_uri(uri)
    return load_keras_file(store, key)


class StoredModel:
    """A trained model slot: config, metrics, temperature and exports; predictions on files or a split."""

    def __init__(self, uri: str | Store):
        self.store = uri if isinstance(uri, Store) else open_store(uri)
        self.uri = self.store.uri.rstrip("/")
        self._keras = None

    def __repr__(self) -> str:
        return f"StoredModel({self.uri!r})"

    # -- what the slot says ---------------------------------------------------------------------
    @property
    def unit(self) -> Unit:
        return model_slot(self.store)

    @property
    def complete(self) -> bool:
        """``metrics.json`` and ``model.keras`` are both there (the marker is written last)."""
        return self.store.exists(MARKER) and self.store.exists(MODEL_FILE)

    @cached_property
    def record(self) -> dict[str, Any]:
        """``metrics.json``; ``FileNotFoundError`` naming the slot when it is not complete."""
        rec = self.unit.record()
        if rec is None:
            raise FileNotFoundError(f"{self.uri} holds no complete model (no {MARKER})")
        return rec

    @property
    def config(self) -> dict[str, Any]:
        return self.record["config"]

    @property
    def name(self) -> str:
        return str(self.config["model"])

    @property
    def input_size(self) -> int:
        return int(self.config["input_size"])

    @property
    def channels(self) -> int:
        return int(self.config["channels"])

    @property
    def calibration(self) -> dict[str, Any] | None:
        """The calibration record (``covid_eval.calibration``), or None before calibration."""
        return Unit(self.store, "calibration", Path(CALIBRATION_MARKER).name).record()

    @property
    def temperature(self) -> float:
        """The fitted temperature; 1.0 (no scaling) before calibration."""
        rec = self.calibration
        return float(rec["temperature"]) if rec else 1.0

    def export_unit(self, variant: str) -> Unit:
        return Unit(self.store, f"exports/{variant}", EXPORT_MARKER)

    def exports(self) -> dict[str, dict[str, Any]]:
        """The complete exports: ``{variant: export.json}``."""
        out = {}
        for key in self.store.list("exports/"):
            if key.endswith(f"/{EXPORT_MARKER}") and key.count("/") == 2:
                variant = key.split("/")[1]
                rec = self.export_unit(variant).record()
                if rec is not None:
                    out[variant] = rec
        return out

    def file_uri(self, key: str = MODEL_FILE) -> str:
        return self.store.uri_for(key)

    # -- predicting -----------------------------------------------------------------------------
    def keras(self):
        """The Keras model, loaded once (safe mode); :class:`ModelLoadError` names the slot."""
        if self._keras is None:
            try:
                self._keras = load_keras_file(self.store)
            except Exception as e:  # missing, truncated or foreign: the caller decides what that means
                raise ModelLoadError(f"cannot load the model stored at {self.uri}: {type(e).__name__}: {e}") from e
        return self._keras

    def predict_files(self, files: list[str], *, batch_size: int = 32) -> np.ndarray:
        """Class probabilities for local image files, read as in training (decode, convert, resize)."""
        ds = make_dataset(
            list(files),
            np.zeros(len(files), dtype="int32"),
            size=self.input_size,
            channels=self.channels,
            batch_size=batch_size,
        )
        return np.asarray(self.keras().predict(ds, verbose=0), dtype="float64")

    def predict_split(
        self,
        data: SplitData | str,
        split: str,
        *,
        max_per_class: int | None = None,
        cache_dir: Path | None = None,
        batch_size: int = 32,
    ) -> tuple[np.ndarray, pd.DataFrame]:
        """(probabilities, the split's rows) for one split of a split table (a URI or loaded data)."""
        if isinstance(data, str):
            data = load_split_data(data, cache_dir, max_per_class)
        ds = image_dataset(
            data, split, size=self.input_size, channels=self.channels, batch_size=batch_size, cache_dir=cache_dir
        )
        return np.asarray(self.keras().predict(ds, verbose=0), dtype="float64"), data.frames[split]
