"""The champion: blessing on the same images, compare-and-swap, history, rollback, crash safety, CLI.

Real tiny models (custom_cnn, 32 px, one epoch) trained once per module on real X-rays, and real
stores (a folder and the GCS emulator, which enforces generation preconditions like GCS).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from covid_data.store import open_store, split_object_uri
from covid_registry.bless import bless, candidate_record, mcnemar_exact, score_model, split_sha256
from covid_registry.champion import (
    CHAMPION,
    ChampionError,
    current,
    decide_and_promote,
    evaluate_and_promote,
    history,
    read_champion,
    rollback,
)
from tests.conftest import REPO

RULES = {"run_succeeded": True, "margin": 0.0, "covid_sensitivity_floor": 0.0}


@dataclass
class World:
    split_a: str  # 60/20/20, seed 42: the champion's split
    split_b: str  # 60/20/20, seed 7: the challenger's (its test overlaps A's train)
    split_c: str  # 80/20/0: no test split
    champ: str  # model slots
    chal: str
    notest: str
    capped: str
    cache: str


def _train(split: str, out: Path, cache: Path, seed: int, max_per_class: int | None = None) -> str:
    from covid_models.train import TrainConfig, train_model

    cfg = TrainConfig(
        model="custom_cnn",
        split=split,
        out=str(out),
        input_size=32,
        epochs=1,
        weights="none",
        patience=0,
        batch_size=8,
        seed=seed,
        max_per_class=max_per_class,
        cache_dir=str(cache),
        verbose=0,
    )
    train_model(cfg)
    return str(out)


@pytest.fixture(scope="module")
def world(small_split, tmp_path_factory) -> World:
    from covid_data.dataset import load_manifest
    from covid_data.split import SplitConfig, write_split

    split_store, _ = split_object_uri(small_split)
    root, version = split_store.uri.split("/datasets/")[0], split_store.uri.split("/datasets/")[1].split("/")[0]
    store = open_store(root)
    manifest = load_manifest(store, version)
    split_b = write_split(store, version, manifest, SplitConfig(0.6, 0.2, 0.2, seed=7)).uri
    split_c = write_split(store, version, manifest, SplitConfig(0.8, 0.2, 0.0)).uri
    base = tmp_path_factory.mktemp("champion-models")
    cache = base / "cache"
    return World(
        split_a=small_split,
        split_b=split_b,
        split_c=split_c,
        champ=_train(small_split, base / "champ", cache, seed=1),
        chal=_train(split_b, base / "chal", cache, seed=2),
        notest=_train(split_c, base / "notest", cache, seed=3),
        capped=_train(split_b, base / "capped", cache, seed=4, max_per_class=2),
        cache=str(cache),
    )


def _entries(store_uri: str) -> list[tuple[int, str]]:
    return [(e["seq"], e["action"]) for e in history(store_uri)]


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


def test_champion_is_rescored_on_the_challengers_split_without_its_training_images(world):
    champ = {**candidate_record("run-a", world.champ), "test_accuracy": 1.0}  # a stored claim on another split
    chal = candidate_record("run-b", world.chal)
    b = bless(chal, champ, **{**RULES, "margin": -2.0}, cache_dir=world.cache)
    cmp = b.comparison
    assert b.blessed and b.rule == "beats_champion" and cmp is not None

    # Recompute independently: both models on B's test images, minus A's training images.
    seen = split_sha256(world.split_a, "train")
    champ_s = score_model(world.champ, world.split_b, cache_dir=world.cache)
    chal_s = score_model(world.chal, world.split_b, cache_dir=world.cache)
    keep = np.array([h not in seen for h in champ_s.sha256])
    assert 0 < (~keep).sum() < len(keep), "the fixture's splits should overlap partly"
    assert cmp.excluded == int((~keep).sum()) and cmp.n == int(keep.sum())
    assert set(cmp.excluded_sha256) <= seen and not set(cmp.sha256) & seen
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
        chal, champ, **{**RULES, "margin": -1.0}, cache_dir=world.cache, require_significance=True, alpha=p
    )  # p < alpha fails when alpha == p
    assert free.blessed and not strict.blessed and strict.rule == "not_significant"
    loose = bless(
        chal, champ, **{**RULES, "margin": -1.0}, cache_dir=world.cache, require_significance=True, alpha=p + 1e-9
    )
    assert loose.blessed


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
    assert _entries(store) == [(1, "keep"), (2, "keep")]


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
    entries = _entries(store_uri)
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


# -- history and rollback ------------------------------------------------------------------------
def test_history_records_every_decision_and_rollback_restores(world, store_uri, tmp_path):
    champ_rec, chal_rec = candidate_record("run-a", world.champ), candidate_record("run-b", world.chal)
    kw = {**RULES, "cache_dir": world.cache}
    d1 = evaluate_and_promote(store_uri, champ_rec, **kw)
    d2 = evaluate_and_promote(store_uri, chal_rec, **{**kw, "margin": -2.0})
    d3 = evaluate_and_promote(store_uri, chal_rec, **kw)  # a rerun of the champion's own run
    d4 = evaluate_and_promote(store_uri, candidate_record("smoke", world.capped), **kw)
    assert [d["changed"] for d in (d1, d2, d3, d4)] == [True, True, False, False]
    assert d2["comparison"]["champion_accuracy"] is not None and d3["rule"] == "already_champion"
    assert current(store_uri)["run_id"] == "run-b"

    d5 = rollback(store_uri, 1, "run-b misreads portable films")
    assert d5["changed"] and d5["action"] == "rollback"
    champ = current(store_uri)
    assert champ["run_id"] == "run-a" and champ["model_uri"] == world.champ
    assert champ["history_seq"] == 5 and champ["rollback_to"] == 1
    entries = history(store_uri)
    assert [(e["seq"], e["action"]) for e in entries] == [
        (1, "promote"),
        (2, "promote"),
        (3, "keep"),
        (4, "keep"),
        (5, "rollback"),
    ]
    assert [e["applied"] for e in entries] == [True, True, None, None, True]
    assert entries[4]["status"] == "current champion" and "portable films" in entries[4]["reason"]
    assert entries[1]["champion_before"]["run_id"] == "run-a" and entries[1]["champion_after"]["run_id"] == "run-b"
    assert all(e["time"] and e["reason"] for e in entries)

    with pytest.raises(ChampionError, match="no history entry 42"):
        rollback(store_uri, 42)
    with pytest.raises(ChampionError, match="made no champion"):
        rollback(store_uri, 3)
    with pytest.raises(ChampionError, match="already is the current champion"):
        rollback(store_uri, 5)
    assert len(history(store_uri)) == 5  # refusals change nothing

    # Back to run-b (entry 2), then a champion whose slot has since lost its metrics is refused.
    assert rollback(store_uri, 2)["champion"]["run_id"] == "run-b"
    assert current(store_uri)["history_seq"] == 6
    gone = tmp_path / "gone"
    shutil.copytree(world.champ, gone)
    blessing = bless(candidate_record("run-gone", str(gone)), current(store_uri), **{**kw, "margin": -2.0})
    assert decide_and_promote(store_uri, candidate_record("run-gone", str(gone)), blessing)["changed"]
    assert rollback(store_uri, 1)["changed"]
    (gone / "metrics.json").unlink()
    with pytest.raises(ChampionError, match="no longer complete"):
        rollback(store_uri, 7)
    assert current(store_uri)["history_seq"] == 8


def test_a_rollback_that_loses_the_race_changes_nothing_and_says_so(world, tmp_path, monkeypatch):
    import covid_registry.champion as registry

    store = str(tmp_path / "store")
    kw = {**RULES, "margin": -2.0, "cache_dir": world.cache}  # -2: any challenger beats the champion
    assert evaluate_and_promote(store, candidate_record("run-a", world.champ), **kw)["changed"]
    assert evaluate_and_promote(store, candidate_record("run-b", world.chal), **kw)["changed"]
    real = registry._append

    def append_then_someone_promotes(s, build):
        entry = real(s, build)
        if entry["action"] == "rollback":  # between the rollback's entry and its swap
            monkeypatch.setattr(registry, "_append", real)
            assert evaluate_and_promote(s, candidate_record("run-late", world.champ), **kw)["changed"]
        return entry

    monkeypatch.setattr(registry, "_append", append_then_someone_promotes)
    with pytest.raises(ChampionError, match="lost the race to run run-late.*nothing was rolled back"):
        rollback(store, 1)
    assert current(store)["run_id"] == "run-late"
    entries = history(store)
    assert [e["action"] for e in entries] == ["promote", "promote", "rollback", "promote", "lost_race"]
    assert not entries[2]["applied"] and "lost the race (entry 5)" in entries[2]["status"]
    assert entries[3]["status"] == "current champion" and entries[4]["intent_seq"] == 3


_CRASH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from covid_registry.champion import evaluate_and_promote
    rec = json.loads(open(sys.argv[2]).read())
    evaluate_and_promote(sys.argv[1], rec, run_succeeded=True, margin=0.0, covid_sensitivity_floor=0.0)
    """
)


@pytest.mark.parametrize("kill_after", [1, 2])
def test_a_kill_between_store_writes_needs_no_person(world, tmp_path, kill_after):
    store = str(tmp_path / "store")
    rec_file = tmp_path / "rec.json"
    rec_file.write_text(json.dumps(candidate_record("run-a", world.champ)))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "COVID_FAULT_KILL_AFTER": str(kill_after),
        "COVID_FAULT_COUNTER": str(tmp_path / "count"),
    }
    res = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, store, str(rec_file)], cwd=REPO, env=env, timeout=120, capture_output=True
    )
    assert res.returncode == -9, res.stderr[-2000:]
    entries = history(store)
    assert [(e["seq"], e["action"]) for e in entries] == [(1, "promote")]
    if kill_after == 1:  # killed after the entry, before the swap
        assert current(store) is None
        assert not entries[0]["applied"] and "interrupted" in entries[0]["status"]
    else:  # killed right after the swap
        assert current(store)["history_seq"] == 1 and entries[0]["applied"]
    # The rerun decides again on its own, and the pointer always parses.
    d = evaluate_and_promote(store, json.loads(rec_file.read_text()), **RULES)
    champ = json.loads(open_store(store).read_text(CHAMPION))
    assert champ["run_id"] == "run-a"
    if kill_after == 1:
        assert d["changed"] and champ["history_seq"] == 2
    else:
        assert not d["changed"] and d["rule"] == "already_champion" and champ["history_seq"] == 1


# -- command line --------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "covid_registry.champion", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_show_history_rollback(world, tmp_path):
    store = str(tmp_path / "store")
    r = _cli("show", "--store", store)
    assert r.returncode == 0 and "no champion" in r.stdout
    evaluate_and_promote(store, candidate_record("run-a", world.champ), **RULES)
    evaluate_and_promote(
        store, candidate_record("run-b", world.chal), **{**RULES, "margin": -2.0}, cache_dir=world.cache
    )

    r = _cli("show", "--store", store)
    assert r.returncode == 0, r.stderr
    assert '"run_id": "run-b"' in r.stdout and "model slot complete: yes" in r.stdout
    r = _cli("history", "--store", store)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["seq", "time", "action", "run"]
    assert lines[1].split()[0] == "1" and "promote" in lines[1] and "run-a" in lines[1]
    assert "current champion" in lines[2] and " vs " in lines[2]

    r = _cli("rollback", "--store", store, "--to", "1", "--reason", "from the CLI")
    assert r.returncode == 0, r.stderr
    assert "rolled back to entry 1" in r.stdout and current(store)["run_id"] == "run-a"
    r = _cli("history", "--store", store, "--json")
    assert [e["action"] for e in json.loads(r.stdout)] == ["promote", "promote", "rollback"]
    r = _cli("rollback", "--store", store, "--to", "42")
    assert r.returncode == 1 and "error: no history entry 42" in r.stderr

    helps = {
        "show": ["the store: a folder"],
        "history": ["the store: a folder", "print the entries as JSON"],
        "rollback": ["the store: a folder", "the history entry (a promote or rollback)", "recorded in the rollback"],
    }
    for sub, texts in helps.items():
        h = _cli(sub, "--help")
        assert h.returncode == 0 and all(t in " ".join(h.stdout.split()) for t in texts), h.stdout
