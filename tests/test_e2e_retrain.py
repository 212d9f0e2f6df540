"""End to end: prefect.yaml deployed to a real Prefect server, `retrain/adhoc` run by a real worker
into a bucket of the gcp-storage-emulator, twice: the second run reuses every model and keeps the
champion. Without the app bundle (the browser tests and the crash-safety test build it, through the
same store units): what is under test is the deployment and the store."""

from __future__ import annotations

import json
import uuid

import pytest

from covid_data.store import open_store
from covid_registry.champion import history
from tests.conftest import make_kaggle_folder
from tests.e2e import check_run, deploy_and_start, promotable_params, run_adhoc

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1800)  # two runs of two models and an ensemble: over 600 s beside another test worker
def test_retrain_adhoc_deployment_end_to_end_on_gcs(gcs_emulator, prefect_cli, tmp_path):
    cli = prefect_cli
    cli.seen_runs = set()
    deploy_and_start(cli, tmp_path)
    source = make_kaggle_folder(tmp_path / "src", n_per_class=30, seed=61)
    store = f"gs://covid-test/e2e-{uuid.uuid4().hex[:8]}"
    params = promotable_params(source, store, models=["custom_cnn", "mobilenet_v2"], ensemble=2, app=False)
    first = check_run(cli, store, run_adhoc(cli, params), tmp_path)
    assert {r["status"] for r in first["board"]} == {"trained"}
    ensemble = next(r for r in first["board"] if r["model"] == "ensemble")  # ranked with the others
    assert "average of the calibrated probabilities of" in ensemble["weights"] and len(first["board"]) == 3
    assert first["record"]["app"] == {"status": "skipped", "reason": "publishing.app is off"}
    assert not open_store(store).list(f"runs/{first['record']['run_id']}/app")  # no bundle was written
    s = open_store(store)
    assert s.exists(f"runs/{first['record']['run_id']}/leaderboard.md") and len(first["record"]["exports"]) == 3
    slots = sorted(k.split("/")[2].split("-")[0] for k in s.list("models") if k.endswith("/model.keras"))
    assert slots == ["custom_cnn", "ensemble", "mobilenet_v2"]  # every slot is in the bucket
    champion = json.loads(open_store(store).read_text("champion.json"))
    assert champion["run_id"] == first["record"]["run_id"] and champion["model"] == first["board"][0]["model"]

    second = check_run(cli, store, run_adhoc(cli, params), tmp_path)
    assert {r["status"] for r in second["board"]} == {"cached"}  # nothing retrained
    kept = json.loads(open_store(store).read_text("champion.json"))
    assert kept["run_id"] == first["record"]["run_id"]  # an equal model does not beat the champion
    assert not second["record"]["promotion"]["pending"]  # run.json says it, before promotion runs last
    last = history(store)[-1]  # the decision itself: the champion history's newest entry
    assert last["run_id"] == second["record"]["run_id"] and last["action"] == "keep"
    assert second["record"]["blessing"]["comparison"]["n"] > 0  # the champion was scored again, same images
