"""tasks.fanout.train_models against real Prefect servers, workers and training processes.

Local route: real ``train-model`` tasks training tiny models. Deployment route: a real
``prefect server start`` with process workers; the children are a stand-in flow that sleeps
``config["epochs"]`` seconds (the fan-out code under test is the real one). The server's
cancellation-cleanup service is off, so any child cancelled here was cancelled by train_models.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import flow

from tasks.fanout import train_models

# -- flows the tests deploy or run (loaded by workers from this file: keep its imports light) ------


@flow(name="sleepy-train-model", flow_run_name="sleepy-{config[model]}")
def sleepy_child(config: dict[str, Any]) -> None:
    """Stands in for train-model: 'trains' for ``config["epochs"]`` seconds, writes nothing."""
    time.sleep(float(config["epochs"]))


@flow(name="fanout-parent")
def fanout_parent(
    configs: list[dict[str, Any]],
    deployment: str | None = None,
    max_parallel: int = 2,
    model_timeout_s: float | None = None,
    pickup_timeout_s: float | None = None,
) -> list[dict[str, Any]]:
    return train_models(
        configs,
        max_parallel=max_parallel,
        deployment=deployment,
        model_timeout_s=model_timeout_s,
        pickup_timeout_s=pickup_timeout_s,
        poll_s=0.5,
    )


def _config(model: str, out: Path, epochs: int, **kw: Any) -> dict[str, Any]:
    from dataclasses import asdict

    from covid_models.train import TrainConfig

    base = {
        "input_size": 32,
        "patience": 0,
        "weights": "scratch",  # every layer trains (a frozen random backbone is refused)
        "max_per_class": 4,
        "cache_dir": str(out.parent / "cache"),
    }
    return asdict(TrainConfig(model=model, split=kw.pop("split", "unused"), out=str(out), epochs=epochs, **base, **kw))


# -- local route ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_local_runner_is_bounded_not_waves_isolates_failures_and_reuses(
    prefect_server, small_split, tmp_path, monkeypatch
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterTaskRunId

    import tasks.training

    def broken(*a, **k):
        raise ConnectionError("artifact API down")

    # A progress artifact that cannot be written must not stop any training.
    monkeypatch.setattr(tasks.training, "create_progress_artifact", broken)
    monkeypatch.setattr(tasks.training, "update_progress_artifact", broken)
    monkeypatch.setenv("COVID_CACHE_DIR", str(tmp_path / "cache"))
    short = _config("custom_cnn", tmp_path / "short", 1, split=small_split)
    long = _config("mobilenet_v2", tmp_path / "long", 25, split=small_split, feature_cache=False)
    # inception_v3 needs at least 75px: this one fails, after the short one frees its slot.
    failing = _config("inception_v3", tmp_path / "failing", 1, split=small_split)

    state = fanout_parent([short, long, failing], max_parallel=2, return_state=True)
    records = state.result()
    assert [r["model"] for r in records] == ["custom_cnn", "mobilenet_v2", "inception_v3"]  # input order
    assert [r["status"] for r in records] == ["trained", "trained", "failed"]
    assert "75" in records[2]["error"] and records[2]["out"] == failing["out"]

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
        by_name = {}
        for r in runs:
            by_name.setdefault(r.name, []).append(r)
        (a,), (b,), (c,) = by_name["train-custom_cnn"], by_name["train-mobilenet_v2"], by_name["train-inception_v3"]
        # Two slots: the failing model waits for a free one, takes the short model's as soon as it
        # is free, and does not wait for the long model (as a wave of two would).
        assert a.end_time < b.end_time
        assert c.start_time >= a.end_time
        assert c.start_time < b.end_time  # (no bound in seconds: a loaded 2-core machine is slow to start one)
        # Logs reach the API in batches: wait for the last epoch line.
        texts = _wait(
            lambda: (
                (
                    t := [
                        log.message
                        for log in client.read_logs(
                            log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[a.id, b.id]))
                        )
                    ]
                )
                and any("epoch 25/25 done" in m for m in t)
                and t
            ),
            20,
            "epoch lines in the task logs",
        )
    assert any("epoch 1/1 done" in t for t in texts)  # Keras epoch lines stream to the task log
    assert sum("epoch 25/25 done" in t for t in texts) == 1
    assert sum("progress artifact of custom_cnn: create failed" in t for t in texts) == 1  # logged once

    again = fanout_parent([short, long], max_parallel=2, return_state=True)
    assert [r["status"] for r in again.result()] == ["cached", "cached"]
    assert again.result()[0]["val_accuracy"] == records[0]["val_accuracy"]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[again.state_details.flow_run_id]))
        )
    # Visible in the UI as task runs in a "Cached" state; nothing trained.
    assert sorted((r.name, r.state.name, r.state.type.value) for r in runs) == [
        ("reuse-custom_cnn", "Cached", "COMPLETED"),
        ("reuse-mobilenet_v2", "Cached", "COMPLETED"),
    ]


def test_children_are_all_cancelled_when_the_parent_is_terminated_midway():
    """The runner's SIGTERM reaches a cancelled parent as Prefect's TerminationSignal, at about the
    moment its poll sees the cancellation: raised inside the first child's cancel call (the signal
    itself cannot be timed to land there), it must not leave the second child running."""
    from prefect.exceptions import TerminationSignal

    from tasks.fanout import _cancel_each

    done: list[str] = []
    calls: list[str] = []

    def cancel(child: str) -> None:
        calls.append(child)
        if calls == ["a"]:
            raise TerminationSignal(15)
        done.append(child)

    with pytest.raises(TerminationSignal):
        _cancel_each(["a", "b"], cancel)
    assert done == ["a", "b"]  # the interrupted one again, then the other
    assert calls == ["a", "a", "b"]
    _cancel_each(["c"], cancel)  # nothing held: nothing raised
    assert done == ["a", "b", "c"]


def test_train_models_needs_a_flow():
    with pytest.raises(RuntimeError, match="inside a running Prefect flow"):
        train_models([], max_parallel=1)


# -- deployment route -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `prefect server start` without the cancellation-cleanup service; a `busy` pool with a
    process worker and an `idle` pool without any; the stand-in child deployed to both, and the
    parent deployed to `busy`."""
    from tests.conftest import PrefectCLI

    cli = PrefectCLI(tmp_path_factory.mktemp("fanout-prefect"))
    cli.settings.update(
        PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
        PREFECT_WORKER_CANCELLATION_POLL_SECONDS="2",  # the fallback if the event websocket fails
    )
    cli.start_server()
    try:
        _deploy(cli.api)
        cli.start_worker("busy", "--limit", "4")
        yield cli
    finally:
        cli.stop()


def _deploy(api_url: str) -> None:
    """Pools and deployments through the client (the CLI costs seconds a call), as `prefect deploy`
    of this checkout would record them: run from the repo by its entrypoint."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.utilities.callables import parameter_schema
    from prefect.workers.process import ProcessWorker

    from tests.conftest import REPO

    template = ProcessWorker.get_default_base_job_template()
    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for pool in ("busy", "idle"):
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
        for fl, entry, pool in (
            (sleepy_child, "sleepy_child", "busy"),
            (sleepy_child, "sleepy_child", "idle"),
            (fanout_parent, "fanout_parent", "busy"),
        ):
            client.create_deployment(
                flow_id=client.create_flow_from_name(fl.name),
                name=pool,
                work_pool_name=pool,
                entrypoint=f"tests/test_fanout.py:{entry}",
                path=str(REPO),
                pull_steps=pull,
                parameter_openapi_schema=parameter_schema(fl).model_dump_for_openapi(),
            )


@pytest.fixture
def api(server):
    """This process's flows and clients talk to that server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.api}):
        yield server


def _flow_run(client, run_id: UUID | str):
    return client.read_flow_run(UUID(str(run_id)))


def _children(client, parent_flow_run_id: UUID) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_flow_run_id]))
    )


def _state_messages(client, run_id: UUID) -> list[str]:
    return [f"{s.name}: {s.message}" for s in client.read_flow_run_states(run_id)]


def _wait(pred, timeout: float, what: str, describe=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"not {what} after {timeout}s" + (f": {describe()}" if describe else ""))


@pytest.mark.slow
def test_pickup_deadline_cancels_a_child_no_worker_takes(api, tmp_path):
    from prefect.client.orchestration import get_client

    cfg = _config("custom_cnn", tmp_path / "m", 1)
    t0 = time.monotonic()
    state = fanout_parent([cfg], deployment="sleepy-train-model/idle", pickup_timeout_s=3, return_state=True)
    (rec,) = state.result()
    assert time.monotonic() - t0 < 30
    assert rec["status"] == "failed" and rec["model"] == "custom_cnn"
    assert "no worker of work pool 'idle' picked it up within 3 s" in rec["error"]
    with get_client(sync_client=True) as client:
        (child,) = _children(client, state.state_details.flow_run_id)
        assert child.state.is_cancelled()
        assert any("picked it up within 3 s" in m for m in _state_messages(client, child.id))


@pytest.mark.slow
def test_model_deadline_cancels_a_child_running_too_long(api, tmp_path):
    from prefect.client.orchestration import get_client

    slow, quick = _config("custom_cnn", tmp_path / "slow", 600), _config("vgg16", tmp_path / "quick", 1)
    state = fanout_parent(
        [slow, quick], deployment="sleepy-train-model/busy", model_timeout_s=4, pickup_timeout_s=60, return_state=True
    )
    rec, other = state.result()
    assert rec["status"] == "failed" and "timed out after 4 s" in rec["error"]
    # The quick child completed on its own: the stand-in stores no model, so no timeout in its record.
    assert other["status"] == "failed" and "completed, but the store holds no model" in other["error"]
    with get_client(sync_client=True) as client:
        by_name = {c.name: c for c in _children(client, state.state_details.flow_run_id)}
        assert by_name["sleepy-vgg16"].state.is_completed()
        child = _wait(
            lambda: (c := _flow_run(client, by_name["sleepy-custom_cnn"].id)).state.is_cancelled() and c,
            60,
            "cancelled by the worker",
        )
        assert child.start_time is not None  # it did run: this was the run deadline, not pickup
        assert any("timed out after 4 s" in m for m in _state_messages(client, child.id))


@pytest.mark.slow
def test_cancelling_the_parent_cancels_its_children(api, tmp_path):
    from prefect.client.orchestration import get_client

    configs = [_config("custom_cnn", tmp_path / "a", 600), _config("vgg16", tmp_path / "b", 600)]
    params = {"configs": configs, "deployment": "sleepy-train-model/busy", "max_parallel": 2}
    res = api.run("deployment", "run", "fanout-parent/busy", "--params", json.dumps(params))
    parent_id = UUID(res.stdout.split("UUID:")[1].split()[0])
    with get_client(sync_client=True) as client:
        _wait(lambda: sum(c.state.is_running() for c in _children(client, parent_id)) == 2, 120, "both running")
        api.run("flow-run", "cancel", str(parent_id))
        _wait(lambda: _flow_run(client, parent_id).state.is_cancelled(), 90, "parent cancelled")
        kids = _wait(
            lambda: (k := _children(client, parent_id)) and all(c.state.is_cancelled() for c in k) and k,
            120,  # the runner stops each process on its Cancelling event: seconds, more on 2 busy cores
            "children cancelled",
            lambda: {c.name: _state_messages(client, c.id) for c in _children(client, parent_id)},
        )
        assert len(kids) == 2
        for kid in kids:
            assert any("the parent flow run" in m for m in _state_messages(client, kid.id)), _state_messages(
                client, kid.id
            )


# -- the train-model flow (the deployment route's child) ------------------------------------------


def test_train_model_flow_retries_once_within_a_time_limit_from_the_environment(monkeypatch):
    import subprocess
    import sys

    from flows.train_model import DEFAULT_TIMEOUT_S, train_model_flow
    from tests.conftest import REPO

    assert train_model_flow.retries == 1
    monkeypatch.delenv("COVID_TRAIN_TIMEOUT_S", raising=False)
    code = "from flows.train_model import train_model_flow as f; print(f.timeout_seconds)"
    read = [sys.executable, "-c", code]
    assert float(subprocess.run(read, cwd=REPO, capture_output=True, text=True, check=True).stdout) == DEFAULT_TIMEOUT_S
    monkeypatch.setenv("COVID_TRAIN_TIMEOUT_S", "1234")
    assert float(subprocess.run(read, cwd=REPO, capture_output=True, text=True, check=True).stdout) == 1234


@pytest.mark.slow
def test_train_model_flow_timeout_parameter_kills_the_training_and_is_retried(prefect_server, small_split, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.train_model import train_model_flow

    endless = _config("custom_cnn", tmp_path / "m", 100_000, split=small_split)
    quick_retry = train_model_flow.with_options(retry_delay_seconds=0)
    state = quick_retry(config=endless, timeout_s=4, return_state=True)
    assert state.is_failed()
    assert "training custom_cnn timed out after 4 s" in state.message
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.run_count == 2  # the retry ran (and would resume from the checkpoint in the store)


_ENDLESS_FLOW = """
import json, sys
from prefect import flow
from tasks.fanout import train_models

@flow
def endless(configs):
    return train_models(configs, max_parallel=2)

endless(json.loads(open(sys.argv[1]).read()))
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")
def test_a_terminated_flow_kills_its_trainings(prefect_server, small_split, tmp_path):
    """SIGTERM is how a worker cancels a flow run: the trainings its task threads wait on must end
    (or those non-daemon threads would keep the process, and the trainings, going)."""
    import signal
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    from tests.conftest import REPO
    from tests.test_runner import _alive, _trainings

    configs = [_config(m, tmp_path / m, 100_000, split=small_split) for m in ("custom_cnn", "vgg16")]
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    cmd = [sys.executable, "-c", _ENDLESS_FLOW, str(tmp_path / "configs.json")]
    log = open(tmp_path / "flow.log", "wb")  # noqa: SIM115 (the child keeps its own copy of the fd)
    flow_proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        pids = _wait(lambda: len(p := _trainings(flow_proc.pid)) == 2 and p, 120, "two trainings")
        flow_proc.send_signal(signal.SIGTERM)
        try:
            flow_proc.wait(120)  # two trainings hold both cores until the handler kills them
        except subprocess.TimeoutExpired:
            pytest.fail("the flow process outlived SIGTERM by 120 s:\n" + (tmp_path / "flow.log").read_text()[-4000:])
        _wait(lambda: not any(_alive(p) for p in pids), 10, "trainings ended")
    finally:
        flow_proc.kill()
        flow_proc.wait()
