"""Stored units: a folder of objects that one marker, written last, declares complete."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from covid_data.store.base import PutResult, UnitCompleteError, UnitConflictError, fault_hook, md5_bytes, md5_file

if TYPE_CHECKING:
    from covid_data.store.interface import Store

log = logging.getLogger(__name__)


class Unit:
    """A folder of objects that one marker, written last, declares complete.

    Until the marker exists, writes replace whatever an interrupted attempt left; once it
    exists, the unit is read-only. A ``Unit`` object is one attempt: it remembers the checksum of
    each object it wrote, and completes only while they are all still there as it wrote them (a
    timed-out attempt that still runs can otherwise overwrite a file under another attempt's
    marker). The marker records the checksum of every object, so a reader can tell that the
    objects are the ones that were completed (:meth:`intact_record`).
    """

    def __init__(self, store: Store, prefix: str, marker: str = "_COMPLETE.json"):
        self.store, self.prefix, self.marker = store, prefix.strip("/"), marker
        self.written: dict[str, str] = {}  # this attempt's writes: name -> md5

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
        self.written[name] = md5_file(Path(path))
        return self.store.put_file(self.key(name), path, overwrite=True)

    def put_bytes(self, name: str, data: bytes) -> PutResult:
        self._check_open(name)
        self.written[name] = md5_bytes(data)
        return self.store.put_bytes(self.key(name), data, overwrite=True)

    def put_text(self, name: str, text: str) -> PutResult:
        return self.put_bytes(name, text.encode("utf-8"))

    def put_tree(self, name: str, path: Path) -> None:
        """A file, or every file of a folder (a Core ML package), under ``name``."""
        self._check_open(name)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            rel = name if f == path else f"{name}/{f.relative_to(path).as_posix()}"
            self.written[rel] = md5_file(f)
            self.store.put_file(self.key(rel), f, overwrite=True)

    def complete(self, record: dict) -> bool:
        """Write the marker (create-only) with ``record`` plus the checksums of the unit's objects.

        False when another attempt completed the unit first: its marker, and its objects, stay.
        :class:`UnitConflictError` when an object this attempt wrote has been replaced since.
        """
        sums = {
            k[len(self.prefix) + 1 :] if self.prefix else k: v
            for k, v in self.store.checksums(self._folder).items()
            if k != self.key(self.marker)
        }
        changed = sorted(name for name, md5 in self.written.items() if sums.get(name) != md5)
        if changed:
            raise UnitConflictError(
                f"{self.uri}: {', '.join(changed)} changed after this attempt wrote them (another attempt still "
                "writing?); not completed"
            )
        doc = {**record, "objects": dict(sorted(sums.items()))}
        with tempfile.NamedTemporaryFile(prefix="store-marker-", delete=False) as tmp:
            tmp.write(json.dumps(doc, indent=2, sort_keys=True, default=str).encode())
        try:
            written = self.store._write_file(self.key(self.marker), Path(tmp.name), create_only=True)
        finally:
            os.unlink(tmp.name)
        if written:
            fault_hook(self.key(self.marker))
        return written

    def intact_record(self) -> dict | None:
        """The marker's content when every object it lists is still as completed; else None, and
        the unit is incomplete again (its stale marker removed, so the next attempt replaces it)."""
        rec = self.record()
        if rec is None:
            return None
        bad = self.verify()
        if not bad:
            return rec
        log.warning("%s: %s changed after the unit was completed; treating it as incomplete", self.uri, bad)
        self.store.delete(self.key(self.marker))
        return None

    def verify(self) -> list[str]:
        """Objects of a complete unit whose checksum differs from the marker's (empty: intact)."""
        rec = self.record()
        if rec is None:
            return []
        now = self.store.checksums(self._folder)
        return [name for name, md5 in rec.get("objects", {}).items() if now.get(self.key(name)) != md5]
