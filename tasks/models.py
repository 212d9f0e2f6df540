"""Tasks of the model half around training: configure, rank, export.

Thin wrappers over covid_models; between tasks only configs, store URIs and small records
travel, never model objects.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from covid_models.leaderboard import leaderboard, to_markdown
from covid_models.model_exports import ensure_exports, wanted_variants
from covid_models.presets import Preset, model_configs
from covid_models.train import model_slot


@task(name="configure-models")
def configure_models(
    preset: dict[str, Any], data: dict[str, Any], store: str, models: list[str], overrides: dict[str, dict]
) -> list[dict[str, Any]]:
    """One resolved training config per model, each with its model slot in the store."""
    p = Preset(**{**preset, "models": tuple(preset["models"]), "split": tuple(preset["split"])})
    configs = model_configs(p, data["split"], data["split_hash"], store, models, overrides)
    get_run_logger().info("model slots: %s", {c["model"]: c["out"] for c in configs})
    return configs


@task(name="rank-models")
def rank_models(records: list[dict[str, Any]], rank_by: str, run_id: str) -> dict[str, Any]:
    """The leaderboard, ranked on validation (a table artifact too)."""
    board = leaderboard(records, rank_by)
    rows = board.astype(object).where(board.notna(), None).to_dict("records")
    create_table_artifact(rows, key="leaderboard", description=f"retrain {run_id}: ranked by {rank_by}")
    return {"rows": rows, "markdown": to_markdown(board)}


@task(name="export-model", task_run_name="export-{record[model]}")
def export_model(
    record: dict[str, Any], split_uri: str, int8: bool = True, max_per_class: int | None = None
) -> dict[str, Any]:
    """Core ML (fp16, optionally int8 weights) and TFLite exports of one top model, checked and
    stored beside it; formats already stored are reused."""
    metrics = {k: record[k] for k in ("val_accuracy", "test_accuracy", "test_macro_f1", "test_covid_sensitivity")}
    version = "/".join(record["out"].rstrip("/").rsplit("/", 2)[-2:])  # split hash / model-key
    variants = ensure_exports(
        record["out"],
        wanted_variants(int8),
        split_uri=split_uri,
        version=version,
        metrics={k: v for k, v in metrics.items() if v is not None},
        max_per_class=max_per_class,
    )
    stored = model_slot(record["out"]).record() or {}
    get_run_logger().info(
        "exports of %s: %s", record["model"], json.dumps({v: r["checks"] for v, r in variants.items()}, default=str)
    )
    return {
        "model": record["model"],
        "model_uri": record["out"],
        "version": version,
        "config": stored.get("config", {}),
        "weights": stored.get("weights"),
        "variants": variants,
    }
