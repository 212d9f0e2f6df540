"""Helpers for the tests of the frozen blocks at a classifier's input (equalisation, blur)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covid_models.segmenter import resize_images
from tests.conftest import sample_files


def resized_xrays(n_per_class: int, size: int, seed: int) -> np.ndarray:
    """Real X-rays of the shared sample, resized as the pipeline resizes them: float32 [N, size, size, 1]."""
    from PIL import Image

    files = [f for fs in sample_files(n_per_class, seed).values() for f in fs]
    return resize_images([np.asarray(Image.open(f).convert("L")) for f in files], size).astype("float32")


def saved_and_reloaded(model, x: np.ndarray, tmp: Path):
    """``model`` saved as a .keras file and loaded again (safe mode), with the same probabilities on ``x``, and
    a network that sees the block: the probabilities change without it. Returns the loaded model and ``p``."""
    import keras

    p = np.asarray(model.predict(x, verbose=0))
    model.save(tmp / "m.keras")
    again = keras.saving.load_model(tmp / "m.keras", safe_mode=True)
    np.testing.assert_array_equal(np.asarray(again.predict(x, verbose=0)), p)
    body = keras.Model(model.get_layer("preprocess").input, model.output)
    assert not np.allclose(np.asarray(body.predict(x, verbose=0)), p, atol=1e-4)
    return again, p
