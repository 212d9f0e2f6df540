"""The tf.data pipeline on real X-rays: shapes, labels, the on-disk cache and GCS staging."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covid_data.labels import CLASSES
from covid_data.split import load_split
from covid_data.store import open_store
from covid_models.data import image_dataset, load_split_data


def _collect(ds, limit=None):
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
        if limit and len(xs) >= limit:
            break
    return np.concatenate(xs), np.concatenate(ys)


def test_batches_are_raw_pixels_with_labels_in_split_order(small_split):
    data = load_split_data(small_split)
    table = load_split(small_split)
    x, y = _collect(image_dataset(data, "val", size=64, batch_size=4))
    assert x.shape == (data.size("val"), 64, 64, 1) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 255 and x.max() > 100  # raw pixels, not rescaled
    expected = table[table["split"] == "val"]["label"].map(CLASSES.index).to_numpy()
    np.testing.assert_array_equal(y, expected)


def test_train_set_shuffles_and_repeats(small_split):
    data = load_split_data(small_split)
    n = data.size("train")
    ds = image_dataset(data, "train", size=32, batch_size=n, training=True, seed=1)
    (x1, y1), (x2, y2) = [(x.numpy(), y.numpy()) for x, y in ds.take(2)]  # repeats past one epoch
    assert len(y1) == len(y2) == n
    assert sorted(y1) == sorted(y2) and not np.array_equal(x1, x2)  # same images, new order


def test_disk_cache_serves_without_the_source_images(small_split, tmp_path):
    version_dir = Path(small_split).parents[2]  # .../datasets/<version>/splits/<hash>/split.parquet
    data = load_split_data(small_split)
    cache = tmp_path / "cache"
    first = _collect(image_dataset(data, "test", size=48, cache_dir=cache))
    assert list((cache / "tfdata").glob("*/test.index"))
    moved = tmp_path / "moved"
    shutil.move(str(version_dir / "images"), moved)  # decoding is now impossible
    try:
        again = _collect(image_dataset(data, "test", size=48, cache_dir=cache))
        with pytest.raises(Exception, match="(?i)not found|no such file"):
            _collect(image_dataset(data, "test", size=48, cache_dir=None))
    finally:
        shutil.move(str(moved), version_dir / "images")
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    uncached = _collect(image_dataset(data, "test", size=48, cache_dir=None))
    np.testing.assert_array_equal(first[0], uncached[0])


def test_gcs_split_is_staged_locally_once(small_split, gcs_emulator, tmp_path):
    src = open_store(Path(small_split).parents[4])  # the store root
    dst = open_store(f"gs://covid-test/{uuid.uuid4().hex[:8]}")
    for key in src.list():
        dst.put_file(key, src.local_path(key))
    rel = Path(small_split).relative_to(src.local_path("")).as_posix()
    data = load_split_data(dst.uri_for(rel), cache_dir=tmp_path / "cache")
    assert str(data.root).startswith(str(tmp_path / "cache"))
    files, labels = data.files("train")
    assert all(Path(f).is_file() for f in files) and len(files) == len(labels)
    x, _ = _collect(image_dataset(data, "train", size=32, batch_size=8, repeat=False))
    assert len(x) == len(files)
    assert isinstance(load_split(dst.uri_for(rel)), pd.DataFrame)
