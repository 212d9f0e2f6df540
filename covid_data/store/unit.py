"""Stored units: a folder of objects that one marker, written last, declares complete."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from covid_data.store.base import PutResult, UnitCompleteError, fault_hook

if TYPE_CHECKING:
    from covid_data.store.interface import Store


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
            fault_hook()
        return written

    def verify(self) -> list[str]:
        """Objects of a complete unit whose checksum differs from the marker's (empty: intact)."""
        rec = self.record()
        if rec is None:
            return []
        now = self.store.checksums(self._folder)
        return [name for name, md5 in rec.get("objects", {}).items() if now.get(self.key(name)) != md5]
