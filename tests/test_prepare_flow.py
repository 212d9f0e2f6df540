"""The prepare-data flow on a real (temporary, SQLite) Prefect server."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pandas as pd
import pytest

from covid_data.store import open_store
from flows.prepare_data import prepare_data
from tests.conftest import make_kaggle_folder

SMALL = {"profile": "any", "train": 0.6, "val": 0.2, "test": 0.2}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return make_kaggle_folder(tmp_path / "src", n_per_class=10, seed=21)


def _artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return found


def test_flow_prepares_a_sample_end_to_end(prefect_server, source, store_uri, tmp_path):
    out = prepare_data(source=str(source), store=store_uri, cache_dir=str(tmp_path / "cache"), **SMALL)
    store = open_store(store_uri)
    prefix = f"datasets/{out['dataset_version']}"
    assert out["dataset"] == store.uri_for(prefix)
    assert len(store.list(f"{prefix}/images")) == 40
    manifest = pd.read_parquet(io.BytesIO(store.read_bytes(f"{prefix}/manifest.parquet")))
    assert len(manifest) == 40
    assert '"success": true' in store.read_text(out["validation"].removeprefix(store.uri + "/"))
    split_key = out["split"].removeprefix(store.uri + "/")
    split = pd.read_parquet(io.BytesIO(store.read_bytes(split_key)))
    assert split["split"].value_counts().to_dict() == {"train": 24, "val": 8, "test": 8}
    assert out["split_hash"] in out["split"]
    assert _artifact("data-validation") and _artifact("split-counts")


def test_second_run_uploads_nothing_and_keeps_the_version(prefect_server, source, tmp_path):
    store_dir = tmp_path / "store"
    first = prepare_data(source=str(source), store=str(store_dir), **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in store_dir.rglob("*.png")}
    second = prepare_data(source=str(source), store=str(store_dir), **SMALL)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in store_dir.rglob("*.png")} == stamps


def test_failed_validation_stops_the_flow_and_loses_nothing(prefect_server, source, tmp_path):
    store_dir = tmp_path / "store"
    good = prepare_data(source=str(source), store=str(store_dir), **SMALL)
    before = open_store(store_dir).checksums()

    shutil.rmtree(source / "COVID-19_Radiography_Dataset" / "Viral Pneumonia")
    state = prepare_data(source=str(source), store=str(store_dir), return_state=True, **SMALL)
    assert state.is_failed()
    with pytest.raises(Exception) as err:
        state.result()
    msg = str(err.value)
    assert "data validation failed" in msg and "missing ['Viral Pneumonia']" in msg
    after = open_store(store_dir).checksums()
    assert {k: v for k, v in after.items() if k in before} == before  # the good version is intact
    assert not any("/splits/" in k for k in set(after) - set(before))  # no split of bad data
    assert good["dataset_version"] not in [k.split("/")[1] for k in set(after) - set(before)]


def test_wrong_folder_fails_with_its_path(prefect_server, tmp_path):
    (tmp_path / "holiday-photos" / "beach").mkdir(parents=True)
    state = prepare_data(source=str(tmp_path / "holiday-photos"), store=str(tmp_path / "s"), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="no class folders found under .*holiday-photos"):
        state.result()


def test_every_data_setting_is_a_flow_parameter_and_a_cli_option(capsys):
    from flows.prepare_data import main

    params = set(prepare_data.parameters.properties)
    assert params == {
        "source",
        "store",
        "profile",
        "image_size",
        "size_mismatch",
        "unreadable",
        "train",
        "val",
        "test",
        "seed",
        "near_dup_distance",
        "max_group_share",
        "cache_dir",
        "kaggle_secret_block",
        "extra_sources",
    }
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    # A repeatable option is named in the singular.
    cli = {p for p in params if p not in ("train", "val", "test", "extra_sources")} | {"split", "extra_source"}
    for name in cli:
        assert f"--{name.replace('_', '-')} " in help_text, name
    assert help_text.count("(default:") >= len(cli)  # each option explains itself and its default


def test_secret_block_credentials(prefect_server):
    from prefect.blocks.system import Secret

    from covid_data.kaggle_download import KaggleAuthError
    from tasks.credentials import prefect_secret_credentials, secret_block_credentials

    Secret(value={"username": "carol", "key": "k-123"}).save("kaggle-test-creds", overwrite=True)
    creds = prefect_secret_credentials("kaggle-test-creds")()
    assert (creds.username, creds.key) == ("carol", "k-123")
    assert "kaggle-test-creds" in creds.origin
    assert secret_block_credentials("no-such-block") is None
    assert prefect_secret_credentials(None) is None
    Secret(value={"username": "carol"}).save("kaggle-test-bad", overwrite=True)
    with pytest.raises(KaggleAuthError, match="must hold"):
        secret_block_credentials("kaggle-test-bad")
