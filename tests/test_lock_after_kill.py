"""store_run_lock after a hard kill (issue 14 §0): the next run on the store must not wait for hours.

Each holder is a real flow in its own process group, as a worker's flow run is; it is killed with
SIGKILL on its whole group (the run and, without PREFECT_API_URL, the temporary Prefect server it
started), as an OOM kill does. Then another run on the same store, with the same Prefect home,
must get the store within a minute.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tasks.locks import store_lock_name
from tests.conftest import REPO

# Real SIGKILLs of runs on temporary and long-lived Prefect servers: minutes, so not in the quick loop.
pytestmark = pytest.mark.slow

# A flow that takes the store lock, records when it entered (and its flow run's name), holds the
# lock until `release_when` exists (or 120 s pass), and records when it left. LOCK_KW (JSON) adds
# keyword arguments of store_run_lock.
HOLDER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path
    # Ctrl-C as in a terminal: a job a non-interactive shell starts with `&` (a CI script run in the
    # background) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from prefect import flow
    from prefect.runtime import flow_run
    from tasks.locks import store_run_lock

    @flow(name="hold-store-lock")
    def hold(store: str, record: str, release_when: str) -> None:
        kw = json.loads(os.environ.get("LOCK_KW", "{}"))
        Path(record + ".waiting").write_text(
            json.dumps({"run": flow_run.get_name(), "id": flow_run.get_id(), "pid": os.getpid()})
        )
        with store_run_lock(store, timeout_s=float(os.environ.get("LOCK_TIMEOUT_S", "90")), **kw):
            Path(record + ".entered").write_text(str(time.time()))
            deadline = time.monotonic() + 120
            while not Path(release_when).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        Path(record).write_text(json.dumps({"left": time.time()}))

    store, record, release_when = sys.argv[1:]
    hold(store, record, release_when)
    """
)


class Holders:
    """Holder processes of one test, each in its own process group, sharing one Prefect home."""

    def __init__(self, tmp_path: Path, env: dict[str, str]):
        self.dir = tmp_path
        self.env = {
            **env,
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        self.script = tmp_path / "holder.py"
        self.script.write_text(HOLDER)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, store: str, release_when: Path | None = None, **env: str) -> subprocess.Popen:
        release = release_when or self.dir / f"{name}.release"
        log = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115 (the child keeps its own copy of the fd)
        proc = subprocess.Popen(
            [sys.executable, str(self.script), store, str(self.dir / name), str(release)],
            env={**self.env, **env},
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, with the temporary server it may start
        )
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.dir / f"{name}.log").read_text(errors="replace")

    def wait_file(self, path: Path, *alive: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            for n in alive:
                assert self.procs[n].poll() is None, f"{n} exited early waiting for {path.name}:\n{self.log(n)[-3000:]}"
            assert time.monotonic() < deadline, f"{path.name} never appeared"
            time.sleep(0.05)

    def wait_log(self, name: str, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            assert self.procs[name].poll() is None, f"{name} exited before logging {text!r}:\n{self.log(name)[-3000:]}"
            assert time.monotonic() < deadline, f"{name} never logged {text!r}:\n{self.log(name)[-3000:]}"
            time.sleep(0.1)

    def kill_group(self, name: str, sig: int = signal.SIGKILL) -> None:
        os.killpg(self.procs[name].pid, sig)
        self.procs[name].wait(30)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)


def _env_without_api() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}


def _kill_holder_then_take_store(holders: Holders, store: str, **env: str) -> float:
    """Kill a holder's group while it holds the store; the seconds the next run takes to get it."""
    first = holders.start("first", store, **env)
    holders.wait_file(holders.dir / "first.entered", "first")
    holders.kill_group("first")
    assert first.returncode == -signal.SIGKILL
    (holders.dir / "second.release").touch()  # leaves as soon as it holds the store
    t0 = time.time()
    second = holders.start("second", store, **env)
    rc = second.wait(150)
    assert rc == 0, holders.log("second")[-4000:]
    took = float((holders.dir / "second.entered").read_text()) - t0
    assert "took over the slot of dead flow run" in holders.log("second"), holders.log("second")[-4000:]
    return took


@pytest.mark.timeout(300)
def test_killed_holder_with_temporary_server_frees_the_store(tmp_path: Path):
    """No PREFECT_API_URL: each run starts its own temporary server on one SQLite Prefect home."""
    holders = Holders(tmp_path, {**_env_without_api(), "PREFECT_HOME": str(tmp_path / "prefect-home")})
    try:
        took = _kill_holder_then_take_store(holders, str(tmp_path / "store"))
    finally:
        holders.stop_all()
    print(f"temporary server: the run after the kill held the store {took:.1f}s after it started")
    # Most of it is starting the temporary server; before the fix it waited the full timeout.
    assert took < 60, took


@pytest.mark.timeout(300)
def test_killed_holder_with_long_lived_server_frees_the_store(prefect_cli, tmp_path: Path):
    """A `prefect server start` that outlives the run: the dead run's lease is still on it."""
    holders = Holders(tmp_path, {**os.environ, **prefect_cli.settings})
    store = str(tmp_path / "store")
    try:
        took = _kill_holder_then_take_store(holders, store)
        # Another run after the one that took over: the slot was given back (lease and all).
        (tmp_path / "third.release").touch()
        assert holders.start("third", store, LOCK_TIMEOUT_S="20").wait(90) == 0, holders.log("third")[-3000:]
    finally:
        holders.stop_all()
    print(f"long-lived server: the run after the kill held the store {took:.1f}s after it started")
    assert took < 60, took
    limit = json.loads(prefect_cli.run("gcl", "inspect", store_lock_name(store), "--output", "json").stdout)
    assert (limit["limit"], limit["active_slots"]) == (1, 0), limit


@pytest.mark.timeout(300)
def test_holder_on_another_machine_is_taken_over_when_its_heartbeat_stops(prefect_server, tmp_path: Path):
    """A holder this machine cannot see: alive while its heartbeat moves, dead once it stops."""
    from prefect.settings import PREFECT_API_URL

    holders = Holders(tmp_path, {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()})
    store = str(tmp_path / "store")
    fast = json.dumps({"heartbeat_s": 1.0, "stale_after_s": 6.0})
    try:
        holders.start("remote", store, LOCK_KW=fast, COVID_LOCK_MACHINE_ID="another-machine")
        holders.wait_file(tmp_path / "remote.entered", "remote")
        # Alive: a run here waits its whole timeout, well past `stale_after_s`, and gives up.
        waiter = holders.start("waiter", store, LOCK_KW=fast, LOCK_TIMEOUT_S="12")
        assert waiter.wait(90) != 0
        assert "TimeoutError" in holders.log("waiter") and not (tmp_path / "waiter.entered").exists()
        # Dead: its heartbeat stops, and the next run takes the store over once it has been still 6 s.
        holders.kill_group("remote")
        (tmp_path / "next.release").touch()
        t0 = time.time()
        assert holders.start("next", store, LOCK_KW=fast).wait(90) == 0, holders.log("next")[-3000:]
        took = float((tmp_path / "next.entered").read_text()) - t0
    finally:
        holders.stop_all()
    assert "took over the slot of dead flow run" in holders.log("next")
    assert 6 <= took < 30, took


@pytest.mark.timeout(300)
def test_a_waiting_run_reports_the_holder_and_stops_on_sigterm_sigint_and_cancellation(prefect_server, tmp_path: Path):
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelling

    holders = Holders(tmp_path, {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()})
    store = str(tmp_path / "store")
    try:
        holders.start("holder", store)
        holders.wait_file(tmp_path / "holder.entered", "holder")
        holder = json.loads((tmp_path / "holder.waiting").read_text())
        for name, stop in (("term", signal.SIGTERM), ("int", signal.SIGINT), ("cancel", None)):
            waiter = holders.start(name, store)
            # Reported at once (and then every REPORT_EVERY_S): the holder's run, pid and since when.
            holders.wait_log(name, f"is held by flow run '{holder['run']}'")
            line = next(x for x in holders.log(name).splitlines() if "is held by" in x)
            assert f"pid {holder['pid']} on " in line and " since " in line, line
            run_id = UUID(json.loads((tmp_path / f"{name}.waiting").read_text())["id"])
            t0 = time.monotonic()
            if stop is None:  # cancelled in the UI, with no worker to kill the process
                with get_client(sync_client=True) as client:
                    client.set_flow_run_state(run_id, Cancelling(), force=True)
            else:
                os.kill(waiter.pid, stop)
            waiter.wait(30)
            assert time.monotonic() - t0 < 10, f"{name} took {time.monotonic() - t0:.1f}s to stop"
            assert waiter.returncode != 0 and not (tmp_path / f"{name}.entered").exists()
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(run_id).state
            assert state.is_final() and (stop is not None or state.is_cancelled()), (name, state)
        # The holder was never disturbed, and gives the store back: slot free, record gone.
        assert holders.procs["holder"].poll() is None
        (tmp_path / "holder.release").touch()
        assert holders.procs["holder"].wait(60) == 0, holders.log("holder")[-3000:]
    finally:
        holders.stop_all()
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(store_lock_name(store))
        assert (limit.limit, limit.active_slots) == (1, 0)
        assert client.read_variable_by_name(store_lock_name(store)) is None


# What store_run_lock did before holder records: the slot alone, under Prefect's `concurrency`.
OLD_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from prefect.concurrency.sync import concurrency
    from tasks.locks import ensure_store_limit, store_lock_name

    name = store_lock_name(sys.argv[1])
    ensure_store_limit(name)
    with concurrency(name, occupy=1, lease_duration=300, strict=True):
        Path(sys.argv[2]).touch()
        time.sleep(300)
    """
)


@pytest.mark.timeout(300)
def test_a_slot_left_by_a_killed_run_of_the_old_version_is_taken_over(tmp_path: Path):
    """The stores the bug already locked: the slot taken, no holder record, the temporary server gone."""
    holders = Holders(tmp_path, {**_env_without_api(), "PREFECT_HOME": str(tmp_path / "prefect-home")})
    store = str(tmp_path / "store")
    (tmp_path / "old.py").write_text(OLD_HOLDER)
    old = subprocess.Popen(
        [sys.executable, str(tmp_path / "old.py"), store, str(tmp_path / "old.entered")],
        env=holders.env,
        cwd=REPO,
        start_new_session=True,
    )
    holders.procs["old"] = old
    (tmp_path / "next.release").touch()
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "old.entered").exists():
            assert old.poll() is None and time.monotonic() < deadline, "the old-style holder never held the store"
            time.sleep(0.05)
        holders.kill_group("old")
        t0 = time.time()
        nxt = holders.start("next", store, LOCK_KW=json.dumps({"stale_after_s": 5.0}))
        assert nxt.wait(120) == 0, holders.log("next")[-3000:]
    finally:
        holders.stop_all()
    took = float((tmp_path / "next.entered").read_text()) - t0
    assert "took over the slot of a holder without a record" in holders.log("next"), holders.log("next")[-3000:]
    assert 5 <= took < 60, took
