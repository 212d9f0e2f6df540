"""The ``train-model`` flow: one model, for fan-out as a child run on its own worker.

The ``retrain`` flow starts it through a deployment (``run_deployment``) when told to train on
separate workers, one model per accelerator; it writes its artefacts to the store, where the
parent reads them.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from covid_models.train import TrainConfig, train_model


@flow(name="train-model", flow_run_name="train-{config[model]}")
def train_model_flow(config: dict[str, Any]) -> dict[str, Any]:
    return train_model(TrainConfig(**config)).to_dict()
