"""The champion's promotion decisions: blessing on the same images, compare-and-swap.

Real tiny models (tests/champion_world.py, the ``world`` fixture) and real stores (a folder and
the GCS emulator, which enforces generation preconditions like GCS). History, rollback, crash
safety and the command line: tests/test_champion_history.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from covid_data.store import open_store
from covid_eval.duplicates import training_images
from covid_registry.bless import bless, candidate_record
from covid_registry.champion import (
    CHAMPION,
    current,
    decide_and_promote,
    evaluate_and_promote,
    history,
    read_champion,
)
from covid_registry.comparison import Comparison, mcnemar_exact, score_model, split_sha256
from tests.champion_world import RULES, history_actions
from tests.conftest import REPO


# -- blessing ------------------------------------------------------------------------------------
def test_score_model_reproduces_the_stored_test_metrics(world):
    from covid_data.split import load_split

    table = load_split(world.split_b)
    test = table[table["split"] == "test"]
    s = score_model(world.chal, world.split_b, cache_dir=world.cache)
    stored = json.loads(open_store(world.chal).read_text("metrics.json"))["metrics"]["test"]
    assert s.metrics["n"] == stored["n"] == len(s.sha256) == len(s.paths) == len(test) > 0
    assert s.metrics["accuracy"] == pytest.approx(stored["accuracy"])
    assert s.probabilities.shape == (len(test), 4) and s.labels.shape == (len(test),)
    assert sorted(s.sha256) == sorted(test["sha256"]) and sorted(s.paths) == sorted(test["path"])


def test_champion_is_rescored_on_the_challengers_split_without_the_images_it_has_seen(world):
    champ = {**candidate_record("run-a", world.champ), "test_accuracy": 1.0}  # a stored claim on another split
    chal = candidate_record("run-b", world.chal)
    b = bless(chal, champ, **{**RULES, "margin": -2.0}, cache_dir=world.cache)
    cmp = b.comparison
    assert b.blessed and b.rule == "beats_champion" and cmp is not None

    # Recompute independently, by brute force: both models on B's test images, minus every copy or
    # near copy (pHash within 4 bits) of an image of A's train or validation split ("seen").
    a = training_images(world.split_a)
    a = a[a["split"].isin(["train", "val"])]
    seen_sha = set(a["sha256"])
    seen_ph = [int(h, 16) for h in a["phash"].dropna()]
    b_rows = training_images(world.split_b).set_index("path")
    champ_s = score_model(world.champ, world.split_b, cache_dir=world.cache)
    chal_s = score_model(world.chal, world.split_b, cache_dir=world.cache)

    def seen(path: str, sha: str) -> bool:
        ph = b_rows.loc[path, "phash"]
        return sha in seen_sha or (isinstance(ph, str) and any((int(ph, 16) ^ h).bit_count() <= 4 for h in seen_ph))

    keep = np.array([not seen(p, h) for p, h in zip(champ_s.paths, champ_s.sha256, strict=True)])
    assert 0 < (~keep).sum() < len(keep), "the fixture's splits should overlap partly"
    assert set(split_sha256(world.split_a, "train")) & set(np.array(champ_s.sha256)[keep]) == set()
    assert cmp.excluded == int((~keep).sum()) and cmp.n == int(keep.sum())
    assert not set(cmp.sha256) & seen_sha
    assert cmp.champion["accuracy"] == pytest.approx(champ_s.correct[keep].mean())
    assert cmp.challenger["accuracy"] == pytest.approx(chal_s.correct[keep].mean())
    assert cmp.champion["n"] == cmp.challenger["n"] == cmp.n
    assert cmp.champion_correct == champ_s.correct[keep].tolist()
    assert cmp.challenger_correct == chal_s.correct[keep].tolist()
    assert f"{cmp.excluded} excluded" in b.reason
    s = cmp.summary()
    assert s["only_challenger_right"] == int((chal_s.correct[keep] & ~champ_s.correct[keep]).sum())


def test_promotion_needs_more_than_the_margin_on_the_same_images(world):
    champ = candidate_record("run-a", world.champ)
    chal = candidate_record("run-b", world.chal)
    cmp = bless(chal, champ, **RULES, cache_dir=world.cache).comparison
    diff = cmp.challenger["accuracy"] - cmp.champion["accuracy"]
    above = bless(chal, champ, **{**RULES, "margin": diff - 0.01}, cache_dir=world.cache)
    below = bless(chal, champ, **{**RULES, "margin": diff + 0.01}, cache_dir=world.cache)
    assert above.blessed and above.rule == "beats_champion"
    assert not below.blessed and below.rule == "does_not_beat" and "does not beat" in below.reason

    # The same model published by another run: equal on the same images, so not better (strictly).
    same = {**champ, "run_id": "run-a-again"}
    tie = bless(same, champ, **RULES, cache_dir=world.cache)
    assert not tie.blessed and tie.rule == "does_not_beat"
    assert tie.comparison.challenger["accuracy"] == tie.comparison.champion["accuracy"]
    assert tie.comparison.excluded == 0  # its own split: test never overlaps train


def test_mcnemar_exact_against_hand_computed_values():
    # 10 images only the challenger got right, 2 only the champion: n = 12, two-sided
    # p = 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096.
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)  # symmetric
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0  # capped at 1; no discordance
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 64)  # 0.03125: six to none is just significant


def test_require_significance_needs_mcnemar_p_below_alpha(world):
    champ = candidate_record("run-a", world.champ)
    chal = candidate_record("run-b", world.chal)
    free = bless(chal, champ, **{**RULES, "margin": -1.0}, cache_dir=world.cache)
    p = free.comparison.mcnemar_p
    summary = free.comparison.summary()
    assert p == mcnemar_exact(summary["only_challenger_right"], summary["only_champion_right"])
    assert summary["mcnemar_p"] == p and "McNemar" in free.reason
    strict = bless(
        chal, champ, **{**RULES, "margin": -1.0, "require_significance": True}, cache_dir=world.cache, alpha=p
    )  # p < alpha fails when alpha == p
    assert free.blessed and not strict.blessed and strict.rule == "not_significant"
    loose = bless(
        chal,
        champ,
        **{**RULES, "margin": -1.0, "require_significance": True},
        cache_dir=world.cache,
        alpha=p + 1e-9,
    )
    assert loose.blessed


def test_by_default_a_win_must_be_significant_and_covid_sensitivity_non_inferior(world):
    """The defaults (no rule overrides): luck on one test set does not promote."""
    champ = candidate_record("run-a", world.champ)
    chal = candidate_record("run-b", world.chal)
    base = {"run_succeeded": True, "margin": -1.0, "covid_sensitivity_floor": 0.0}
    default = bless(chal, champ, **base, cache_dir=world.cache)
    p = default.comparison.mcnemar_p
    assert p >= 0.05 and not default.blessed and default.rule == "not_significant"  # tiny models: p is large

    # COVID sensitivity on the same images, paired: with no COVID image left among the few images
    # the champion has not seen, non-inferiority cannot be shown, and nothing is promoted.
    cmp = default.comparison
    n_covid = int((np.asarray(cmp.labels) == 0).sum())
    args = {**base, "require_significance": False}
    strict = bless(chal, champ, **args, covid_noninferiority_margin=0.0, cache_dir=world.cache)
    assert not strict.blessed and strict.rule == "covid_noninferiority"
    if n_covid:
        diff, lo, hi, n = cmp.covid_sensitivity_difference()
        assert n == n_covid and lo < diff < hi and "95% CI" in strict.reason
    else:
        assert cmp.covid_sensitivity_difference() is None and "no COVID image is left" in strict.reason
    off = bless(chal, champ, **args, covid_noninferiority_margin=None, cache_dir=world.cache)
    assert off.blessed and off.rule == "beats_champion"


def test_covid_sensitivity_difference_is_agresti_min_on_the_covid_images():
    # 40 COVID images: 6 only the challenger gets right, 2 only the champion; 20 other images.
    chal = [True] * 6 + [False] * 2 + [True] * 30 + [False] * 2 + [True] * 20
    champ = [False] * 6 + [True] * 2 + [True] * 30 + [False] * 2 + [False] * 20
    cmp = Comparison(
        "s", 60, 0, {}, {}, 0.0, labels=[0] * 40 + [2] * 20, challenger_correct=chal, champion_correct=champ
    )
    diff, lo, hi, n = cmp.covid_sensitivity_difference()
    b, c, m = 6.5, 2.5, 42.0  # half an image added to each cell
    half = 1.959964 * math.sqrt((b + c) - (b - c) ** 2 / m) / m
    assert (n, diff) == (40, pytest.approx(4 / 40)) and (lo, hi) == pytest.approx(
        ((b - c) / m - half, (b - c) / m + half)
    )
    assert (
        Comparison(
            "s", 1, 0, {}, {}, 0.0, labels=[2], challenger_correct=[True], champion_correct=[True]
        ).covid_sensitivity_difference()
        is None
    )


def test_a_capped_run_never_promotes_even_on_an_empty_store(world, tmp_path):
    store = str(tmp_path / "store")
    rec = candidate_record("smoke-1", world.capped, preset="smoke")
    assert rec["max_per_class"] == 2
    d = evaluate_and_promote(store, rec, **{**RULES, "margin": -2.0}, cache_dir=world.cache)
    assert not d["changed"] and d["rule"] == "capped" and "capped at 2" in d["reason"]
    # A record that hides the cap does not help: the slot's own config says it.
    d = evaluate_and_promote(store, {**rec, "max_per_class": None}, **RULES, cache_dir=world.cache)
    assert not d["changed"] and d["rule"] == "capped"
    assert not open_store(store).exists(CHAMPION)
    assert history_actions(store) == [(1, "keep"), (2, "keep")]


def test_a_run_without_a_test_split_cannot_promote(world, tmp_path):
    rec = candidate_record("paper-1", world.notest, preset="paper")
    assert rec["test_accuracy"] is None
    d = evaluate_and_promote(str(tmp_path / "store"), rec, **RULES, cache_dir=world.cache)
    assert not d["changed"] and d["rule"] == "no_test_split" and "no test split" in d["reason"]
    assert current(str(tmp_path / "store")) is None


def test_covid_sensitivity_floor(world):
    rec = candidate_record("run-b", world.chal)
    sens = rec["test_covid_sensitivity"]
    below = bless(rec, None, **{**RULES, "covid_sensitivity_floor": sens + 1e-6})
    at = bless(rec, None, **{**RULES, "covid_sensitivity_floor": sens})
    assert not below.blessed and below.rule == "sensitivity_floor" and "below the floor" in below.reason
    assert at.blessed and at.rule == "first_champion"
    failed = bless(rec, None, **{**RULES, "run_succeeded": False})
    assert not failed.blessed and failed.rule == "run_failed"


def test_an_unreadable_champion_is_never_replaced(world, tmp_path):
    store = str(tmp_path / "store")
    slot = tmp_path / "champ-copy"
    shutil.copytree(world.champ, slot)
    assert evaluate_and_promote(store, candidate_record("run-a", str(slot)), **RULES)["changed"]
    (slot / "model.keras").write_bytes(b"not a keras file")
    before = open_store(store).read_text(CHAMPION)
    d = evaluate_and_promote(
        store, candidate_record("run-b", world.chal), **{**RULES, "margin": -2.0}, cache_dir=world.cache
    )
    assert not d["changed"] and d["rule"] == "champion_unreadable"
    assert "could not be re-scored" in d["reason"] and str(slot) in d["reason"]
    assert open_store(store).read_text(CHAMPION) == before


# -- compare-and-swap ------------------------------------------------------------------------------
def test_concurrent_promotions_one_winner_threads(world, store_uri):
    recs = [candidate_record("run-a", world.champ), candidate_record("run-b", world.chal)]
    barrier = threading.Barrier(2)
    results: dict[str, dict] = {}

    def promote(rec: dict) -> None:
        champ, token = read_champion(store_uri)
        blessing = bless(rec, champ, **RULES)
        barrier.wait()  # both have read the same (empty) pointer before either swaps
        results[rec["run_id"]] = decide_and_promote(store_uri, rec, blessing, token=token)

    threads = [threading.Thread(target=promote, args=(r,)) for r in recs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == ["run-a", "run-b"]
    winners = [k for k, d in results.items() if d["changed"]]
    assert len(winners) == 1, results
    (loser,) = set(results) - set(winners)
    assert results[loser]["action"] == "lost_race"
    assert f"lost the race to run {winners[0]}" in results[loser]["reason"]
    champ = json.loads(open_store(store_uri).read_text(CHAMPION))
    assert champ["run_id"] == winners[0] and champ["history_seq"] == results[winners[0]]["seq"]
    entries = {e["seq"]: e for e in history(store_uri)}
    assert sorted(e["action"] for e in entries.values()) == ["lost_race", "promote", "promote"]
    assert entries[champ["history_seq"]]["status"] == "current champion"
    intent = entries[results[loser]["intent_seq"]]
    assert intent["run_id"] == loser and not intent["applied"] and "lost the race" in intent["status"]


_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from covid_registry.bless import bless
    from covid_registry.champion import decide_and_promote, read_champion

    store, rec_file, me, other = sys.argv[1:5]
    rec = json.loads(Path(rec_file).read_text())
    champ, token = read_champion(store)
    blessing = bless(rec, champ, run_succeeded=True, margin=0.0, covid_sensitivity_floor=0.0)
    Path(me).touch()
    deadline = time.monotonic() + 60
    while not Path(other).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    print(json.dumps(decide_and_promote(store, rec, blessing, token=token)))
    """
)


def test_concurrent_promotions_one_winner_two_processes(world, store_uri, tmp_path):
    procs = []
    for i, (run, slot) in enumerate((("proc-a", world.champ), ("proc-b", world.chal))):
        rec_file = tmp_path / f"rec{i}.json"
        rec_file.write_text(json.dumps(candidate_record(run, slot)))
        args = [str(tmp_path / f"ready{i}"), str(tmp_path / f"ready{1 - i}")]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _PROCESS_SCRIPT, store_uri, str(rec_file), *args],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(d["changed"] for d in outs) == [False, True]
    win, lose = (outs[0], outs[1]) if outs[0]["changed"] else (outs[1], outs[0])
    assert lose["action"] == "lost_race" and f"lost the race to run {win['champion']['run_id']}" in lose["reason"]
    assert current(store_uri) == win["champion"]
    entries = history_actions(store_uri)
    assert sorted(a for _, a in entries) == ["lost_race", "promote", "promote"], (entries, outs)


def test_a_decision_without_token_notices_a_champion_changed_after_blessing(world, tmp_path):
    store = str(tmp_path / "store")
    late = candidate_record("run-late", world.chal)
    blessing = bless(late, current(store), **RULES)  # blessed against no champion
    assert evaluate_and_promote(store, candidate_record("run-a", world.champ), **RULES)["changed"]
    d = decide_and_promote(store, late, blessing)
    assert not d["changed"] and d["action"] == "lost_race" and "lost the race to run run-a" in d["reason"]
    assert current(store)["run_id"] == "run-a"


def test_a_blessing_as_a_plain_dict_promotes_as_the_publish_task_passes_it(world, tmp_path):
    import dataclasses

    store = str(tmp_path / "store")
    assert evaluate_and_promote(store, candidate_record("run-a", world.champ), **RULES)["changed"]
    chal = candidate_record("run-b", world.chal)
    plain = dataclasses.asdict(bless(chal, current(store), **{**RULES, "margin": -2.0}, cache_dir=world.cache))
    assert plain["comparison"]["champion_accuracy"] is not None and plain["comparison"]["n"] > 0
    refused = decide_and_promote(store, chal, {**plain, "blessed": False, "reason": "exports failed"})
    assert not refused["changed"] and refused["reason"] == "exports failed" and current(store)["run_id"] == "run-a"
    d = decide_and_promote(store, chal, json.loads(json.dumps(plain)))  # as a JSON-persisted task result
    assert d["changed"] and current(store)["run_id"] == "run-b"
    assert d["comparison"]["n"] == plain["comparison"]["n"] and d["comparison"]["excluded"] > 0


def test_a_champion_from_before_the_history_is_compared_and_replaced(world, tmp_path):
    store = open_store(tmp_path / "store")
    # What the old decide_champion wrote: no split_uri, no history_seq; a published model slot.
    legacy = {k: v for k, v in candidate_record("old-run", world.champ).items() if k != "split_uri"}
    store.put_text(CHAMPION, json.dumps({**legacy, "promoted": "2026-01-01T00:00:00+00:00"}))
    chal = candidate_record("run-b", world.chal)
    d = evaluate_and_promote(store, chal, **{**RULES, "margin": -2.0}, cache_dir=world.cache)
    assert d["changed"] and d["comparison"]["excluded"] > 0  # its training split came from the slot's config
    entries = history(store)
    assert entries[0]["champion_before"]["run_id"] == "old-run" and entries[0]["status"] == "current champion"


def test_a_blessed_challenger_is_not_pushed_when_its_app_bundle_failed(world, tmp_path, prefect_server):
    """The Pusher runs last and pushes only what is complete: a failed app bundle keeps the champion,
    and the history says why; the same blessing with a built bundle is pushed."""
    import dataclasses

    from prefect import flow

    from tasks.publishing import not_ready, promote_champion

    store = str(tmp_path / "store")
    assert evaluate_and_promote(store, candidate_record("run-a", world.champ), **RULES)["changed"]
    chal = candidate_record("run-b", world.chal)
    blessing = dataclasses.asdict(bless(chal, current(store), **{**RULES, "margin": -2.0}, cache_dir=world.cache))
    assert blessing["blessed"]

    @flow
    def push(app: dict) -> dict:
        return promote_champion(store, chal, [], blessing, not_ready(True, app))

    kept = push({"status": "failed", "reason": "npm run build exited 1"})
    assert not kept["changed"] and "app bundle failed (npm run build exited 1)" in kept["reason"]
    assert current(store)["run_id"] == "run-a"
    assert history(store)[-1]["action"] == "keep" and "app bundle failed" in history(store)[-1]["reason"]
    assert push({"status": "built"})["changed"] and current(store)["run_id"] == "run-b"
