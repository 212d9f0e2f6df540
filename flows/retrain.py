"""The ``retrain`` flow: prepare -> configure -> train -> rank -> bless -> export -> publish.

    python -m flows.retrain --preset smoke --source ../shared/data/covid19-radiography-sample \\
        --store .store --profile shared-sample
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow, get_run_logger, runtime

from covid_data.split import SplitConfig
from covid_data.store import open_store
from covid_eval.leaderboard import with_columns
from covid_models.builders import MODEL_NAMES
from covid_models.presets import PRESETS, get_preset
from covid_registry.bless import candidate_record, external_gate
from flows.prepare_data import DEFAULT_SOURCE, DEFAULT_STORE, add_data_arguments, data_settings, prepare_data
from tasks.app import build_app
from tasks.credentials import DEFAULT_SECRET_BLOCK
from tasks.evaluation import evaluate_external
from tasks.explain import explain_models
from tasks.fanout import train_models
from tasks.locks import store_run_lock
from tasks.models import build_ensemble, configure_models, export_model, rank_models
from tasks.publishing import bless_challenger, finish_run, promote_champion, publish_run

TOP_N = 3


@flow(name="train-models")
def train_stage(
    configs: list[dict[str, Any]],
    max_parallel: int,
    train_deployment: str | None = None,
    model_timeout_s: float | None = None,
    pickup_timeout_s: float | None = 600,
) -> list[dict[str, Any]]:
    """Every model on this flow's task runner (threads, or Dask workers), or each as a child
    run of ``train_deployment`` on its own worker."""
    return train_models(
        configs,
        max_parallel=max_parallel,
        deployment=train_deployment,
        model_timeout_s=model_timeout_s,
        pickup_timeout_s=pickup_timeout_s,
    )


@flow(name="retrain")
def retrain(
    source: str = DEFAULT_SOURCE,
    store: str = DEFAULT_STORE,
    preset: str = "cpu",
    models: list[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    profile: str | None = None,
    rank_by: Literal["val_accuracy", "val_loss"] = "val_accuracy",
    max_parallel: int | None = None,
    train_deployment: str | None = None,
    dask_address: str | None = None,
    int8: bool | None = None,
    champion_margin: float = 0.0,
    covid_sensitivity_floor: float = 0.85,
    require_significance: bool = False,
    split: tuple[float, float, float] | None = None,
    seed: int = 42,
    image_size: int | None = 299,
    size_mismatch: Literal["warn", "fail"] = "fail",
    unreadable: Literal["exclude", "fail"] = "exclude",
    near_dup_distance: int = 4,
    max_group_share: float = SplitConfig.max_group_share,
    kaggle_secret_block: str | None = DEFAULT_SECRET_BLOCK,
    model_timeout_s: float | None = None,
    pickup_timeout_s: float | None = 600,
    external_sources: list[str] | None = None,
    external_floor: float | None = None,
    ensemble: int | None = None,
) -> dict[str, Any]:
    """Retrain, rank on validation, bless against the champion, export the top three, publish.

    ``train_deployment`` (e.g. ``"train-model/vertex-tpu"``) trains each model as a child flow
    run of that deployment; ``dask_address`` trains them on a Dask cluster instead of threads.
    ``ensemble`` (default: the preset's) averages that many of the best trained models into one
    more leaderboard row (0: none).
    """
    p = get_preset(preset, **({"split": tuple(split)} if split else {}))
    selected = _check_models(models or p.models)
    run_id, clock = _run_id(), _Timings()
    with store_run_lock(store):
        data = prepare_data(
            source=source,
            store=store,
            profile=profile or default_profile(source),
            image_size=image_size,
            size_mismatch=size_mismatch,
            unreadable=unreadable,
            train=p.split[0],
            val=p.split[1],
            test=p.split[2],
            seed=seed,
            near_dup_distance=near_dup_distance,
            max_group_share=max_group_share,
            kaggle_secret_block=kaggle_secret_block,
        )
        plan = configure_models(p.to_dict(), data, store, selected, overrides or {})
        configs = plan["configs"]
        clock.lap("prepare_data")
        records = _train_stage(dask_address)(
            configs, max_parallel or p.max_parallel, train_deployment, model_timeout_s, pickup_timeout_s
        )
        n_ensemble = p.ensemble if ensemble is None else ensemble
        combined = build_ensemble(records, n_ensemble, data["split"], data["split_hash"], store, p.max_per_class)
        records = [*records, *([combined] if combined else []), *plan["skipped"]]  # skipped: with the reason
        candidates = len(configs) + (1 if combined else 0)
        clock.lap("train")
        board = rank_models(records, rank_by, run_id)
        top = _top_models(board["rows"], records, min(TOP_N, candidates))
        externals = _external_evaluations(records, external_sources or [], store, kaggle_secret_block)
        board = with_columns(board, _external_columns(externals, external_sources or []))
        # The challenger as the champion registry records it, read from its model slot.
        candidate = candidate_record(run_id, top[0]["out"], preset=p.name) if top else None
        trained_all = all(r["status"] in ("trained", "cached", "skipped") for r in records)
        blessing = bless_challenger(
            candidate,
            store,
            training_succeeded=trained_all,
            margin=champion_margin,
            floor=covid_sensitivity_floor,
            require_significance=require_significance,
        )
        if candidate is not None:
            blessing = external_gate(blessing, externals.get(candidate["model"], []), external_floor)
        clock.lap("bless")
        exports = _export_all(top, data["split"], p.int8 if int8 is None else int8, p.max_per_class)
        clock.lap("export")
        exports_ok = len(exports) == len(top) == min(TOP_N, candidates)
        explain = explain_models(store, run_id, data["split"], top, max_per_class=p.max_per_class)
        board = with_columns(board, _shortcut_columns(explain))
        clock.lap("explain")
        models_published = publish_run(store, run_id, data, board, records, exports, blessing, explain)
        decision = promote_champion(store, candidate, exports, blessing, exports_ok)
        clock.lap("publish")
        app_state = build_app(store, run_id, data, exports, explain, return_state=True)
        app = app_state.result() if app_state.is_completed() else {"status": "failed", "reason": app_state.message}
        clock.lap("app")
        run = finish_run(
            store,
            run_id,
            data,
            p.to_dict(),
            board,
            records,
            models_published,
            exports,
            blessing,
            decision,
            clock.seconds,
            app,
            explain=explain,
            externals=externals,
        )
    if len(top) < min(TOP_N, candidates):
        failures = [(r["model"], str(r.get("error"))[:200]) for r in records if r["status"] == "failed"]
        raise RuntimeError(
            f"only {len(top)} of {candidates} models trained; {min(TOP_N, candidates)} are needed for the "
            f"top three. Failures: {failures}"
        )
    if not exports_ok:
        raise RuntimeError(f"exports failed for {sorted({r['model'] for r in top} - {e['model'] for e in exports})}")
    if app["status"] == "failed":
        raise RuntimeError(f"the app bundle failed: {app['reason']}")
    return {
        **{k: run[k] for k in ("run_id", "exports", "champion", "seconds", "app")},
        "leaderboard": board["rows"],
        "run": open_store(store).uri_for(f"runs/{run_id}"),
    }


def default_profile(source: str) -> str:
    """The Kaggle release's class counts are checked for Kaggle sources; anything else gets the
    layout-only profile unless the caller names one."""
    return "kaggle" if source.startswith("kaggle") else "any"


class _Timings:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._clock, 1)
        self._clock = now


def _run_id() -> str:
    """Stable across retries of one flow run (its scheduled start and id), so a retried run
    completes its own folder instead of leaving a second one."""
    start = runtime.flow_run.scheduled_start_time or datetime.now(UTC)
    return f"{start:%Y%m%dT%H%M%SZ}-{str(runtime.flow_run.id or 'local')[:8]}"


def _export_all(top: list[dict], split_uri: str, int8: bool, max_per_class: int | None) -> list[dict[str, Any]]:
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


def _check_models(models) -> list[str]:
    unknown = sorted(set(models) - set(MODEL_NAMES))
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {', '.join(MODEL_NAMES)}")
    return list(models)


def _train_stage(dask_address: str | None):
    """The train-models subflow, on a Dask cluster when an address is given (prefect-dask)."""
    if not dask_address:
        return train_stage
    from prefect_dask import DaskTaskRunner

    return train_stage.with_options(task_runner=DaskTaskRunner(address=dask_address))


def _external_evaluations(
    records: list[dict], sources: list[str], store: str, kaggle_secret_block: str | None
) -> dict[str, list[dict[str, Any]]]:
    """``{model: [evaluation summary per source]}`` for every model that trained (each evaluation is
    stored once under ``evaluations/`` and reused by later runs)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r["status"] not in ("trained", "cached"):
            continue
        out[r["model"]] = [
            evaluate_external(r["out"], src, store, kaggle_secret_block=kaggle_secret_block) for src in sources
        ]
    return out


def _external_columns(externals: dict[str, list[dict]], sources: list[str]) -> dict[str, dict[str, Any]]:
    """One column group per external set: ``ext<i>_accuracy``, ``ext<i>_covid_sensitivity``, ``ext<i>_n``."""
    cols: dict[str, dict[str, Any]] = {}
    for model, evals in externals.items():
        for i, e in enumerate(evals, start=1):
            cols.setdefault(model, {}).update(
                {
                    f"ext{i}_accuracy": e.get("accuracy"),
                    f"ext{i}_covid_sensitivity": e.get("covid_sensitivity"),
                    f"ext{i}_n": e.get("n"),
                }
            )
    return cols


def _shortcut_columns(explain: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The shortcut score beside what a uniform map scores (see covid_eval.gradcam)."""
    return {
        x["model"]: {"shortcut (uniform)": f"{x['shortcut_score']:.2f} ({x['baseline']:.2f})"}
        for x in explain or []
        if x.get("shortcut_score") is not None
    }


def _top_models(rows: list[dict], records: list[dict], n: int) -> list[dict[str, Any]]:
    by_model = {r["model"]: r for r in records}
    ok = [by_model[r["model"]] for r in rows if r["status"] in ("trained", "cached")]
    return ok[:n]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.retrain", description=retrain.description)
    ap.add_argument("--source", default=DEFAULT_SOURCE, help="kaggle[:owner/slug], a folder, a .zip or a store prefix")
    ap.add_argument("--store", default=DEFAULT_STORE, help="store URI: a path, file://... or gs://bucket/prefix")
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="named settings (default: cpu)")
    ap.add_argument("--models", nargs="*", default=None, help=f"models to train (default: the preset's): {MODEL_NAMES}")
    ap.add_argument("--overrides", type=json.loads, default=None, help='per-model settings as JSON: {"vgg16": {...}}')
    ap.add_argument(
        "--profile",
        default=None,
        help="validation profile: kaggle, shared-sample or any (default: kaggle for Kaggle sources, else any)",
    )
    ap.add_argument(
        "--rank-by",
        default="val_accuracy",
        choices=["val_accuracy", "val_loss"],
        help="validation metric the leaderboard ranks on (test metrics are refused)",
    )
    ap.add_argument("--max-parallel", type=int, default=None, help="models trained at once (default: the preset's)")
    ap.add_argument(
        "--train-deployment",
        default=None,
        help="train each model as a run of this deployment, e.g. train-model/vertex-tpu",
    )
    ap.add_argument("--dask-address", default=None, help="train on this Dask scheduler (prefect-dask)")
    ap.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also publish int8-weight Core ML packages (default: the preset's)",
    )
    ap.add_argument(
        "--champion-margin",
        type=float,
        default=0.0,
        help="test accuracy the challenger must beat the champion by, on the same images",
    )
    ap.add_argument(
        "--covid-sensitivity-floor", type=float, default=0.85, help="lowest test COVID sensitivity a champion may have"
    )
    ap.add_argument(
        "--require-significance",
        action="store_true",
        help="promotion also needs McNemar's exact test against the champion at p < 0.05",
    )
    ap.add_argument(
        "--split",
        default=None,
        help="train,val,test ratios (default: the preset's; the paper's exact 80/20 is 0.8,0.2,0 and cannot promote)",
    )
    add_data_arguments(ap)
    ap.add_argument("--model-timeout-s", type=float, default=None, help="deadline of each model's training")
    ap.add_argument(
        "--pickup-timeout-s",
        type=float,
        default=600,
        help="with --train-deployment: how long a child run may wait for a worker",
    )
    ap.add_argument(
        "--external-source",
        dest="external_sources",
        action="append",
        default=None,
        help="a labelled set from elsewhere (folder, .zip, kaggle:...) every trained model is scored on: one "
        "leaderboard column group per set (repeatable)",
    )
    ap.add_argument(
        "--external-floor",
        type=float,
        default=None,
        help="promotion needs at least this accuracy on every external set (default: no gate)",
    )
    ap.add_argument(
        "--ensemble",
        type=int,
        default=None,
        help="average the best N trained models into one more leaderboard row (default: the preset's; 0: none)",
    )
    a = ap.parse_args(argv)
    out = retrain(
        source=a.source,
        store=a.store,
        preset=a.preset,
        models=a.models,
        overrides=a.overrides,
        profile=a.profile,
        rank_by=a.rank_by,
        max_parallel=a.max_parallel,
        train_deployment=a.train_deployment,
        dask_address=a.dask_address,
        int8=a.int8,
        champion_margin=a.champion_margin,
        covid_sensitivity_floor=a.covid_sensitivity_floor,
        require_significance=a.require_significance,
        split=tuple(float(x) for x in a.split.split(",")) if a.split else None,
        **data_settings(a),
        model_timeout_s=a.model_timeout_s,
        pickup_timeout_s=a.pickup_timeout_s,
        external_sources=a.external_sources,
        external_floor=a.external_floor,
        ensemble=a.ensemble,
    )
    print(json.dumps({k: out[k] for k in ("run_id", "run", "champion")}, indent=2, default=str))


if __name__ == "__main__":
    main()
