"""Training on a dask.distributed cluster through prefect-dask's DaskTaskRunner.

A real LocalCluster of two worker processes (one thread each); the evidence that the models
trained there, not in the flow's process, is the count of tasks each worker reports it executed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SHARED, make_kaggle_folder

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """Two Dask worker processes; started after the environment is set, which they inherit."""
    from distributed import Client, LocalCluster

    monkeypatch.setenv("COVID_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COVID_WEIGHTS_DIR", str(SHARED / "weights"))
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c,
        Client(c) as client,
    ):
        c.client = client
        yield c


def _executed(cluster) -> dict[str, int]:
    """Tasks each worker ran, by worker address."""
    return cluster.client.run(lambda dask_worker: dask_worker.state.executed_count)


def test_train_models_runs_the_trainings_on_dask_workers(prefect_server, cluster, small_split, tmp_path):
    from dataclasses import asdict

    from prefect import flow
    from prefect_dask import DaskTaskRunner

    from covid_models.train import TrainConfig
    from tasks.fanout import train_models

    configs = [
        asdict(
            TrainConfig(
                model=m,
                split=small_split,
                out=str(tmp_path / m),
                input_size=32,
                epochs=1,
                patience=0,
                weights="scratch",
                max_per_class=4,
            )
        )
        for m in ("custom_cnn", "vgg16")
    ]

    @flow(task_runner=DaskTaskRunner(address=cluster.scheduler_address))
    def on_dask(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return train_models(configs, max_parallel=2)

    before = _executed(cluster)
    records = on_dask(configs)
    assert [(r["model"], r["status"]) for r in records] == [("custom_cnn", "trained"), ("vgg16", "trained")]
    ran = {w: n - before.get(w, 0) for w, n in _executed(cluster).items()}
    assert sum(ran.values()) == 2  # both train-model tasks ran on the workers ...
    assert all(n == 1 for n in ran.values())  # ... one on each (two slots, one thread per worker)
    for m in ("custom_cnn", "vgg16"):
        assert (Path(tmp_path / m) / "metrics.json").exists()


@pytest.mark.timeout(1200)  # a whole smoke run; over 600 s beside another test worker on 2 cores
def test_retrain_smoke_preset_on_a_dask_cluster(prefect_server, cluster, tmp_path):
    from flows.retrain import retrain
    from flows.retrain_params import DataParams, PublishingParams, TrainingParams

    source = make_kaggle_folder(tmp_path / "src", n_per_class=30, seed=71)
    before = _executed(cluster)
    state = retrain(
        store=str(tmp_path / "store"),
        data=DataParams(source=str(source), profile="any"),
        # Two models, one for each worker: what is under test is where they train, not the ranking.
        training=TrainingParams(
            preset="smoke", models=["custom_cnn", "mobilenet_v2"], dask_address=cluster.scheduler_address
        ),
        publishing=PublishingParams(app=False),  # what is under test is where the models train
        return_state=True,
    )
    assert state.is_completed(), state.message
    out = state.result()
    board = {r["model"]: r["status"] for r in out["leaderboard"]}
    assert board == {"custom_cnn": "trained", "mobilenet_v2": "trained"}
    ran = {w: n - before.get(w, 0) for w, n in _executed(cluster).items()}
    assert sum(ran.values()) >= 2  # the two train-model tasks ran on the Dask workers
    assert sum(n > 0 for n in ran.values()) == 2  # and both workers took part


def _trainings_here() -> list[int]:
    """Pids of the training processes this process (a Dask worker) started."""
    me, found = os.getpid(), []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) == me and stat[0] not in "ZX" and b"covid_models.train" in (d / "cmdline").read_bytes():
                found.append(int(d.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


_ENDLESS_FLOW = """
import json, sys
from prefect import flow
from prefect_dask import DaskTaskRunner
from tasks.fanout import train_models

@flow(task_runner=DaskTaskRunner(address=sys.argv[1]))
def endless(configs):
    return train_models(configs, max_parallel=2)

endless(json.loads(open(sys.argv[2]).read()))
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")
def test_a_terminated_flow_kills_its_trainings_on_the_dask_workers(prefect_server, cluster, small_split, tmp_path):
    """Dask cannot interrupt a running task: a flow that gets SIGTERM (how a worker cancels it) must
    end the training processes its tasks started on the Dask workers."""
    import json
    import signal
    import subprocess
    import sys
    import time
    from dataclasses import asdict

    from prefect.settings import PREFECT_API_URL

    from covid_models.train import TrainConfig
    from tests.conftest import REPO

    configs = [
        asdict(TrainConfig(model=m, split=small_split, out=str(tmp_path / m), input_size=32, epochs=100_000,
                           patience=0, weights="scratch", max_per_class=4))
        for m in ("custom_cnn", "vgg16")
    ]  # fmt: skip
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    cmd = [sys.executable, "-c", _ENDLESS_FLOW, cluster.scheduler_address, str(tmp_path / "configs.json")]
    flow_proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            running = cluster.client.run(_trainings_here)
            if all(len(p) == 1 for p in running.values()):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"no training on each worker after 120s: {running}")
        flow_proc.send_signal(signal.SIGTERM)
        flow_proc.wait(60)
        deadline = time.monotonic() + 30
        while any(cluster.client.run(_trainings_here).values()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(cluster.client.run(_trainings_here).values())
    finally:
        flow_proc.kill()
        flow_proc.wait()
