"""Training many models from a running flow: bounded, fault-isolated, cancellable.

:func:`train_models` is what the ``retrain`` flow calls. Models already complete in the store
are not trained again; they show up in the UI as a ``reuse-model`` task run in a ``Cached`` state.
The others train either

- here, as ``train-model`` tasks on the flow's task runner (threads by default, or Dask workers
  under ``prefect_dask.DaskTaskRunner``), at most ``max_parallel`` at once, the next one starting
  as soon as any finishes; or
- as child flow runs of a ``train-model`` deployment (one worker per model), at most
  ``max_parallel`` at once, each with a pickup deadline (no worker took it) and a run deadline.

Either way a failed model becomes a failed record and never stops the others, and a cancelled
parent (a Prefect cancellation, a TerminationSignal, KeyboardInterrupt) takes its trainings along.

A model's slot is keyed on the device it trains on, planned in the flow's process. A deployment
whose environment sets ``COVID_DEVICE`` (its job variables, else its work pool's default ``env``:
``tpu:4`` for ``vertex-tpu``) trains on that device, so its models are re-keyed for it before the
store is checked; a deployment without it is taken to train on the flow's own device (its training
stops with an error naming both when it does not).

Records, one per config and in the order of the configs: a model trained or reused is
``TrainResult.to_dict()`` (``status`` ``"trained"`` or ``"cached"``); a model that failed is
``{"model": ..., "status": "failed", "error": ..., "out": ...}``.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect import Flow, get_run_logger, task
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Cancelled, Cancelling, Completed, State

from covid_models.presets import for_device
from covid_models.runner import kill_all_trainings
from covid_models.strategy import DEVICE_ENV
from covid_models.train import TrainConfig, cached_result
from tasks.training import default_model_deadline_s, train_model

__all__ = ["train_models", "reuse_model", "failed_record", "on_dask", "deployment_env_device"]


def on_dask(flow: Flow, address: str | None) -> Flow:
    """``flow`` with a Dask task runner on the cluster at ``address`` (prefect-dask); unchanged
    without an address."""
    if not address:
        return flow
    from prefect_dask import DaskTaskRunner

    return flow.with_options(task_runner=DaskTaskRunner(address=address))


def failed_record(cfg: dict[str, Any], error: str) -> dict[str, Any]:
    return {"model": cfg["model"], "status": "failed", "error": error, "out": cfg["out"]}


@task(name="reuse-model", task_run_name="reuse-{record[model]}")
def reuse_model(record: dict[str, Any]) -> State:
    """A model already complete in the store: nothing to train. A task run all the same, so the
    UI lists every model of the run, this one in a ``Cached`` state."""
    return Completed(
        name="Cached",
        message=f"{record['model']} is already trained for this split and settings: {record['out']}",
        data=record,
    )


def train_models(
    configs: list[dict[str, Any]],
    *,
    max_parallel: int,
    deployment: str | None = None,
    model_timeout_s: float | None = None,
    pickup_timeout_s: float | None = 600,
    poll_s: float = 2.0,
) -> list[dict[str, Any]]:
    """Train (or reuse) one model per ``TrainConfig`` dict; one record per config, in their order.

    Must be called inside a running flow. ``deployment`` (e.g. ``"train-model/local"``) trains
    each model as a child flow run of that deployment, else as tasks on the flow's task runner.
    ``model_timeout_s`` limits each training (from its start: for a child run, from when it is
    Running); ``pickup_timeout_s`` limits how long a child run may wait for a worker (deployment
    route only; ``None`` waits forever). ``poll_s`` is the deployment route's polling interval.
    """
    flow_ctx = FlowRunContext.get()
    if flow_ctx is None or flow_ctx.flow_run is None:
        raise RuntimeError("train_models must be called inside a running Prefect flow")
    logger = get_run_logger()
    if deployment:
        configs = _for_deployment_device(configs, deployment, logger)
    records: list[dict[str, Any] | None] = [None] * len(configs)
    todo: list[int] = []
    for i, cfg in enumerate(configs):
        try:
            cached = cached_result(TrainConfig(**cfg))
        except Exception as e:  # a bad config or an unreadable store: its training reports the failure
            logger.warning("could not check the store for a trained %s: %s", cfg.get("model"), e)
            cached = None
        if cached is None:
            todo.append(i)
        else:
            # A task returning a State hands back that State; its data is the record.
            state = reuse_model(cached.to_dict(), return_state=True)
            records[i] = state.result() if isinstance(state, State) else state
    if not todo:
        logger.info("all %d models are already trained for this dataset, split and settings", len(configs))
    elif len(todo) < len(configs):
        logger.info(
            "%d of %d models reused from the store; training %d", len(configs) - len(todo), len(configs), len(todo)
        )
    if todo:
        work = [configs[i] for i in todo]
        if deployment:
            done = _train_on_deployment(
                work,
                deployment,
                parent=flow_ctx.flow_run.id,
                max_parallel=max_parallel,
                model_timeout_s=model_timeout_s,
                pickup_timeout_s=pickup_timeout_s,
                poll_s=poll_s,
            )
        else:
            done = _train_here(work, max_parallel=max_parallel, model_timeout_s=model_timeout_s)
        for i, rec in zip(todo, done, strict=True):
            records[i] = rec
    return [r for r in records if r is not None]


def deployment_env_device(base_job_template: dict[str, Any] | None, job_variables: dict[str, Any] | None) -> str | None:
    """``COVID_DEVICE`` in a deployment's environment: its ``job_variables["env"]`` over its work
    pool's default ``env`` (the deployment's keys win); None when neither sets it."""
    props = ((base_job_template or {}).get("variables") or {}).get("properties") or {}
    env = {**((props.get("env") or {}).get("default") or {}), **((job_variables or {}).get("env") or {})}
    return (env.get(DEVICE_ENV) or "").strip() or None


def _for_deployment_device(configs: list[dict[str, Any]], deployment: str, logger) -> list[dict[str, Any]]:
    """The configs re-keyed for the device ``deployment`` declares (unchanged when it declares none)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        template = client.read_work_pool(dep.work_pool_name).base_job_template if dep.work_pool_name else None
    device = deployment_env_device(template, dep.job_variables)
    if device is None:
        return configs
    moved = [for_device(c, device) for c in configs]
    changed = {c["model"]: c["out"] for c, old in zip(moved, configs, strict=True) if c is not old}
    if changed:
        logger.info(
            "%s trains on %s (its %s): model slots for that device: %s", deployment, device, DEVICE_ENV, changed
        )
    return moved


# -- on this flow's task runner --------------------------------------------------------------
def _train_here(configs: list[dict[str, Any]], *, max_parallel: int, model_timeout_s: float | None) -> list[dict]:
    """Keep up to ``max_parallel`` train-model tasks in flight; start the next as soon as any ends,
    so no slot waits for the slowest model of a batch."""
    logger = get_run_logger()
    slots = max(1, max_parallel)
    threads = max(1, (os.cpu_count() or 1) // slots)
    queue = deque(range(len(configs)))
    running: dict[PrefectFuture, int] = {}
    records: dict[int, dict[str, Any]] = {}
    try:
        while queue or running:
            while queue and len(running) < slots:
                i = queue.popleft()
                running[train_model.submit(configs[i], threads=threads, timeout=model_timeout_s)] = i
            fut = next(as_completed(list(running)))
            i = running.pop(fut)
            records[i] = _task_record(fut, configs[i])
            if records[i]["status"] == "failed":
                logger.error("training %s failed: %s", configs[i]["model"], records[i]["error"])
    except BaseException:
        # Cancelled or interrupted (a TerminationSignal, KeyboardInterrupt): the tasks' threads wait
        # on training processes. Killing those makes the threads return (failed) instead of training
        # on, orphaned: here under the thread pool, on every Dask worker under the DaskTaskRunner.
        killed = kill_all_trainings() + _kill_on_dask_workers(logger)
        for fut in running:
            fut_cancel = getattr(getattr(fut, "wrapped_future", None), "cancel", None)
            if fut_cancel is not None:
                fut_cancel()  # a Dask task not started yet is dropped
        logger.warning("training interrupted: %d training processes killed, %d tasks cancelled", killed, len(running))
        raise
    return [records[i] for i in range(len(configs))]


def _kill_on_dask_workers(logger) -> int:
    """Under prefect-dask's DaskTaskRunner, kill the training processes of every worker of the
    flow's cluster (Dask cannot interrupt a running task; its training process it can end).
    A cluster shared with other flows loses their trainings too."""
    ctx = FlowRunContext.get()
    client = getattr(getattr(ctx, "task_runner", None), "_client", None)
    if client is None:
        return 0
    try:
        return sum(client.run(kill_all_trainings).values())
    except Exception as e:  # the cluster may be going down with us
        logger.warning("could not kill the trainings on the Dask workers: %s", e)
        return 0


def _task_record(fut: PrefectFuture, cfg: dict[str, Any]) -> dict[str, Any]:
    fut.wait()
    state = fut.state
    if state.is_completed():
        return fut.result()
    err = fut.result(raise_on_failure=False)
    message = str(err) if isinstance(err, BaseException) else str(state.message or state.name)
    return failed_record(cfg, message)


# -- as child flow runs of a deployment ---------------------------------------------------------
@dataclass
class _Child:
    index: int
    cfg: dict[str, Any]
    run_id: UUID
    submitted: float  # time.monotonic()
    started: float | None = None  # when first seen Running


def _train_on_deployment(
    configs: list[dict[str, Any]],
    deployment: str,
    *,
    parent: UUID,
    max_parallel: int,
    model_timeout_s: float | None,
    pickup_timeout_s: float | None,
    poll_s: float,
) -> list[dict[str, Any]]:
    """Each model as a child flow run of ``deployment``; at most ``max_parallel`` in flight (set it to
    the number of workers of the pool: a run queued behind busy workers would otherwise count
    against its pickup deadline)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    slots = max(1, max_parallel)
    deadline = model_timeout_s if model_timeout_s is not None else default_model_deadline_s()
    queue = deque(range(len(configs)))
    active: dict[int, _Child] = {}
    records: dict[int, dict[str, Any]] = {}
    with get_client(sync_client=True) as client:
        pool = client.read_deployment_by_name(deployment).work_pool_name or "(no work pool)"

        def cancel(child: _Child, why: str) -> None:
            # A run no worker has taken has no infrastructure to stop: straight to Cancelled (the
            # server would turn Cancelling into that anyway, dropping the message). Else Cancelling,
            # on which the worker that runs it kills its process and marks it Cancelled.
            try:
                state = client.read_flow_run(child.run_id).state
                waiting = state is not None and state.is_scheduled() and child.started is None
                new = Cancelled(message=why) if waiting else Cancelling(message=why)
                client.set_flow_run_state(child.run_id, new, force=True)
            except Exception as e:  # best effort: report and go on cancelling the others
                logger.error("could not cancel child flow run %s (%s): %s", child.run_id, child.cfg["model"], e)

        try:
            while queue or active:
                while queue and len(active) < slots:
                    i = queue.popleft()
                    # run_deployment is sync here (async_dispatch: no running event loop in a sync flow).
                    run = run_deployment(deployment, parameters={"config": configs[i]}, timeout=0, as_subflow=True)
                    active[i] = _Child(i, configs[i], run.id, time.monotonic())
                    logger.info("%s: child flow run %s of %s (pool %s)", configs[i]["model"], run.id, deployment, pool)
                time.sleep(poll_s)
                own = client.read_flow_run(parent).state
                if own is not None and (own.is_cancelling() or own.is_cancelled()):
                    raise _ParentCancelled(f"flow run {parent} is {own.name}")
                now = time.monotonic()
                for i, child in list(active.items()):
                    state = client.read_flow_run(child.run_id).state
                    if state is None:
                        continue
                    if state.is_final():
                        records[i] = _child_record(child, state)
                    elif state.is_running():
                        child.started = child.started or now
                        if now - child.started > deadline:
                            why = f"timed out after {deadline:g} s" + (
                                ""
                                if model_timeout_s is not None
                                else " (the train-model flow's limit for two "
                                "attempts plus a grace period: is its worker gone?)"
                            )
                            cancel(child, f"train_models: {why}")
                            records[i] = failed_record(child.cfg, f"child flow run {child.run_id} {why}")
                    elif (
                        (state.is_scheduled() or state.is_pending())
                        and child.started is None
                        and pickup_timeout_s is not None
                        and now - child.submitted > pickup_timeout_s
                    ):
                        why = f"no worker of work pool {pool!r} picked it up within {pickup_timeout_s:g} s"
                        cancel(child, f"train_models: {why}")
                        records[i] = failed_record(child.cfg, f"child flow run {child.run_id} of {deployment}: {why}")
                    if i in records:
                        del active[i]
                        if records[i]["status"] == "failed":
                            logger.error("training %s failed: %s", child.cfg["model"], records[i]["error"])
        except BaseException as e:
            # The parent is cancelled, interrupted or broken: its children must not train on unowned.
            logger.warning("cancelling %d unfinished child flow runs: %s", len(active), str(e) or type(e).__name__)
            why = f"train_models: the parent flow run {parent} was cancelled or failed"
            _cancel_each(list(active.values()), lambda child: cancel(child, why))
            raise
    return [records[i] for i in range(len(configs))]


def _cancel_each(children: list[_Child], cancel: Callable[[_Child], None]) -> None:
    """Cancel every child even if this process is told to stop meanwhile. A cancelled parent gets
    SIGTERM from its runner at about the moment its own poll sees the cancellation, and Prefect raises
    that as a BaseException wherever the main thread is: mid-loop, it would leave the rest of the
    children training. The interruption is held, the child it hit is cancelled again, and it is
    raised once all are done (the runner's SIGKILL follows only after a grace period)."""
    held: BaseException | None = None
    for child in children:
        for _ in range(2):
            try:
                cancel(child)
                break
            except BaseException as stop:  # noqa: BLE001 - re-raised below
                held = held or stop
    if held is not None:
        raise held


class _ParentCancelled(RuntimeError):
    """The parent's own flow run was cancelled through the API while it waited on its children."""


def _child_record(child: _Child, state: State) -> dict[str, Any]:
    try:
        res = cached_result(TrainConfig(**child.cfg)) if state.is_completed() else None
    except Exception as e:  # an unreadable store fails this model, not the whole fan-out
        return failed_record(child.cfg, f"child flow run {child.run_id} ended {state.name}; reading its model: {e}")
    if res is not None:
        return {**res.to_dict(), "status": "trained"}
    if state.is_completed():
        why = f"child flow run {child.run_id} completed, but the store holds no model at {child.cfg['out']}"
    else:
        why = f"child flow run {child.run_id} ended {state.name}: {state.message}"
    return failed_record(child.cfg, why)
