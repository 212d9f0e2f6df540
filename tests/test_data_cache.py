"""The on-disk image cache survives a filler killed mid-fill, and never races a live one.

A real child process fills the cache of a real split, slowly; while it lives, this process reads
uncached and leaves its files alone; once it is SIGKILLed, this process removes what it left and
fills the cache itself.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from covid_models.data import FILL_LOCK_SUFFIX, load_split_data, make_dataset
from tests.conftest import REPO

SIZE = 32

# The child: the same pipeline as make_dataset, one second per image before the cache, so it is
# still filling when it is killed.
SLOW_FILLER = textwrap.dedent(
    """
    import json, sys, time
    import tensorflow as tf
    from covid_models.data import _filled_cache, decode_resize

    files, labels, prefix, size = json.load(open(sys.argv[1]))

    def slow(x):
        time.sleep(1.0)
        return x

    ds = tf.data.Dataset.from_tensor_slices((files, labels))
    ds = ds.map(lambda p, y: (decode_resize(p, size, 1), y))
    ds = ds.map(lambda x, y: (tf.py_function(slow, [x], tf.uint8), y))
    ds = ds.map(lambda x, y: (tf.ensure_shape(x, (size, size, 1)), y))
    _filled_cache(ds, prefix)
    print("finished filling", flush=True)
    """
)


def _collect(ds) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    return np.concatenate(xs), np.concatenate(ys)


def _wait_until_filling(child: subprocess.Popen, prefix: str, log: Path, timeout: float = 120) -> None:
    """Until tf.data's lock file exists and the fill lock names the child."""
    deadline = time.monotonic() + timeout
    fill_lock = Path(prefix + FILL_LOCK_SUFFIX)
    while True:
        assert child.poll() is None, f"the filler exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the filler never started filling:\n{log.read_text()[-3000:]}"
        tf_locks = list(Path(prefix).parent.glob(Path(prefix).name + "_*.lockfile"))
        if tf_locks and fill_lock.exists() and str(child.pid) in fill_lock.read_text():
            return
        time.sleep(0.1)


def test_killed_filler_is_cleaned_up_and_a_live_one_is_left_alone(small_split, tmp_path: Path, caplog):
    data = load_split_data(small_split)
    files, labels = data.files("train")
    prefix = str(tmp_path / "tfdata" / "train")
    Path(prefix).parent.mkdir(parents=True)
    job = tmp_path / "job.json"
    job.write_text(json.dumps([files, labels.tolist(), prefix, SIZE]))
    script = tmp_path / "filler.py"
    script.write_text(SLOW_FILLER)
    log = tmp_path / "filler.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(log, "wb") as out:
        child = subprocess.Popen([sys.executable, str(script), str(job)], cwd=REPO, env=env, stdout=out, stderr=out)
    try:
        _wait_until_filling(child, prefix, log)
        tf_lock = next(Path(prefix).parent.glob("train_*.lockfile"))

        # A live filler: read uncached, touch nothing of it.
        with caplog.at_level(logging.WARNING, logger="covid_models.data"):
            x, y = _collect(make_dataset(files, labels, size=SIZE, batch_size=8, cache=prefix))
        assert len(y) == len(files)
        assert "being written by" in caplog.text and str(child.pid) in caplog.text, caplog.text
        assert tf_lock.exists() and not Path(prefix + ".index").exists()
        assert child.poll() is None, "the filler should still be filling (it takes one second per image)"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert child.returncode == -signal.SIGKILL
    assert tf_lock.exists(), "a killed filler leaves tf.data's lock file behind"

    # The filler is dead: its leftovers go, and this process fills the cache.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="covid_models.data"):
        cached = _collect(make_dataset(files, labels, size=SIZE, batch_size=8, cache=prefix))
    assert "interrupted fill" in caplog.text and "reading uncached" not in caplog.text, caplog.text
    assert Path(prefix + ".index").exists()
    assert not list(Path(prefix).parent.glob("train_*")), "partial files of the killed fill remain"
    np.testing.assert_array_equal(cached[1], y)
    np.testing.assert_array_equal(cached[0], x)

    # And it really is the cache that serves now: with the source images gone, reading still works.
    gone = [Path(f).rename(Path(f).with_suffix(".moved")) for f in files]
    try:
        again = _collect(make_dataset(files, labels, size=SIZE, batch_size=8, cache=prefix))
    finally:
        for moved, f in zip(gone, files, strict=True):
            moved.rename(f)
    np.testing.assert_array_equal(again[0], x)


def test_no_lock_left_after_a_normal_fill(small_split, tmp_path: Path):
    data = load_split_data(small_split)
    files, labels = data.files("val")
    prefix = str(tmp_path / "val")
    _collect(make_dataset(files, labels, size=SIZE, batch_size=8, cache=prefix))
    assert Path(prefix + ".index").exists()
    assert not list(tmp_path.glob("val_*")), "a finished fill leaves no lock or partial files"
    # The fill lock is free again: a second fill of a fresh prefix in this process is not refused.
    from covid_models.data import _fill_lock

    with _fill_lock(prefix) as holder:
        assert holder is None
