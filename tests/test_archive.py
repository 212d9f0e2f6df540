"""Unpacking refuses entries that escape the target, links and absurd sizes, naming the entry."""

from __future__ import annotations

import random
import stat
import zipfile
from pathlib import Path

import pytest

from covid_data.archive import CorruptArchiveError, UnsafeArchiveError, safe_extract_zip


def _zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return path


def test_plain_archive_unpacks(tmp_path: Path):
    a = _zip(tmp_path / "ok.zip", [("COVID/images/a.png", b"x"), ("Normal/b.png", b"y")])
    out = safe_extract_zip(a, tmp_path / "out")
    assert (out / "COVID/images/a.png").read_bytes() == b"x"
    assert not list(out.rglob("*.part"))


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "/etc/evil.txt"])
def test_escaping_entries_are_refused_before_anything_is_written(tmp_path: Path, name: str):
    a = _zip(tmp_path / "bad.zip", [("COVID/ok.png", b"x"), (name, b"owned")])
    with pytest.raises(UnsafeArchiveError, match="escape") as err:
        safe_extract_zip(a, tmp_path / "out")
    assert repr(name) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_symlink_entries_are_refused(tmp_path: Path):
    info = zipfile.ZipInfo("COVID/link.png")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    a = _zip(tmp_path / "link.zip", [(info, b"/etc/passwd")])
    with pytest.raises(UnsafeArchiveError, match="'COVID/link.png' is a symbolic link"):
        safe_extract_zip(a, tmp_path / "out")


def test_zip_bomb_ratio_and_size_limits(tmp_path: Path):
    a = _zip(tmp_path / "bomb.zip", [("COVID/zeros.png", b"\0" * (8 << 20))])
    with pytest.raises(UnsafeArchiveError, match="'COVID/zeros.png' has a compression ratio"):
        safe_extract_zip(a, tmp_path / "out")
    noise = random.Random(0).randbytes(2 << 20)  # incompressible
    b = _zip(tmp_path / "big.zip", [("COVID/big.png", noise)])
    with pytest.raises(UnsafeArchiveError, match="'COVID/big.png' would unpack to 2,097,152 bytes"):
        safe_extract_zip(b, tmp_path / "out", max_entry_bytes=1 << 20)
    with pytest.raises(UnsafeArchiveError, match="in all"):
        safe_extract_zip(b, tmp_path / "out", max_total_bytes=1 << 20)


def test_truncated_archive(tmp_path: Path):
    a = _zip(tmp_path / "ok.zip", [("COVID/a.png", bytes(range(256)) * 400)])
    data = a.read_bytes()
    a.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptArchiveError, match="truncated"):
        safe_extract_zip(a, tmp_path / "out")
