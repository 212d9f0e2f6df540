"""benchmarks/retrain.py --repeats: each figure as mean ± sd over runs, computed by hand here."""

from __future__ import annotations

import math

from benchmarks.retrain import repeat_table, summarise_repeats


def _run(rows: list[dict]) -> dict:
    return {"leaderboard": rows}


def test_repeats_aggregate_each_model_and_each_runs_rank_one():
    runs = [
        _run(
            [
                {"model": "a", "status": "trained", "rank": 1, "test_accuracy": 0.90, "ext1_covid_false_alarm": 0.2},
                {"model": "b", "status": "trained", "rank": 2, "test_accuracy": 0.80, "ext1_covid_false_alarm": 0.5},
            ]
        ),
        _run(
            [
                {"model": "b", "status": "cached", "rank": 1, "test_accuracy": 0.86, "ext1_covid_false_alarm": 0.1},
                {"model": "a", "status": "trained", "rank": 2, "test_accuracy": 0.84, "ext1_covid_false_alarm": 0.4},
                {"model": "c", "status": "failed", "rank": None, "test_accuracy": 0.99},  # a failure is no figure
            ]
        ),
        _run([{"model": "a", "status": "trained", "rank": 1, "test_accuracy": 0.87, "test_macro_f1": float("nan")}]),
    ]
    s = summarise_repeats(runs)
    assert s["rank1"]["models"] == ["a", "b", "a"]
    top = s["rank1"]["test_accuracy"]
    assert top["n"] == 3 and math.isclose(top["mean"], (0.90 + 0.86 + 0.87) / 3)
    mean = (0.90 + 0.86 + 0.87) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in (0.90, 0.86, 0.87)) / 2)  # sample sd
    assert math.isclose(top["sd"], sd) and (top["min"], top["max"]) == (0.86, 0.90)
    assert s["a"]["test_accuracy"]["n"] == 3 and s["b"]["test_accuracy"]["n"] == 2
    assert s["a"]["ext1_covid_false_alarm"]["n"] == 2  # the third run had no external set
    assert "c" not in s and "test_macro_f1" not in s["a"]  # failed rows and NaN are left out
    assert "rank" not in s["a"]  # the rank is not a figure
    table = repeat_table(s)
    assert table.splitlines()[2].startswith("| rank 1 (a, b, a) | ")
    assert f"{mean:.3f} ± {sd:.3f} [0.860, 0.900] (n=3)" in table


def test_a_single_run_has_no_spread():
    s = summarise_repeats([_run([{"model": "a", "status": "trained", "rank": 1, "test_accuracy": 0.9}])])
    assert s["a"]["test_accuracy"]["sd"] is None
    assert "0.900 [0.900, 0.900] (n=1)" in repeat_table(s)
