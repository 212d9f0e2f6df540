"""Tasks of the model half: train, export and publish. Thin wrappers over covid_models."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from covid_models.runner import train_in_subprocess
from covid_models.train import TrainConfig

_EPOCH = re.compile(r"epoch (\d+)/(\d+) done")

DEFAULT_TIMEOUT_S = 6 * 3600.0  # one training's limit, unless COVID_TRAIN_TIMEOUT_S says otherwise
RETRY_GRACE_S = 600.0  # a retry's delay, a worker's start-up and a slow API, on top of two attempts


def training_timeout_s() -> float:
    """One training attempt's limit: ``COVID_TRAIN_TIMEOUT_S`` (seconds), default 6 h."""
    raw = os.environ.get("COVID_TRAIN_TIMEOUT_S", "")
    try:
        return float(raw) if raw.strip() else DEFAULT_TIMEOUT_S
    except ValueError as e:
        raise ValueError(f"COVID_TRAIN_TIMEOUT_S must be a number of seconds, not {raw!r}") from e


def default_model_deadline_s() -> float:
    """How long a training may run when the caller sets no ``model_timeout_s``: the train-model
    flow's own limit for its two attempts (it retries once), plus a grace period. Past it a child
    run whose worker died (its state stays Running) is cancelled instead of polled forever."""
    return 2 * training_timeout_s() + RETRY_GRACE_S


class _Progress:
    """A progress artifact whose API calls may fail without failing the training (it is only a
    display): a failure is logged once, and later updates still try."""

    def __init__(self, model: str, logger: logging.LoggerAdapter | logging.Logger):
        self.model, self.logger = model, logger
        self.artifact_id: Any = None
        self.failed = False

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:
            if not self.failed:
                self.logger.warning(
                    "progress artifact of %s: %s failed (%s: %s); training goes on",
                    self.model,
                    what,
                    type(e).__name__,
                    e,
                )
            self.failed = True
            return None

    def start(self) -> None:
        self.artifact_id = self._call(
            "create", lambda: create_progress_artifact(0.0, description=f"training {self.model}")
        )

    def update(self, percent: float) -> None:
        if self.artifact_id is None:
            self.start()  # its creation failed: try again, so the bar can still appear
        if self.artifact_id is not None:
            self._call("update", lambda: update_progress_artifact(self.artifact_id, percent))


@task(name="train-model", task_run_name="train-{config[model]}")
def train_model(config: dict[str, Any], threads: int | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Train one model in its own process; Keras' per-epoch lines go to the task log, and the
    epochs done to a progress artifact. ``timeout`` (seconds) kills the training when it runs longer."""
    logger = get_run_logger()
    cfg = TrainConfig(**config)
    progress = _Progress(cfg.model, logger)
    total_epochs = max(1, cfg.epochs + cfg.fine_tune_epochs)
    done = {"epochs": 0}

    def on_line(line: str) -> None:
        if not line or line.startswith(("W0000", "I0000", "E0000", "WARNING: All log messages")):
            return  # TensorFlow's start-up chatter
        logger.log(logging.WARNING if "Error" in line else logging.INFO, "%s", line)
        if _EPOCH.search(line):
            done["epochs"] += 1
            progress.update(min(99.0, 100.0 * done["epochs"] / total_epochs))

    progress.start()
    result = train_in_subprocess(cfg, threads=threads, on_line=on_line, timeout=timeout)
    progress.update(100.0)
    return result.to_dict()
