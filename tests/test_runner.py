"""The per-model training process never outlives its caller, and never dies of a broken progress display.

Real training processes (``covid_models.train`` on a small real split): timeouts, exceptions and
cancellations in the caller must kill them, checked through /proc.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from covid_models.runner import TrainingFailed, TrainingTimeout, kill_all_trainings, train_in_subprocess
from covid_models.train import TrainConfig
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")


def _state(pid: int) -> str | None:
    """A process's state letter, or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")  # a zombie no init reaps is dead too


def _trainings(parent: int) -> list[int]:
    """Pids of the training processes whose parent is ``parent``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"covid_models.train" in cmd and _alive(int(d.name)):
            found.append(int(d.name))
    return found


def _wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"no {what} after {timeout}s")


def _cfg(split: str, tmp_path: Path, epochs: int) -> TrainConfig:
    # A tiny custom CNN: the endless variants run until killed, the short one trains for real.
    return TrainConfig(
        model="custom_cnn",
        split=split,
        out=str(tmp_path / "out"),
        input_size=32,
        epochs=epochs,
        patience=0,
        weights="none",
        max_per_class=4,
        cache_dir=str(tmp_path / "cache"),
    )


def test_timeout_is_a_real_deadline_that_kills_the_child(small_split, tmp_path):
    cfg = _cfg(small_split, tmp_path, epochs=100_000)  # would run for hours
    pids: list[int] = []

    def on_line(line: str) -> None:
        pids.extend(p for p in _trainings(os.getpid()) if p not in pids)

    t0 = time.monotonic()
    with pytest.raises(TrainingTimeout, match=r"training custom_cnn timed out after 8 s") as exc:
        train_in_subprocess(cfg, threads=1, timeout=8, on_line=on_line)
    elapsed = time.monotonic() - t0
    assert 8 <= elapsed < 8 + 7, elapsed  # the deadline, plus at most the SIGTERM grace
    assert exc.value.model == "custom_cnn" and exc.value.limit_s == 8
    assert pids == [exc.value.pid]  # the child did run (and wrote lines) ...
    assert not _alive(exc.value.pid)  # ... and is gone
    assert not _trainings(os.getpid())


def test_a_failing_output_callback_never_stops_the_training(small_split, tmp_path, caplog):
    cfg = _cfg(small_split, tmp_path, epochs=2)
    seen: list[str] = []

    def on_line(line: str) -> None:
        seen.append(line)
        raise ConnectionError("the Prefect API is down")

    with caplog.at_level(logging.ERROR, logger="covid_models.runner"):
        result = train_in_subprocess(cfg, threads=1, on_line=on_line)
    assert result.status == "trained" and result.epochs == 2
    assert (tmp_path / "out" / "metrics.json").exists()
    assert sum("epoch" in line and "done" in line for line in seen) == 2  # called for every line after failing
    failures = [r for r in caplog.records if "output callback of training custom_cnn failed" in r.getMessage()]
    assert len(failures) == 1  # logged once, not once per line


def test_keyboard_interrupt_in_the_caller_kills_the_child(small_split, tmp_path):
    cfg = _cfg(small_split, tmp_path, epochs=100_000)
    pids: list[int] = []

    def on_line(line: str) -> None:
        pids.extend(_trainings(os.getpid()))
        raise KeyboardInterrupt  # Ctrl-C while the training runs

    with pytest.raises(KeyboardInterrupt):
        train_in_subprocess(cfg, threads=1, on_line=on_line, timeout=300)
    assert len(pids) == 1
    assert not _alive(pids[0])


def _training_in_a_thread(cfg) -> tuple[threading.Thread, dict[str, BaseException], int]:
    """A long training started from another thread: (that thread, where its exception lands, child pid)."""
    outcome: dict[str, BaseException] = {}

    def call() -> None:
        try:
            train_in_subprocess(cfg, threads=1, timeout=300)
        except BaseException as e:
            outcome["error"] = e

    before = set(_trainings(os.getpid()))
    caller = threading.Thread(target=call)
    caller.start()
    (pid,) = _wait_for(lambda: sorted(set(_trainings(os.getpid())) - before), 30, "training process")
    return caller, outcome, pid


def test_an_exception_raised_into_the_calling_thread_kills_the_child(small_split, tmp_path):
    """How Prefect cancels and times out a sync task: an exception raised asynchronously in its thread."""
    caller, outcome, pid = _training_in_a_thread(_cfg(small_split, tmp_path, epochs=100_000))
    # One thread state: the caller starts no thread of its own that could share its ident.
    assert ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(caller.ident), ctypes.py_object(RuntimeError)) == 1
    caller.join(60)  # the kill's grace and wait: at most 35 s
    assert not caller.is_alive()
    assert isinstance(outcome["error"], RuntimeError)
    # Killed by the caller, or (when the exception landed mid-start) by the kernel as the thread died.
    _wait_for(lambda: not _alive(pid), 10, "end of the training")


def test_kill_all_trainings_ends_waiting_callers(small_split, tmp_path):
    caller, outcome, pid = _training_in_a_thread(_cfg(small_split, tmp_path, epochs=100_000))
    assert kill_all_trainings() == 1  # seen even when its start is still under way
    caller.join(60)
    assert isinstance(outcome["error"], TrainingFailed) and "killed by signal" in str(outcome["error"])
    assert not _alive(pid)


def test_a_sigkilled_caller_takes_its_training_along(small_split, tmp_path):
    """No handler runs on SIGKILL: the kernel's parent-death signal must end the child. (Keras' own
    progress output would die of the broken pipe; ``verbose=0`` leaves only logging, which doesn't.)"""
    cfg = replace(_cfg(small_split, tmp_path, epochs=100_000), verbose=0)
    (tmp_path / "cfg.json").write_text(json.dumps(asdict(cfg)))
    script = textwrap.dedent(
        f"""
        import json, pathlib
        from covid_models.runner import train_in_subprocess
        from covid_models.train import TrainConfig
        cfg = TrainConfig(**json.loads(pathlib.Path({str(tmp_path / "cfg.json")!r}).read_text()))
        train_in_subprocess(cfg, on_line=lambda line: print(line, flush=True))
        """
    )
    out = tmp_path / "caller.log"
    with open(out, "wb") as log:
        caller = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        (pid,) = _wait_for(lambda: _trainings(caller.pid), 60, "training process")
        # Kill mid-training (epochs are being logged), not while TensorFlow still imports.
        _wait_for(lambda: "epoch 2/" in out.read_text(errors="replace"), 120, "second epoch")
        caller.send_signal(signal.SIGKILL)
        caller.wait(10)
        _wait_for(lambda: not _alive(pid), 10, "end of the orphaned training")
    finally:
        caller.kill()
        caller.wait()


def test_output_lines_split_as_universal_newlines_across_reads():
    """The caller reads the pipe itself: a \\r\\n or a UTF-8 character split between reads is one line end,
    one character; a last line without a line end still arrives."""
    from covid_models.runner import _LineReader

    r, w = os.pipe()
    reader, got = _LineReader(r), []
    for chunk in (b"epoch 1\r", b"\nbar\rdone", b" \xc3", b"\xa9\n", b"tail"):
        os.write(w, chunk)
        got += reader.read(5)
    os.close(w)
    while not reader.done:
        got += reader.read(5)
    os.close(r)
    assert got == ["epoch 1", "bar", "done é", "tail"]
