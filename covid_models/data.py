"""The tf.data input pipeline: the paper's steps, made fast.

read -> decode PNG/JPEG/DICOM (``covid_data.imaging``, as the phone app) -> grayscale/RGB
-> resize -> cache -> shuffle (train) -> repeat (train)
-> batch -> prefetch.

Images are read straight from a local store, or staged once from ``gs://`` into a local cache.
The decoded, resized images are cached on disk (as uint8, 4x smaller than float32) under a
key of split hash, split name, size, channels and this module's fingerprint (so pixels made by
other decoding code are never reused), and a second model or run at the same size skips decoding.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from covid_data.dataset import default_cache_dir
from covid_data.imaging import read_pixels, to_channels
from covid_data.labels import CLASSES
from covid_data.sources import source_of
from covid_data.split import SplitRef, load_split

log = logging.getLogger(__name__)

PER_REPLICA_BATCH = 16  # the paper's batch size


@dataclass(frozen=True)
class SplitData:
    """Where a split's images are, as local files, with integer labels."""

    split_hash: str
    version: str
    root: Path
    frames: dict[str, pd.DataFrame]  # split name -> rows (path, label, y)

    def files(self, split: str) -> tuple[list[str], np.ndarray]:
        df = self.frames[split]
        return [str(self.root / p) for p in df["path"]], df["y"].to_numpy(dtype="int32")

    def size(self, split: str) -> int:
        return len(self.frames.get(split, ()))

    def sources(self, split: str) -> np.ndarray:
        """Each row's source (``main``, or an extra source's name: ``covid_data.sources``)."""
        return source_of(self.frames[split]["path"])

    def balanced_weights(self, split: str) -> np.ndarray | None:
        """Per-row weights that give every source the same total weight (mean 1), or None for one
        source: what source-balanced batches do, for training on cached features."""
        src = self.sources(split)
        names, idx, counts = np.unique(src, return_inverse=True, return_counts=True)
        if len(names) < 2:
            return None
        return (len(src) / (len(names) * counts[idx])).astype("float32")


def load_split_data(split_uri: str, cache_dir: Path | None = None, max_per_class: int | None = None) -> SplitData:
    """Resolve a split in the store to local image files (staging from GCS once).

    ``max_per_class`` keeps at most that many images per class in each split (chosen in
    content-hash order, so the same for every run) for quick runs; caches are keyed by it too.
    """
    table = load_split(split_uri)
    if max_per_class:
        table = (
            table.sort_values("sha256", kind="stable")
            .groupby(["split", "label"], sort=False)
            .head(max_per_class)
            .sort_values("path", kind="stable")
        )
    ref = SplitRef.from_uri(split_uri)
    split_hash, version, dataset = ref.cache_key(max_per_class), ref.version, ref.dataset_store()
    root = dataset.local_path("")
    if root is None:
        root = (Path(cache_dir) if cache_dir else default_cache_dir()) / "images" / version
        _stage(dataset, table["path"].tolist(), root)
    table = table.assign(y=table["label"].map({c: i for i, c in enumerate(CLASSES)}).astype("int32"))
    frames = {s: g.reset_index(drop=True) for s, g in table.groupby("split", sort=False)}
    return SplitData(split_hash, version, Path(root), frames)


def _stage(dataset, paths: list[str], root: Path) -> None:
    missing = [p for p in paths if not (root / p).is_file()]
    if not missing:
        return
    log.info("staging %d images from %s into %s", len(missing), dataset.uri, root)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: dataset.get_file(p, root / p), missing))


def global_batch_size(replicas: int = 1, per_replica: int = PER_REPLICA_BATCH) -> int:
    return per_replica * max(1, replicas)


# The modules whose code decides the pixels (this one resizes, these decode): cached pixels made by
# other code are never reused.
_PIXEL_CODE = ("covid_models/data.py", "covid_data/imaging.py", "covid_data/dicom.py")


@functools.cache
def pipeline_version() -> str:
    """A fingerprint of the code that decodes and resizes (``_PIXEL_CODE``): cached pixels made by
    other code (the JPEG decoder's ``dct_method`` once changed, then EXIF orientation and grey) are
    never reused."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for name in _PIXEL_CODE:
        h.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return h.hexdigest()[:10]


def cache_path(cache_dir: Path, split_hash: str, split: str, size: int, channels: int) -> str:
    d = Path(cache_dir) / "tfdata" / f"{split_hash}-{size}px-{channels}ch-{pipeline_version()}"
    d.mkdir(parents=True, exist_ok=True)
    return str(d / split)


def decode_file(path: bytes | str | np.ndarray, raw: bytes | np.ndarray, channels: int) -> np.ndarray:
    """uint8 (H, W, channels) pixels of one file's bytes: PNG, JPEG (upright by its EXIF orientation)
    or DICOM, grey as the phone app computes it (:mod:`covid_data.imaging`). Bad input raises
    :class:`covid_data.imaging.ImageError` naming the file."""
    path, raw = (v.item() if isinstance(v, np.ndarray) else v for v in (path, raw))  # tf hands 0-d arrays
    where = path.decode(errors="replace") if isinstance(path, bytes) else str(path)
    return np.ascontiguousarray(to_channels(read_pixels(raw, where), int(channels)))


def decode_resize(path, size: int, channels: int):
    """Read, decode (:func:`decode_file`), resize (antialiased bilinear), round; uint8 out."""
    import tensorflow as tf

    raw = tf.io.read_file(path)
    img = tf.numpy_function(
        functools.partial(decode_file, channels=channels), [path, raw], tf.uint8, stateful=False, name="decode_file"
    )
    img.set_shape([None, None, channels])
    return resize_pixels(img, size)


def resize_pixels(img, size: int):
    """uint8 (H, W, C) pixels to the model's (size, size, C): antialiased bilinear, rounded half to even."""
    import tensorflow as tf

    img = tf.image.resize(img, (size, size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(img), 0.0, 255.0), tf.uint8)


# Who fills a cache: an advisory lock (flock) on `<prefix>.fill-lock`, held for the whole fill. The
# kernel drops it when the holder exits, SIGKILL included, so "TF lock file there, fill lock free"
# means the filler died: tf.data's own `<prefix>_<shard>.lockfile` ("Created at: <seconds>") says
# neither who nor whether it is alive. The fill-lock file also records pid/host for messages, and
# is never deleted (deleting a lock file lets two processes lock two different inodes).
FILL_LOCK_SUFFIX = ".fill-lock"


def _partial_cache_files(prefix: str) -> list[Path]:
    """What an unfinished fill leaves: ``<name>_<shard>.lockfile``, ``<name>_<shard>.data-*.tempstate*``,
    shard bundles, and a half-merged ``<name>.data-*`` without its ``<name>.index``."""
    p = Path(prefix)
    if not p.parent.is_dir():
        return []
    shard = [f for f in p.parent.glob(f"{p.name}_*") if f.name[len(p.name) + 1 :][:1].isdigit()]
    return sorted(shard + list(p.parent.glob(f"{p.name}.data-*")))


@contextmanager
def _fill_lock(prefix: str) -> Iterator[str | None]:
    """Try to become the one process filling ``prefix``: yields None when it did, else who holds it."""
    import fcntl
    import json
    import socket

    path = Path(prefix + FILL_LOCK_SUFFIX)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = True
        else:
            held = False
        if held:
            f.seek(0)
            yield f.read().strip() or "another process"
            return
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
            f.flush()
            yield None
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _filled_cache(ds, prefix: str):
    """``ds.cache(prefix)``, filled now by one full pass.

    tf.data finalises a file cache only when an iterator reaches the end of the data, which
    Keras' fit/predict (stopping after a known number of steps) never do; filling it here
    makes the cache reliable. Another live process filling the same cache at the same moment
    makes this one read uncached instead of waiting. What a killed filler left behind (tf.data's
    lock file and partial files) is removed, and the cache is filled again.
    """
    import tensorflow as tf

    if Path(prefix + ".index").exists():
        return ds.cache(prefix)
    with _fill_lock(prefix) as holder:
        if holder is not None:
            log.warning("image cache %s is being written by %s; reading uncached", prefix, holder)
            return ds
        if Path(prefix + ".index").exists():  # a filler finished between the two checks
            return ds.cache(prefix)
        stale = _partial_cache_files(prefix)
        if stale:
            # We hold the fill lock, so no live process is writing these: its filler died.
            log.warning(
                "image cache %s: removing %d files of an interrupted fill (%s) and filling again",
                prefix,
                len(stale),
                ", ".join(f.name for f in stale),
            )
            for f in stale:
                f.unlink(missing_ok=True)
        t0 = time.perf_counter()
        try:
            n = int(ds.cache(prefix).reduce(0, lambda count, _: count + 1))
        except (tf.errors.AlreadyExistsError, tf.errors.UnavailableError) as e:
            # A filler that does not take the fill lock (another host, an older version).
            log.warning("image cache %s is being written by another process; reading uncached (%s)", prefix, e)
            return ds
    log.info("cached %d decoded images at %s in %.1fs", n, prefix, time.perf_counter() - t0)
    return ds.cache(prefix)


def make_dataset(
    files: list[str],
    labels: np.ndarray,
    *,
    size: int,
    channels: int = 1,
    batch_size: int = PER_REPLICA_BATCH,
    training: bool = False,
    cache: str | None = None,
    seed: int = 42,
    augment=None,
    repeat: bool | None = None,
    sources: np.ndarray | None = None,
):
    """A batched dataset of (float32 images 0-255, int labels).

    ``cache`` is a file prefix for the on-disk cache of decoded, resized images, or None.
    ``repeat`` defaults to ``training``: a repeating train set needs ``steps_per_epoch``.
    ``sources`` (each file's source name): a training set of two or more sources draws each
    example from a source chosen uniformly, so batches are source-balanced (and repeat).
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((files, labels))
    ds = ds.map(lambda p, y: (decode_resize(p, size, channels), y), num_parallel_calls=tf.data.AUTOTUNE)
    if cache is not None:
        ds = _filled_cache(ds, cache)
    names, source_idx = np.unique(sources, return_inverse=True) if sources is not None else ((), None)
    if training and len(names) > 1:
        ds = _source_balanced(ds, source_idx, len(files), seed)
    elif training:
        ds = ds.shuffle(min(len(files), 4096), seed=seed, reshuffle_each_iteration=True)
    if training if repeat is None else repeat:
        ds = ds.repeat()
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size)
    if augment is not None:
        ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _source_balanced(ds, source_idx: np.ndarray, n: int, seed: int):
    """Each source shuffled and repeated on its own, then sampled with equal weights (seeded)."""
    import tensorflow as tf

    k = int(source_idx.max()) + 1
    tagged = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices(source_idx.astype("int32"))))
    parts = [
        tagged.filter(lambda e, s, i=i: tf.equal(s, i))
        .map(lambda e, s: e)
        .shuffle(min(n, 4096), seed=seed + i, reshuffle_each_iteration=True)
        .repeat()
        for i in range(k)
    ]
    return tf.data.Dataset.sample_from_datasets(parts, weights=[1.0 / k] * k, seed=seed)


def image_dataset(
    data: SplitData,
    split: str,
    *,
    size: int,
    channels: int = 1,
    batch_size: int = PER_REPLICA_BATCH,
    training: bool = False,
    cache_dir: Path | None = None,
    seed: int = 42,
    augment=None,
    repeat: bool | None = None,
):
    files, labels = data.files(split)
    cache = None
    if cache_dir is not None and os.environ.get("COVID_TFDATA_CACHE", "1") != "0":
        cache = cache_path(Path(cache_dir), data.split_hash, split, size, channels)
    return make_dataset(
        files,
        labels,
        size=size,
        channels=channels,
        batch_size=batch_size,
        training=training,
        cache=cache,
        seed=seed,
        augment=augment,
        repeat=repeat,
        sources=data.sources(split) if training else None,
    )
