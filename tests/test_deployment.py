"""prefect.yaml deployed to a real Prefect server and run by a real process worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from covid_data.store import open_store
from tests.conftest import make_kaggle_folder

pytestmark = pytest.mark.slow


def test_prepare_data_runs_from_its_deployment(prefect_cli, tmp_path: Path):
    source = make_kaggle_folder(tmp_path / "src", n_per_class=10, seed=31)
    store = tmp_path / "store"
    prefect_cli.create_local_pool()
    prefect_cli.run("--no-prompt", "deploy", "--name", "prepare-data/adhoc")
    prefect_cli.start_worker("local-process")
    params = {"source": str(source), "store": str(store), "profile": "any", "cache_dir": str(tmp_path / "cache")}
    res = prefect_cli.run(
        "deployment",
        "run",
        "prepare-data/adhoc",
        "--params",
        json.dumps(params),
        "--watch",
        "--watch-timeout",
        "300",
        timeout=360,
    )
    assert "Completed" in res.stdout, res.stdout + prefect_cli.log("worker-local-process.log")
    keys = open_store(store).list()
    assert sum(k.endswith(".png") and "/images/" in k for k in keys) == 40
    assert sum(k.endswith(".png") and "/masks/" in k for k in keys) == 4  # the usable lung masks
    assert any(k.endswith("/split.parquet") for k in keys)
    assert any(k.endswith("/validation/any-" + k.split("/validation/any-")[-1]) for k in keys if "/validation/" in k)
