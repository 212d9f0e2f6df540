"""The ``retrain`` flow: prepare -> configure -> train -> rank -> bless -> export -> explain -> publish.

    python -m flows.retrain --preset smoke --source ../shared/data/covid19-radiography-sample \\
        --store .store --profile shared-sample

Its parameters (``store`` and four groups) are in flows/retrain_params.py, with what each defaults
to; what happens between the tasks is in tasks/models.py and tasks/publishing.py.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow

from covid_data.store import open_store
from covid_eval.leaderboard import with_columns
from covid_registry.bless import candidate_record
from flows.prepare_data import DEFAULT_STORE, prepare_data
from flows.retrain_params import (
    DataParams,
    PromotionParams,
    PublishingParams,
    TrainingParams,
    cli_parameters,
    refuse_external_training,
    refuse_lung_fields_without_masks,
    run_preset,
)
from tasks.audit import audit_data
from tasks.explain import explain_models
from tasks.fanout import on_dask, train_models
from tasks.locks import store_run_lock
from tasks.models import (
    build_ensemble,
    configure_models,
    export_models,
    external_columns,
    external_evaluations,
    external_notes,
    rank_models,
    shortcut_columns,
    source_columns,
    top_models,
    with_ensemble,
)
from tasks.publishing import (
    StageClock,
    app_bundle,
    bless_challenger,
    blessed_uri,
    check_run,
    finish_run,
    not_ready,
    promote_champion,
    publish_run,
    run_id,
    trained_all,
)

DATA, TRAINING, PROMOTION, PUBLISHING = DataParams(), TrainingParams(), PromotionParams(), PublishingParams()


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
    store: str = DEFAULT_STORE,
    data: DataParams = DATA,
    training: TrainingParams = TRAINING,
    promotion: PromotionParams = PROMOTION,
    publishing: PublishingParams = PUBLISHING,
) -> dict[str, Any]:
    """Retrain, rank on validation, bless against the champion, export the top three, publish.

    Args:
        store: where every stage reads and writes: a path, file://... or gs://bucket/prefix
        data: the source, its validation profile and the split (prepare-data)
        training: the preset, the models and where they train (train-models), the ensemble, the ranking
        promotion: what a challenger must show to become the champion (bless, promote)
        publishing: what is exported for the top models
    """
    refuse_external_training(data, promotion)
    p = run_preset(data, training)
    refuse_lung_fields_without_masks(data, training, p)
    run, clock = run_id(), StageClock()
    with store_run_lock(store):
        dataset = prepare_data(store=store, **data.prepare_kwargs(p))
        clock.lap("prepare_data")
        # A fact about the data, before any model: with data.lung_masks, the lungs blacked out and read around.
        audit = audit_data(data.lung_masks, store, dataset["split"], data.segmenter, max_per_class=p.max_per_class)
        if audit is not None:
            clock.lap("shortcut_audit")
        # Models on the lung fields carry the run's segmenter inside their graphs.
        overrides = training.model_overrides(p, (audit or {}).get("segmenter_uri"))
        plan = configure_models(p.to_dict(), dataset, store, training.selected(p), overrides)
        records = on_dask(train_stage, training.dask_address)(plan["configs"], **training.fanout(p))
        split, split_hash = dataset["split"], dataset["split_hash"]
        combined = build_ensemble(records, training.ensemble_size(p), split, split_hash, store, p.max_per_class)
        records, needed = with_ensemble(records, combined, plan["skipped"])
        clock.lap("train")
        board = rank_models(records, training.rank_by, run)
        top = top_models(board["rows"], records, needed)
        externals = external_evaluations(records, promotion.external_sets(), store, data.kaggle_secret_block)
        ext_columns, ext_notes = external_columns(externals), external_notes(externals)
        board = with_columns(board, ext_columns, after="test_covid_sensitivity", notes=ext_notes)
        by_source, source_notes = source_columns(records)  # with extra sources: each one's test figures
        board = with_columns(board, by_source, after="test_covid_sensitivity", notes=source_notes)
        # The challenger as the champion registry records it, read from its model slot.
        candidate = candidate_record(run, top[0]["out"], preset=p.name) if top else None
        blessing = bless_challenger(
            candidate, store, training_succeeded=trained_all(records), externals=externals, **promotion.rules()
        )
        clock.lap("bless")
        exports = export_models(top, split, publishing.int8_for(p), p.max_per_class)
        clock.lap("export")
        # Where the dataset ships no lung masks, the audit's segmenter outlines the lungs for the shortcut score.
        lungs = (audit or {}).get("segmenter_uri")
        explain = explain_models(store, run, split, top, max_per_class=p.max_per_class, segmenter_uri=lungs)
        board = with_columns(board, shortcut_columns(explain))
        clock.lap("explain")
        published = publish_run(store, run, dataset, board, records, exports, blessing, explain, externals=externals)
        clock.lap("publish")
        app = (
            app_bundle(
                store,
                run,
                dataset,
                exports,
                explain,
                blessed_uri(candidate, blessing),
                externals=externals,
                lungs_uri=lungs,
            )
            if publishing.app
            else {"status": "skipped", "reason": "publishing.app is off"}
        )
        clock.lap("app")
        done = finish_run(
            store, run, dataset, p.to_dict(), board, records, published, exports, blessing, clock.seconds,
            app, explain=explain, externals=externals, shortcut_audit=audit,
        )  # fmt: skip
        # The Pusher last: the champion only ever points at a complete run, exports and app.
        ready = not_ready(len(exports) == len(top) == needed, app)
        decision = promote_champion(store, candidate, exports, blessing, ready)
    check_run(top, needed, records, exports, app)
    return {
        **{k: done[k] for k in ("run_id", "exports", "seconds", "app")},
        "champion": decision,
        "leaderboard": board["rows"],
        "run": open_store(store).uri_for(f"runs/{run}"),
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m flows.retrain``: every field of the parameter groups is an option (``--help``)."""
    out = retrain(**cli_parameters(argv, description=retrain.description))
    print(json.dumps({k: out[k] for k in ("run_id", "run", "champion")}, indent=2, default=str))


if __name__ == "__main__":
    main()
