"""Columns added to the leaderboard after ranking (external sets, shortcut scores) and the external
promotion gate."""

from __future__ import annotations

from covid_eval.leaderboard import leaderboard, with_columns
from covid_registry.bless import external_gate, false_alarm_gate
from covid_registry.model_card import external_lines, external_report_lines
from tasks.models import external_columns, external_notes


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


SHENZHEN = {
    "set_kind": "negative",
    "source": "folder:/shared/data/shenzhen-cxr",
    "name": "shenzhen-cxr",
    "about": "pre-pandemic X-rays from another hospital, none COVID",
    "n": 640,
    "covid_predicted": 32,
    "false_alarm_rate": 0.05,
    "false_alarm_ci95": [0.0357, 0.0697],
    "test_false_alarm_rate": 0.02,
    "test_false_alarm_ci95": [0.01, 0.04],
    "per_finding": {
        "Normal": {"n": 320, "false_alarm_rate": 0.025},
        "Tuberculosis": {"n": 320, "false_alarm_rate": 0.075},
    },
}
SITE_B = {"set_kind": "labelled", "source": "/data/site-b", "name": "site-b", "accuracy": 0.71, "n": 120}


def test_false_alarm_ceiling_withdraws_a_blessing_on_negative_sets_only():
    blessed = {"blessed": True, "reason": "better", "rule": "beats_champion"}
    ext = [SITE_B, SHENZHEN]
    assert false_alarm_gate(blessed, ext, None) == blessed  # no gate asked for
    kept = false_alarm_gate(blessed, ext, 0.05)  # at the ceiling: allowed
    assert kept["blessed"] and [e["false_alarm_rate"] for e in kept["external_false_alarms"]] == [0.05]
    refused = false_alarm_gate(blessed, ext, 0.04)
    assert not refused["blessed"] and refused["rule"] == "external_false_alarm_ceiling"
    assert "shenzhen-cxr: 0.0500 (32 of 640 called COVID)" in refused["reason"] and "site-b" not in refused["reason"]
    assert false_alarm_gate(blessed, [SITE_B], 0.0)["blessed"]  # no negative set: nothing to check
    unmeasured = [{**SHENZHEN, "false_alarm_rate": None}]
    assert false_alarm_gate(blessed, unmeasured, 0.5)["rule"] == "external_false_alarm_ceiling"  # never passes
    assert false_alarm_gate({"blessed": False, "rule": "does_not_beat", "reason": "worse"}, ext, 0.0)["rule"] == (
        "does_not_beat"
    )
    # The accuracy floor is the labelled sets' alone: a negative set has no accuracy to fail it.
    assert external_gate(blessed, ext, 0.7)["blessed"]


def test_false_alarm_columns_sit_beside_the_test_metrics_and_say_what_the_set_is():
    externals = {"mobilenet_v2": [SITE_B, SHENZHEN], "custom_cnn": [SITE_B, {**SHENZHEN, "false_alarm_rate": 0.1}]}
    out = with_columns(
        _board(), external_columns(externals), after="test_covid_sensitivity", notes=external_notes(externals)
    )
    cols = list(out["rows"][0])
    at = cols.index("test_covid_sensitivity")
    assert cols[at + 1 : at + 7] == [
        "ext1_accuracy",
        "ext1_covid_sensitivity",
        "ext1_n",
        "ext2_covid_false_alarm",
        "ext2_covid_false_alarm_ci95",
        "ext2_n",
    ]
    assert [r["ext2_covid_false_alarm"] for r in out["rows"]] == [0.05, 0.1, None]
    assert out["rows"][0]["ext2_covid_false_alarm_ci95"] == "0.0357-0.0697"
    assert (
        "- ext2: shenzhen-cxr, pre-pandemic X-rays from another hospital, none COVID (negative set" in out["markdown"]
    )
    later = with_columns(out, {"mobilenet_v2": {"shortcut (uniform)": "0.30 (0.36)"}})  # notes and order stay
    assert list(later["rows"][0])[: len(cols)] == cols and "- ext2: shenzhen-cxr" in later["markdown"]
    card = "\n".join(external_lines([SHENZHEN]))
    assert "**shenzhen-cxr** (pre-pandemic X-rays from another hospital, none COVID)" in card
    assert "COVID false-alarm rate 5.0% (95% CI 3.6-7.0%): 32 of 640 images called COVID" in card
    assert "Tuberculosis 7.5% (n=320)" in card and "own test split, 2.0%" in card
    report = "\n".join(external_report_lines(externals))
    assert "| mobilenet_v2 | 5.0% | 3.6-7.0% | 640 | 2.0% |" in report and "| custom_cnn | 10.0% |" in report
