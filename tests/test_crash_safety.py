"""Crash safety: the pipeline SIGKILLed at store writes, then run again.

Each stage of a tiny retraining run (tests/crash_stages.py: prepare, train, calibrate, ensemble,
evaluate, export, publish, guard, bundle, complete, promote) runs as a real process that kills
itself with SIGKILL right after its N-th store write; then the stage runs again. An uninterrupted
run first logs every stage's writes; each stage is then killed on both sides of the first
completion marker of each kind it writes (the writes where a unit goes from incomplete to
complete), or, without markers, at its first and last write. Every rerun must complete; every unit that
was complete before the kill must be byte-identical after; ``champion.json`` must always parse and
point at a complete model; the champion history is append-only; and the rerun must end where an
uninterrupted run of the stage ends: the same complete units, the same champion, no orphaned
files. The first run (r0) covers every stage from an empty store; a second run (r1) covers
publishing beside an existing run and replacing an existing champion.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from covid_data.store import md5_file
from tests.conftest import SHARED, make_kaggle_folder, require_shared

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

HERE = Path(__file__).parent
STAGES_R0 = ("prepare", "train", "calibrate", "ensemble", "evaluate", "export")
STAGES_R0 += ("publish", "guard", "bundle", "complete", "promote")
STAGES_R1 = ("publish", "complete", "promote")
MARKERS = (
    "metrics.json", "export.json", "run.json", "split.json", "manifest.parquet", "_COMPLETE.json",
    "calibration.json", "evaluation.json", "guard.json", "bundle.json",
)  # fmt: skip


def _env(work: Path, kill_after: int | None, log: Path | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "COVID_CACHE_DIR": str(work / "cache"),
        "COVID_WEIGHTS_DIR": str(SHARED / "weights"),  # the guard's MobileNetV2
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "TF_NUM_INTRAOP_THREADS": "1",
        "TF_NUM_INTEROP_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(HERE.parent),
    }
    for k in ("COVID_FAULT_KILL_AFTER", "COVID_FAULT_COUNTER", "COVID_FAULT_LOG"):
        env.pop(k, None)
    if kill_after is not None or log is not None:
        counter = work / "writes.count"
        counter.unlink(missing_ok=True)
        env.update(COVID_FAULT_KILL_AFTER=str(kill_after or 10**9), COVID_FAULT_COUNTER=str(counter))
    if log is not None:  # count and name the writes, kill none
        log.unlink(missing_ok=True)
        env["COVID_FAULT_LOG"] = str(log)
    return env


class StageServer:
    """``crash_stages.py --serve``: each stage runs as a forked child of one process that imported
    TensorFlow and the pipeline once, a fresh process for the store (its own environment, writes
    and SIGKILL) without a hundred cold imports of TensorFlow."""

    def __init__(self, work: Path):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.log = work.parent / "stage-server.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "crash_stages.py"), "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=_env(work, None),
            )

    def run(self, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        out = self.work.parent / "stage.out"
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "out": str(out), "timeout": 600}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the stage server died:\n{self.log.read_text()[-3000:]}"
        text = out.read_text(errors="replace")
        return subprocess.CompletedProcess(argv, json.loads(line)["returncode"], text, text)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def _stage(server: StageServer, stage: str, source: Path, run_id: str, kill_after: int | None = None, log=None):
    work, external = server.work, source.parent / "external"
    argv = [stage, "--source", str(source), "--store", str(work / "store"), "--run-id", run_id]
    return server.run(argv + ["--external", str(external)], _env(work, kill_after, log))


def _files(store: Path) -> dict[str, str]:
    return {
        p.relative_to(store).as_posix(): md5_file(p)
        for p in store.rglob("*")
        if p.is_file() and not p.name.endswith((".tmp", ".lock"))
    }


def complete_units(store: Path, files: dict[str, str]) -> dict[str, set[str]]:
    """Each complete unit (found by its marker) and the keys it consists of."""
    units: dict[str, set[str]] = {}
    for key in files:
        prefix, _, name = key.rpartition("/")
        if key.startswith("champion/history/"):
            units[key] = {key}  # each history entry is written once, never replaced
        elif key.startswith("runs/") and key.count("/") > 2 and name != "bundle.json":
            continue  # copies inside a run folder: run.json covers them (the app bundle is a unit of its own)
        elif name in MARKERS:
            if name == "manifest.parquet":  # a dataset version: images, dataset.json, manifest
                members = {k for k in files if k.startswith(prefix + "/") and "/splits/" not in k}
                members -= {k for k in members if "/validation/" in k}
            elif name == "split.json":
                members = {key, f"{prefix}/split.parquet"}
            else:  # a Unit: its marker lists its objects
                listed = json.loads((store / key).read_text()).get("objects", {})
                members = {key} | {f"{prefix}/{k}" if prefix else k for k in listed}
            units[prefix or "."] = members
    return units


def _snapshot(store: Path) -> tuple[dict[str, str], dict[str, set[str]]]:
    files = _files(store)
    return files, complete_units(store, files)


def _check(store: Path, before: tuple[dict[str, str], dict[str, set[str]]], where: str) -> None:
    files, units = before
    after = _files(store)
    for unit, keys in units.items():
        changed = sorted(k for k in keys if after.get(k) != files.get(k))
        assert not changed, f"{where}: complete unit {unit} changed: {changed}"
    if (store / "champion.json").exists():
        champ = json.loads((store / "champion.json").read_text())  # always parses
        slot = Path(champ["model_uri"])
        assert (slot / "metrics.json").is_file(), f"{where}: champion points at an incomplete model {slot}"


def _same_end_state(store: Path, reference: Path, where: str) -> None:
    """A killed and rerun stage ends where an uninterrupted one does: the same complete units (the
    same objects in each; formats that are not byte-reproducible may differ in content), the same
    champion, and no file the uninterrupted run does not have (nothing orphaned)."""
    files, ref_files = _files(store), _files(reference)
    units, ref_units = complete_units(store, files), complete_units(reference, ref_files)
    history = {u for u in units if u.startswith("champion/history/")}
    ref_history = {u for u in ref_units if u.startswith("champion/history/")}
    assert {u: sorted(k) for u, k in units.items() if u not in history} == {
        u: sorted(k) for u, k in ref_units.items() if u not in ref_history
    }, f"{where}: other complete units than an uninterrupted run"
    # History entries may differ: a killed promotion leaves its intent entry, and the story says so.
    orphans = sorted(k for k in set(files) - set(ref_files) if not k.startswith("champion/history/"))
    assert not orphans, f"{where}: files an uninterrupted run does not leave: {orphans[:10]}"

    def champion(root: Path) -> tuple | None:
        p = root / "champion.json"
        if not p.exists():
            return None
        c = json.loads(p.read_text())
        return c.get("run_id"), c.get("model"), c["model_uri"]  # URIs name the slot's fixed store path

    assert champion(store) == champion(reference), f"{where}: another champion than an uninterrupted run"


class Slot:
    """A fixed store path (URIs inside the store name it), reset from a saved state per kill point."""

    def __init__(self, root: Path, source: Path):
        self.work, self.source = root, source
        self.server = StageServer(root)
        self.states: dict[str, Path] = {}
        self.writes: dict[str, list[str]] = {}  # "<run>/<stage>": the keys it wrote, in order

    def save(self, name: str) -> None:
        dest = self.work.parent / f"{self.work.name}-state-{name}"
        shutil.copytree(self.work / "store", dest, symlinks=True)
        self.states[name] = dest

    def restore(self, name: str | None) -> None:
        shutil.rmtree(self.work / "store", ignore_errors=True)
        shutil.rmtree(self.work / "cache", ignore_errors=True)
        if name is not None:
            shutil.copytree(self.states[name], self.work / "store", symlinks=True)
        else:
            (self.work / "store").mkdir(parents=True)

    def build(self) -> None:
        """The states before each stage, and each stage's writes, from an uninterrupted run of r0
        then r1."""
        self.restore(None)
        self.save("r0-prepare")
        for run_id, stages in (("r0", STAGES_R0), ("r1", STAGES_R1)):
            for stage in stages:
                log = self.work.parent / f"writes-{run_id}-{stage}.log"
                res = _stage(self.server, stage, self.source, run_id, log=log)
                assert res.returncode == 0, f"{run_id} {stage} failed uninterrupted:\n{res.stderr[-3000:]}"
                self.writes[f"{run_id}/{stage}"] = [ln.split("\t", 1)[1] for ln in log.read_text().splitlines()]
                self.save(self.after(run_id, stage))

    def kill_point(self, run_id: str, stage: str, n: int) -> str:
        """'done' when the stage finished before its n-th write, 'killed' when it was killed and
        its rerun passed every check."""
        self.restore(f"{run_id}-{stage}")
        before_kill = _snapshot(self.work / "store")
        res = _stage(self.server, stage, self.source, run_id, kill_after=n)
        if res.returncode == 0:
            return "done"
        where = f"{run_id}/{stage} killed after write {n}"
        assert res.returncode == -signal.SIGKILL, f"{where}: exit {res.returncode}\n{res.stderr[-3000:]}"
        at_kill = _snapshot(self.work / "store")
        _check(self.work / "store", before_kill, where + " (the kill itself)")
        rerun = _stage(self.server, stage, self.source, run_id)
        assert rerun.returncode == 0, f"{where}: the rerun failed\n{rerun.stderr[-3000:]}"
        _check(self.work / "store", at_kill, where + ", rerun")
        _same_end_state(self.work / "store", self.states[self.after(run_id, stage)], where + ", rerun")
        return "killed"

    @staticmethod
    def after(run_id: str, stage: str) -> str:
        """The saved state an uninterrupted run reaches after ``stage``."""
        stages = STAGES_R0 if run_id == "r0" else STAGES_R1
        i = stages.index(stage)
        if i + 1 < len(stages):
            return f"{run_id}-{stages[i + 1]}"
        return "r1-publish" if run_id == "r0" else "r1-end"


def kill_points(writes: list[str]) -> list[int]:
    """The writes (1-based) to kill a stage at: on both sides of the first completion marker of each
    kind it writes (the unit just before and just after it becomes complete); a stage without
    markers at its first and last write."""
    points: set[int] = set()
    kinds: set[str] = set()
    for i, key in enumerate(writes, 1):
        name = "champion.json" if key == "champion.json" else key.rpartition("/")[2]
        if (name in MARKERS or name == "champion.json") and name not in kinds:
            kinds.add(name)
            points |= {i - 1, i} - {0}
    return sorted(points or {1, len(writes)})


def test_kill_points_are_both_sides_of_each_kind_of_unit_boundary():
    assert kill_points(["a", "b", "metrics.json"]) == [2, 3]
    many = [f"m/{i}.png" for i in range(6)] + ["m/metrics.json"] + [f"e/{i}" for i in range(4)] + ["e/export.json"]
    assert kill_points(many + ["n/x.png", "n/metrics.json"]) == [6, 7, 11, 12]
    assert kill_points(["runs/r/a.csv", "runs/r/b.md", "runs/r/c.png"]) == [1, 3]
    assert kill_points(["champion/history/000001.json", "champion.json"]) == [1, 2]


def test_every_unit_is_a_safe_place_to_die(tmp_path: Path):
    require_shared(SHARED / "weights")  # the guard stage fits on ImageNet MobileNetV2 features
    source = make_kaggle_folder(tmp_path / "src", n_per_class=4, seed=5, extras=False)
    make_kaggle_folder(tmp_path / "external", n_per_class=2, seed=6, extras=False)
    slots = [Slot(tmp_path / f"slot{i}" / "work", source) for i in range(2)]
    try:
        _kill_everywhere(slots)
    finally:
        for s in slots:
            s.server.close()


def _kill_everywhere(slots: list[Slot]) -> None:
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(Slot.build, slots))
    # The same writes (images are published by parallel threads: their order may differ).
    assert {k: sorted(v) for k, v in slots[0].writes.items()} == {k: sorted(v) for k, v in slots[1].writes.items()}
    covered: dict[str, list[int]] = {}
    for run_id, stages in (("r0", STAGES_R0), ("r1", STAGES_R1)):
        for stage in stages:
            plan = kill_points(slots[0].writes[f"{run_id}/{stage}"])
            covered[f"{run_id}/{stage}"] = []
            for pair in (plan[i : i + 2] for i in range(0, len(plan), 2)):
                with ThreadPoolExecutor(2) as pool:  # two kill points at a time, one per slot
                    futures = [pool.submit(s.kill_point, run_id, stage, k) for s, k in zip(slots, pair, strict=False)]
                    outcomes = [f.result() for f in futures]
                covered[f"{run_id}/{stage}"] += [k for k, o in zip(pair, outcomes, strict=True) if o == "killed"]
    total = sum(map(len, covered.values()))
    print(f"kill points covered: {total} {covered}")
    report = Path(os.environ.get("COVID_CRASH_REPORT", slots[0].work.parent / "kill_points.json"))
    report.write_text(json.dumps({"total": total, "per_stage": covered, "writes": slots[0].writes}, indent=2))
    # Every stage writes and is killed at every planned point: if not, the hook or the stage is broken.
    for name, writes in slots[0].writes.items():
        assert writes and covered[name] == kill_points(writes), (name, covered[name], writes)
