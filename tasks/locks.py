"""One retraining per store at a time, across workers: a Prefect global concurrency limit per store.

``retrain/weekly`` and ``retrain/adhoc`` are separate deployments, so the deployment-level
``concurrency_limit`` of one does not stop the other. Both write the same ``runs/`` and
``champion.json`` of a store, so the ``retrain`` flow holds :func:`store_run_lock` around its body:
a global concurrency limit named after the store (``retrain-store-<12 hex digits>``) with one slot.

The slot alone cannot say whether its holder still lives. Prefect frees a slot whose holder died
when the holder's lease expires, but leases live in the memory of the Prefect server, and the
temporary server a run starts when ``PREFECT_API_URL`` is unset dies with the run (temporary
servers also never expire leases): a run killed with ``SIGKILL`` (an OOM kill) left the slot taken
in the Prefect database for good, and every later run on the store waited its full 8 hours.

So the holder also keeps a *holder record* in the same database, a Prefect variable of the same
name as the limit: who holds the slot (flow run, pid, host, since when), the lease, and a heartbeat
rewritten every ``HEARTBEAT_S``. A run that finds the slot taken reads the record and

- waits while the holder lives: a holder on this machine (same kernel boot and pid namespace) while
  its process exists, another machine's while its heartbeat moves;
- *takes over* the slot of a dead holder: at once when the holder was on this machine and its
  process is gone; after ``STALE_AFTER_S`` of an unchanged heartbeat for another machine's; and a
  taken slot without a record (a run of an older version, or one killed between taking the slot
  and writing its record) after ``STALE_AFTER_S`` with a temporary server, or, with a long-lived
  server, once that server would have freed it itself (``LEASE_DURATION_S`` + 60 s) and has not.

Taking over leaves the slot's count as it is (the dead run's slot becomes the taker's), so no
slot is freed twice: among runs that find one dead holder, the one that creates the variable
``<limit>-takeover-<dead holder's token>`` first takes over, the others keep waiting. A dead
holder's lease that a long-lived server still holds is renewed and kept by the taker, so the
server's lease expiry cannot free the slot under it. A waiting run logs who holds the store every
``REPORT_EVERY_S``, and stops at once on SIGTERM/SIGINT or when its flow run is cancelled.

Limits: a holder on another machine that lives but writes no heartbeat for ``STALE_AFTER_S`` (a
frozen process, the API unreachable from it alone) is taken over as dead; it logs an error when it
notices and leaves the slot to the taker. A run of the older version that still runs has no record,
and is taken over after the delay above.
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
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, VariableCreate, VariableUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.asyncio import AcquireConcurrencySlotTimeoutError, ConcurrencySlotAcquisitionError
from prefect.exceptions import Abort, ObjectAlreadyExists, ObjectNotFound

log = logging.getLogger(__name__)

LOCK_PREFIX = "retrain-store-"
DEFAULT_TIMEOUT_S = 8 * 3600.0  # longer than a weekly `cpu` retraining; then the waiting run fails
LEASE_DURATION_S = 300.0  # how long a long-lived server keeps a dead holder's slot when nobody takes it over
HEARTBEAT_S = 10.0  # how often the holder rewrites its record (and renews its lease)
STALE_AFTER_S = 45.0  # a heartbeat from another machine unchanged this long: its holder is dead
POLL_S = 2.0  # how often a waiting run asks for the slot again
REPORT_EVERY_S = 30.0  # how often a waiting run logs who holds the store
# A long-lived server frees a dead holder's slot this long after its lease expired (its repossessor
# runs every few seconds): a slot without a holder record waits for that before it is taken over.
UNRECORDED_MARGIN_S = 60.0
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
    """Create the one-slot limit ``name`` unless it exists (an existing limit is left as it is).

    Without the limit, acquisition would run unguarded, so it is created here and acquisition below
    is strict. Two runs creating it at once is harmless: the loser gets ``ObjectAlreadyExists``.
    """
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
    """Processes with one machine id see each other's pids: the kernel boot and the pid namespace."""
    if os.environ.get(MACHINE_ENV):
        return os.environ[MACHINE_ENV]
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return "host:" + socket.gethostname()


def _process_start(pid: int) -> str | None:
    """The process' start time (clock ticks since boot), ``None`` when no such process runs, ``""``
    when it runs but this system does not say when it started."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:  # no /proc: only whether the pid exists
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # killed, not yet reaped: dead
        return None
    return fields[19]


def _holder_alive(record: dict[str, Any]) -> bool | None:
    """Whether the record's process still runs; ``None`` when it is on another machine."""
    if record.get("machine") != _machine_id():
        return None
    start = _process_start(int(record["pid"]))
    return start is not None and (not start or not record.get("proc_start") or start == record["proc_start"])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _ago(iso: str | None) -> str:
    if not iso:
        return "?"
    s = max(0, int((datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _describe(record: dict[str, Any] | None) -> str:
    if record is None:
        return "a holder without a record (a run of an older version, or one killed before it wrote it)"
    run = record.get("flow_run_id")
    who = f"flow run '{record['flow_run_name']}' ({run})" if run else "a process"
    return (
        f"{who}, pid {record['pid']} on {record['host']}, since {record['since']} ({_ago(record['since'])} ago), "
        f"last heartbeat {_ago(record.get('heartbeat'))} ago"
    )


def _flow_run() -> tuple[str | None, str | None]:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None, None
    return str(ctx.flow_run.id), ctx.flow_run.name


def _server() -> str:
    """The API this process uses: a URL, or ``ephemeral`` (a temporary server that dies with it)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or "ephemeral"


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

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


class _Watch:
    """How long the waiting run has seen the same record (and heartbeat) unchanged."""

    def __init__(self) -> None:
        self.key: object = ()
        self.since = 0.0

    def observe(self, record: dict[str, Any] | None) -> float:
        key = None if record is None else (record["token"], record.get("beats"))
        if key != self.key:
            self.key, self.since = key, time.monotonic()
        return time.monotonic() - self.since


# --- taking and giving back the slot --------------------------------------------------------------


def _try_take(client, name: str, lease_duration_s: float, holder: ConcurrencyLeaseHolder | None) -> uuid.UUID | None:
    """Take the free slot (its lease id), or ``None`` when it is taken."""
    try:
        response = client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=lease_duration_s, holder=holder
        )
    except httpx.HTTPStatusError as e:
        if e.response.status_code == 423:
            return None
        raise ConcurrencySlotAcquisitionError(f"Unable to acquire the concurrency slot of {name}: {e}") from e
    except httpx.HTTPError as e:
        raise ConcurrencySlotAcquisitionError(f"Unable to acquire the concurrency slot of {name}: {e!r}") from e
    data = response.json()
    if not data.get("limits"):
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


def _take_over(
    client,
    name: str,
    store_uri: str,
    dead: dict[str, Any] | None,
    unchanged_s: float,
    stale_after_s: float,
    lease_s: float,
) -> dict[str, Any] | None:
    """Make the dead holder's slot this run's; the new record, or ``None`` (keep waiting)."""
    logger = _run_logger()
    if dead is None:
        # A taken slot without a record: claim it by creating the record (only one creator wins).
        mine = _new_record(store_uri, None)
        try:
            client.create_variable(VariableCreate(name=name, value=mine))
        except ObjectAlreadyExists:
            return None
        logger.warning("store %s (%s): took over the slot of %s", store_uri, name, _describe(None))
        return mine
    lease_id = dead.get("lease_id")
    if lease_id and dead.get("server") != "ephemeral":
        # A long-lived server may still hold the dead run's lease (then it expires it later): keep it.
        if not _renew(client, lease_id, lease_s):
            # Expired and freed by the server (then the slot is now someone else's, and their record
            # is on its way), or lost in a server restart (then nobody frees the slot): wait long
            # enough to tell.
            if unchanged_s < stale_after_s:
                return None
            lease_id = None
    else:
        lease_id = None  # a temporary server's leases die with it
    claim = f"{name}-takeover-{dead['token']}"
    try:
        client.create_variable(VariableCreate(name=claim, value={"at": _now(), "by_pid": os.getpid()}))
    except ObjectAlreadyExists:
        return None  # another waiting run takes it over
    current = _read_record(client, name)
    if current is None or current["token"] != dead["token"]:
        _delete_variable(client, claim)
        return None
    mine = _new_record(store_uri, uuid.UUID(lease_id) if lease_id else None)
    mine["took_over"] = dead["token"]
    _write_record(client, name, mine)
    if dead.get("took_over"):  # the dead run had itself taken over: its claim is done with
        _delete_variable(client, f"{name}-takeover-{dead['took_over']}")
    logger.warning("store %s (%s): took over the slot of dead %s", store_uri, name, _describe(dead))
    return mine


def _check_cancelled(client, run_id: str | None) -> None:
    if run_id is None:
        return
    state = client.read_flow_run(uuid.UUID(run_id)).state
    if state is not None and (state.is_cancelling() or state.is_cancelled()):
        message = "cancelled while waiting for the store's retraining slot"
        if state.is_cancelling():  # a run that no worker supervises would stay Cancelling
            from prefect.states import Cancelled

            state = client.set_flow_run_state(uuid.UUID(run_id), Cancelled(message=message)).state or state
        exc = StoreLockCancelled(f"flow run {run_id} was {message}")
        exc.state = state  # the engine keeps this state instead of proposing Failed
        raise exc


def _acquire(
    name: str,
    store_uri: str,
    timeout_s: float | None,
    lease_duration_s: float,
    stale_after_s: float,
    report_every_s: float,
) -> dict[str, Any]:
    logger = _run_logger()
    run_id, _ = _flow_run()
    holder = ConcurrencyLeaseHolder(type="flow_run", id=uuid.UUID(run_id)) if run_id else None
    t0 = time.monotonic()
    deadline = None if timeout_s is None else t0 + timeout_s
    watch, reported = _Watch(), None
    with get_client(sync_client=True) as client:
        while True:
            lease_id = _try_take(client, name, lease_duration_s, holder)
            if lease_id is not None:
                mine = _new_record(store_uri, lease_id)
                try:
                    _write_record(client, name, mine)
                except BaseException:  # not holding a slot nobody could tell the holder of
                    client.release_concurrency_slots_with_lease(lease_id)
                    raise
                return mine
            record = _read_record(client, name)
            unchanged_s = watch.observe(record)
            alive = None if record is None else _holder_alive(record)
            # Without a record, a long-lived server may still hold the holder's lease, and would
            # free the slot a second time when it expires: leave that to the server, and take over
            # only what it never frees (leases lost in a restart of the server).
            stale_s = stale_after_s if record or _server() == "ephemeral" else lease_duration_s + UNRECORDED_MARGIN_S
            if alive is False or (alive is None and unchanged_s >= stale_s):
                mine = _take_over(client, name, store_uri, record, unchanged_s, stale_after_s, lease_duration_s)
                if mine is not None:
                    return mine
            now = time.monotonic()
            if reported is None or now - reported >= report_every_s:
                reported = now
                logger.info(
                    "store %s (%s) is held by %s; waiting (%.0fs so far, up to %s)",
                    store_uri,
                    name,
                    _describe(record),
                    now - t0,
                    "ever" if timeout_s is None else f"{timeout_s:.0f}s",
                )
            _check_cancelled(client, run_id)
            if deadline is not None and now >= deadline:
                raise AcquireConcurrencySlotTimeoutError(
                    f"store {store_uri} ({name}) still held by {_describe(record)} after {timeout_s:.0f}s"
                )
            time.sleep(POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - now)))


class _Heartbeat:
    """Rewrites the holder record and renews the lease every ``period`` seconds, in a thread."""

    def __init__(self, name: str, record: dict[str, Any], period: float, lease_duration_s: float):
        self.name, self.record, self.period, self.lease_s = name, record, period, lease_duration_s
        self.stop = threading.Event()
        self.lost: str | None = None  # why the record is no longer this run's
        self.lease_lost = False
        self.logger = _run_logger()
        ctx = contextvars.copy_context()  # the same Prefect settings (API URL) as the caller
        self.thread = threading.Thread(target=ctx.run, args=(self._loop,), daemon=True, name=f"heartbeat-{name}")

    def _loop(self) -> None:
        with get_client(sync_client=True) as client:
            while not self.stop.wait(self.period) and self.lost is None:
                try:
                    self.beat(client)
                except Exception as e:  # a transient API error: the next beat tries again
                    self.logger.warning("store lock %s: heartbeat failed: %r", self.name, e)

    def beat(self, client) -> None:
        lease_id = self.record.get("lease_id")
        if lease_id and not self.lease_lost and not _renew(client, lease_id, self.lease_s):
            self.lease_lost = True
            self.logger.warning("store lock %s: the server no longer knows this run's lease %s", self.name, lease_id)
        current = _read_record(client, self.name)
        if current is None or current["token"] != self.record["token"]:
            self.lost = _describe(current)
            self.logger.error(
                "store lock %s: this run's slot was taken over by %s (its heartbeat stopped for too long); "
                "two runs may now write the store",
                self.name,
                self.lost,
            )
            return
        self.record = {**self.record, "heartbeat": _now(), "beats": self.record["beats"] + 1}
        _write_record(client, self.name, self.record)


def _release(name: str, store_uri: str, record: dict[str, Any], lease_lost: bool, t0: float) -> None:
    with get_client(sync_client=True) as client:
        current = _read_record(client, name)
        if current is None or current["token"] != record["token"]:
            # Another run took the slot over: it is theirs now, and theirs to give back.
            _run_logger().error(
                "store %s (%s): not giving back the slot, now held by %s", store_uri, name, _describe(current)
            )
            return
        _delete_variable(client, name)
        if record.get("lease_id") and not lease_lost:
            client.release_concurrency_slots_with_lease(uuid.UUID(record["lease_id"]))
        else:  # no lease (taken over from a dead run), or the server lost it
            client.release_concurrency_slots(names=[name], slots=1, occupancy_seconds=max(1.0, time.monotonic() - t0))
        if record.get("took_over"):
            _delete_variable(client, f"{name}-takeover-{record['took_over']}")


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
    name = store_lock_name(store_uri)
    ensure_store_limit(name)
    logger = _run_logger()
    logger.info("waiting for the retraining slot of store %s (%s)", store_uri, name)
    t0 = time.monotonic()
    record = _acquire(name, store_uri, timeout_s, lease_duration_s, stale_after_s, report_every_s)
    logger.info("holding the retraining slot of store %s (%s) after %.1fs", store_uri, name, time.monotonic() - t0)
    heartbeat = _Heartbeat(name, record, heartbeat_s, lease_duration_s)
    heartbeat.thread.start()
    t_held = time.monotonic()
    try:
        yield name
    finally:
        heartbeat.stop.set()
        heartbeat.thread.join(timeout=10)
        _release(name, store_uri, heartbeat.record, heartbeat.lease_lost, t_held)


if __name__ == "__main__":  # `python -m tasks.locks STORE`: the limit's name and the command that creates it
    import sys

    for uri in sys.argv[1:] or [".store"]:
        print(f"prefect gcl create {store_lock_name(uri)} --limit 1  # {canonical_store_uri(uri)}")
