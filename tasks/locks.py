"""One retraining per store at a time, across workers: a Prefect global concurrency limit per store.

``retrain/weekly`` and ``retrain/adhoc`` are separate deployments, so the deployment-level
``concurrency_limit`` of one does not stop the other. Both write the same ``runs/`` and
``champion.json`` of a store, so the ``retrain`` flow holds :func:`store_run_lock` around its body:
a global concurrency limit named after the store (``retrain-store-<12 hex digits>``) with one slot.
The slot is held under a lease that Prefect renews while the flow runs; it is released when the
block exits (success or exception), and a worker that dies without releasing it loses the slot
when the lease expires.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

log = logging.getLogger(__name__)

LOCK_PREFIX = "retrain-store-"
DEFAULT_TIMEOUT_S = 8 * 3600.0  # longer than a weekly `cpu` retraining; then the waiting run fails
LEASE_DURATION_S = 300.0  # how long a dead holder keeps the slot before the server frees it


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
    logged beside it, and `prefect gcl ls` shows the slots.
    """
    digest = hashlib.sha256(canonical_store_uri(store_uri).encode()).hexdigest()[:12]
    return LOCK_PREFIX + digest


def ensure_store_limit(name: str) -> None:
    """Create the one-slot limit ``name`` unless it exists (an existing limit is left as it is).

    Without the limit, ``concurrency(strict=False)`` would only warn and run unguarded, so it is
    created here and acquisition below is strict. Two runs creating it at once is harmless: the
    loser gets ``ObjectAlreadyExists``.
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


@contextmanager
def store_run_lock(
    store_uri: str,
    *,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    lease_duration_s: float = LEASE_DURATION_S,
) -> Iterator[str]:
    """Hold the store's one retraining slot for the ``with`` block; yields the limit's name.

    Waits up to ``timeout_s`` seconds (``None``: for ever) for another run on the same store to
    finish, then raises ``TimeoutError`` (Prefect's ``AcquireConcurrencySlotTimeoutError``).
    Raises ``ConcurrencySlotAcquisitionError`` when the Prefect API cannot be reached or the limit
    cannot be used. Runs on different stores do not wait for each other.
    """
    name = store_lock_name(store_uri)
    ensure_store_limit(name)
    log.info("waiting for the retraining slot of store %s (%s)", store_uri, name)
    t0 = time.monotonic()
    with concurrency(
        name,
        occupy=1,
        timeout_seconds=timeout_s,
        lease_duration=lease_duration_s,
        strict=True,  # a missing limit must fail, not run unguarded
        # A transient API error while renewing the lease must not kill hours of training: the
        # lease only lapses after `lease_duration_s` without a successful renewal.
        raise_on_lease_renewal_failure=False,
    ):
        log.info("holding the retraining slot of store %s (%s) after %.1fs", store_uri, name, time.monotonic() - t0)
        yield name


if __name__ == "__main__":  # `python -m tasks.locks STORE`: the limit's name and the command that creates it
    import sys

    for uri in sys.argv[1:] or [".store"]:
        print(f"prefect gcl create {store_lock_name(uri)} --limit 1  # {canonical_store_uri(uri)}")
