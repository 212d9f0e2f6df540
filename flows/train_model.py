"""The ``train-model`` flow: one model, for fan-out as a child run on its own worker.

The ``retrain`` flow starts it through a deployment (``run_deployment``) when told to train on
separate workers, one model per accelerator; it writes its artefacts to the store, where the
parent reads them.

A failed run is retried once: the retry resumes from the ``BackupAndRestore`` checkpoint in the
store, so an interrupted epoch is all that is lost. The run has a time limit: the flow's
``timeout_seconds`` is ``COVID_TRAIN_TIMEOUT_S`` (read when the flow is imported, default 6 h),
and the ``timeout_s`` parameter sets a shorter one for a single run (it kills the training
process when it runs past it).
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow, get_run_logger

from covid_models.runner import train_in_subprocess
from covid_models.train import TrainConfig
from tasks.training import DEFAULT_TIMEOUT_S, training_timeout_s

__all__ = ["DEFAULT_TIMEOUT_S", "TIMEOUT_S", "train_model_flow"]

TIMEOUT_S = training_timeout_s()


@flow(
    name="train-model",
    flow_run_name="train-{config[model]}",
    retries=1,
    retry_delay_seconds=10,
    timeout_seconds=TIMEOUT_S,
)
def train_model_flow(config: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
    """Train one model (a ``TrainConfig`` as a dict) in its own process; its epoch lines go to this run's log."""
    logger = get_run_logger()
    cfg = TrainConfig(**config)
    # The training runs in a child process so that a time limit kills it for sure (an exception
    # raised into Python code waits until TensorFlow hands control back) and the retry starts clean.
    limit = min(timeout_s, TIMEOUT_S) if timeout_s else TIMEOUT_S

    def on_line(line: str) -> None:
        if line and not line.startswith(("W0000", "I0000", "E0000", "WARNING: All log messages")):
            logger.log(logging.WARNING if "Error" in line else logging.INFO, "%s", line)

    return train_in_subprocess(cfg, on_line=on_line, timeout=limit).to_dict()
