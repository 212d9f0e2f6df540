"""The store interface: the primitives each backend provides and the behaviour they share."""

from __future__ import annotations

import os
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from covid_data.store.base import ObjectExistsError, PutResult, fault_hook, md5_file
from covid_data.store.unit import Unit


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

    @abstractmethod
    def child(self, prefix: str) -> Store:
        """The store rooted at ``prefix`` of this one (the same backend)."""

    def put_if_match(self, key: str, data: bytes, expected: str | None) -> bool:
        """Compare-and-swap: replace ``key`` only if nobody changed it since :meth:`read_versioned`
        returned ``expected``. False (nothing written) when another writer got there first."""
        ok = self._swap(key, data, expected)
        if ok:
            fault_hook(key)
        return ok

    def local_path(self, key: str) -> Path | None:
        """A path readers can open directly, where the backend has one."""
        return None

    def unit(self, prefix: str, marker: str = "_COMPLETE.json") -> Unit:
        return Unit(self, prefix, marker)

    # -- shared behaviour ---------------------------------------------------------------
    def uri_for(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key.lstrip('/')}"

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
            fault_hook(key)
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
