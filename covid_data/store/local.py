"""The local-folder backend: the embedded default."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from covid_data.store.base import CHUNK, StoreError, md5_bytes, md5_file
from covid_data.store.interface import Store

_UMASK = os.umask(0)
os.umask(_UMASK)


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

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self.uri_for(prefix))

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
                shutil.copyfileobj(src, out, CHUNK)
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
