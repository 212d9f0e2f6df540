"""Fetching through the real kaggle client from a loopback stub of Kaggle's download API."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from covid_data.archive import CorruptArchiveError, UnsafeArchiveError
from covid_data.dataset import fetch_dataset, load_manifest
from covid_data.kaggle_download import KaggleAuthError, KaggleCredentials
from covid_data.store import open_store
from tests.conftest import make_kaggle_folder
from tests.kaggle_stub import zip_folder

REF = "tawsifurrahman/covid19-radiography-database"


@pytest.fixture
def archive(tmp_path: Path) -> bytes:
    return zip_folder(make_kaggle_folder(tmp_path / "kaggle-src", n_per_class=10, seed=3))


@pytest.fixture
def creds(monkeypatch, kaggle_stub):
    kaggle_stub.credentials = ("alice", "s3cr3t-kaggle-key")
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "s3cr3t-kaggle-key")


def test_fetch_then_refetch_moves_nothing(kaggle_stub, archive, creds, store_uri, tmp_path, caplog):
    kaggle_stub.add(REF, archive)
    cache = tmp_path / "cache"
    first = fetch_dataset("kaggle", store_uri, cache_dir=cache)
    assert first.n_images == 40 and first.uploaded == 44  # 40 images and the 4 usable lung masks
    assert kaggle_stub.body_bytes_sent == len(archive)
    manifest = load_manifest(open_store(store_uri), first.version)
    assert sorted(manifest["label"].unique()) == ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    assert not manifest["path"].str.contains("masks").any()  # masks are not images
    assert manifest["mask_path"].str.startswith("masks/").sum() == 4

    (cached,) = cache.rglob("*.zip")
    before = cached.stat()
    with caplog.at_level(logging.INFO, logger="covid_data"):
        second = fetch_dataset("kaggle", store_uri, cache_dir=cache)
    assert second.version == first.version
    assert kaggle_stub.api_calls == 2  # the client still asked whether the data changed ...
    after = cached.stat()  # ... but did not rewrite the cached archive
    assert (after.st_ctime_ns, after.st_size) == (before.st_ctime_ns, before.st_size)
    assert second.uploaded == 0
    assert "nothing downloaded" in caplog.text and "nothing uploaded" in caplog.text


def test_changed_remote_data_becomes_a_new_version(kaggle_stub, archive, creds, tmp_path):
    store = str(tmp_path / "store")
    kaggle_stub.add(REF, archive, modified=1_700_000_000)
    v1 = fetch_dataset("kaggle", store, cache_dir=tmp_path / "cache")
    v1_files = open_store(store).checksums(f"datasets/{v1.version}")
    newer = zip_folder(make_kaggle_folder(tmp_path / "kaggle-src2", n_per_class=11, seed=4))
    kaggle_stub.add(REF, newer, modified=1_800_000_000)
    v2 = fetch_dataset("kaggle", store, cache_dir=tmp_path / "cache")
    assert v2.version != v1.version and v2.n_images == 44
    assert open_store(store).checksums(f"datasets/{v1.version}") == v1_files  # untouched


def test_bad_credentials_are_named_without_leaking_the_key(kaggle_stub, archive, monkeypatch, tmp_path):
    kaggle_stub.add(REF, archive)
    kaggle_stub.credentials = ("alice", "right-key")
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", "wrong-key-123")
    with pytest.raises(KaggleAuthError) as err:
        fetch_dataset("kaggle", str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert "HTTP 401" in msg and "alice" in msg and REF in msg
    assert "wrong-key-123" not in msg
    assert not (tmp_path / "store").exists()


def test_public_dataset_downloads_without_credentials(kaggle_stub, archive, tmp_path):
    kaggle_stub.add(REF, archive)  # the stub demands no credentials
    ref = fetch_dataset("kaggle", str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    assert ref.n_images == 40
    assert kaggle_stub.auth_seen == [None]


def test_unknown_dataset_is_a_clear_error(kaggle_stub, creds, tmp_path):
    with pytest.raises(Exception, match="nobody/nothing was not found"):
        fetch_dataset("kaggle:nobody/nothing", str(tmp_path / "store"), cache_dir=tmp_path / "cache")


def test_interrupted_download_is_resumed(kaggle_stub, archive, creds, tmp_path):
    kaggle_stub.add(REF, archive)
    kaggle_stub.mode = "truncate_once"  # the connection drops halfway through the first GET
    ref = fetch_dataset("kaggle", str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    assert ref.n_images == 40


def test_truncated_archive_fails_clearly_and_publishes_nothing(kaggle_stub, archive, creds, tmp_path):
    kaggle_stub.add(REF, archive)
    kaggle_stub.mode = "truncated"
    with pytest.raises(CorruptArchiveError, match="truncated"):
        fetch_dataset("kaggle", str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "store" / "datasets").exists()


def test_zip_slip_archive_is_refused_and_nothing_is_written(kaggle_stub, archive, creds, tmp_path):
    buf = io.BytesIO(archive)
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr("../../escaped.txt", "owned")
    kaggle_stub.add(REF, buf.getvalue())
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./\.\./escaped\.txt'"):
        fetch_dataset("kaggle", str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (tmp_path / "store").exists()


def test_credentials_provider_is_asked_only_when_the_client_finds_none(kaggle_stub, archive, tmp_path):
    kaggle_stub.add(REF, archive)
    kaggle_stub.credentials = ("bob", "provider-key")
    asked = []

    def provider() -> KaggleCredentials:
        asked.append(True)
        return KaggleCredentials("bob", "provider-key", origin="the test's vault")

    ref = fetch_dataset("kaggle", str(tmp_path / "store"), cache_dir=tmp_path / "cache", kaggle_credentials=provider)
    assert ref.n_images == 40 and asked == [True]
    assert "provider-key" not in repr(KaggleCredentials("bob", "provider-key"))


def test_covid_data_does_not_import_prefect():
    code = (
        "import sys, covid_data.dataset, covid_data.split, covid_data.kaggle_download, covid_data.validation; "
        "sys.exit('prefect' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0
