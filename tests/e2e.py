"""What the end-to-end tests share: a `retrain/adhoc` run through a real Prefect server and worker, and
the checks every published run must pass (tests/test_e2e_*.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from covid_data.labels import CLASSES
from covid_data.store import open_store
from tests.conftest import SHARED, require_shared


def run_adhoc(cli, params: dict) -> str:
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


def api(cli, path: str, body: dict) -> list[dict]:
    r = httpx.post(f"{cli.api}{path}", json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def labels(package: Path) -> list[str]:
    import coremltools as ct

    from covid_registry.convert import _classify_labels

    return _classify_labels(ct.models.MLModel(str(package), skip_model_load=True).get_spec())


def smoke_params(source: Path, store: str, **training) -> dict:
    """The flow's parameter groups as JSON; each group replaces the deployment's (prefect.yaml)."""
    return {
        "store": store,
        "data": {"source": str(source), "profile": "any"},
        "training": {"preset": "smoke", **training},
        # The smoke models (one epoch on a sample) are weak: a zero floor lets the champion rules run.
        "promotion": {"covid_sensitivity_floor": 0.0},
    }


TOP_THREE = ["custom_cnn", "mobilenet_v2", "vgg16"]  # three models, so the top-three export runs


def smoke_sized(model: str) -> dict:
    # vgg16 has no ImageNet file here: trained from scratch, an explicit choice (else it is skipped)
    weights = {"weights": "scratch"} if model == "vgg16" else {}
    return {"input_size": 64, "epochs": 1, "fine_tune_epochs": 0, **weights}


def promotable_params(
    source: Path, store: str, models: list[str] = TOP_THREE, ensemble: int = 0, app: bool = True
) -> dict:
    """Smoke-sized training under the cpu preset: its test set is not capped, so it may promote
    (a smoke run never can). ``ensemble``: the preset's averaged ensemble (0: none); ``app``: build
    the phone app bundle (the browser tests cover it; other end-to-end tests can spare its minute)."""
    training = {"models": models, "overrides": {m: smoke_sized(m) for m in models}, "max_parallel": 2}
    return {
        **smoke_params(source, store, **training, preset="cpu", ensemble=ensemble),
        "publishing": {"int8": False, "app": app},
    }


def deploy_and_start(cli, tmp_path: Path) -> None:
    require_shared(SHARED / "weights")  # MobileNetV2 trains on ImageNet weights in every end-to-end run
    cli.settings.update(COVID_WEIGHTS_DIR=str(SHARED / "weights"), COVID_CACHE_DIR=str(tmp_path / "cache"))
    cli.create_local_pool()
    cli.run("--no-prompt", "deploy", "--name", "retrain/adhoc")
    cli.start_worker("local-process")


def check_run(cli, store_uri: str, flow_run_id: str, tmp_path: Path) -> dict:
    (run,) = api(cli, "/flow_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    assert run["state"]["type"] == "COMPLETED"
    children = api(cli, "/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"is_null_": False}}})
    assert any(c["name"] and c["flow_id"] != run["flow_id"] for c in children)  # prepare-data ran as a subflow
    arts = api(cli, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
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
    assert len(packages) == min(3, len(board))  # the top three, or every model of a smaller run
    for pkg in packages:
        local = tmp_path / "pkgs" / run_dir / pkg
        for key in store.list(f"runs/{run_dir}/exports/{pkg}"):
            store.get_file(key, local / key.split(f"{pkg}/", 1)[1])
        assert labels(local) == list(CLASSES)
    assert all(e["variants"]["tflite"]["checks"]["max_prob_diff"] < 1e-3 for e in record["exports"])
    return {"record": record, "board": board}
