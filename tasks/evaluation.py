"""Tasks of external evaluation: thin wrappers over covid_eval.external.

Between tasks only small records travel: the model's reference, the dataset version, counts,
the duplicates table and the scored rows (paths and labels) with their probabilities.

``negative=True`` makes each task work on a negative set (X-rays known not to be COVID, in finding
folders: ``covid_eval.negative``): every finding folder is scored, and the figure is the COVID
false-alarm rate.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from covid_data.store import read_object
from covid_eval import external as ee
from covid_eval import negative as ne
from covid_eval.duplicates import DUPLICATE_COLUMNS
from covid_registry import references
from tasks.credentials import DEFAULT_SECRET_BLOCK, prefect_secret_credentials

ARTIFACT_KEY = "external-evaluation"


def _model(model: dict[str, Any]) -> ee.ModelRef:
    return ee.ModelRef(**model)


@task(name="resolve-model")
def resolve_model(reference: str, store: str) -> dict[str, Any]:
    """``champion``, ``<run id>/<model>`` or a model slot URI -> the complete slot it names."""
    model = references.resolve_model(reference, store)
    get_run_logger().info("evaluating %s (%s): %s", model.model, reference, model.uri)
    return model.to_dict()


@task(name="validate-external")
def validate_external(dataset: dict[str, Any], negative: bool = False) -> dict[str, Any]:
    """The ``external`` validation profile: a missing class, unknown class folders and undecodable
    files are reported (and left out), not errors (``negative``: the ``negative`` profile)."""
    logger = get_run_logger()
    if negative:
        out = ne.validate_negative(dataset["store"], dataset["version"])
        logger.info("negative set, images per finding folder: %s", out["finding_counts"])
        if out["undecodable"]:
            logger.warning("%d undecodable files left out", len(out["undecodable"]))
        return out
    out = ee.validate_external(dataset["store"], dataset["version"])
    if out["missing_classes"]:
        logger.warning("classes with no images in the set: %s", ", ".join(out["missing_classes"]))
    if out["unknown_classes"]:
        logger.warning("unknown class folders, left out: %s", out["unknown_classes"])
    if out["undecodable"]:
        logger.warning("%d undecodable files left out", len(out["undecodable"]))
    return out


@task(name="find-evaluation")
def find_evaluation(
    store: str,
    model: dict[str, Any],
    dataset: dict[str, Any],
    include_duplicates: bool,
    near_dup_distance: int,
    negative: bool = False,
) -> dict[str, Any] | None:
    """The complete evaluation of this model on this set with these settings, if there is one."""
    return ee.existing(
        store,
        _model(model),
        dataset["version"],
        include_duplicates=include_duplicates,
        near_dup_distance=near_dup_distance,
        negative=negative,
    )


@task(name="find-duplicates")
def find_duplicates(
    store: str,
    model: dict[str, Any],
    dataset: dict[str, Any],
    include_duplicates: bool,
    near_dup_distance: int,
    negative: bool = False,
) -> list[dict[str, Any]]:
    """The set's exact and near copies of the model's train, val and test images."""
    rows = ee.usable_rows(store, dataset["version"], negative=negative)
    if rows.empty:
        raise ee.EvaluationError(
            f"dataset {dataset['version']} has no image that can be scored "
            "(each is undecodable or in an unknown class folder)"
        )
    dups = ee.find_duplicates(
        rows, ee.training_images(_model(model).split_uri), near_dup_distance, exclude=not include_duplicates
    )
    s = ee.duplicates_summary(dups, near_dup_distance, include_duplicates)
    get_run_logger().info(
        "duplicates of the model's images: exact %s, near %s; %d seen in training, %d left out",
        s["exact"],
        s["near"],
        s["seen_in_training"],
        s["excluded"],
    )
    return dups.to_dict("records")


@task(name="score-model")
def score_model(
    store: str,
    model: dict[str, Any],
    dataset: dict[str, Any],
    duplicates: list[dict[str, Any]],
    cache_dir: str | None,
    negative: bool = False,
) -> dict[str, Any]:
    """Predict every usable image that is not left out as a duplicate."""
    rows = ee.usable_rows(store, dataset["version"], negative=negative)
    excluded = {d["path"] for d in duplicates if d["excluded"]}
    scored = rows[~rows["path"].isin(excluded)].reset_index(drop=True)
    if scored.empty:
        raise ee.EvaluationError(
            f"every image of dataset {dataset['version']} was seen in the model's training; nothing is left to "
            "score (include_duplicates scores them anyway)"
        )
    probs = ee.predict(_model(model), ee.local_images(store, dataset["version"], scored["path"].tolist(), cache_dir))
    get_run_logger().info("scored %d images", len(scored))
    columns = ["path", "label", "finding"] if negative else ["path", "label"]
    return {"rows": scored[columns].to_dict("records"), "probabilities": probs.tolist()}


@task(name="write-evaluation")
def write_evaluation(
    store: str,
    model: dict[str, Any],
    dataset: dict[str, Any],
    validation: dict[str, Any],
    duplicates: list[dict[str, Any]],
    scores: dict[str, Any],
    include_duplicates: bool,
    near_dup_distance: int,
    negative: bool = False,
    name: str | None = None,
    about: str | None = None,
) -> dict[str, Any]:
    """Metrics, comparison with the model's test metrics, confusion matrix and report, then
    ``evaluation.json``; the report also as the ``external-evaluation`` artifact (``negative``: the
    false-alarm figures; ``name`` and ``about`` say what the set is)."""
    args = (
        store,
        _model(model),
        dataset,
        validation,
        pd.DataFrame(duplicates, columns=DUPLICATE_COLUMNS),
        pd.DataFrame(scores["rows"], columns=["path", "label", "finding"] if negative else ["path", "label"]),
        np.asarray(scores["probabilities"], dtype="float64").reshape(-1, len(ee.CLASSES)),
    )
    settings = {"include_duplicates": include_duplicates, "near_dup_distance": near_dup_distance}
    if negative:
        record = ne.write_negative_evaluation(*args, name=name, about=about, **settings)
    else:
        record = ee.write_evaluation(*args, **settings)
    publish_report(record)
    return ee.summary(record)


def publish_report(record: dict[str, Any]) -> None:
    """The stored report as the Prefect markdown artifact."""
    create_markdown_artifact(
        ee.read_report(record),
        key=ARTIFACT_KEY,
        description=f"{record['model']['key']} on dataset {record['dataset']['version']}",
    )


@task(name="evaluate-external")
def evaluate_external(
    model_uri: str,
    source: str,
    store: str,
    *,
    include_duplicates: bool = False,
    near_dup_distance: int = ee.DEFAULT_NEAR_DUP_DISTANCE,
    cache_dir: str | None = None,
    kaggle_secret_block: str | None = DEFAULT_SECRET_BLOCK,
    negative: bool = False,
    name: str | None = None,
    about: str | None = None,
) -> dict[str, Any]:
    """One task for the whole evaluation (for the retrain flow's ``external_sources``); returns the
    small record (headline metrics, changes against the model's test metrics, the URI; for a
    ``negative`` set, the COVID false-alarm rate). ``name`` and ``about`` say what the set is."""
    kw = {
        "include_duplicates": include_duplicates,
        "near_dup_distance": near_dup_distance,
        "cache_dir": cache_dir,
        "kaggle_credentials": prefect_secret_credentials(kaggle_secret_block),
    }
    if negative:
        out = ne.evaluate_negative(model_uri, source, store, name=name, about=about, **kw)
    else:
        named = {k: v for k, v in (("name", name), ("about", about)) if v}
        out = {**ee.evaluate_external(model_uri, source, store, **kw), **named}
    publish_report(json.loads(read_object(out["evaluation"])))
    get_run_logger().info("evaluation of %s on %s: %s", out["model_key"], out["dataset_version"], out["uri"])
    return out
