"""store_run_lock: one retraining per store at a time, checked with flows in separate processes.

Each flow runs in its own Python process against the temporary Prefect server, as two workers
would, and records when it entered and left the lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tasks.locks import canonical_store_uri, ensure_store_limit, store_lock_name, store_run_lock
from tests.conftest import REPO

# A flow that holds the store lock until the file `release_when` exists (or 60 s pass), records
# its times, and fails on demand.
HOLDER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from prefect import flow
    from tasks.locks import store_run_lock

    @flow(name="hold-store-lock")
    def hold(store: str, record: str, release_when: str, fail: bool) -> None:
        Path(record + ".waiting").write_text(str(time.time()))
        with store_run_lock(store, timeout_s=90):
            entered = time.time()
            Path(record + ".entered").write_text(str(entered))
            deadline = time.monotonic() + 60
            while not Path(release_when).exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
            Path(record).write_text(json.dumps({"entered": entered, "left": time.time()}))
            if fail:
                raise RuntimeError("retraining failed on purpose")

    store, record, release_when, fail = sys.argv[1:]
    hold(store, record, release_when, fail == "fail")
    """
)


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _start(tmp_path: Path, name: str, store: str, release_when: Path, fail: bool = False) -> subprocess.Popen:
    script = tmp_path / "holder.py"
    if not script.exists():
        script.write_text(HOLDER)
    env = {**os.environ, "PREFECT_API_URL": _api_url(), "PYTHONPATH": str(REPO)}
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 (the child keeps its own copy of the fd)
    args = [sys.executable, str(script), store, str(tmp_path / name), str(release_when), "fail" if fail else "ok"]
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _wait_file(path: Path, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, f"a holder exited early waiting for {path.name}"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.1)


def _record(tmp_path: Path, name: str) -> dict[str, float]:
    return json.loads((tmp_path / name).read_text())


def test_names_are_stable_per_store(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert store_lock_name(".store") == store_lock_name("./.store/") == store_lock_name(f"file://{tmp_path}/.store")
    assert store_lock_name("gs://b/p") == store_lock_name("gs://b/p/") != store_lock_name("gs://b/q")
    assert store_lock_name("gs://b/p").startswith("retrain-store-") and len(store_lock_name("gs://b/p")) == 26
    assert canonical_store_uri(".store") == str(tmp_path / ".store")


def _wait_log(path: Path, text: str, procs: list, timeout: float = 120.0) -> None:
    """Until ``path`` contains ``text`` (a waiting run's report of the holder), while ``procs`` run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        assert all(p.poll() is None for p in procs), path.read_text(errors="replace")[-3000:]
        time.sleep(0.1)
    pytest.fail(f"{path.name} never said {text!r}")


@pytest.mark.timeout(300)
def test_one_run_per_store_released_on_failure_other_stores_concurrent(prefect_server, tmp_path: Path):
    from prefect.client.orchestration import get_client

    same, other_a, other_b = (str(tmp_path / s) for s in ("store-same", "store-a", "store-b"))
    go_first = tmp_path / "release-first"
    # `first` holds the lock of one store until `second` is waiting for it, then fails.
    first = _start(tmp_path, "first", same, go_first, fail=True)
    _wait_file(tmp_path / "first.entered", [first])
    second = _start(tmp_path, "second", same, tmp_path / "second.entered")  # leaves at once
    # Two other stores: each holds its lock until the other has entered its own.
    a = _start(tmp_path, "a", other_a, tmp_path / "b.entered")
    b = _start(tmp_path, "b", other_b, tmp_path / "a.entered")
    procs = [first, second, a, b]
    # Only `first` and `second` must still be running: `a` and `b` may already be done.
    _wait_file(tmp_path / "second.waiting", [first, second])
    # `second` has asked the server for the slot `first` holds, and been told who holds it:
    _wait_log(tmp_path / "second.log", "is held by", [first, second])
    assert not (tmp_path / "second.entered").exists(), "two runs on one store held the lock at once"
    go_first.touch()
    codes = {n: p.wait(180) for n, p in zip(("first", "second", "a", "b"), procs, strict=True)}
    logs = {n: (tmp_path / f"{n}.log").read_text(errors="replace")[-3000:] for n in codes}

    assert codes["first"] != 0 and "retraining failed on purpose" in logs["first"], logs["first"]
    assert (codes["second"], codes["a"], codes["b"]) == (0, 0, 0), logs
    r1, r2 = _record(tmp_path, "first"), _record(tmp_path, "second")
    # Strictly one after the other, and the failed run's slot came back at once (not by lease expiry).
    assert r2["entered"] >= r1["left"], (r1, r2)
    assert r2["entered"] - r1["left"] < 30, (r1, r2)
    ra, rb = _record(tmp_path, "a"), _record(tmp_path, "b")
    assert max(ra["entered"], rb["entered"]) < min(ra["left"], rb["left"]), "different stores waited for each other"

    # Every slot is free again, and this process gets the store at once.
    with get_client(sync_client=True) as client:
        for store in (same, other_a, other_b):
            limit = client.read_global_concurrency_limit_by_name(store_lock_name(store))
            assert (limit.limit, limit.active_slots) == (1, 0)
            assert client.read_variable_by_name(store_lock_name(store)) is None  # no holder record left
    t0 = time.monotonic()
    with store_run_lock(same, timeout_s=10) as name:
        assert name == store_lock_name(same)
    assert time.monotonic() - t0 < 10


def test_existing_limit_is_kept_and_a_busy_store_times_out(prefect_server, tmp_path: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    store = str(tmp_path / "store")
    name = store_lock_name(store)
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    ensure_store_limit(name)  # already there: no error, left as it is
    # The same store again, from this process, while the slot is held: it must wait, then give up.
    with store_run_lock(store, timeout_s=30), pytest.raises(TimeoutError), store_run_lock(store, timeout_s=2):
        pass
