"""Scoring a model on a *negative* set: X-rays known not to be COVID (no Prefect).

    resolve model -> ingest the set (finding folders) -> validate -> dedupe against training -> score -> write

As an external labelled set (``covid_eval.external``), with three differences:

* **The set** is published with :func:`covid_data.negative.fetch_negative_dataset`: any folder
  names are findings (``Normal/``, ``Tuberculosis/``; ``masks/`` is not one), each image keeps its
  finding folder, and the ``negative`` profile validates it (undecodable files reported, left out).
* **Every image** of every finding folder is scored, since each is known not to be COVID.
* **The figure** is the COVID false-alarm rate (share called COVID) with its 95% Wilson interval,
  overall and per finding folder, with the predicted-class counts, beside the model's own test
  false-alarm rate (``covid_eval.negative_report``).

Duplicates of the model's train and validation images are left out as for a labelled set. The unit
is ``evaluations/<model key>/<dataset version>-negative[...]/``, ``evaluation.json`` last, with
``"set_kind": "negative"``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covid_data.labels import CLASSES
from covid_data.negative import fetch_negative_dataset, finding_counts
from covid_eval.duplicates import DEFAULT_NEAR_DUP_DISTANCE, duplicates_summary
from covid_eval.external import (
    ModelRef,
    csv_text,
    evaluation_prefix,
    evaluation_unit,
    existing,
    model_ref,
    score_set,
    stored_validation,
)
from covid_eval.external_report import clean_json
from covid_eval.negative_report import (
    compare_false_alarm,
    external_set,
    negative_metrics,
    negative_report_markdown,
    negative_summary,
)

log = logging.getLogger(__name__)

PROFILE = "negative"


def ingest_negative(
    source: str, store: str, *, cache_dir: str | None = None, kaggle_credentials=None
) -> dict[str, Any]:
    """Publish the negative set as a dataset version of ``store``."""
    ref = fetch_negative_dataset(
        source, store, cache_dir=Path(cache_dir) if cache_dir else None, kaggle_credentials=kaggle_credentials
    )
    return ref.to_dict()


def validate_negative(store: str, version: str) -> dict[str, Any]:
    """The ``negative`` profile over the version's manifest: counts per finding folder and the
    undecodable files (reported and left out)."""
    manifest, report, result_uri = stored_validation(store, version, PROFILE)
    bad = manifest[manifest["error"].notna()]
    return {
        "version": version,
        "result_uri": result_uri,
        "n_images": len(manifest),
        "finding_counts": finding_counts(manifest),
        "undecodable": [{"path": str(p), "error": str(e)} for p, e in zip(bad["path"], bad["error"], strict=True)],
        "warnings": [f"{f.description}: {f.observed}" for f in report.warnings],
    }


def write_negative_evaluation(
    store: str,
    model: ModelRef,
    dataset: dict[str, Any],
    validation: dict[str, Any],
    duplicates: pd.DataFrame,
    scored: pd.DataFrame,
    probs: np.ndarray,
    *,
    include_duplicates: bool = False,
    near_dup_distance: int = DEFAULT_NEAR_DUP_DISTANCE,
    name: str | None = None,
    about: str | None = None,
) -> dict[str, Any]:
    """The false-alarm figures, the report and the predictions into the evaluation's unit,
    ``evaluation.json`` last. A unit that is already complete is returned as it is."""
    version = dataset["version"]
    settings = {"include_duplicates": include_duplicates, "near_dup_distance": near_dup_distance}
    unit = evaluation_unit(store, evaluation_prefix(model.key, version, negative=True, **settings))
    done = unit.record()
    if done is not None:
        return done
    if unit.store.list(unit.prefix + "/"):
        log.info("replacing the interrupted evaluation at %s", unit.uri)
    probs = np.asarray(probs, dtype="float64")
    metrics = negative_metrics(probs, scored["finding"].astype(str).to_numpy())
    named = external_set({"uri": dataset.get("source") or version, "kind": "negative", "name": name, "about": about})
    dups = duplicates_summary(duplicates, near_dup_distance, include_duplicates)
    # A "not COVID" image matching one of the model's COVID images: the set or the data is wrong, or
    # (a near match) a chance likeness; the report asks for a look.
    dups["covid_matches"] = int((duplicates["match_label"] == "COVID").sum())
    dups.pop("label_disagreements", None)  # every match disagrees with "not COVID": says nothing here
    record = clean_json(
        {
            "kind": "external-evaluation",
            "set_kind": "negative",
            "uri": unit.uri,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": model.identity(),
            "dataset": {
                "source": dataset.get("source"),
                "name": named["name"],
                "about": named["about"],
                "version": version,
                "uri": dataset.get("uri"),
                "manifest_uri": dataset.get("manifest_uri"),
                "finding_counts": validation["finding_counts"],
                "undecodable": validation["undecodable"][:100],
                "validation": validation["result_uri"],
                "validation_warnings": validation.get("warnings", []),
            },
            "settings": {**settings, "negative": True},
            "counts": {
                "images": int(validation["n_images"]),
                "undecodable": len(validation["undecodable"]),
                "duplicates_excluded": dups["excluded"],
                "scored": len(scored),
                "scored_per_finding": {f: r["n"] for f, r in metrics["per_finding"].items()},
            },
            "duplicates": dups,
            "metrics": metrics,
            "comparison": compare_false_alarm(metrics, model.test_metrics),
            "files": {"duplicates": "duplicates.csv", "predictions": "predictions.csv", "report": "report.md"},
        }
    )
    pred = scored[["path", "finding"]].assign(predicted=[CLASSES[i] for i in probs.argmax(axis=1)])
    for i, c in enumerate(CLASSES):
        pred[f"p_{c}"] = np.round(probs[:, i], 6)
    unit.put_text("duplicates.csv", csv_text(duplicates))
    unit.put_text("predictions.csv", csv_text(pred))
    unit.put_text("report.md", negative_report_markdown(record))
    if not unit.complete(record):
        log.info("another attempt completed %s first; its evaluation stands", unit.uri)
    return unit.record() or record


def evaluate_negative(
    model: ModelRef | str,
    source: str,
    store: str,
    *,
    include_duplicates: bool = False,
    near_dup_distance: int = DEFAULT_NEAR_DUP_DISTANCE,
    cache_dir: str | None = None,
    kaggle_credentials=None,
    name: str | None = None,
    about: str | None = None,
) -> dict[str, Any]:
    """Score the model (a :class:`ModelRef`, or a slot URI) on the negative set at ``source``;
    returns :func:`negative_summary` of the stored evaluation (computed once, then reused).
    ``name`` and ``about`` say what the set is (default: its folder's name, and "known not to be COVID")."""
    if not isinstance(model, ModelRef):
        model = model_ref(model)
    dataset = ingest_negative(source, store, cache_dir=cache_dir, kaggle_credentials=kaggle_credentials)
    settings = {"include_duplicates": include_duplicates, "near_dup_distance": near_dup_distance}
    # What the caller calls the set wins over what a reused evaluation recorded (it is not part of its key).
    named = {k: v for k, v in (("name", name), ("about", about)) if v}
    done = existing(store, model, dataset["version"], negative=True, **settings)
    if done is not None:
        log.info("%s is already evaluated on %s: %s", model.key, dataset["version"], done["uri"])
        return {**negative_summary(done), **named}
    validation = validate_negative(store, dataset["version"])
    dups, scored, probs = score_set(store, model, dataset["version"], cache_dir=cache_dir, negative=True, **settings)
    record = write_negative_evaluation(
        store, model, dataset, validation, dups, scored, probs, name=name, about=about, **settings
    )
    return {**negative_summary(record), **named}
