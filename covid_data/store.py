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

Fault injection: with ``COVID_FAULT_KILL_AFTER`` = N and ``COVID_FAULT_COUNTER`` = a file, the
process that makes the N-th store write (counted across processes in that file) SIGKILLs itself
right after it. The crash-safety tests use it to stop the pipeline at every write boundary.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_UMASK = os.umask(0)
os.umask(_UMASK)


class StoreError(RuntimeError):
    """Base class for store failures."""


class ObjectExistsError(StoreError):
    """Raised instead of replacing an existing object whose content differs."""


class StoreUnavailableError(StoreError):
    """The store could not be reached (after retries)."""


class UnitCompleteError(StoreError):
    """Raised instead of writing into a unit whose completion marker exists."""


def _fault_hook() -> None:
    """Count this store write; SIGKILL this process if it is the N-th (see the module docstring)."""
    limit = os.environ.get("COVID_FAULT_KILL_AFTER")
    counter = os.environ.get("COVID_FAULT_COUNTER")
    if not limit or not counter:
        return
    with open(counter, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # processes of one run share the count
        f.seek(0)
        n = int(f.read().strip() or 0) + 1
        f.seek(0)
        f.truncate()
        f.write(str(n))
        f.flush()
        os.fsync(f.fileno())
    if n == int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


def md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class PutResult:
    key: str
    written: bool  # False when an identical object was already there


class Store(ABC):
    """A flat key/value object store rooted at ``uri``."""

    uri: str

    # -- primitives each backend provides --------------------------------------------
    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def checksum(self, key: str) -> str | None:
        """Hex MD5 of the object, or None when it does not exist."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def _write_file(self, key: str, path: Path, *, create_only: bool) -> bool:
        """Atomically place ``path``'s content at ``key``; False if create_only and it exists."""

    @abstractmethod
    def get_file(self, key: str, dest: Path) -> Path:
        """Copy the object to a local file (atomically) and return its path."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (recursive), sorted."""

    @abstractmethod
    def checksums(self, prefix: str = "") -> dict[str, str]:
        """``{key: md5}`` for every object under ``prefix``, in one listing."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object (absent is fine). For scratch such as training backups only:
        published datasets and models are never deleted."""

    @abstractmethod
    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        """The object's bytes and a version token (None, None when absent), for :meth:`put_if_match`."""

    @abstractmethod
    def _swap(self, key: str, data: bytes, expected: str | None) -> bool:
        """Write ``data`` at ``key`` only if its version is still ``expected`` (None: absent)."""

    def put_if_match(self, key: str, data: bytes, expected: str | None) -> bool:
        """Compare-and-swap: replace ``key`` only if nobody changed it since :meth:`read_versioned`
        returned ``expected``. False (nothing written) when another writer got there first."""
        ok = self._swap(key, data, expected)
        if ok:
            _fault_hook()
        return ok

    def local_path(self, key: str) -> Path | None:
        """A path readers can open directly, where the backend has one."""
        return None

    def unit(self, prefix: str, marker: str = "_COMPLETE.json") -> Unit:
        return Unit(self, prefix, marker)

    # -- shared behaviour ---------------------------------------------------------------
    def uri_for(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key.lstrip('/')}"

    def child(self, prefix: str) -> Store:
        return open_store(self.uri_for(prefix))

    def put_file(self, key: str, path: Path, *, overwrite: bool = False, known_md5: str | None = None) -> PutResult:
        """Store a local file under ``key``.

        Skips the write when the stored object already has the same MD5. Raises
        :class:`ObjectExistsError` when it differs, unless ``overwrite``.
        """
        local_md5 = md5_file(path)
        current = known_md5 if known_md5 is not None else self.checksum(key)
        if current == local_md5:
            return PutResult(key, written=False)
        if current is not None and not overwrite:
            raise ObjectExistsError(
                f"{self.uri_for(key)} already exists with different content; refusing to overwrite it"
            )
        if self._write_file(key, path, create_only=not overwrite):
            _fault_hook()
            return PutResult(key, written=True)
        # Someone created it between our check and our write: compare again.
        if self.checksum(key) == local_md5:
            return PutResult(key, written=False)
        raise ObjectExistsError(f"{self.uri_for(key)} was created concurrently with different content")

    def put_bytes(self, key: str, data: bytes, *, overwrite: bool = False) -> PutResult:
        with tempfile.NamedTemporaryFile(prefix="store-put-", delete=False) as tmp:
            tmp.write(data)
        try:
            return self.put_file(key, Path(tmp.name), overwrite=overwrite)
        finally:
            os.unlink(tmp.name)

    def put_text(self, key: str, text: str, *, overwrite: bool = False) -> PutResult:
        return self.put_bytes(key, text.encode("utf-8"), overwrite=overwrite)

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def put_many(
        self,
        items: Iterable[tuple[str, Path]],
        *,
        prefix: str = "",
        workers: int = 8,
    ) -> tuple[int, int]:
        """Upload many files under ``prefix`` with one listing and a thread pool.

        Returns ``(written, skipped)``.
        """
        existing = self.checksums(prefix)
        items = list(items)
        counts = {"written": 0, "skipped": 0}
        lock = threading.Lock()

        def one(item: tuple[str, Path]) -> None:
            key, path = item
            res = self.put_file(key, path, known_md5=existing.get(key))
            with lock:
                counts["written" if res.written else "skipped"] += 1

        with ThreadPoolExecutor(max_workers=workers) as pool:
            # list() re-raises the first worker exception here.
            list(pool.map(one, items))
        return counts["written"], counts["skipped"]


# ---------------------------------------------------------------------------------------
class LocalStore(Store):
    """A folder on the local file system: the embedded default."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if p != self.root and self.root not in p.parents:
            raise StoreError(f"key {key!r} escapes the store root {self.root}")
        return p

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def checksum(self, key: str) -> str | None:
        p = self._path(key)
        return md5_file(p) if p.is_file() else None

    def read_bytes(self, key: str) -> bytes:
        p = self._path(key)
        try:
            return p.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"no object {self.uri_for(key)}") from None

    def _write_file(self, key: str, path: Path, *, create_only: bool) -> bool:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; objects are ordinary files
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out, _CHUNK)
                out.flush()
                os.fsync(out.fileno())
            if create_only:
                try:
                    os.link(tmp, dest)  # atomic "create if absent"
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, dest)
            return True
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        p = self._path(key)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None, None
        return data, md5_bytes(data)

    def _swap(self, key: str, data: bytes, expected: str | None) -> bool:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # One writer at a time compares and replaces; the lock file is a dot-file the listing skips.
        with open(dest.parent / f".{dest.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _, current = self.read_versioned(key)
            if current != expected:
                return False
            with tempfile.NamedTemporaryFile(prefix="store-swap-", delete=False) as tmp:
                tmp.write(data)
            try:
                self._write_file(key, Path(tmp.name), create_only=False)
            finally:
                os.unlink(tmp.name)
            return True

    def get_file(self, key: str, dest: Path) -> Path:
        src = self._path(key)
        if not src.is_file():
            raise FileNotFoundError(f"no object {self.uri_for(key)}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        os.close(fd)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return dest

    def _iter(self, prefix: str) -> Iterable[Path]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            yield base
            return
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".") and name.endswith((".tmp", ".lock")):
                    continue  # an in-flight write or a swap lock, not an object
                yield Path(dirpath) / name

    def list(self, prefix: str = "") -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self._iter(prefix))

    def checksums(self, prefix: str = "") -> dict[str, str]:
        # Hashing every file is the honest equivalent of GCS's stored MD5s.
        return {p.relative_to(self.root).as_posix(): md5_file(p) for p in self._iter(prefix)}


# ---------------------------------------------------------------------------------------
class GCSStore(Store):
    """A ``gs://bucket/prefix`` location through ``google-cloud-storage``.

    Honours ``STORAGE_EMULATOR_HOST`` (then no credentials are needed). Transient errors
    and an unreachable endpoint are retried with exponential backoff for up to
    ``retry_deadline`` seconds (``COVID_STORE_RETRY_DEADLINE``), then reported as
    :class:`StoreUnavailableError` naming the bucket and endpoint.
    """

    def __init__(self, uri: str, *, retry_deadline: float | None = None, client=None):
        from google.api_core.retry import Retry
        from google.cloud.storage.retry import DEFAULT_RETRY

        parsed = urlparse(uri)
        self.bucket_name = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.uri = f"gs://{self.bucket_name}" + (f"/{self.prefix}" if self.prefix else "")
        if retry_deadline is None:
            retry_deadline = float(os.environ.get("COVID_STORE_RETRY_DEADLINE", "120"))
        self.retry_deadline = retry_deadline
        self._retry: Retry = DEFAULT_RETRY.with_timeout(retry_deadline)
        self._client = client or _gcs_client()
        self._bucket = self._client.bucket(self.bucket_name)
        self.endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or "storage.googleapis.com"

    def _name(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn, *args, **kwargs):
        from google.api_core import exceptions as gexc
        from requests import exceptions as rexc

        try:
            return fn(*args, retry=self._retry, timeout=min(60.0, self.retry_deadline), **kwargs)
        except gexc.NotFound as e:
            if "bucket" in str(e).lower() and not self._bucket_exists():
                raise StoreUnavailableError(
                    f"GCS bucket {self.bucket_name!r} does not exist (at {self.endpoint})"
                ) from None
            raise
        except (gexc.RetryError, rexc.ConnectionError, rexc.Timeout, gexc.ServiceUnavailable) as e:
            raise StoreUnavailableError(
                f"GCS bucket {self.bucket_name!r} at {self.endpoint} is unreachable: {what} failed "
                f"after retrying for {self.retry_deadline:.0f}s ({type(e).__name__}: {_short(e)})"
            ) from e
        except gexc.Forbidden as e:
            raise StoreUnavailableError(
                f"access to GCS bucket {self.bucket_name!r} was refused while trying to {what}: {_short(e)}"
            ) from e

    def _bucket_exists(self) -> bool:
        try:
            return self._client.lookup_bucket(self.bucket_name, retry=self._retry) is not None
        except Exception:
            return True

    def exists(self, key: str) -> bool:
        return self.checksum(key) is not None

    def checksum(self, key: str) -> str | None:
        blob = self._call(f"stat {key}", self._bucket.get_blob, self._name(key))
        return _hex_md5(blob.md5_hash) if blob is not None else None

    def read_bytes(self, key: str) -> bytes:
        from google.api_core import exceptions as gexc

        try:
            return self._call(f"read {key}", self._bucket.blob(self._name(key)).download_as_bytes)
        except gexc.NotFound:
            raise FileNotFoundError(f"no object {self.uri_for(key)}") from None

    def _write_file(self, key: str, path: Path, *, create_only: bool) -> bool:
        from google.api_core import exceptions as gexc

        blob = self._bucket.blob(self._name(key))
        extra = {"if_generation_match": 0} if create_only else {}
        try:
            # A GCS object only becomes visible once its upload is finalised: atomic by design.
            self._call(f"write {key}", blob.upload_from_filename, str(path), **extra)
        except gexc.PreconditionFailed:
            return False
        return True

    def read_versioned(self, key: str) -> tuple[bytes | None, str | None]:
        blob = self._call(f"stat {key}", self._bucket.get_blob, self._name(key))
        if blob is None:
            return None, None
        from google.api_core import exceptions as gexc

        generation = blob.generation  # before the download, which may reset it from response headers
        try:
            data = self._call(f"read {key}", blob.download_as_bytes, if_generation_match=generation)
        except (gexc.PreconditionFailed, gexc.NotFound):
            return self.read_versioned(key)  # replaced between stat and read: read the new one
        return data, str(generation)

    def _swap(self, key: str, data: bytes, expected: str | None) -> bool:
        from google.api_core import exceptions as gexc

        blob = self._bucket.blob(self._name(key))
        try:
            self._call(
                f"write {key}",
                blob.upload_from_string,
                data,
                if_generation_match=int(expected) if expected is not None else 0,
            )
        except gexc.PreconditionFailed:
            return False
        return True

    def delete(self, key: str) -> None:
        from google.api_core import exceptions as gexc

        with contextlib.suppress(gexc.NotFound):
            self._call(f"delete {key}", self._bucket.blob(self._name(key)).delete)

    def get_file(self, key: str, dest: Path) -> Path:
        from google.api_core import exceptions as gexc

        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        os.close(fd)
        try:
            self._call(f"read {key}", self._bucket.blob(self._name(key)).download_to_filename, tmp)
            os.replace(tmp, dest)
        except gexc.NotFound:
            raise FileNotFoundError(f"no object {self.uri_for(key)}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dest

    def _blobs(self, prefix: str):
        full = self._name(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        return self._call(
            f"list {prefix or '/'}", lambda **kw: list(self._client.list_blobs(self.bucket_name, prefix=full, **kw))
        )

    def _key(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if self.prefix else name

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self._key(b.name) for b in self._blobs(prefix))

    def checksums(self, prefix: str = "") -> dict[str, str]:
        return {self._key(b.name): _hex_md5(b.md5_hash) for b in self._blobs(prefix)}


# ---------------------------------------------------------------------------------------
class Unit:
    """A folder of objects that one marker, written last, declares complete.

    Until the marker exists, writes replace whatever an interrupted attempt left; once it
    exists, the unit is read-only. The marker records the checksum of every object, so a reader
    can tell that the objects are the ones that were completed.
    """

    def __init__(self, store: Store, prefix: str, marker: str = "_COMPLETE.json"):
        self.store, self.prefix, self.marker = store, prefix.strip("/"), marker

    @property
    def uri(self) -> str:
        return self.store.uri_for(self.prefix)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @property
    def _folder(self) -> str:
        # The trailing slash keeps GCS' prefix listing from matching siblings (m1 vs m10).
        return f"{self.prefix}/" if self.prefix else ""

    def is_complete(self) -> bool:
        return self.store.exists(self.key(self.marker))

    def record(self) -> dict | None:
        """The marker's content, or None while the unit is incomplete."""
        try:
            return json.loads(self.store.read_text(self.key(self.marker)))
        except FileNotFoundError:
            return None

    def _check_open(self, name: str) -> None:
        if self.is_complete():
            raise UnitCompleteError(f"{self.store.uri_for(self.key(name))}: {self.uri} is complete and never rewritten")

    def put_file(self, name: str, path: Path) -> PutResult:
        self._check_open(name)
        return self.store.put_file(self.key(name), path, overwrite=True)

    def put_bytes(self, name: str, data: bytes) -> PutResult:
        self._check_open(name)
        return self.store.put_bytes(self.key(name), data, overwrite=True)

    def put_text(self, name: str, text: str) -> PutResult:
        return self.put_bytes(name, text.encode("utf-8"))

    def put_tree(self, name: str, path: Path) -> None:
        """A file, or every file of a folder (a Core ML package), under ``name``."""
        self._check_open(name)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            rel = name if f == path else f"{name}/{f.relative_to(path).as_posix()}"
            self.store.put_file(self.key(rel), f, overwrite=True)

    def complete(self, record: dict) -> bool:
        """Write the marker (create-only) with ``record`` plus the checksums of the unit's objects.

        False when another attempt completed the unit first: its marker, and its objects, stay.
        """
        sums = {
            k[len(self.prefix) + 1 :] if self.prefix else k: v
            for k, v in self.store.checksums(self._folder).items()
            if k != self.key(self.marker)
        }
        doc = {**record, "objects": dict(sorted(sums.items()))}
        with tempfile.NamedTemporaryFile(prefix="store-marker-", delete=False) as tmp:
            tmp.write(json.dumps(doc, indent=2, sort_keys=True, default=str).encode())
        try:
            written = self.store._write_file(self.key(self.marker), Path(tmp.name), create_only=True)
        finally:
            os.unlink(tmp.name)
        if written:
            _fault_hook()
        return written

    def verify(self) -> list[str]:
        """Objects of a complete unit whose checksum differs from the marker's (empty: intact)."""
        rec = self.record()
        if rec is None:
            return []
        now = self.store.checksums(self._folder)
        return [name for name, md5 in rec.get("objects", {}).items() if now.get(self.key(name)) != md5]


def _hex_md5(b64: str | None) -> str | None:
    return base64.b64decode(b64).hex() if b64 else None


def _short(e: BaseException, limit: int = 300) -> str:
    s = str(e).replace("\n", " ")
    return s if len(s) <= limit else s[:limit] + "..."


def _gcs_client():
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(
            project=os.environ.get("GOOGLE_CLOUD_PROJECT", "local"), credentials=AnonymousCredentials()
        )
    return storage.Client()


def open_store(uri: str | Path) -> Store:
    """Open a store from a URI: ``/path``, ``file:///path`` or ``gs://bucket/prefix``."""
    uri = str(uri)
    if uri.startswith("gs://"):
        if not urlparse(uri).netloc:
            raise ValueError(f"store URI {uri!r} names no bucket")
        return GCSStore(uri)
    if uri.startswith("file://"):
        return LocalStore(urlparse(uri).path)
    if "://" in uri:
        raise ValueError(f"unsupported store URI {uri!r}: use a path, file://... or gs://bucket/prefix")
    return LocalStore(uri)


def as_store(store: Store | str | Path) -> Store:
    """``store`` itself when it is open already, else the store at that URI: functions take either,
    so a task opens its store once and passes the object down."""
    return store if isinstance(store, Store) else open_store(store)


def split_object_uri(uri: str) -> tuple[Store, str]:
    """``gs://b/p/x.json`` -> (store at gs://b/p, "x.json")."""
    uri = str(uri).rstrip("/")
    parent, _, name = uri.rpartition("/")
    if not name or not parent:
        raise ValueError(f"{uri!r} is not an object URI")
    return open_store(parent), name


def read_object(uri: str) -> bytes:
    store, key = split_object_uri(uri)
    return store.read_bytes(key)
