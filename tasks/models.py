"""Tasks of the model half around training: configure, rank, export.

Thin wrappers over covid_models; between tasks only configs, store URIs and small records
travel, never model objects. The plain functions after the tasks are the retrain flow's steps
between them: which models are the top ones, exporting them in turn, the external evaluations,
and the columns added to the leaderboard after ranking.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from covid_eval.calibration import ensure_calibration
from covid_eval.leaderboard import leaderboard, to_markdown
from covid_eval.negative_report import external_set
from covid_models.describe import describe_weights
from covid_models.ensemble import build_and_evaluate, ensemble_slot_uri
from covid_models.presets import Preset, plan_models
from covid_models.stored import model_slot
from covid_registry.exports import ensure_exports, wanted_variants
from tasks.evaluation import evaluate_external
from tasks.logs import task_logger

TOP_N = 3  # models exported, explained and shipped in the app


@task(name="configure-models")
def configure_models(
    preset: dict[str, Any], data: dict[str, Any], store: str, models: list[str], overrides: dict[str, dict]
) -> dict[str, list[dict[str, Any]]]:
    """``{"configs": [...], "skipped": [...]}``: one resolved training config per model that can
    train, each with its model slot in the store, and a record per model skipped for want of its
    ImageNet weights (with the reason, naming the file)."""
    p = Preset(**{**preset, "models": tuple(preset["models"]), "split": tuple(preset["split"])})
    configs, skipped = plan_models(p, data["split"], data["split_hash"], store, models, overrides)
    log = get_run_logger()
    log.info("model slots: %s", {c["model"]: c["out"] for c in configs})
    for s in skipped:
        log.warning("%s %s", s["model"], s["error"])
    return {"configs": configs, "skipped": skipped}


@task(name="build-ensemble")
def build_ensemble(
    records: list[dict[str, Any]], size: int, split_uri: str, split_hash: str, store: str, max_per_class: int | None
) -> dict[str, Any] | None:
    """The averaged ensemble of the ``size`` best trained models by validation accuracy (each
    calibrated on validation first), as one more record for the leaderboard; None when fewer than
    two models trained."""
    trained = [r for r in records if r.get("status") in ("trained", "cached") and r.get("val_accuracy") is not None]
    trained.sort(key=lambda r: -float(r["val_accuracy"]))
    picked = trained[:size]
    log = task_logger(__name__)
    if size < 2 or len(picked) < 2:
        log.info("no ensemble: %d trained models (two are needed)", len(picked))
        return None
    members = [
        {"model": r["model"], "out": r["out"], "temperature": _temperature(r["out"], split_uri, max_per_class)}
        for r in picked
    ]
    out = ensemble_slot_uri(store, split_hash, members)
    result = build_and_evaluate(members, split_uri, out, max_per_class).to_dict()
    log.info("ensemble of %s: val accuracy %.4f", [m["model"] for m in members], result["val_accuracy"])
    return result


def _temperature(model_uri: str, split_uri: str, max_per_class: int | None) -> float:
    return float(ensure_calibration(model_uri, split_uri, max_per_class)["temperature"])


@task(name="rank-models")
def rank_models(records: list[dict[str, Any]], rank_by: str, run_id: str) -> dict[str, Any]:
    """The leaderboard, ranked on validation (a table artifact too), with what each model started
    from and what of it trained."""
    records = [{**r, "weights_desc": _weights_desc(r)} for r in records]
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
    calibration = ensure_calibration(record["out"], split_uri, max_per_class)
    variants = ensure_exports(
        record["out"],
        wanted_variants(int8),
        split_uri=split_uri,
        version=version,
        metrics={k: v for k, v in metrics.items() if v is not None},
        max_per_class=max_per_class,
        temperature=calibration["temperature"],
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
        "calibration": calibration,
    }


def _weights_desc(record: dict[str, Any]) -> str:
    if record.get("status") not in ("trained", "cached"):
        return ""
    stored = model_slot(record["out"]).record() or {}
    cfg = stored.get("config") or {}
    return describe_weights(record["model"], cfg, stored.get("weights")) if cfg else ""


# -- the retrain flow's steps around these tasks -------------------------------------------------
def with_ensemble(
    records: list[dict[str, Any]], ensemble: dict[str, Any] | None, skipped: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], int]:
    """(every record: trained, the ensemble, skipped with the reason; how many top models the run
    needs: :data:`TOP_N`, or fewer when fewer candidates were configured)."""
    extra = [ensemble] if ensemble else []
    return [*records, *extra, *skipped], min(TOP_N, len(records) + len(extra))


def top_models(rows: list[dict[str, Any]], records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The records of the first ``n`` leaderboard rows that trained (or were reused)."""
    by_model = {r["model"]: r for r in records}
    return [by_model[r["model"]] for r in rows if r["status"] in ("trained", "cached")][:n]


def export_models(
    top: list[dict[str, Any]], split_uri: str, int8: bool, max_per_class: int | None
) -> list[dict[str, Any]]:
    """One export task per top model, in turn (conversions are memory-hungry); a failed export is
    logged and left out, and the run then cannot promote."""
    exports = []
    for r in top:
        state = export_model(r, split_uri, int8, max_per_class, return_state=True)
        if state.is_completed():
            exports.append(state.result())
        else:
            get_run_logger().error("export of %s failed: %s", r["model"], state.message)
    return exports


def external_evaluations(
    records: list[dict[str, Any]],
    sources: list[str | dict[str, Any]] | None,
    store: str,
    kaggle_secret_block: str | None,
) -> dict[str, list[dict[str, Any]]]:
    """``{model: [evaluation summary per source]}`` for every model that trained (each evaluation is
    stored once under ``evaluations/`` and reused by later runs). A source is a labelled set, a
    ``negative:<set>`` string or a ``{uri, kind, name, about}`` record (``covid_eval.negative_report.external_set``)."""
    sets = [external_set(s) for s in sources or []]
    return {
        r["model"]: [
            evaluate_external(
                r["out"],
                s["uri"],
                store,
                kaggle_secret_block=kaggle_secret_block,
                negative=s["kind"] == "negative",
                name=s["name"],
                about=s["about"],
            )
            for s in sets
        ]
        for r in records
        if r["status"] in ("trained", "cached")
    }


def _interval(ci: list[float] | None) -> str | None:
    return f"{ci[0]:.4f}-{ci[1]:.4f}" if ci and ci[0] is not None else None


def external_columns(externals: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One column group per external set: ``ext<i>_accuracy``, ``ext<i>_covid_sensitivity``, ``ext<i>_n``
    for a labelled set; ``ext<i>_covid_false_alarm`` and its 95% interval, ``ext<i>_n`` for a negative one."""
    cols: dict[str, dict[str, Any]] = {}
    for model, evals in externals.items():
        for i, e in enumerate(evals, start=1):
            if e.get("set_kind") == "negative":
                group = {
                    f"ext{i}_covid_false_alarm": e.get("false_alarm_rate"),
                    f"ext{i}_covid_false_alarm_ci95": _interval(e.get("false_alarm_ci95")),
                }
            else:
                group = {f"ext{i}_accuracy": e.get("accuracy"), f"ext{i}_covid_sensitivity": e.get("covid_sensitivity")}
            cols.setdefault(model, {}).update({**group, f"ext{i}_n": e.get("n")})
    return cols


def external_notes(externals: dict[str, list[dict[str, Any]]]) -> list[str]:
    """What each ``ext<i>`` column group is: the set's name and what it holds."""
    evals = next(iter(externals.values()), [])
    return [
        f"ext{i}: {e.get('name')}, {e.get('about')}"
        + (
            " (negative set: covid_false_alarm is the share of its images called COVID, with its 95% Wilson interval)"
            if e.get("set_kind") == "negative"
            else " (labelled set)"
        )
        for i, e in enumerate(evals, start=1)
    ]


def shortcut_columns(explain: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """The shortcut score beside what a uniform map scores (see covid_eval.gradcam)."""
    return {
        x["model"]: {"shortcut (uniform)": f"{x['shortcut_score']:.2f} ({x['baseline']:.2f})"}
        for x in explain or []
        if x.get("shortcut_score") is not None
    }


def source_columns(records: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """With extra sources: each model's test accuracy per source (95% Wilson interval), read from its slot's
    ``metrics.json``, and a note naming the columns; nothing for a run of one source."""
    cols: dict[str, dict[str, Any]] = {}
    sizes: dict[str, int] = {}
    for r in records:
        if r.get("status") not in ("trained", "cached") or not r.get("out"):
            continue
        by_source = (((model_slot(r["out"]).record() or {}).get("metrics") or {}).get("test") or {}).get("by_source")
        for name, m in (by_source or {}).items():
            sizes[name] = m["n"]
            cols.setdefault(r["model"], {}).update(
                {f"test_accuracy@{name}": m["accuracy"], f"test_accuracy@{name}_ci95": _interval(m["accuracy_ci95"])}
            )
    counts = ", ".join(f"{k}: {n}" for k, n in sizes.items())
    note = (
        f"test_accuracy@<source>: test accuracy on one source's images ({counts} images), with its 95% Wilson "
        "interval; every model trained on all the sources with source-balanced batches"
    )
    notes = [note] if sizes else []
    return cols, notes
