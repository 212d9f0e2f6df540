"""End to end: `retrain/adhoc` fans its trainings out as child runs of the `train-model/local`
deployment, each picked up by a real worker."""

from __future__ import annotations

import pytest

from tests.conftest import make_kaggle_folder
from tests.e2e import api, check_run, deploy_and_start, run_adhoc, smoke_params

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1200)
def test_retrain_fans_out_to_the_train_model_deployment(prefect_cli, tmp_path):
    cli = prefect_cli
    cli.seen_runs = set()
    deploy_and_start(cli, tmp_path)
    cli.run("--no-prompt", "deploy", "--name", "local")  # the train-model deployment
    source = make_kaggle_folder(tmp_path / "src", n_per_class=30, seed=63)
    store = str(tmp_path / "store")
    models = ["custom_cnn", "mobilenet_v2"]  # two children are enough to show one child run per model
    params = smoke_params(source, store, models=models, train_deployment="train-model/local")
    params["publishing"] = {"app": False}  # what is under test is the fan-out
    flow_run_id = run_adhoc(cli, params)
    out = check_run(cli, store, flow_run_id, tmp_path)
    assert {r["status"] for r in out["board"]} == {"trained"}
    children = api(cli, "/flow_runs/filter", {"flow_runs": {"name": {"like_": "train-"}}})
    names = sorted(c["name"] for c in children if c["state"]["type"] == "COMPLETED")
    assert names == ["train-custom_cnn", "train-mobilenet_v2"]  # one child flow run per model
    deployments = {c["deployment_id"] for c in children}
    assert len(deployments) == 1 and None not in deployments
