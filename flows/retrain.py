"""The ``retrain`` flow: prepare-data -> train every selected model -> rank -> Core ML -> publish.

    python -m flows.retrain --preset smoke --source ../shared/data/covid19-radiography-sample \
        --store .store --profile shared-sample
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from covid_data.store import open_store
from covid_models.builders import MODEL_NAMES, is_transfer
from covid_models.leaderboard import leaderboard, to_markdown
from covid_models.presets import Preset, get_preset
from covid_models.publish import copy_model_artefacts, decide_champion, model_card
from covid_models.train import TrainConfig, cached_result
from covid_models.weights import has_local_imagenet
from flows.prepare_data import DEFAULT_SOURCE, DEFAULT_STORE, prepare_data
from tasks.training import export_top_model, train_model

TOP_N = 3


def model_configs(
    preset: Preset, split_uri: str, split_hash: str, store: str, models: list[str], overrides: dict[str, dict]
) -> list[dict[str, Any]]:
    """One TrainConfig per model. Its output folder is keyed by split and settings, so the same
    dataset, split, model and settings find the stored model instead of training again."""
    out = []
    for name in models:
        weights = preset.weights
        if weights == "local-imagenet":
            weights = "imagenet" if has_local_imagenet(name, preset.input_size) else "none"
        cfg = {
            "model": name,
            "split": split_uri,
            "out": "",
            "input_size": preset.input_size,
            "epochs": preset.epochs,
            "learning_rate": preset.head_learning_rate if is_transfer(name) else preset.learning_rate,
            "batch_size": preset.batch_size,
            "patience": preset.patience,
            "weights": weights,
            "max_per_class": preset.max_per_class,
            **preset.overrides.get(name, {}),
            **overrides.get(name, {}),
        }
        settings = {k: v for k, v in cfg.items() if k not in ("out", "split", "cache_dir", "verbose")}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        cfg["out"] = open_store(store).uri_for(f"models/{split_hash}/{name}-{key}")
        out.append(asdict(TrainConfig(**cfg)))
    return out


def _train_all(configs: list[dict[str, Any]], max_parallel: int, deployment: str | None) -> list[dict[str, Any]]:
    logger = get_run_logger()
    records: list[dict[str, Any]] = []
    todo = []
    for cfg in configs:
        cached = cached_result(TrainConfig(**cfg))
        if cached is not None:
            records.append(cached.to_dict())
        else:
            todo.append(cfg)
    if len(records) == len(configs):
        logger.info(
            "all %d models are already trained for this dataset, split and settings: nothing trained", len(configs)
        )
    elif records:
        logger.info("%d of %d models reused from the store; training %d", len(records), len(configs), len(todo))
    if deployment:
        return records + _train_on_deployment(todo, deployment)
    threads = max(1, (os.cpu_count() or 1) // max(1, max_parallel))
    for start in range(0, len(todo), max(1, max_parallel)):  # waves of max_parallel models
        wave = todo[start : start + max(1, max_parallel)]
        futures = [train_model.submit(cfg, threads=threads) for cfg in wave]
        for cfg, fut in zip(wave, futures, strict=True):
            fut.wait()
            if fut.state.is_completed():
                records.append(fut.result())
            else:  # a failed model is reported, and does not sink the others
                err = str(fut.state.message or fut.state.name)
                logger.error("training %s failed: %s", cfg["model"], err)
                records.append({"model": cfg["model"], "status": "failed", "error": err, "out": cfg["out"]})
    return records


def _train_on_deployment(configs: list[dict[str, Any]], deployment: str) -> list[dict[str, Any]]:
    """Fan out: each model as a child flow run of the ``train-model`` deployment (its own worker)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    runs = {
        cfg["model"]: run_deployment(deployment, parameters={"config": cfg}, timeout=0, as_subflow=True)
        for cfg in configs
    }
    logger.info("started %d child runs of %s: %s", len(runs), deployment, {m: str(r.id) for m, r in runs.items()})
    final = {}
    with get_client(sync_client=True) as client:
        while len(final) < len(runs):
            for model, run in runs.items():
                if model not in final:
                    state = client.read_flow_run(run.id).state
                    if state is not None and state.is_final():
                        final[model] = state
            time.sleep(2)
    records = []
    for cfg in configs:
        state = final[cfg["model"]]
        res = cached_result(TrainConfig(**cfg)) if state.is_completed() else None
        if res is not None:
            records.append({**res.to_dict(), "status": "trained"})
        else:
            records.append(
                {
                    "model": cfg["model"],
                    "status": "failed",
                    "out": cfg["out"],
                    "error": f"child flow run {runs[cfg['model']].id} ended {state.name}: {state.message}",
                }
            )
    return records


@task(name="publish-run")
def publish_run(
    store_uri: str,
    run_id: str,
    data: dict[str, Any],
    preset: dict[str, Any],
    records: list[dict[str, Any]],
    exports: list[dict[str, Any]],
    board_rows: list[dict[str, Any]],
    run_succeeded: bool,
    margin: float,
    covid_sensitivity_floor: float,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Write everything of the run under runs/<run id>/ and decide the champion."""
    import pandas as pd

    store = open_store(store_uri)
    prefix = f"runs/{run_id}"
    board = pd.DataFrame(board_rows)
    store.put_text(f"{prefix}/leaderboard.csv", board.to_csv(index=False))
    store.put_text(f"{prefix}/leaderboard.md", to_markdown(board))
    by_model = {r["model"]: r for r in records}
    published: dict[str, Any] = {}
    for r in records:
        if r.get("status") not in ("trained", "cached"):
            continue
        copy_model_artefacts(r["out"], store, f"{prefix}/models/{r['model']}")
        published[r["model"]] = store.uri_for(f"{prefix}/models/{r['model']}")
    dataset = {"version": data["dataset_version"], "split_hash": data["split_hash"], "counts": data.get("split_counts")}
    for e in exports:
        stored = json.loads(open_store(by_model[e["model"]]["out"]).read_text("metrics.json"))
        card = model_card(e["model"], stored["metrics"], stored["config"], dataset)
        store.put_text(f"{prefix}/model_cards/{e['model']}.md", card)
    best = next((r for r in board_rows if r["status"] in ("trained", "cached")), None)
    decision = None
    if best is not None:
        candidate = {
            "run_id": run_id,
            "model": best["model"],
            "model_uri": published.get(best["model"]),
            "coreml": next((e["coreml"] for e in exports if e["model"] == best["model"]), None),
            "split_hash": data["split_hash"],
            "dataset_version": data["dataset_version"],
            "test_accuracy": None if pd.isna(best["test_accuracy"]) else float(best["test_accuracy"]),
            "test_covid_sensitivity": None
            if pd.isna(best["test_covid_sensitivity"])
            else float(best["test_covid_sensitivity"]),
            "val_accuracy": float(best["val_accuracy"]),
        }
        decision = decide_champion(
            store,
            candidate,
            run_succeeded=run_succeeded,
            margin=margin,
            covid_sensitivity_floor=covid_sensitivity_floor,
        )
    run = {
        "run_id": run_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": data,
        "preset": preset,
        "succeeded": run_succeeded,
        "models": published,
        "exports": exports,
        "champion": asdict(decision) if decision else None,
        "seconds": timings,  # per stage, up to publishing
    }
    store.put_text(f"{prefix}/run.json", json.dumps(run, indent=2, default=str))
    return run


@flow(name="retrain")
def retrain(
    source: str = DEFAULT_SOURCE,
    store: str = DEFAULT_STORE,
    preset: str = "cpu",
    models: list[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    profile: str = "kaggle",
    rank_by: str = "val_accuracy",
    max_parallel: int | None = None,
    train_deployment: str | None = None,
    int8: bool | None = None,
    champion_margin: float = 0.0,
    covid_sensitivity_floor: float = 0.85,
) -> dict[str, Any]:
    """Retrain, rank, convert the top three to Core ML (and TFLite), publish.

    ``train_deployment`` (e.g. ``"train-model/vertex-tpu"``) trains each model as a child flow
    run of that deployment instead of on this worker.
    """
    logger = get_run_logger()
    p = get_preset(preset)
    selected = list(models or p.models)
    unknown = sorted(set(selected) - set(MODEL_NAMES))
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {', '.join(MODEL_NAMES)}")
    train, val, test = p.split
    clock = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 1)
        clock = now

    data = prepare_data(source=source, store=store, profile=profile, train=train, val=val, test=test)
    split_uri, split_hash = data["split"], data["split_hash"]
    lap("prepare_data")
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{str(runtime.flow_run.id or 'local')[:8]}"

    configs = model_configs(p, split_uri, split_hash, store, selected, overrides or {})
    records = _train_all(configs, max_parallel or p.max_parallel, train_deployment)
    lap("train")
    board = leaderboard(records, rank_by)
    rows = board.astype(object).where(board.notna(), None).to_dict("records")
    create_table_artifact(rows, key="leaderboard", description=f"retrain {run_id}: ranked by {rank_by}")
    ok = [r for r in rows if r["status"] in ("trained", "cached")]
    needed = min(TOP_N, len(configs))
    by_model = {r["model"]: r for r in records}
    exports = []
    if len(ok) >= needed:
        for r in ok[:needed]:
            rec = by_model[r["model"]]
            # The version names the trained model (split and settings), so exports are reusable.
            version = "/".join(rec["out"].rstrip("/").rsplit("/", 2)[-2:])
            exports.append(
                export_top_model(
                    rec,
                    store,
                    f"runs/{run_id}/exports",
                    split_uri,
                    version=version,
                    int8=p.int8 if int8 is None else int8,
                    max_per_class=p.max_per_class,
                )
            )
    lap("export")
    run_succeeded = len(ok) == len(configs) and len(exports) == needed
    run = publish_run(
        store,
        run_id,
        data,
        p.to_dict(),
        records,
        exports,
        rows,
        run_succeeded,
        champion_margin,
        covid_sensitivity_floor,
        timings,
    )
    _report(run, board, store)
    if len(ok) < needed:
        raise RuntimeError(
            f"only {len(ok)} of {len(configs)} models trained; {needed} are needed for the top {needed}. "
            f"Failures: {[(r['model'], r['error'][:200]) for r in rows if r['status'] == 'failed']}"
        )
    logger.info("champion: %s", run["champion"]["reason"] if run["champion"] else "none")
    return {
        "run_id": run_id,
        "run": open_store(store).uri_for(f"runs/{run_id}"),
        "leaderboard": rows,
        "exports": exports,
        "champion": run["champion"],
        "seconds": timings,
    }


def _coreml_runtime(checks: dict[str, Any]) -> str:
    if "runtime_max_prob_diff" in checks:
        return f"max |Δp| against Keras {checks['runtime_max_prob_diff']:.1e}"
    return checks.get("runtime_parity", "not run")


def _report(run: dict[str, Any], board, store_uri: str) -> None:
    store = open_store(store_uri)
    lines = [
        f"# Retrain {run['run_id']}",
        "",
        f"Dataset `{run['dataset']['dataset_version']}`, split "
        f"`{run['dataset']['split_hash']}`, preset `{run['preset']['name']}`.",
        "",
        to_markdown(board),
    ]
    if run["champion"]:
        lines += ["", f"**Champion:** {run['champion']['reason']}"]
    for e in run["exports"]:
        lines += [
            "",
            f"## {e['model']}",
            f"Core ML {e['coreml_bytes'] / 1e6:.1f} MB (int8 {(e['coreml_int8_bytes'] or 0) / 1e6:.1f} MB), "
            f"TFLite {e['tflite_bytes'] / 1e6:.1f} MB, TFLite vs Keras max |Δp| {e['tflite_max_prob_diff']:.1e}; "
            f"Core ML runtime check: {_coreml_runtime(e['checks']['coreml'])}",
        ]
        create_link_artifact(e["coreml"], link_text=f"{e['model']}.mlpackage", description="Core ML package")
    for model, uri in run["models"].items():
        lines.append(f"- {model}: `{uri}` (curves: `{uri}/curves.png`)")
    text = "\n".join(lines) + "\n"
    store.put_text(f"runs/{run['run_id']}/report.md", text)
    create_markdown_artifact(text, key="retrain-report", description=f"retrain {run['run_id']}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.retrain", description=retrain.description)
    ap.add_argument("--source", default=DEFAULT_SOURCE)
    ap.add_argument("--store", default=DEFAULT_STORE)
    ap.add_argument("--preset", default="cpu", choices=["smoke", "cpu", "paper"])
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--profile", default="kaggle")
    ap.add_argument("--max-parallel", type=int, default=None)
    a = ap.parse_args(argv)
    out = retrain(
        source=a.source, store=a.store, preset=a.preset, models=a.models, profile=a.profile, max_parallel=a.max_parallel
    )
    print(json.dumps({k: out[k] for k in ("run_id", "run", "champion")}, indent=2, default=str))


if __name__ == "__main__":
    main()
