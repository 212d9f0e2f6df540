"""The same store contract on both backends: a local folder and GCS (through the emulator)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from covid_data.store import GCSStore, ObjectExistsError, StoreError, StoreUnavailableError, open_store


def test_roundtrip_and_listing(store_uri: str, tmp_path: Path):
    store = open_store(store_uri)
    assert store.put_bytes("a/b/one.bin", b"1" * 10).written
    src = tmp_path / "two.txt"
    src.write_text("two")
    assert store.put_file("a/two.txt", src).written
    assert store.read_bytes("a/b/one.bin") == b"1" * 10
    assert store.list("a") == ["a/b/one.bin", "a/two.txt"]
    assert store.exists("a/two.txt") and not store.exists("a/three.txt")
    got = store.get_file("a/two.txt", tmp_path / "dl" / "two.txt")
    assert got.read_text() == "two"
    assert store.checksums("a") == {k: store.checksum(k) for k in store.list("a")}
    with pytest.raises(FileNotFoundError, match="a/missing"):
        store.read_bytes("a/missing")


def test_identical_write_is_skipped_and_different_content_is_refused(store_uri: str):
    store = open_store(store_uri)
    assert store.put_text("v1/data.json", '{"x": 1}').written
    assert not store.put_text("v1/data.json", '{"x": 1}').written  # same checksum: no upload
    with pytest.raises(ObjectExistsError, match="v1/data.json"):
        store.put_text("v1/data.json", '{"x": 2}')
    assert store.read_text("v1/data.json") == '{"x": 1}'  # nothing lost


def test_pointer_updates_need_explicit_overwrite(store_uri: str):
    store = open_store(store_uri)
    store.put_text("champion.json", "old")
    assert store.put_text("champion.json", "new", overwrite=True).written
    assert store.read_text("champion.json") == "new"


def test_put_many_uploads_only_what_changed(store_uri: str, tmp_path: Path):
    store = open_store(store_uri)
    files = []
    for i in range(20):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(bytes([i]) * 100)
        files.append((f"imgs/f{i}.bin", p))
    assert store.put_many(files[:5], prefix="imgs") == (5, 0)
    assert store.put_many(files, prefix="imgs") == (15, 5)
    assert store.put_many(files, prefix="imgs") == (0, 20)


def test_local_writes_are_atomic_for_concurrent_readers(tmp_path: Path):
    store = open_store(tmp_path / "store")
    payloads = [bytes([i]) * (4 << 20) for i in range(2)]  # 4 MB each: a copy takes many syscalls
    store.put_bytes("big.bin", payloads[0])
    stop = threading.Event()
    seen_bad: list[int] = []

    def reader():
        while not stop.is_set():
            data = store.read_bytes("big.bin")
            if data not in payloads:
                seen_bad.append(len(data))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(10):
        store.put_bytes("big.bin", payloads[i % 2], overwrite=True)
    stop.set()
    t.join()
    assert seen_bad == []
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["big.bin"]  # no temp files left


def test_local_keys_cannot_escape_the_root(tmp_path: Path):
    store = open_store(tmp_path / "store")
    with pytest.raises(StoreError, match="escapes"):
        store.put_text("../outside.txt", "x")
    assert not (tmp_path / "outside.txt").exists()


def test_unreachable_bucket_retries_then_names_bucket_and_endpoint(monkeypatch):
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    store = GCSStore("gs://unreachable-bucket/x", retry_deadline=4)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError) as err:
        store.put_text("a.txt", "x")
    elapsed = time.monotonic() - t0
    msg = str(err.value)
    assert "unreachable-bucket" in msg and f"127.0.0.1:{port}" in msg and "retrying" in msg
    # It backed off and retried until its deadline (a RetryError, not the first ConnectionError),
    # then gave up. The time waited is jittered by google-api-core, so only bounded loosely.
    from google.api_core.exceptions import RetryError

    assert isinstance(err.value.__cause__, RetryError), repr(err.value.__cause__)
    assert 0.5 <= elapsed < 30


def test_missing_bucket_is_named(gcs_emulator):
    store = GCSStore("gs://no-such-bucket-here/x", retry_deadline=5)
    with pytest.raises(StoreUnavailableError, match="no-such-bucket-here.*does not exist"):
        store.put_text("a.txt", "x")


def test_store_uris():
    assert open_store("file:///tmp/x").uri == "/tmp/x"
    with pytest.raises(ValueError, match="unsupported store URI"):
        open_store("s3://bucket/x")
    with pytest.raises(ValueError, match="names no bucket"):
        open_store("gs:///x")


def test_compare_and_swap_has_one_winner(store_uri: str):
    store = open_store(store_uri)
    assert store.read_versioned("champion.json") == (None, None)
    assert store.put_if_match("champion.json", b"v1", None)
    assert not store.put_if_match("champion.json", b"v1-again", None)  # "absent" no longer holds
    data, token = store.read_versioned("champion.json")
    assert data == b"v1"
    # Two writers read the same version; the first swap wins, the second is refused.
    assert store.put_if_match("champion.json", b"from-a", token)
    assert not store.put_if_match("champion.json", b"from-b", token)
    assert store.read_versioned("champion.json")[0] == b"from-a"
    assert store.list() == ["champion.json"]  # the local lock file is not an object


def test_local_compare_and_swap_under_threads(tmp_path: Path):
    store = open_store(tmp_path / "store")
    store.put_bytes("p.json", b"0", overwrite=True)
    _, token = store.read_versioned("p.json")
    wins = []

    def writer(i: int) -> None:
        if store.put_if_match("p.json", f"w{i}".encode(), token):
            wins.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.read_bytes("p.json") == f"w{wins[0]}".encode()


def test_unit_replaces_leftovers_until_complete_then_is_read_only(store_uri: str, tmp_path: Path):
    from covid_data.store import UnitCompleteError

    store = open_store(store_uri)
    unit = store.unit("models/m1", "metrics.json")
    unit.put_text("model.keras", "attempt 1")  # a killed attempt left this behind
    assert not unit.is_complete() and unit.record() is None
    unit.put_text("model.keras", "attempt 2")  # different bytes: replaced, no ObjectExistsError
    pkg = tmp_path / "m.mlpackage"
    (pkg / "Data").mkdir(parents=True)
    (pkg / "Manifest.json").write_text("{}")
    (pkg / "Data" / "w.bin").write_bytes(b"w")
    unit.put_tree("m.mlpackage", pkg)
    store.put_text("models/m10/other.txt", "a sibling whose name extends m1")
    assert unit.complete({"status": "trained"})
    rec = unit.record()
    assert rec["status"] == "trained"
    assert sorted(rec["objects"]) == ["m.mlpackage/Data/w.bin", "m.mlpackage/Manifest.json", "model.keras"]
    assert unit.verify() == []
    with pytest.raises(UnitCompleteError, match="models/m1"):
        unit.put_text("model.keras", "attempt 3")
    assert not unit.complete({"status": "again"})  # the first completion stays
    assert unit.record()["status"] == "trained"
    assert store.read_text("models/m1/model.keras") == "attempt 2"


def test_an_attempt_does_not_complete_over_objects_another_writer_replaced(store_uri: str, tmp_path: Path):
    """A timed-out attempt still running can overwrite model.keras: the attempt that completes checks
    its own writes, and a unit whose objects changed after completion is incomplete again."""
    from covid_data.store import Unit, UnitConflictError

    store = open_store(store_uri)
    mine = Unit(store, "models/slot", "metrics.json")
    mine.put_bytes("model.keras", b"attempt 2")
    mine.put_text("history.json", "[]")
    store.put_bytes("models/slot/model.keras", b"attempt 1, still running", overwrite=True)  # the zombie
    with pytest.raises(UnitConflictError, match="model.keras changed after this attempt wrote"):
        mine.complete({"result": 2})
    assert not mine.is_complete()

    retry = Unit(store, "models/slot", "metrics.json")
    retry.put_bytes("model.keras", b"attempt 3")
    assert retry.complete({"result": 3}) and retry.intact_record()["result"] == 3
    store.put_bytes("models/slot/model.keras", b"late zombie write", overwrite=True)
    assert retry.verify() == ["model.keras"]
    assert retry.intact_record() is None and not retry.is_complete()  # incomplete: the next attempt replaces it
    again = Unit(store, "models/slot", "metrics.json")
    again.put_bytes("model.keras", b"attempt 4")
    assert again.complete({"result": 4}) and again.intact_record()["result"] == 4
