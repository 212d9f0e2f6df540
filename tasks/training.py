"""Tasks of the model half: train, export and publish. Thin wrappers over covid_models."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from covid_models.publish import export_model
from covid_models.runner import train_in_subprocess
from covid_models.train import TrainConfig

_EPOCH = re.compile(r"epoch (\d+)/(\d+) done")


@task(name="train-model", task_run_name="train-{config[model]}")
def train_model(config: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    """Train one model in its own process; Keras' per-epoch lines go to the task log, and the
    epochs done to a progress artifact."""
    logger = get_run_logger()
    cfg = TrainConfig(**config)
    progress = create_progress_artifact(0.0, description=f"training {cfg.model}")
    total_epochs = max(1, cfg.epochs + cfg.fine_tune_epochs)
    done = {"epochs": 0}

    def on_line(line: str) -> None:
        if not line or line.startswith(("W0000", "I0000", "E0000", "WARNING: All log messages")):
            return  # TensorFlow's start-up chatter
        logger.log(logging.WARNING if "Error" in line else logging.INFO, "%s", line)
        if _EPOCH.search(line):
            done["epochs"] += 1
            update_progress_artifact(progress, min(99.0, 100.0 * done["epochs"] / total_epochs))

    result = train_in_subprocess(cfg, threads=threads, on_line=on_line)
    update_progress_artifact(progress, 100.0)
    return result.to_dict()


@task(name="export-model", task_run_name="export-{record[model]}")
def export_top_model(
    record: dict[str, Any],
    store: str,
    prefix: str,
    split_uri: str,
    version: str,
    int8: bool = True,
    max_per_class: int | None = None,
) -> dict[str, Any]:
    """Core ML and TFLite exports of one top model, checked, under ``prefix`` in the store."""
    metrics = {k: record[k] for k in ("val_accuracy", "test_accuracy", "test_macro_f1", "test_covid_sensitivity")}
    res = export_model(
        record["out"],
        store,
        prefix,
        split_uri=split_uri,
        version=version,
        metrics={k: v for k, v in metrics.items() if v is not None},
        int8=int8,
        max_per_class=max_per_class,
    )
    get_run_logger().info("exports of %s: %s", record["model"], json.dumps(res.to_dict()["checks"], default=str))
    return res.to_dict()
