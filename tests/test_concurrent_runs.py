"""Two ``retrain`` runs started at once on one store, each SIGKILLed (its whole process group, as an
OOM kill does) at a random store write, then both started again at once: they end with one
champion that points at a complete run and model, complete units that are intact, and a champion
history that tells the story (every decision once, in order, nothing of a killed run claimed done).

The kill points are drawn from a seed that is printed (``COVID_CONCURRENT_SEED`` replays one).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from covid_data.store import open_store
from covid_registry.champion import CHAMPION, history
from tests.conftest import REPO, make_kaggle_folder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

# The writes of the first run on an empty store number about 100 (dataset, model slot, exports,
# explanations, run folder, app bundle, promotion); a run that finds them cached writes about 50.
KILL_RANGE = (1, 80)


def _start(
    name: str, tmp: Path, source: Path, store: str, env: dict[str, str], kill_after: int | None
) -> subprocess.Popen:
    run_env = {**env, "COVID_CACHE_DIR": str(tmp / "cache")}
    if kill_after is not None:
        counter = tmp / f"{name}.count"
        counter.unlink(missing_ok=True)
        run_env |= {
            "COVID_FAULT_KILL_AFTER": str(kill_after),
            "COVID_FAULT_COUNTER": str(counter),
            "COVID_FAULT_KILL_GROUP": "1",
        }
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 (the child keeps its own copy of the fd)
    # The cpu preset (uncapped: a capped smoke run never promotes) with one tiny model, and a first
    # champion that needs no COVID sensitivity: the test is about what kills leave, not about accuracy.
    cmd = [sys.executable, "-m", "flows.retrain", "--preset", "cpu", "--models", "custom_cnn", "--no-int8"]
    cmd += ["--overrides", json.dumps({"custom_cnn": {"epochs": 1, "input_size": 32, "patience": 0}})]
    cmd += ["--covid-sensitivity-floor", "0", "--source", str(source), "--store", store, "--profile", "any"]
    proc = subprocess.Popen(cmd, env=run_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return proc


def _wait(procs: dict[str, subprocess.Popen], tmp: Path, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    codes = {}
    for name, p in procs.items():
        try:
            codes[name] = p.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs.values():
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
            pytest.fail(f"{name} did not finish in {timeout:.0f}s:\n{(tmp / f'{name}.log').read_text()[-4000:]}")
    return codes


def _intact(store: str, prefix: str, marker: str) -> None:
    """A complete unit: every object its marker lists is there with the recorded checksum."""
    s = open_store(store)
    doc = json.loads(s.read_text(f"{prefix}/{marker}"))
    for key, md5 in doc.get("objects", {}).items():
        assert s.checksum(f"{prefix}/{key}") == md5, f"{prefix}/{key} does not match its marker"


def test_two_runs_at_once_killed_at_random_then_rerun_end_with_one_champion(prefect_cli, tmp_path: Path):
    seed = int(os.environ.get("COVID_CONCURRENT_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    kills = {"a": rng.randint(*KILL_RANGE), "b": rng.randint(*KILL_RANGE)}
    print(f"COVID_CONCURRENT_SEED={seed}: kill after writes {kills}")
    source = make_kaggle_folder(tmp_path / "src", n_per_class=10, seed=61, extras=False)
    store = str(tmp_path / "store")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "COVID_FAULT_"))},
        **prefect_cli.settings,
        "PYTHONPATH": str(REPO),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    first = {n: _start(n, tmp_path, source, store, env, k) for n, k in kills.items()}
    codes = _wait(first, tmp_path, 900)
    for name, rc in codes.items():
        log = (tmp_path / f"{name}.log").read_text(errors="replace")
        # Killed at its write, or finished first because the other run had already written what it needed.
        assert rc in (0, -signal.SIGKILL), f"seed {seed}: {name} exited {rc}:\n{log[-4000:]}"
    print(f"first attempts: {codes}")
    again = {f"{n}2": _start(f"{n}2", tmp_path, source, store, env, None) for n in kills}
    codes2 = _wait(again, tmp_path, 900)
    for name, rc in codes2.items():
        assert rc == 0, f"seed {seed}: the rerun {name} failed:\n{(tmp_path / f'{name}.log').read_text()[-4000:]}"

    s = open_store(store)
    runs = {k.split("/")[1] for k in s.list("runs")}
    complete = {r for r in runs if s.exists(f"runs/{r}/run.json")}
    reruns = {json.loads(_last_json(tmp_path / f"{n}.log"))["run_id"] for n in again}
    assert reruns <= complete, (reruns, complete)
    for r in complete:
        _intact(store, f"runs/{r}", "run.json")

    # One champion: a complete model of a complete run.
    champ = json.loads(s.read_text(CHAMPION))
    assert champ["run_id"] in complete, (champ["run_id"], complete)
    slot = open_store(champ["model_uri"])
    assert slot.exists("metrics.json"), champ["model_uri"]
    # The story: sequence numbers 1..n; both reruns decided; the champion is the entry at its head;
    # every promotion that was applied is of a complete run; one that a kill interrupted says so.
    entries = history(store)
    story = [(e["seq"], e["action"], e.get("run_id"), e.get("status")) for e in entries]
    print(f"seed {seed}: runs {sorted(runs)}, complete {sorted(complete)}, history {story}")
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1)), story
    assert reruns <= {e.get("run_id") for e in entries}, (reruns, story)
    (head,) = [e for e in entries if e.get("status") == "current champion"]
    assert head["seq"] == champ["history_seq"] and head["run_id"] == champ["run_id"], (champ, story)
    for e in entries:
        if e["action"] == "promote" and e["applied"]:
            assert e["run_id"] in complete, (e["seq"], story)
        if e["action"] == "promote" and not e["applied"] and e["run_id"] not in complete:
            assert "interrupted" in e["status"] or "lost the race" in e["status"], (e["seq"], story)


def _last_json(log: Path) -> str:
    """The JSON object ``python -m flows.retrain`` prints last."""
    text = log.read_text(errors="replace")
    return text[text.rindex("\n{\n") + 1 :]
