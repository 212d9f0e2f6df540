"""The retrain flow with the smoke preset, on a temporary Prefect server."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from covid_data.store import open_store
from covid_models.leaderboard import leaderboard
from covid_models.publish import decide_champion
from flows.retrain import retrain
from tests.conftest import SHARED, make_kaggle_folder

pytestmark = pytest.mark.slow


@pytest.fixture
def weights_dir(monkeypatch):
    monkeypatch.setenv("COVID_WEIGHTS_DIR", str(SHARED / "weights"))


def test_smoke_retrain_ranks_survives_a_failed_model_and_reuses(prefect_server, weights_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COVID_CACHE_DIR", str(tmp_path / "cache"))
    source = make_kaggle_folder(tmp_path / "src", n_per_class=30, seed=51)
    store = str(tmp_path / "store")
    # inception_v3 cannot take the smoke preset's 64px: its training fails, the other three go on.
    models = ["custom_cnn", "mobilenet_v2", "vgg16", "inception_v3"]
    out = retrain(source=str(source), store=store, preset="smoke", profile="any", models=models)
    s = open_store(store)
    run = f"runs/{out['run_id']}"
    board = pd.read_csv(s.local_path(f"{run}/leaderboard.csv"))
    assert list(board["model"][3:]) == ["inception_v3"]
    assert list(board["status"]) == ["trained"] * 3 + ["failed"]
    assert list(board["rank"][:3]) == [1, 2, 3] and pd.isna(board["rank"][3])
    assert board["val_accuracy"][:3].is_monotonic_decreasing
    assert "needs an input of at least 75px" in board["error"][3]
    top = list(board["model"][:3])
    packages = sorted(k.split("/")[3] for k in s.list(f"{run}/exports") if k.endswith("Manifest.json"))
    assert packages == sorted(f"{m}.mlpackage" for m in top)
    for e in out["exports"]:
        assert e["checks"]["coreml"]["labels"] == ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
        assert e["tflite_max_prob_diff"] < 1e-3
        assert s.exists(f"{run}/exports/{e['model']}.tflite")
        card = s.read_text(f"{run}/model_cards/{e['model']}.md")
        assert "not a medical device" in card and "95% CI" in card
    for m in top:
        assert s.exists(f"{run}/models/{m}/model.keras") and s.exists(f"{run}/models/{m}/curves.png")
    run_json = json.loads(s.read_text(f"{run}/run.json"))
    assert not run_json["succeeded"] and "did not fully succeed" in out["champion"]["reason"]
    assert not s.exists("champion.json")  # a partly failed run never promotes

    again = retrain(source=str(source), store=store, preset="smoke", profile="any", models=models)
    assert again["run_id"] != out["run_id"]
    status = {r["model"]: r["status"] for r in again["leaderboard"]}
    assert status == {"custom_cnn": "cached", "mobilenet_v2": "cached", "vgg16": "cached", "inception_v3": "failed"}
    assert [e["coreml_bytes"] for e in again["exports"]] == [e["coreml_bytes"] for e in out["exports"]]


def test_run_fails_when_too_few_models_succeed(prefect_server, tmp_path, monkeypatch):
    monkeypatch.setenv("COVID_CACHE_DIR", str(tmp_path / "cache"))
    source = make_kaggle_folder(tmp_path / "src", n_per_class=10, seed=53)
    state = retrain(
        source=str(source),
        store=str(tmp_path / "store"),
        preset="smoke",
        profile="any",
        models=["inception_v3"],
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(Exception, match=r"only 0 of 1 models trained; 1 are needed"):
        state.result()
    (run,) = (tmp_path / "store" / "runs").iterdir()
    assert "failed" in (run / "leaderboard.csv").read_text()


def test_champion_rules(tmp_path):
    store = open_store(tmp_path / "store")
    base = {"run_id": "r1", "model": "a", "split_hash": "s1", "test_accuracy": 0.90, "test_covid_sensitivity": 0.95}
    assert decide_champion(store, base, run_succeeded=True, margin=0.01, covid_sensitivity_floor=0.9).changed
    assert json.loads(store.read_text("champion.json"))["run_id"] == "r1"
    slightly = {**base, "run_id": "r2", "test_accuracy": 0.905}
    d = decide_champion(store, slightly, run_succeeded=True, margin=0.01, covid_sensitivity_floor=0.9)
    assert not d.changed and "margin" in d.reason
    insensitive = {**base, "run_id": "r3", "test_accuracy": 0.99, "test_covid_sensitivity": 0.80}
    d = decide_champion(store, insensitive, run_succeeded=True, margin=0.01, covid_sensitivity_floor=0.9)
    assert not d.changed and "below the floor" in d.reason
    other_split = {**base, "run_id": "r4", "split_hash": "s2", "test_accuracy": 0.99}
    assert not decide_champion(store, other_split, run_succeeded=True, margin=0.0, covid_sensitivity_floor=0.9).changed
    failed_run = {**base, "run_id": "r5", "test_accuracy": 0.99}
    assert not decide_champion(store, failed_run, run_succeeded=False, margin=0.0, covid_sensitivity_floor=0.9).changed
    better = {**base, "run_id": "r6", "test_accuracy": 0.95}
    assert decide_champion(store, better, run_succeeded=True, margin=0.01, covid_sensitivity_floor=0.9).changed
    assert json.loads(store.read_text("champion.json"))["run_id"] == "r6"


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
