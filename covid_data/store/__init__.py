"""The data and artefact store: one small interface, a local-folder and a GCS backend.

Locations are URIs: ``/path``, ``file:///path`` or ``gs://bucket/prefix``. Keys are
``/``-separated paths relative to the store's root.

Three promises every backend keeps:

* atomic writes: an object appears under its final name complete or not at all;
* idempotent writes: an object whose checksum already matches is not written again, and an
  existing object with *different* content is never replaced unless the caller asks for it
  (``overwrite=True``: objects of an incomplete :class:`Unit`, scratch);
* compare-and-swap for pointers (``read_versioned`` / ``put_if_match``): of two writers that
  read the same version, exactly one replaces it (GCS ``if_generation_match``; a lock file on
  the local store).

Stored units (a dataset version, a split, a model slot, an export, a run folder) are folders
completed by one marker object written last (:class:`Unit`). A unit without its marker is
incomplete: the next attempt replaces its objects. A complete unit is never written again, so
formats that are not byte-for-byte reproducible (Keras zips, Core ML UUIDs, parquet) never turn
a rerun into an error.

Every store write can be a fault-injection point for the crash-safety tests
(``COVID_FAULT_KILL_AFTER``, ``COVID_FAULT_COUNTER``: see :mod:`covid_data.store.base`).

The modules: ``base`` (errors, checksums, :class:`PutResult`, the fault hook), ``unit``
(:class:`Unit`), ``interface`` (the :class:`Store` ABC), ``local`` (:class:`LocalStore`), ``gcs``
(:class:`GCSStore`) and ``uri`` (:func:`open_store`, :func:`as_store`, object URIs).
"""

from covid_data.store.base import (
    ObjectExistsError,
    PutResult,
    StoreError,
    StoreUnavailableError,
    UnitCompleteError,
    UnitConflictError,
    md5_bytes,
    md5_file,
)
from covid_data.store.gcs import GCSStore
from covid_data.store.interface import Store
from covid_data.store.local import LocalStore
from covid_data.store.unit import Unit
from covid_data.store.uri import as_store, open_store, read_object, split_object_uri

__all__ = [
    "GCSStore",
    "LocalStore",
    "ObjectExistsError",
    "PutResult",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "Unit",
    "UnitCompleteError",
    "UnitConflictError",
    "as_store",
    "md5_bytes",
    "md5_file",
    "open_store",
    "read_object",
    "split_object_uri",
]
