"""prefect.yaml deployed to a real Prefect server and run by a real process worker."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
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


def test_retrain_deployment_takes_its_parameter_groups_as_json(prefect_cli):
    """retrain/adhoc carries store and the nested groups with their schema; a run's group, given as
    `-p group=JSON`, replaces the deployment's; a value the schema excludes is refused by the server.
    No worker is started: nothing runs."""
    prefect_cli.create_local_pool()
    prefect_cli.run("--no-prompt", "deploy", "--name", "retrain/adhoc")
    deployment = httpx.get(f"{prefect_cli.api}/deployments/name/retrain/adhoc", timeout=30).json()
    assert deployment["parameters"] == {
        "store": ".store",
        "data": {"source": "kaggle", "profile": "kaggle"},
        "training": {"preset": "cpu"},
    }
    schema = deployment["parameter_openapi_schema"]
    assert {"DataParams", "TrainingParams", "PromotionParams", "PublishingParams"} <= set(schema["definitions"])
    assert schema["properties"]["training"]["$ref"] == "#/definitions/TrainingParams"

    res = prefect_cli.run(
        "deployment", "run", "retrain/adhoc", "-p", 'training={"preset": "smoke"}', "-p", 'data={"source": "/x"}'
    )
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", res.stdout).group(1)
    run = httpx.get(f"{prefect_cli.api}/flow_runs/{flow_run_id}", timeout=30).json()
    assert run["parameters"] == {"store": ".store", "data": {"source": "/x"}, "training": {"preset": "smoke"}}

    with pytest.raises(RuntimeError, match=r"Validation failed for field 'training.preset'") as refused:
        prefect_cli.run("deployment", "run", "retrain/adhoc", "--params", '{"training": {"preset": "fast"}}')
    assert "UUID:" not in str(refused.value)  # no run was created
    with pytest.raises(RuntimeError, match=r"not found on the deployment: \s*'preset'"):
        prefect_cli.run("deployment", "run", "retrain/adhoc", "-p", "preset=smoke")  # the flat shape of before
