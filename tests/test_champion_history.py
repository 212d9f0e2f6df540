"""The champion's history and rollback, crash safety between store writes, and the command line.

Real tiny models (tests/champion_world.py, the ``world`` fixture) and real stores (a folder and
the GCS emulator). Promotion decisions: tests/test_champion.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from covid_data.store import open_store
from covid_registry.bless import bless, candidate_record
from covid_registry.champion import (
    CHAMPION,
    ChampionError,
    current,
    decide_and_promote,
    evaluate_and_promote,
    history,
    rollback,
)
from tests.champion_world import RULES
from tests.conftest import REPO


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
    from covid_registry.champion import pointer as registry  # where rollback appends its entry

    store = str(tmp_path / "store")
    kw = {**RULES, "margin": -2.0, "cache_dir": world.cache}  # -2: any challenger beats the champion
    assert evaluate_and_promote(store, candidate_record("run-a", world.champ), **kw)["changed"]
    assert evaluate_and_promote(store, candidate_record("run-b", world.chal), **kw)["changed"]
    real = registry.append_entry

    def append_then_someone_promotes(s, build):
        entry = real(s, build)
        if entry["action"] == "rollback":  # between the rollback's entry and its swap
            monkeypatch.setattr(registry, "append_entry", real)
            assert evaluate_and_promote(s, candidate_record("run-late", world.champ), **kw)["changed"]
        return entry

    monkeypatch.setattr(registry, "append_entry", append_then_someone_promotes)
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
