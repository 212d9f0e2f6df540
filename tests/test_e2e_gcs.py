"""End to end on Google Cloud Storage: `retrain/adhoc` run by a real worker into a bucket of the
gcp-storage-emulator. One model and no app bundle: what is under test is the store, not the ranking
(app bundles go through the same store units, tested in the browser and crash-safety tests)."""

from __future__ import annotations

import uuid

import pytest

from covid_data.store import open_store
from tests.conftest import make_kaggle_folder
from tests.e2e import check_run, deploy_and_start, promotable_params, run_adhoc

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1200)
def test_retrain_publishes_to_gcs(gcs_emulator, prefect_cli, tmp_path):
    cli = prefect_cli
    cli.seen_runs = set()
    deploy_and_start(cli, tmp_path)
    source = make_kaggle_folder(tmp_path / "src", n_per_class=30, seed=62)
    store = f"gs://covid-test/e2e-{uuid.uuid4().hex[:8]}"
    params = promotable_params(source, store, models=["custom_cnn"], app=False)
    out = check_run(cli, store, run_adhoc(cli, params), tmp_path)
    s = open_store(store)
    assert s.exists("champion.json") and s.exists(f"runs/{out['record']['run_id']}/leaderboard.md")
    assert sorted(k for k in s.list("models") if k.endswith("model.keras"))  # the slots are in the bucket
    assert len(out["record"]["exports"]) == 1
