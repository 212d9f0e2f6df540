"""Columns added to the leaderboard after ranking (external sets, shortcut scores) and the external
promotion gate."""

from __future__ import annotations

from covid_eval.leaderboard import leaderboard, with_columns
from covid_registry.bless import external_gate


def _board() -> dict:
    records = [
        {"model": "custom_cnn", "status": "trained", "val_accuracy": 0.9, "val_loss": 0.3},
        {"model": "mobilenet_v2", "status": "trained", "val_accuracy": 0.95, "val_loss": 0.2},
        {"model": "vgg16", "status": "skipped", "error": "skipped: no file"},
    ]
    df = leaderboard(records)
    rows = df.astype(object).where(df.notna(), None).to_dict("records")
    return {"rows": rows, "markdown": ""}


def test_extra_columns_never_change_the_ranking():
    board = _board()
    out = with_columns(board, {"mobilenet_v2": {"ext1_accuracy": 0.61}, "custom_cnn": {"ext1_accuracy": 0.72}})
    assert [r["model"] for r in out["rows"]] == ["mobilenet_v2", "custom_cnn", "vgg16"]
    assert [r["ext1_accuracy"] for r in out["rows"]] == [0.61, 0.72, None]
    header = out["markdown"].splitlines()[0]
    assert header.endswith("| ext1_accuracy |") and "| weights |" in header
    assert "| 0.6100 |" in out["markdown"]


def test_external_floor_withdraws_a_blessing():
    blessed = {"blessed": True, "reason": "better", "rule": "better"}
    ext = [
        {"source": "/data/site-b", "accuracy": 0.71, "n": 120},
        {"source": "/data/site-c", "accuracy": 0.93, "n": 80},
    ]
    assert external_gate(blessed, ext, None) == blessed  # no gate asked for
    kept = external_gate(blessed, ext, 0.7)
    assert kept["blessed"] and [e["accuracy"] for e in kept["external"]] == [0.71, 0.93]
    refused = external_gate(blessed, ext, 0.8)
    assert not refused["blessed"] and refused["rule"] == "external_floor"
    assert "site-b" in refused["reason"] and "site-c" not in refused["reason"]
    assert external_gate({"blessed": False, "reason": "worse", "rule": "worse"}, ext, 0.8)["rule"] == "worse"


def test_a_model_chosen_on_validation_ranks_just_below_the_model_it_names():
    records = [
        {"model": "custom_cnn", "status": "trained", "val_accuracy": 0.90, "val_loss": 0.3},
        {"model": "mobilenet_v2", "status": "trained", "val_accuracy": 0.95, "val_loss": 0.2},
        {"model": "ensemble", "status": "trained", "val_accuracy": 0.97, "extra": {"rank_below": "mobilenet_v2"}},
        {"model": "vgg16", "status": "trained", "val_accuracy": 0.80, "val_loss": 0.5},
    ]
    board = leaderboard(records)
    assert list(board["model"]) == ["mobilenet_v2", "ensemble", "custom_cnn", "vgg16"]
    assert list(board["rank"]) == [1, 2, 3, 4]
    # A significant win on validation (no rank_below): it ranks by its figure like any row.
    records[2]["extra"] = {}
    assert list(leaderboard(records)["model"]) == ["ensemble", "mobilenet_v2", "custom_cnn", "vgg16"]
