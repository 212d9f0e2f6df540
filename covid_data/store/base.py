"""What every part of the store shares: its errors, MD5 checksums, write results and the fault hook.

Fault injection: with ``COVID_FAULT_KILL_AFTER`` = N and ``COVID_FAULT_COUNTER`` = a file, the
process that makes the N-th store write (counted across processes in that file) SIGKILLs itself
right after it. The crash-safety tests use it to stop the pipeline at every write boundary.
With ``COVID_FAULT_LOG`` = a file as well, each write appends its key there (a line per write, in
count order): the tests learn which write completes which unit. ``COVID_FAULT_KILL_GROUP=1`` kills
the writer's whole process group instead, and the group of the run's first writer (a flow run with its
children, as an OOM kill does, even when the N-th write is a training child's, in a session of its own).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


class StoreError(RuntimeError):
    """Base class for store failures."""


class ObjectExistsError(StoreError):
    """Raised instead of replacing an existing object whose content differs."""


class StoreUnavailableError(StoreError):
    """The store could not be reached (after retries)."""


class UnitCompleteError(StoreError):
    """Raised instead of writing into a unit whose completion marker exists."""


class UnitConflictError(StoreError):
    """An object this attempt wrote into a unit was replaced by another writer before completion."""


def fault_hook(key: str = "") -> None:
    """Count this store write of ``key``; SIGKILL this process if it is the N-th (see the module docstring)."""
    limit = os.environ.get("COVID_FAULT_KILL_AFTER")
    counter = os.environ.get("COVID_FAULT_COUNTER")
    if not limit or not counter:
        return
    if os.environ.get("COVID_FAULT_KILL_GROUP") == "1":
        # The run's group, as its first writer sees it: a training child leads a session of its own, and an
        # OOM kill of the run takes the flow process with it, not the child alone.
        os.environ.setdefault("COVID_FAULT_RUN_PGID", str(os.getpgrp()))
    with open(counter, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # processes of one run share the count
        f.seek(0)
        n = int(f.read().strip() or 0) + 1
        f.seek(0)
        f.truncate()
        f.write(str(n))
        f.flush()
        os.fsync(f.fileno())
        if os.environ.get("COVID_FAULT_LOG"):
            with open(os.environ["COVID_FAULT_LOG"], "a") as log:
                log.write(f"{n}\t{key}\n")
    if n == int(limit):
        if os.environ.get("COVID_FAULT_KILL_GROUP") == "1":
            run = int(os.environ["COVID_FAULT_RUN_PGID"])
            if run != os.getpgrp():
                os.killpg(run, signal.SIGKILL)
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class PutResult:
    key: str
    written: bool  # False when an identical object was already there
