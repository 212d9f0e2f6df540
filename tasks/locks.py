"""One retraining per store at a time, across workers: a Prefect global concurrency limit per store.

``retrain/weekly`` and ``retrain/adhoc`` are separate deployments, so the deployment-level
``concurrency_limit`` of one does not stop the other. Both write the same ``runs/`` and
``champion.json`` of a store, so the ``retrain`` flow holds :func:`store_run_lock` around its body:
a global concurrency limit named after the store (``retrain-store-<12 hex digits>``) with one slot.

The slot cannot say whether its holder lives, and the lease that frees a dead holder's slot lives
in the Prefect server's memory: the temporary server of a run without ``PREFECT_API_URL`` dies with
it (and never expires leases), so a SIGKILLed run used to lock its store for the full 8 hours. So
the holder also keeps a *holder record*, a Prefect variable named like the limit: flow run, pid,
host, since when, lease, and a heartbeat rewritten every ``HEARTBEAT_S``. A run finding the slot
taken waits while the holder lives, and *takes over* the slot of a dead one: at once when it ran on
this machine (same kernel boot and pid namespace) and its process is gone; after ``STALE_AFTER_S``
of an unchanged heartbeat when it ran on another machine; a slot without a record (left by the
previous version, or by a run killed before it wrote its record) after ``STALE_AFTER_S`` with a
temporary server, after ``LEASE_DURATION_S`` + 60 s with a long-lived one (which frees it first).

Taking over leaves the slot's count as it is (the dead run's slot becomes the taker's), so no slot
is freed twice; of the runs that find one dead holder, the one that creates the variable
``<limit>-takeover-<holder's token>`` takes over. A dead holder's lease that a long-lived server
still holds is renewed and kept by the taker, so its expiry cannot free the slot under the taker.
A waiting run logs who holds the store every ``REPORT_EVERY_S``, and stops at once on SIGTERM or
SIGINT, or when its flow run is cancelled. Limits: a live holder on another machine that writes no
heartbeat for ``STALE_AFTER_S`` (frozen, or cut off from the API) is taken over as dead (it logs an
error when it notices); so is a still-running run of the previous version, after the delay above.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, VariableCreate, VariableUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.asyncio import AcquireConcurrencySlotTimeoutError, ConcurrencySlotAcquisitionError
from prefect.context import FlowRunContext
from prefect.exceptions import Abort, MissingContextError, ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelled

log = logging.getLogger(__name__)

LOCK_PREFIX = "retrain-store-"
DEFAULT_TIMEOUT_S = 8 * 3600.0  # longer than a weekly `cpu` retraining; then the waiting run fails
LEASE_DURATION_S = 300.0  # how long a long-lived server keeps a dead holder's slot when nobody takes it over
HEARTBEAT_S = 10.0  # how often the holder rewrites its record (and renews its lease)
STALE_AFTER_S = 45.0  # a heartbeat from another machine unchanged this long: its holder is dead
POLL_S = 2.0  # how often a waiting run asks for the slot again
REPORT_EVERY_S = 30.0  # how often a waiting run logs who holds the store
UNRECORDED_MARGIN_S = 60.0  # after a lease expires, a long-lived server frees its slot within this
# Set by tests to play a holder on another machine; otherwise this machine's kernel boot and pid namespace.
MACHINE_ENV = "COVID_LOCK_MACHINE_ID"


class StoreLockCancelled(Abort):
    """The flow run waiting for the store was cancelled (a ``BaseException``, as Prefect's signals are)."""


def canonical_store_uri(store_uri: str) -> str:
    """The one spelling of a store: ``.store``, ``./.store/`` and ``file:///abs/.store`` are one store."""
    uri = str(store_uri).strip()
    if uri.startswith("gs://"):
        return uri.rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return str(Path(uri).expanduser().resolve())


def store_lock_name(store_uri: str) -> str:
    """The global concurrency limit's name for a store: ``retrain-store-<sha256(canonical uri)[:12]>``.

    A hash, because limit names may not hold ``/`` and a bucket path can be long; the store URI is
    logged beside it, and `prefect gcl ls` shows the slots. The holder record is the Prefect
    variable of the same name (`prefect variable inspect <name>`).
    """
    digest = hashlib.sha256(canonical_store_uri(store_uri).encode()).hexdigest()[:12]
    return LOCK_PREFIX + digest


def ensure_store_limit(name: str) -> None:
    """Create the one-slot limit ``name`` unless it exists (an existing limit is left as it is); two
    runs creating it at once is harmless (the loser gets ``ObjectAlreadyExists``)."""
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                log.info("created global concurrency limit %s (1 slot)", name)
            except ObjectAlreadyExists:
                pass
            return
        if existing.limit != 1 or not existing.active:
            log.warning(
                "global concurrency limit %s has limit=%s active=%s; one retraining per store needs limit=1, active",
                name,
                existing.limit,
                existing.active,
            )


# --- who holds the slot ---------------------------------------------------------------------------


def _machine_id() -> str:
    """Processes with one machine id see each other's pids: the kernel boot and the pid namespace.
    Without Linux' /proc, no other process shares this one's: its holders go by heartbeat."""
    if os.environ.get(MACHINE_ENV):
        return os.environ[MACHINE_ENV]
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return f"{socket.gethostname()}/{os.getpid()}"


def _process_start(pid: int) -> str | None:
    """The process' start time (clock ticks since boot); ``None`` when no such process runs."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    return None if fields[0] in ("Z", "X") else fields[19]  # Z: killed, not yet reaped


def _holder_alive(record: dict[str, Any]) -> bool | None:
    """Whether the record's process still runs; ``None`` when it is on another machine."""
    if record.get("machine") != _machine_id():
        return None
    start = _process_start(int(record["pid"]))
    return start is not None and (not start or not record.get("proc_start") or start == record["proc_start"])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _ago(iso: str) -> str:
    s = max(0, int((datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _describe(record: dict[str, Any] | None) -> str:
    if record is None:
        return "a holder without a record (a run of an older version, or one killed before it wrote it)"
    run = record.get("flow_run_id")
    who = f"flow run '{record['flow_run_name']}' ({run})" if run else "a process"
    return (
        f"{who}, pid {record['pid']} on {record['host']}, since {record['since']} ({_ago(record['since'])} ago), "
        f"last heartbeat {_ago(record['heartbeat'])} ago"
    )


def _flow_run() -> tuple[str | None, str | None]:
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None, None
    return str(ctx.flow_run.id), ctx.flow_run.name


def _server() -> str:
    """The API this process uses: a URL, or ``ephemeral`` (a temporary server that dies with it)."""
    return PREFECT_API_URL.value() or "ephemeral"


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return log


def _read_record(client, name: str) -> dict[str, Any] | None:
    var = client.read_variable_by_name(name)
    return var.value if var is not None and isinstance(var.value, dict) and var.value.get("token") else None


def _write_record(client, name: str, record: dict[str, Any]) -> None:
    try:
        client.update_variable(VariableUpdate(name=name, value=record))
    except httpx.HTTPStatusError as e:
        if e.response.status_code != 404:
            raise
        try:
            client.create_variable(VariableCreate(name=name, value=record))
        except ObjectAlreadyExists:
            client.update_variable(VariableUpdate(name=name, value=record))


def _delete_variable(client, name: str) -> None:
    with suppress(ObjectNotFound):
        client.delete_variable_by_name(name)


def _new_record(store_uri: str, lease_id: uuid.UUID | None) -> dict[str, Any]:
    run_id, run_name = _flow_run()
    now = _now()
    return {
        "token": uuid.uuid4().hex,
        "store": canonical_store_uri(store_uri),
        "lease_id": str(lease_id) if lease_id else None,
        "server": _server(),
        "flow_run_id": run_id,
        "flow_run_name": run_name,
        "host": socket.gethostname(),
        "machine": _machine_id(),
        "pid": os.getpid(),
        "proc_start": _process_start(os.getpid()) or "",
        "since": now,
        "heartbeat": now,
        "beats": 0,
    }


def _try_take(client, name: str, lease_duration_s: float, holder: ConcurrencyLeaseHolder | None) -> uuid.UUID | None:
    """Take the free slot (its lease id), or ``None`` when it is taken."""
    try:
        response = client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=lease_duration_s, holder=holder
        )
    except httpx.HTTPError as e:
        if isinstance(e, httpx.HTTPStatusError) and e.response.status_code == 423:
            return None
        raise ConcurrencySlotAcquisitionError(f"Unable to acquire the concurrency slot of {name}: {e!r}") from e
    if not (data := response.json()).get("limits"):
        raise ConcurrencySlotAcquisitionError(f"Concurrency limit {name!r} must be created before acquiring slots")
    return uuid.UUID(data["lease_id"])


def _renew(client, lease_id: str, lease_duration_s: float) -> bool:
    """Renew a lease on this process' server: ``False`` when the server does not know it (410)."""
    try:
        client.renew_concurrency_lease(lease_id=uuid.UUID(lease_id), lease_duration=lease_duration_s)
    except httpx.HTTPStatusError as e:
        if e.response.status_code in (404, 410):
            return False
        raise
    return True


def _check_cancelled(client, run_id: str | None) -> None:
    state = client.read_flow_run(uuid.UUID(run_id)).state if run_id else None
    if state is not None and (state.is_cancelling() or state.is_cancelled()):
        message = "cancelled while waiting for the store's retraining slot"
        if state.is_cancelling():  # a run that no worker supervises would stay Cancelling
            state = client.set_flow_run_state(uuid.UUID(run_id), Cancelled(message=message)).state or state
        exc = StoreLockCancelled(f"flow run {run_id} was {message}")
        exc.state = state  # the engine keeps this state instead of proposing Failed
        raise exc


class _StoreLock:
    """One run's hold on a store: waiting, taking over, the heartbeat thread, giving back."""

    def __init__(self, store_uri: str, lease_s: float, heartbeat_s: float, stale_after_s: float, report_s: float):
        self.store, self.name = store_uri, store_lock_name(store_uri)
        self.lease_s, self.heartbeat_s, self.stale_after_s, self.report_s = (
            lease_s,
            heartbeat_s,
            stale_after_s,
            report_s,
        )
        self.logger = _run_logger()
        self.record: dict[str, Any] = {}
        self.lease_lost = False
        self.stop = threading.Event()
        ctx = contextvars.copy_context()  # the heartbeat thread uses the caller's Prefect settings (API URL)
        self.thread = threading.Thread(target=ctx.run, args=(self._beat_loop,), daemon=True, name=self.name)

    def acquire(self, timeout_s: float | None) -> None:
        run_id, _ = _flow_run()
        holder = ConcurrencyLeaseHolder(type="flow_run", id=uuid.UUID(run_id)) if run_id else None
        t0 = time.monotonic()
        seen, seen_at, reported = (), t0, None
        with get_client(sync_client=True) as client:
            while True:
                if (lease_id := _try_take(client, self.name, self.lease_s, holder)) is not None:
                    self.record = _new_record(self.store, lease_id)
                    try:
                        _write_record(client, self.name, self.record)
                    except BaseException:  # not holding a slot whose holder nobody could tell
                        client.release_concurrency_slots_with_lease(lease_id)
                        raise
                    return
                record = _read_record(client, self.name)
                if (key := record and (record["token"], record["beats"])) != seen:
                    seen, seen_at = key, time.monotonic()
                unchanged_s = time.monotonic() - seen_at
                alive = None if record is None else _holder_alive(record)
                # Without a record, a long-lived server may still hold the holder's lease and free the
                # slot when it expires: leave that to it, and take over only what it never frees
                # (leases lost in a restart of the server).
                stale_s = (
                    self.stale_after_s if record or _server() == "ephemeral" else self.lease_s + UNRECORDED_MARGIN_S
                )
                if (alive is False or (alive is None and unchanged_s >= stale_s)) and self._take_over(
                    client, record, unchanged_s
                ):
                    return
                now, held = time.monotonic(), f"store {self.store} ({self.name}) is held by {_describe(record)}"
                if reported is None or now - reported >= self.report_s:
                    reported, limit = now, "ever" if timeout_s is None else f"{timeout_s:.0f}s"
                    self.logger.info("%s; waiting (%.0fs so far, up to %s)", held, now - t0, limit)
                _check_cancelled(client, run_id)
                if timeout_s is not None and now - t0 >= timeout_s:
                    raise AcquireConcurrencySlotTimeoutError(f"{held}, still after {timeout_s:.0f}s")
                time.sleep(POLL_S if timeout_s is None else max(0.0, min(POLL_S, t0 + timeout_s - now)))

    def _take_over(self, client, dead: dict[str, Any] | None, unchanged_s: float) -> bool:
        """Make the dead holder's slot this run's; ``False``: keep waiting."""
        if dead is None:  # a taken slot without a record: claim it by creating the record (one creator wins)
            mine = _new_record(self.store, None)
            try:
                client.create_variable(VariableCreate(name=self.name, value=mine))
            except ObjectAlreadyExists:
                return False
            self.record = mine
            self.logger.warning("store %s (%s): took over the slot of %s", self.store, self.name, _describe(None))
            return True
        lease_id = dead["lease_id"] if dead["server"] != "ephemeral" else None  # temporary servers' die with them
        # A long-lived server may still hold the dead run's lease, and expire it later: keep it. If it
        # does not know it, it expired and freed the slot (now someone else's, whose record is on its
        # way) or lost it in a restart (then nobody frees the slot): wait long enough to tell.
        if lease_id and not _renew(client, lease_id, self.lease_s):
            if unchanged_s < self.stale_after_s:
                return False
            lease_id = None
        claim = f"{self.name}-takeover-{dead['token']}"
        try:
            client.create_variable(VariableCreate(name=claim, value={"at": _now(), "by_pid": os.getpid()}))
        except ObjectAlreadyExists:
            return False  # another waiting run takes it over
        if (current := _read_record(client, self.name)) is None or current["token"] != dead["token"]:
            _delete_variable(client, claim)
            return False
        self.record = {**_new_record(self.store, lease_id and uuid.UUID(lease_id)), "took_over": dead["token"]}
        _write_record(client, self.name, self.record)
        if dead.get("took_over"):  # the dead run had itself taken over: that claim is done with
            _delete_variable(client, f"{self.name}-takeover-{dead['took_over']}")
        self.logger.warning("store %s (%s): took over the slot of dead %s", self.store, self.name, _describe(dead))
        return True

    def _beat_loop(self) -> None:
        """Every ``heartbeat_s``: renew the lease, and rewrite the record while it is still this run's."""
        with get_client(sync_client=True) as client:
            while not self.stop.wait(self.heartbeat_s):
                try:
                    lease_id = self.record.get("lease_id")
                    if lease_id and not self.lease_lost and not _renew(client, lease_id, self.lease_s):
                        self.lease_lost = True
                        self.logger.warning("store lock %s: the server no longer knows lease %s", self.name, lease_id)
                    if (current := _read_record(client, self.name)) is None or current["token"] != self.record["token"]:
                        self.logger.error(
                            "store lock %s: this run's slot was taken over by %s, as its heartbeat stopped; "
                            "two runs may now write the store",
                            self.name,
                            _describe(current),
                        )
                        return
                    self.record = {**self.record, "heartbeat": _now(), "beats": self.record["beats"] + 1}
                    _write_record(client, self.name, self.record)
                except Exception as e:  # a transient API error: the next beat tries again
                    self.logger.warning("store lock %s: heartbeat failed: %r", self.name, e)

    def release(self, held_s: float) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        with get_client(sync_client=True) as client:
            if (current := _read_record(client, self.name)) is None or current["token"] != self.record["token"]:
                # Another run took the slot over: it is theirs now, and theirs to give back.
                self.logger.error("store lock %s: slot not given back, now held by %s", self.name, _describe(current))
                return
            _delete_variable(client, self.name)
            if self.record["lease_id"] and not self.lease_lost:
                client.release_concurrency_slots_with_lease(uuid.UUID(self.record["lease_id"]))
            else:  # no lease (taken over from a dead run), or the server lost it
                client.release_concurrency_slots(names=[self.name], slots=1, occupancy_seconds=max(1.0, held_s))
            if self.record.get("took_over"):
                _delete_variable(client, f"{self.name}-takeover-{self.record['took_over']}")


@contextmanager
def store_run_lock(
    store_uri: str,
    *,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    lease_duration_s: float = LEASE_DURATION_S,
    heartbeat_s: float = HEARTBEAT_S,
    stale_after_s: float = STALE_AFTER_S,
    report_every_s: float = REPORT_EVERY_S,
) -> Iterator[str]:
    """Hold the store's one retraining slot for the ``with`` block; yields the limit's name.

    Waits up to ``timeout_s`` seconds (``None``: for ever) for another run on the same store to
    finish, then raises ``TimeoutError`` (Prefect's ``AcquireConcurrencySlotTimeoutError``); takes
    over the slot of a holder that died (see the module's docstring). Raises
    ``ConcurrencySlotAcquisitionError`` when the Prefect API cannot be reached or the limit cannot
    be used, and ``StoreLockCancelled`` when the flow run is cancelled while it waits. Runs on
    different stores do not wait for each other.
    """
    lock = _StoreLock(store_uri, lease_duration_s, heartbeat_s, stale_after_s, report_every_s)
    ensure_store_limit(lock.name)
    lock.logger.info("waiting for the retraining slot of store %s (%s)", store_uri, lock.name)
    t0 = time.monotonic()
    lock.acquire(timeout_s)
    t_held = time.monotonic()
    lock.logger.info("holding the retraining slot of store %s (%s) after %.1fs", store_uri, lock.name, t_held - t0)
    lock.thread.start()
    try:
        yield lock.name
    finally:
        lock.release(time.monotonic() - t_held)


if __name__ == "__main__":  # `python -m tasks.locks STORE`: the limit's name and the command that creates it
    import sys

    for uri in sys.argv[1:] or [".store"]:
        print(f"prefect gcl create {store_lock_name(uri)} --limit 1  # {canonical_store_uri(uri)}")
