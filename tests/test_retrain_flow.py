"""The retrain flow with the smoke preset, on a temporary Prefect server."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from covid_data.store import open_store
from covid_eval.leaderboard import leaderboard
from flows.retrain import retrain
from flows.retrain_params import DataParams, PublishingParams, TrainingParams
from tests.conftest import SHARED, make_kaggle_folder

pytestmark = pytest.mark.slow


@pytest.fixture
def weights_dir(monkeypatch):
    monkeypatch.setenv("COVID_WEIGHTS_DIR", str(SHARED / "weights"))


@pytest.mark.timeout(1200)  # two smoke runs; slow beside another test worker on 2 cores
def test_smoke_retrain_ranks_survives_a_failed_model_and_reuses(prefect_server, weights_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COVID_CACHE_DIR", str(tmp_path / "cache"))
    source = make_kaggle_folder(tmp_path / "src", n_per_class=30, seed=51)
    store = str(tmp_path / "store")
    # inception_v3 cannot take the smoke preset's 64px: its training fails, the other three go on.
    models = ["custom_cnn", "mobilenet_v2", "vgg16", "inception_v3"]
    data, training = DataParams(source=str(source), profile="any"), TrainingParams(preset="smoke", models=models)
    # No app bundle: the browser tests' published run builds one through this flow (about a minute here).
    publishing = PublishingParams(app=False)
    out = retrain(store=store, data=data, training=training, publishing=publishing)
    s = open_store(store)
    run = f"runs/{out['run_id']}"
    out_data = json.loads(s.read_text(f"{run}/run.json"))["dataset"]
    board = pd.read_csv(s.local_path(f"{run}/leaderboard.csv"))
    assert list(board["model"][3:]) == ["inception_v3"]
    assert list(board["status"]) == ["trained"] * 3 + ["failed"]
    assert list(board["rank"][:3]) == [1, 2, 3] and pd.isna(board["rank"][3])
    assert board["val_accuracy"][:3].is_monotonic_decreasing
    assert "needs an input of at least 75px" in board["error"][3]
    top = list(board["model"][:3])
    packages = sorted(k.split("/")[4] for k in s.list(f"{run}/exports") if k.endswith("Manifest.json"))
    assert packages == sorted(f"{m}.mlpackage" for m in top)
    for e in out["exports"]:
        v = e["variants"]
        assert sorted(v) == ["coreml", "tflite"]  # smoke: no int8
        assert v["coreml"]["checks"]["labels"] == ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
        assert v["tflite"]["checks"]["max_prob_diff"] < 1e-3
        assert s.exists(f"{run}/exports/{e['model']}/{e['model']}.tflite")
        card = s.read_text(f"{run}/model_cards/{e['model']}.md")
        assert "not a medical device" in card and "95% CI" in card and "paediatric" in card
        assert f"dataset version `{out_data['dataset_version']}`" in card and "The test split has" in card
    for m in top:
        assert s.exists(f"{run}/models/{m}/model.keras") and s.exists(f"{run}/models/{m}/curves.png")
    run_json = json.loads(s.read_text(f"{run}/run.json"))  # the marker, written last
    assert not run_json["succeeded"]
    assert sorted(run_json["objects"]) == sorted(
        k.removeprefix(run + "/") for k in s.list(run) if k != f"{run}/run.json"
    )
    assert out["champion"] is not None and not out["champion"]["changed"]
    assert not s.exists("champion.json")  # a partly failed (and capped) run never promotes
    assert len(s.list("champion/history")) == 1  # but the decision is recorded

    again = retrain(store=store, data=data, training=training, publishing=publishing)
    assert again["run_id"] != out["run_id"]
    status = {r["model"]: r["status"] for r in again["leaderboard"]}
    assert status == {"custom_cnn": "cached", "mobilenet_v2": "cached", "vgg16": "cached", "inception_v3": "failed"}
    assert [e["variants"] for e in again["exports"]] == [e["variants"] for e in out["exports"]]  # not converted again


def test_run_fails_when_too_few_models_succeed(prefect_server, tmp_path, monkeypatch):
    monkeypatch.setenv("COVID_CACHE_DIR", str(tmp_path / "cache"))
    source = make_kaggle_folder(tmp_path / "src", n_per_class=10, seed=53)
    state = retrain(
        store=str(tmp_path / "store"),
        data={"source": str(source), "profile": "any"},  # as a deployment run passes them: JSON objects
        training={"preset": "smoke", "models": ["inception_v3"]},
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(Exception, match=r"only 0 of 1 models trained; 1 are needed"):
        state.result()
    (run,) = (tmp_path / "store" / "runs").iterdir()
    assert "failed" in (run / "leaderboard.csv").read_text()


def test_leaderboard_ranks_deterministically():
    recs = [
        {"model": "b", "status": "trained", "val_accuracy": 0.9, "val_loss": 0.3},
        {"model": "a", "status": "trained", "val_accuracy": 0.9, "val_loss": 0.3},
        {"model": "c", "status": "failed", "error": "x"},
        {"model": "d", "status": "cached", "val_accuracy": 0.95, "val_loss": 0.5},
    ]
    board = leaderboard(recs)
    assert list(board["model"]) == ["d", "a", "b", "c"]
    assert list(board["rank"][:3]) == [1, 2, 3] and pd.isna(board["rank"][3])
    assert list(leaderboard(recs, rank_by="val_loss")["model"][:3]) == ["a", "b", "d"]
    with pytest.raises(ValueError, match="cannot rank by"):
        leaderboard(recs, rank_by="vibes")
    with pytest.raises(ValueError, match="selection on test"):
        leaderboard(recs, rank_by="test_accuracy")
