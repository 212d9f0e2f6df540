"""Safe unpacking of downloaded dataset archives."""

from __future__ import annotations

import os
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

# The real release is about 800 MB packed; anything far beyond is not this dataset.
DEFAULT_MAX_TOTAL_BYTES = 20 * 1024**3
DEFAULT_MAX_ENTRY_BYTES = 512 * 1024**2
DEFAULT_MAX_ENTRIES = 200_000
DEFAULT_MAX_RATIO = 200  # uncompressed/compressed, per entry: zip bombs go far higher


class UnsafeArchiveError(ValueError):
    """The archive holds an entry we refuse to unpack."""


class CorruptArchiveError(ValueError):
    """The archive cannot be read (truncated or damaged download)."""


def _check_entry(info: zipfile.ZipInfo, archive: Path, max_entry: int, max_ratio: int) -> None:
    name = info.filename
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} would escape the target folder")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} is a symbolic link; links are not unpacked")
    # Many writers store permission bits only (no file type): those are plain files.
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UnsafeArchiveError(f"{archive}: entry {name!r} is not a regular file or folder")
    if info.file_size > max_entry:
        raise UnsafeArchiveError(
            f"{archive}: entry {name!r} would unpack to {info.file_size:,} bytes (limit {max_entry:,})"
        )
    if info.compress_size and info.file_size / info.compress_size > max_ratio and info.file_size > 1 << 20:
        raise UnsafeArchiveError(
            f"{archive}: entry {name!r} has a compression ratio of "
            f"{info.file_size / info.compress_size:.0f}:1 (limit {max_ratio}:1)"
        )


def safe_extract_zip(
    archive: Path,
    dest: Path,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_ratio: int = DEFAULT_MAX_RATIO,
) -> Path:
    """Unpack ``archive`` into ``dest`` after checking every entry first.

    Nothing is written unless the whole archive passes: entries that escape ``dest``
    (zip-slip), links, special files and absurd sizes are refused with an error naming
    the entry. A truncated or damaged archive raises :class:`CorruptArchiveError`.
    """
    archive = Path(archive)
    dest = Path(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise CorruptArchiveError(
            f"{archive} is not a readable zip archive ({e}); the download is probably truncated"
        ) from e
    with zf:
        infos = zf.infolist()
        if len(infos) > max_entries:
            raise UnsafeArchiveError(f"{archive}: {len(infos):,} entries (limit {max_entries:,})")
        total = 0
        for info in infos:
            _check_entry(info, archive, max_entry_bytes, max_ratio)
            total += info.file_size
        if total > max_total_bytes:
            raise UnsafeArchiveError(f"{archive}: would unpack to {total:,} bytes in all (limit {max_total_bytes:,})")
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        for info in infos:
            target = (root / info.filename).resolve()
            if root not in target.parents and target != root:  # belt and braces after _check_entry
                raise UnsafeArchiveError(f"{archive}: entry {info.filename!r} would escape {dest}")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            try:
                with zf.open(info) as src, open(tmp, "wb") as out:
                    written = 0
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > info.file_size:  # header lied about the size
                            raise UnsafeArchiveError(
                                f"{archive}: entry {info.filename!r} is larger than its header says"
                            )
                        out.write(chunk)
                os.replace(tmp, target)
            except (zipfile.BadZipFile, EOFError, zlib.error) as e:
                raise CorruptArchiveError(
                    f"{archive}: entry {info.filename!r} is damaged ({e}); the download is probably truncated"
                ) from e
            finally:
                if tmp.exists():
                    tmp.unlink()
    return dest
