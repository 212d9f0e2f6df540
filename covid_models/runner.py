"""Training a model in its own process.

The retraining flow trains several models at once; each in its own Python process keeps
TensorFlow's global state (seeds, precision policy, thread pools, memory) apart, shares the
CPU cores out explicitly, and gives memory back when the model is done.

The child never outlives its caller: a timeout, an exception or a cancellation in the caller
(KeyboardInterrupt, a Prefect TerminationSignal, an exception raised into the calling thread)
kills the child's whole process group, and on Linux the child is also killed by the kernel
when the thread that started it dies (``PR_SET_PDEATHSIG``), so a SIGKILLed flow leaves no
orphaned training behind.
"""

from __future__ import annotations

import atexit
import codecs
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from covid_models.train import TrainConfig, TrainResult

log = logging.getLogger(__name__)


_NOISE = ("W0000", "I0000", "E0000", "WARNING: All log messages")
_KILL_GRACE_S = 5.0  # between SIGTERM and SIGKILL of the child's process group
_NEWLINE = re.compile(r"\r\n|\r|\n")  # universal newlines, as a text-mode pipe splits them
_POLL_S = 0.5  # how often the caller's loop checks the deadline while no line arrives

# Started as `python -c _BOOTSTRAP ...` instead of `python -m covid_models.train ...`: the child
# first asks the kernel to SIGKILL it when its parent (thread) dies, then runs the module as -m would.
_BOOTSTRAP = """\
import ctypes, os, runpy, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass  # not Linux: the caller's handlers still kill the child
# The kernel's signal follows the thread that started us; one that died before the prctl above
# sent nothing, so look for it (and for the parent process) now.
parent, thread = os.environ.get("COVID_TRAIN_PARENT_PID"), os.environ.get("COVID_TRAIN_PARENT_TID")
if parent and (os.getppid() != int(parent) or (thread and not os.path.exists(f"/proc/{parent}/task/{thread}"))):
    sys.exit("the caller died before training started")
runpy.run_module("covid_models.train", run_name="__main__", alter_sys=True)
"""


class TrainingFailed(RuntimeError):
    """The training process exited with an error."""


class TrainingTimeout(TrainingFailed):
    """The training process ran past its time limit and was killed."""

    def __init__(self, model: str, limit_s: float, pid: int):
        super().__init__(f"training {model} timed out after {limit_s:g} s (its time limit); process {pid} killed")
        self.model, self.limit_s, self.pid = model, limit_s, pid

    def __reduce__(self):  # pickled into Prefect states and across Dask workers
        return type(self), (self.model, self.limit_s, self.pid)


# Every live child, so that a cancelled caller (or the interpreter exiting) can kill them all.
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def _kill_group(proc: subprocess.Popen, grace_s: float = _KILL_GRACE_S) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``grace_s``, and reap the child."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)  # the child leads its own session: its group id is its pid
        except ProcessLookupError:
            break
        except PermissionError:  # pragma: no cover - group already gone and the id reused
            proc.send_signal(sig)
        try:
            proc.wait(wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    log.warning("killed training process %d (exit code %s)", proc.pid, proc.returncode)


def kill_all_trainings() -> int:
    """Kill every training process started by this process; returns how many were alive.

    For a caller that is being cancelled while other threads wait on their trainings (the
    Prefect fan-out on a TerminationSignal): their loops then see the child gone and return.
    """
    with _LIVE_LOCK:
        procs = list(_LIVE)
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        _kill_group(p, grace_s=1.0)
    return len(alive)


atexit.register(kill_all_trainings)


class _LineReader:
    """The child's output, read in the calling thread: lines as universal newlines split them.

    No reader thread: Prefect cancels and times out a sync task by raising an exception into its
    thread, and on CPython 3.11 a thread being started carries its creator's ident for a moment, so
    that exception can land in the new thread instead and leave the caller waiting on it forever.
    Polling the pipe with ``select`` also returns to Python code every ``_POLL_S``, where such an
    exception is raised.
    """

    def __init__(self, fd: int):
        self.fd, self.done = fd, False
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        self._buf = ""

    def read(self, timeout: float) -> list[str]:
        """The complete lines that arrived within ``timeout`` seconds; at the end, the last partial one."""
        if self.done or not select.select([self.fd], [], [], max(0.0, timeout))[0]:
            return []
        try:
            chunk = os.read(self.fd, 1 << 16)
        except OSError:  # the pipe broke under us (the child killed)
            chunk = b""
        self._buf += self._decode(chunk, final=not chunk)
        if not chunk:
            self.done = True
            cut = len(self._buf)
        else:  # up to the last line end; a final \r may be half of a \r\n
            body = self._buf[:-1] if self._buf.endswith("\r") else self._buf
            cut = max(body.rfind("\n"), body.rfind("\r")) + 1
        text, self._buf = self._buf[:cut], self._buf[cut:]
        lines = _NEWLINE.split(text)
        return lines[:-1] if lines[-1] == "" else lines  # text ends with a line end: no line after it


def train_in_subprocess(
    cfg: TrainConfig,
    *,
    threads: int | None = None,
    on_line: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> TrainResult:
    """Run ``covid_models.train`` for ``cfg`` in a child process; stream its output lines to ``on_line``.

    ``threads`` caps TensorFlow's and BLAS's thread pools (cores / models trained at once).
    ``timeout`` (seconds, from the start) is a hard deadline: past it the child's process group
    is killed and :class:`TrainingTimeout` raised. ``on_line`` runs in the calling thread (so a
    Prefect logger or artifact call sees the task's context); an exception it raises is logged
    once and ignored, since a progress display must never kill a training.
    """
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        "COVID_TRAIN_PARENT_PID": str(os.getpid()),
        "COVID_TRAIN_PARENT_TID": str(threading.get_native_id()),
    }
    if threads:
        for var in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
        env["TF_NUM_INTEROP_THREADS"] = "1" if threads == 1 else "2"
    with tempfile.TemporaryDirectory(prefix=f"train-{cfg.model}-") as tmp:
        config, result = Path(tmp) / "config.json", Path(tmp) / "result.json"
        config.write_text(json.dumps(asdict(cfg)))
        cmd = [sys.executable, "-c", _BOOTSTRAP, "--config", str(config), "--result-file", str(result)]
        tail: list[str] = []
        callback_failed = False
        limit = float(timeout or 0.0)
        deadline = None if timeout is None else time.monotonic() + limit
        proc: subprocess.Popen | None = None
        try:
            # Started and registered under the lock: kill_all_trainings waits for a start under way
            # instead of missing it. An exception raised into this thread mid-start leaves ``proc``
            # unset; the child then dies with the thread (the bootstrap's PR_SET_PDEATHSIG and check).
            with _LIVE_LOCK:
                proc = subprocess.Popen(
                    cmd,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: killed as a whole, apart from ours
                )
                _LIVE.add(proc)
            assert proc.stdout is not None
            reader = _LineReader(proc.stdout.fileno())
            while not reader.done:
                wait = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
                if wait <= 0:
                    _kill_group(proc)
                    raise TrainingTimeout(cfg.model, limit, proc.pid)
                for line in reader.read(wait):
                    line = line.rstrip()
                    tail = (tail + [line])[-40:]
                    if on_line is not None:
                        try:
                            on_line(line)
                        except Exception:
                            if not callback_failed:  # once: a broken callback would fail on every line
                                log.exception("output callback of training %s failed; training goes on", cfg.model)
                            callback_failed = True
            # stdout closed: the child is exiting; the deadline still holds while it does.
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                code = proc.wait(remaining)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise TrainingTimeout(cfg.model, limit, proc.pid) from None
        except BaseException:
            if proc is not None:
                _kill_group(proc)  # an exception, KeyboardInterrupt or cancellation in the caller
            raise
        finally:
            if proc is not None:
                with _LIVE_LOCK:
                    _LIVE.discard(proc)
                if proc.stdout is not None:
                    proc.stdout.close()
        if code != 0 or not result.exists():
            useful = [t for t in tail if not t.startswith(_NOISE)]
            why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            raise TrainingFailed(
                f"training {cfg.model} failed ({why}): {useful[-1] if useful else ''}\n" + "\n".join(useful[-20:])
            )
        return TrainResult(**json.loads(result.read_text()))
