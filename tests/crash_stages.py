"""One stage of a tiny retraining run, as a process of its own, for the crash-safety test.

    python tests/crash_stages.py STAGE --source DIR --store DIR --run-id ID [--external DIR]

Stages, in the retrain flow's order: prepare (publish the dataset version and its split), train
(two tiny models: a custom CNN and a MobileNetV2 at another size), calibrate (each one's
temperature), ensemble (their average, with an in-graph resize), evaluate (the first model on an
external labelled set: its dataset version and the evaluation unit), export (the first model's
Core ML and TFLite files), publish (the run folder), guard (the split's out-of-distribution
guard), bundle (the run's app bundle), complete (report and run.json) and promote (bless, then
the champion compare-and-swap: last, as in the retrain flow). Each calls the plain functions the
Prefect tasks wrap, and derives its inputs from the store alone, so a rerun after a kill starts
from whatever the killed process left. Set ``COVID_FAULT_KILL_AFTER`` / ``COVID_FAULT_COUNTER``
to have the process SIGKILL itself after its N-th store write (covid_data.store).

    python tests/crash_stages.py --serve

runs each requested stage as a forked child of one process that imported the libraries once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("prepare", "train", "calibrate", "ensemble", "evaluate", "export")
STAGES += ("publish", "guard", "bundle", "complete", "promote")
RATIOS = (0.5, 0.25, 0.25)


def _split_uri(store_uri: str) -> str:
    from covid_data.store import open_store

    store = open_store(store_uri)
    markers = [k for k in store.list("datasets") if k.endswith("/split.json")]
    if len(markers) != 1:
        raise RuntimeError(f"expected one complete split in {store_uri}, found {markers}")
    return store.uri_for(markers[0].rsplit("/", 1)[0] + "/split.parquet")


def _preset():
    from covid_models.presets import Preset

    return Preset(
        name="crash-test",
        # two models (an ensemble needs two), at two sizes: the ensemble resizes in its graph
        models=("custom_cnn", "vgg16"),
        overrides={"custom_cnn": {"input_size": 40}, "vgg16": {"weights": "scratch"}},
        input_size=32,
        epochs=1,
        weights="none",
        patience=0,
        split=RATIOS,
        int8=False,
    )


def _records(store_uri: str) -> tuple[list[dict], dict]:
    from covid_data.split import load_split
    from covid_models.presets import model_configs
    from covid_models.train import TrainConfig, cached_result

    split_uri = _split_uri(store_uri)
    split_hash = split_uri.rstrip("/").split("/")[-2]
    configs = model_configs(_preset(), split_uri, split_hash, store_uri, list(_preset().models))
    records = [cached_result(TrainConfig(**c)) for c in configs]
    data = {"split": split_uri, "split_hash": split_hash, "dataset_version": split_uri.split("/")[-4]}
    data["split_counts"] = load_split(split_uri).groupby("split").size().to_dict()
    return [r.to_dict() if r else None for r in records], {**data, "configs": configs}


def _members(records: list[dict], data: dict) -> list[dict]:
    from covid_eval.calibration import ensure_calibration

    return [
        {
            "model": r["model"],
            "out": r["out"],
            "temperature": ensure_calibration(r["out"], data["split"])["temperature"],
        }
        for r in records
    ]


def _exports(records: list[dict], data: dict) -> list[dict]:
    from covid_registry.exports import ensure_exports

    out = []
    for r in records[:1]:  # the first model: every export unit's write boundaries, at half the time
        version = "/".join(r["out"].rstrip("/").rsplit("/", 2)[-2:])
        variants = ensure_exports(
            r["out"], ["coreml", "tflite"], split_uri=data["split"], version=version, metrics={}, parity_images=4
        )
        out.append({"model": r["model"], "model_uri": r["out"], "version": version, "variants": variants})
    return out


def run_stage(stage: str, source: str, store_uri: str, run_id: str, external: str | None = None) -> None:
    from covid_data.store import open_store

    if stage == "prepare":
        from covid_data.dataset import load_manifest, manifest_of, parse_source, publish_version, stage_source
        from covid_data.split import SplitConfig, write_split

        staged = stage_source(parse_source(source), Path(store_uri).parent / "cache")
        store = open_store(store_uri)
        ref = publish_version(store, manifest_of(staged, workers=1), Path(staged.root), source=staged.source)
        write_split(store, ref.version, load_manifest(store, ref.version), SplitConfig(*RATIOS))
        return
    records, data = _records(store_uri)
    if stage == "train":
        from covid_models.train import TrainConfig, train_model

        for cfg in data["configs"]:
            train_model(TrainConfig(**cfg))
        return
    if any(r is None for r in records):
        raise RuntimeError(f"stage {stage} needs every model trained: {records}")
    if stage == "calibrate":
        _members(records, data)
        return
    if stage == "ensemble":
        from covid_models.ensemble import build_and_evaluate, ensemble_slot_uri

        members = _members(records, data)
        build_and_evaluate(members, data["split"], ensemble_slot_uri(store_uri, data["split_hash"], members))
        return
    if stage == "evaluate":
        from covid_eval.external import evaluate_external

        if not external:
            raise ValueError("the evaluate stage needs --external")
        evaluate_external(records[0]["out"], external, store_uri, cache_dir=str(Path(store_uri).parent / "cache"))
        return
    exports = _exports(records, data)
    if stage == "export":
        return
    if stage in ("guard", "bundle"):
        from covid_app.bundle import build_run_app
        from covid_app.guard import ensure_guard

        if stage == "guard":
            ensure_guard(store_uri, data["split"], data["split_hash"])
        else:
            build_run_app(store_uri, run_id, dataset=data, exports=exports, champion_uri=records[0]["out"])
        return
    from covid_eval.leaderboard import leaderboard, to_markdown
    from covid_registry import champion as registry
    from covid_registry.bless import bless, candidate_record
    from covid_registry.run_folder import complete_run, report_markdown, run_unit, write_run_folder

    board = leaderboard(records)
    rows = board.astype(object).where(board.notna(), None).to_dict("records")
    candidate = candidate_record(run_id, records[0]["out"], preset="crash-test")
    store = open_store(store_uri)
    if stage == "publish":
        write_run_folder(
            store_uri,
            run_id,
            dataset=data,
            board_rows=rows,
            board_markdown=to_markdown(board),
            records=records,
            exports=exports,
            blessing=None,
        )
        return
    if stage == "promote":
        # Every challenger good enough (margin -1, no significance or non-inferiority needed): the
        # test wants the swap to happen.
        blessing = bless(
            candidate,
            registry.current(store),
            run_succeeded=True,
            margin=-1.0,
            covid_sensitivity_floor=0.0,
            require_significance=False,
            covid_noninferiority_margin=None,
        )
        registry.decide_and_promote(store, {**candidate, "exports": {}}, blessing)
        return
    if stage == "complete":
        run = {"run_id": run_id, "dataset": data, "preset": {"name": "crash-test"}, "models": {}, "exports": exports}
        if not run_unit(store_uri, run_id).is_complete():
            complete_run(store_uri, run_id, run, report_markdown(run, to_markdown(board)))
        return
    raise ValueError(f"unknown stage {stage!r}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("--source", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--run-id", default="r1")
    ap.add_argument("--external", help="the evaluate stage's external labelled set (a folder)")
    a = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    import covid_app.guard

    # The guard cut after MobileNetV2's third block: the same units, writes and code as the full guard, with
    # conversions a quarter as long (this test fits and converts it about a dozen times).
    covid_app.guard.LAYER = "block_3_expand_relu"
    run_stage(a.stage, a.source, a.store, a.run_id, a.external)


def serve() -> None:
    """Run stages for the crash test as forked children of one process that has imported the heavy
    libraries once (TensorFlow's import alone takes 5-20 s on a busy 2-core machine, and the test
    starts about a hundred stages). Reads one JSON request per line on stdin, ``{"argv": [...],
    "env": {...}, "out": path}``; answers one JSON line, ``{"returncode": rc}``, with ``-9`` for a
    child that SIGKILLed itself as subprocess reports it. Each child is a fresh process for the
    store: its environment is the request's, its writes and its kill are its own."""
    import json
    import signal
    import traceback

    # Imported here, before any fork, and never used in this process (TensorFlow's runtime starts
    # in each child at its first op, with the child's thread settings).
    import coremltools  # noqa: F401
    import keras  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")
    import pandas  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import statsmodels.stats.proportion  # noqa: F401
    import tensorflow  # noqa: F401

    import covid_app.bundle  # noqa: F401
    import covid_app.guard  # noqa: F401
    import covid_data.dataset  # noqa: F401
    import covid_eval.external  # noqa: F401
    import covid_eval.leaderboard  # noqa: F401
    import covid_models.ensemble  # noqa: F401
    import covid_models.train  # noqa: F401
    import covid_registry.exports  # noqa: F401
    import covid_registry.run_folder  # noqa: F401

    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: the stage, then exit without running the parent's cleanup
            code = 1
            try:
                os.environ.clear()
                os.environ.update(req["env"])
                fd = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                signal.alarm(int(req.get("timeout", 600)))  # a hung stage dies rather than hangs the test
                main(req["argv"])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"returncode": rc}), flush=True)


if __name__ == "__main__":
    serve() if sys.argv[1:] == ["--serve"] else main()
