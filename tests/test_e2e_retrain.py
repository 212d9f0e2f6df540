"""End to end: prefect.yaml deployed to a real Prefect server, `retrain/adhoc` run by a real worker."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import httpx
import pytest

from covid_data.labels import CLASSES
from covid_data.store import open_store
from covid_registry.champion import history
from tests.conftest import SHARED, make_kaggle_folder

pytestmark = pytest.mark.slow


def _run(cli, params: dict) -> str:
    res = cli.run(
        "deployment",
        "run",
        "retrain/adhoc",
        "--params",
        json.dumps(params),
        "--watch",
        "--watch-timeout",
        "1200",
        timeout=1260,
    )
    assert "Completed" in res.stdout, res.stdout[-3000:] + cli.log("worker-local-process.log")
    return re.search(r"UUID: ([0-9a-f-]{36})", res.stdout).group(1)


def _api(cli, path: str, body: dict) -> list[dict]:
    r = httpx.post(f"{cli.api}{path}", json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def _labels(package: Path) -> list[str]:
    import coremltools as ct

    from covid_registry.convert import _classify_labels

    return _classify_labels(ct.models.MLModel(str(package), skip_model_load=True).get_spec())


def _smoke_params(source: Path, store: str, **training) -> dict:
    """The flow's parameter groups as JSON; each group replaces the deployment's (prefect.yaml)."""
    return {
        "store": store,
        "data": {"source": str(source), "profile": "any"},
        "training": {"preset": "smoke", **training},
        # The smoke models (one epoch on a sample) are weak: a zero floor lets the champion rules run.
        "promotion": {"covid_sensitivity_floor": 0.0},
    }


def _smoke_sized(model: str) -> dict:
    # vgg16 has no ImageNet file here: trained from scratch, an explicit choice (else it is skipped)
    weights = {"weights": "scratch"} if model == "vgg16" else {}
    return {"input_size": 64, "epochs": 1, "fine_tune_epochs": 0, **weights}


def _promotable_params(source: Path, store: str, ensemble: int = 0) -> dict:
    """Smoke-sized training under the cpu preset: its test set is not capped, so it may promote
    (a smoke run never can). ``ensemble``: the preset's averaged ensemble (0: none)."""
    models = ["custom_cnn", "mobilenet_v2", "vgg16"]
    training = {"models": models, "overrides": {m: _smoke_sized(m) for m in models}, "max_parallel": 2}
    return {
        **_smoke_params(source, store, **training, preset="cpu", ensemble=ensemble),
        "publishing": {"int8": False},
    }


def _deploy_and_start(cli, tmp_path: Path) -> None:
    cli.settings.update(COVID_WEIGHTS_DIR=str(SHARED / "weights"), COVID_CACHE_DIR=str(tmp_path / "cache"))
    cli.create_local_pool()
    cli.run("--no-prompt", "deploy", "--name", "retrain/adhoc")
    cli.start_worker("local-process")


def _check_run(cli, store_uri: str, flow_run_id: str, tmp_path: Path) -> dict:
    (run,) = _api(cli, "/flow_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    assert run["state"]["type"] == "COMPLETED"
    children = _api(cli, "/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"is_null_": False}}})
    assert any(c["name"] and c["flow_id"] != run["flow_id"] for c in children)  # prepare-data ran as a subflow
    arts = _api(cli, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    keys = {a["key"] for a in arts if a["key"]}
    assert {"leaderboard", "retrain-report"} <= keys
    board = next(a for a in arts if a["key"] == "leaderboard")["data"]
    board = json.loads(board) if isinstance(board, str) else board  # table artifacts store JSON text
    assert [row["model"] for row in board] and all(row["status"] != "failed" for row in board)

    store = open_store(store_uri)
    (run_dir,) = {k.split("/")[1] for k in store.list("runs") if k.endswith("/run.json")} - cli.seen_runs
    cli.seen_runs.add(run_dir)
    record = json.loads(store.read_text(f"runs/{run_dir}/run.json"))
    packages = sorted(
        {"/".join(k.split("/")[3:5]) for k in store.list(f"runs/{run_dir}/exports") if ".mlpackage/" in k}
    )
    assert len(packages) == 3
    for pkg in packages:
        local = tmp_path / "pkgs" / run_dir / pkg
        for key in store.list(f"runs/{run_dir}/exports/{pkg}"):
            store.get_file(key, local / key.split(f"{pkg}/", 1)[1])
        assert _labels(local) == list(CLASSES)
    assert all(e["variants"]["tflite"]["checks"]["max_prob_diff"] < 1e-3 for e in record["exports"])
    return {"record": record, "board": board}


@pytest.mark.timeout(1800)  # two runs of three models and an ensemble: over 600 s beside another test worker
def test_retrain_adhoc_deployment_end_to_end(prefect_cli, tmp_path):
    cli = prefect_cli
    cli.seen_runs = set()
    _deploy_and_start(cli, tmp_path)
    source = make_kaggle_folder(tmp_path / "src", n_per_class=30, seed=61)
    store = str(tmp_path / "store")
    params = _promotable_params(source, store, ensemble=3)
    first = _check_run(cli, store, _run(cli, params), tmp_path)
    assert {r["status"] for r in first["board"]} == {"trained"}
    ensemble = next(r for r in first["board"] if r["model"] == "ensemble")  # ranked with the others
    assert "average of the calibrated probabilities of" in ensemble["weights"] and len(first["board"]) == 4
    champion = json.loads(open_store(store).read_text("champion.json"))
    assert champion["run_id"] == first["record"]["run_id"] and champion["model"] == first["board"][0]["model"]

    second = _check_run(cli, store, _run(cli, params), tmp_path)
    assert {r["status"] for r in second["board"]} == {"cached"}  # nothing retrained
    kept = json.loads(open_store(store).read_text("champion.json"))
    assert kept["run_id"] == first["record"]["run_id"]  # an equal model does not beat the champion
    assert not second["record"]["promotion"]["pending"]  # run.json says it, before promotion runs last
    last = history(store)[-1]  # the decision itself: the champion history's newest entry
    assert last["run_id"] == second["record"]["run_id"] and last["action"] == "keep"
    assert second["record"]["blessing"]["comparison"]["n"] > 0  # the champion was scored again, same images


@pytest.mark.timeout(1200)
def test_retrain_publishes_to_gcs(gcs_emulator, prefect_cli, tmp_path):
    cli = prefect_cli
    cli.seen_runs = set()
    _deploy_and_start(cli, tmp_path)
    source = make_kaggle_folder(tmp_path / "src", n_per_class=30, seed=62)
    store = f"gs://covid-test/e2e-{uuid.uuid4().hex[:8]}"
    params = _promotable_params(source, store)
    out = _check_run(cli, store, _run(cli, params), tmp_path)
    s = open_store(store)
    assert s.exists("champion.json") and s.exists(f"runs/{out['record']['run_id']}/leaderboard.md")
    assert any(k.endswith("model.keras") for k in s.list("models"))


@pytest.mark.timeout(1200)
def test_retrain_fans_out_to_the_train_model_deployment(prefect_cli, tmp_path):
    cli = prefect_cli
    cli.seen_runs = set()
    _deploy_and_start(cli, tmp_path)
    cli.run("--no-prompt", "deploy", "--name", "local")  # the train-model deployment
    source = make_kaggle_folder(tmp_path / "src", n_per_class=30, seed=63)
    store = str(tmp_path / "store")
    params = _smoke_params(source, store, train_deployment="train-model/local")
    flow_run_id = _run(cli, params)
    out = _check_run(cli, store, flow_run_id, tmp_path)
    assert {r["status"] for r in out["board"]} == {"trained"}
    children = _api(cli, "/flow_runs/filter", {"flow_runs": {"name": {"like_": "train-"}}})
    names = sorted(c["name"] for c in children if c["state"]["type"] == "COMPLETED")
    assert names == ["train-custom_cnn", "train-mobilenet_v2", "train-vgg16"]  # one child flow run per model
    deployments = {c["deployment_id"] for c in children}
    assert len(deployments) == 1 and None not in deployments
