"""The app bundle: a self-contained static web app under ``runs/<run id>/app/``.

It is the built page (``app/dist``: page, scripts, service worker, LiteRT.js' WASM runtime), the
run's top three models as fixed-batch TFLite files with int8 weights (``tflite-int8`` exports, each
checked against its float32 Keras model), the out-of-distribution guard, the model pages' data
(``data/app.json``: metrics with confidence intervals, the figures on external sets, model cards,
plots) and the service worker's list of every file with its checksum. An ensemble ships no file of
its own: the page runs its members' files and averages them as its Keras graph does (the
members' probabilities, each with its temperature, then the ensemble's temperature), so its bytes
are not a second copy of its members' weights. The worker precaches only what the first result
needs (the page, one WASM build, app.json, the guard and the default model's files); every other
file is marked ``lazy`` and kept once it has been fetched (a model when the user picks it).

The bundle is its own stored unit, completed by ``app/bundle.json``: ``retrain`` writes it before
the run's ``run.json``; a run published where Node.js was missing gets it later from ``make app``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from covid_app.app_models import add_tflite, app_guard, local_file
from covid_app.budget import byte_budget, first_result_files, precache_list
from covid_app.guard import GuardUnavailableError, ensure_guard
from covid_data.labels import CLASSES
from covid_data.store import Store, StoreError, Unit, as_store
from covid_eval.segmenter_unit import MARKER as SEGMENTER_MARKER
from covid_models.metrics import wilson_interval
from covid_models.segmenter import SegmenterUnitError, segmenter_store
from covid_models.stored import StoredModel
from covid_registry import champion as registry
from covid_registry.convert import DISCLAIMER
from covid_registry.model_card import DATA_LIMITS, describe_weights

log = logging.getLogger(__name__)

MARKER = "bundle.json"
APP_SOURCE = Path(__file__).resolve().parent.parent / "app"  # the page's sources (npm project)
MANIFEST_PLACEHOLDER = "self.__WB_MANIFEST"
HEATMAP_GRID = 8
PLOTS = {"confusion_test": "confusion_test.png", "confusion_val": "confusion_val.png", "curves": "curves.png"}
NODE_HINT = (
    "Node.js 18 or newer with npm is needed to build the app's scripts (Debian/Ubuntu: `apt-get install nodejs npm`; "
    "macOS: `brew install node`; else https://nodejs.org/), then `make app` builds and serves the bundle"
)


class AppBuildUnavailable(RuntimeError):
    """The page's scripts cannot be built here (no Node.js/npm, or no app sources)."""


def app_unit(store: Store | str, run_id: str) -> Unit:
    return Unit(as_store(store), f"runs/{run_id}/app", MARKER)


LOCK = ".dist.lock"  # in the app's folder: held while npm builds dist/


def app_source() -> Path:
    return Path(os.environ.get("COVID_APP_SOURCE", APP_SOURCE))


def dist_dir() -> Path:
    return Path(os.environ.get("COVID_APP_DIST", app_source() / "dist"))


def _stale(dist: Path) -> bool:
    built = dist / "app.js"
    if not built.is_file() or not (dist / "sw.js").is_file():
        return True
    skip = {"node_modules", "dist"}
    sources = [p for p in app_source().rglob("*") if p.is_file() and not skip & set(p.parts) and p.name != LOCK]
    return any(p.stat().st_mtime > built.stat().st_mtime for p in sources)


def ensure_dist() -> Path:
    """The built page (``app/dist``), building it with npm when it is missing or older than its sources."""
    dist, source = dist_dir(), app_source()
    if "COVID_APP_DIST" in os.environ or not (source / "package.json").is_file():
        if (dist / "app.js").is_file():
            return dist
        raise AppBuildUnavailable(f"no built app at {dist} and no app sources at {source} to build it from")
    # Two runs at once (or two test workers) must neither build into the same folder together (npm's
    # mkdir races) nor take a folder that is half built: one builds under the lock, the other waits.
    try:
        lock = open(source / LOCK, "a")  # noqa: SIM115 (held across the build below)
    except OSError:  # a read-only checkout: nothing can be built here, so nothing can race
        return dist if not _stale(dist) else _build_dist(dist, source)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return dist if not _stale(dist) else _build_dist(dist, source)


def _build_dist(dist: Path, source: Path) -> Path:
    npm = shutil.which("npm")
    if not npm or not shutil.which("node"):
        if (dist / "app.js").is_file() and (dist / "sw.js").is_file():
            log.warning("the app's sources changed since %s was built, and there is no npm to rebuild it", dist)
            return dist
        raise AppBuildUnavailable(f"the phone app bundle was skipped: {NODE_HINT}")
    steps = [[npm, "run", "build"]]
    if not (source / "node_modules").is_dir():
        steps.insert(0, [npm, "ci", "--no-audit", "--no-fund"])
    log.info("building the app's page in %s: %s", source, " && ".join(" ".join(c[1:]) for c in steps))
    for cmd in steps:
        done = subprocess.run(cmd, cwd=source, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout)[-2000:]
            raise AppBuildUnavailable(f"`{' '.join(cmd[1:])}` in {source} failed ({done.returncode}): {tail}")
    return dist


def _ci(p: float, n: int) -> list[float]:
    return list(wilson_interval(round(p * n), n))


def _model_entry(e: dict[str, Any], rank: int, champion_uri: str | None) -> dict[str, Any]:
    stored = StoredModel(e["model_uri"]).record
    m, cfg = stored["metrics"], stored["config"]
    val, test = m.get("val", {}), m.get("test", {})
    entry = {
        "name": e["model"],
        "rank": rank,
        "champion": champion_uri is not None and e["model_uri"].rstrip("/") == champion_uri.rstrip("/"),
        "file": f"models/{e['model']}.tflite",
        "input_size": cfg["input_size"],
        "channels": cfg["channels"],
        "weights": describe_weights(e["model"], cfg, stored.get("weights")),
        "training": f"{cfg['input_size']} px grey input; "
        + (
            "its members' training, nothing more"
            if cfg.get("members")
            else f"up to {cfg['epochs']} epochs"
            + (f" + {cfg['fine_tune_epochs']} fine-tuning" if cfg.get("fine_tune_epochs") else "")
        ),
        "metrics": m,
        "images": {},
    }
    for split, d in (("val", val), ("test", test)):
        if d:
            entry[f"{split}_accuracy"] = d["accuracy"]
            entry[f"{split}_accuracy_ci95"] = _ci(d["accuracy"], int(d["n"]))
    if test:
        entry |= {
            "covid_sensitivity": test["covid_sensitivity"],
            "covid_sensitivity_ci95": test["covid_sensitivity_ci95"],
            "macro_f1": test["macro_f1"],
        }
    return entry


def build_app_bundle(
    store: Store | str,
    run_id: str,
    *,
    dataset: dict[str, Any],
    exports: list[dict[str, Any]],
    guard: dict[str, Any] | None,
    guard_note: str | None = None,
    champion_uri: str | None = None,
    explain: list[dict[str, Any]] | None = None,
    externals: dict[str, list[dict[str, Any]]] | None = None,
    lungs_uri: str | None = None,
) -> dict[str, Any]:
    """Write ``runs/<run id>/app/`` (if not complete yet) from the run's exports; its record.

    ``exports`` are the run's top models in rank order (records of ``ensure_exports``);
    ``champion_uri`` marks the model slot that is the champion; ``explain`` (tasks.explain records)
    adds each model's Grad-CAM gallery and shortcut score to its page, ``externals`` (``{model: [external
    evaluation summaries]}``) its figures on X-rays from elsewhere; ``lungs_uri`` (the run's lung
    segmenter unit) lets the page outline the lungs over the picked image. Raises
    :class:`AppBuildUnavailable` when the page cannot be built here.
    """
    store = as_store(store)
    unit = app_unit(store, run_id)
    done = unit.record()
    if done is not None:
        return done
    dist = ensure_dist()
    run = f"runs/{run_id}"
    explained = {x["model"]: x for x in explain or []}
    models = []
    shipped: dict[str, tuple[str, Path, int]] = {}  # export uri -> (bundle path, local file, input size)
    with tempfile.TemporaryDirectory(prefix="app-bundle-") as tmp:
        tmp = Path(tmp)
        for rank, e in enumerate(exports, start=1):
            entry = _model_entry(e, rank, champion_uri)
            entry["calibration"] = e.get("calibration")  # the .tflite carries its temperature
            entry["external"] = [app_external(x) for x in (externals or {}).get(e["model"], [])]
            x = explained.get(e["model"])
            if x and not x.get("error"):
                entry["images"]["gradcam"] = []
                for g, rel in zip(x["gallery"], x["images"], strict=True):
                    dest = f"models/{e['model']}/gradcam/{g['file']}"
                    unit.put_file(dest, local_file(store.uri_for(f"{run}/{rel}"), tmp / f"{e['model']}-{g['file']}"))
                    caption = f"true {g['true']} / predicted {g['predicted']} ({g['probability']:.2f})"
                    entry["images"]["gradcam"].append({"src": dest, "caption": caption})
                entry["shortcut"] = {"score": x["shortcut_score"], "baseline": x["baseline"], "method": x["method"]}
            add_tflite(unit, entry, e, dataset, shipped, tmp)
            for name, file in PLOTS.items():
                key = f"{run}/models/{e['model']}/{file}"
                if store.exists(key):
                    unit.put_file(
                        f"models/{e['model']}/{file}", local_file(store.uri_for(key), tmp / f"{e['model']}-{file}")
                    )
                    entry["images"][name] = f"models/{e['model']}/{file}"
            card = f"{run}/model_cards/{e['model']}.md"
            entry["card_markdown"] = store.read_text(card) if store.exists(card) else None
            models.append(entry)
        guard_entry = None
        if guard is not None:
            small = app_guard(guard, dataset["split"])  # float16 weights when within bounds: half the bytes
            unit.put_file("guard/guard.tflite", local_file(small["uri"], tmp / "guard.tflite"))
            keep = ("input_size", "channels", "threshold", "colour_threshold", "method", "val_false_alarm", "view")
            guard_entry = {"file": "guard/guard.tflite", **{k: guard[k] for k in keep}}
            guard_entry |= {"precision": small["precision"], "checks": small["checks"], "rejected": small["rejected"]}
        lungs_entry = None
        if lungs_uri:
            try:
                lungs_entry = app_lungs(unit, lungs_uri)
            except (SegmenterUnitError, StoreError, KeyError) as e:  # an extra: the app works without it
                log.warning("the app shows no lung outline: the segmenter at %s cannot be shipped (%s)", lungs_uri, e)
        data = {
            "run_id": run_id,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "dataset": {
                "version": dataset.get("dataset_version"),
                "split_hash": dataset.get("split_hash"),
                "counts": dataset.get("split_counts"),
            },
            "classes": _classes(),
            "disclaimer": DISCLAIMER,
            "limits": DATA_LIMITS,
            "models": models,
            "guard": guard_entry,
            "guard_note": guard_note,
            "lungs": lungs_entry,
            "heatmap": {"method": "occlusion", "grid": HEATMAP_GRID},
        }
        unit.put_text("data/app.json", json.dumps(data, indent=1, default=float))
        for path in sorted(p for p in dist.rglob("*") if p.is_file() and p.name != "sw.js" and p.suffix != ".map"):
            unit.put_file(path.relative_to(dist).as_posix(), path)
        first = first_result_files(unit, models, guard_entry)
        files = precache_list(unit, first)
        sw = (dist / "sw.js").read_text()
        if sw.count(MANIFEST_PLACEHOLDER) != 1:
            raise AppBuildUnavailable(f"{dist / 'sw.js'} must hold {MANIFEST_PLACEHOLDER} exactly once")
        unit.put_text("sw.js", sw.replace(MANIFEST_PLACEHOLDER, json.dumps(files)))
    record = {
        "run_id": run_id,
        "models": [{k: m.get(k) for k in ("name", "rank", "champion", "file", "bytes", "input_size")} for m in models],
        "guard": guard_entry is not None,
        "lungs": lungs_entry is not None,
        "files": len(files) + 1,
        "bytes": _bytes(unit),
        "budget": byte_budget(unit, files),
    }
    unit.complete(record)
    b = record["budget"]
    log.info(
        "app bundle of run %s: %d files, %.1f MB; %.1f MB to the first result, %.1f MB kept with every model",
        run_id,
        record["files"],
        record["bytes"] / 1e6,
        b["first_result_bytes"] / 1e6,
        b["cached_bytes"] / 1e6,
    )
    return unit.record()


LUNGS_FILE = "lungs/lung_unet.tflite"


def app_lungs(unit: Unit, segmenter_uri: str) -> dict[str, Any]:
    """Put the segmenter unit's TFLite file (float32, checked against Keras when it was stored) into the
    bundle; app.json's ``lungs`` entry: the file, its input, the threshold of its outline, and what the
    segmenter is (its mask source's folder name, held-out Dice and IoU with intervals). The page fetches
    it after the first result (lazy), so it adds nothing to the bytes before that result."""
    seg, _ = segmenter_store(segmenter_uri)
    rec = json.loads(seg.read_text(SEGMENTER_MARKER))
    with tempfile.TemporaryDirectory(prefix="app-lungs-") as tmp:
        unit.put_file(LUNGS_FILE, local_file(seg.uri_for(rec["tflite"]["file"]), Path(tmp) / "lungs.tflite"))
    m, src = rec["heldout_metrics"], rec["source"]
    return {
        "file": LUNGS_FILE,
        "bytes": rec["tflite"]["bytes"],
        "input_size": rec["config"]["size"],
        "channels": 1,
        "threshold": 0.5,
        "trained_on": PurePosixPath(str(src["path"]).rstrip("/")).name,
        "masks": src["pairs"],
        "heldout": {k: m[k] for k in ("images", "dice", "dice_ci95", "iou", "iou_ci95")},
        "external": rec.get("external_metrics"),
    }


def app_external(e: dict[str, Any]) -> dict[str, Any]:
    """What a model page shows of one external set: its name, what it is, the headline figure with
    its interval (a negative set's COVID false-alarm rate, per finding folder too; a labelled set's
    accuracy and COVID sensitivity) and the model's own test figure beside it."""
    keep = ["set_kind", "name", "about", "n"]
    if e.get("set_kind") == "negative":
        keep += ["covid_predicted", "false_alarm_rate", "false_alarm_ci95", "test_false_alarm_rate"]
        keep += ["test_false_alarm_ci95"]
        per = {
            f: {k: r.get(k) for k in ("n", "false_alarm_rate", "false_alarm_ci95")} for f, r in e["per_finding"].items()
        }
        return {**{k: e.get(k) for k in keep}, "per_finding": per}
    keep += ["accuracy", "accuracy_ci95", "covid_sensitivity", "covid_sensitivity_ci95"]
    return {k: e.get(k) for k in keep}


def _classes() -> list[str]:
    return list(CLASSES)


def _bytes(unit: Unit) -> int:
    """Bytes of the bundle's files (local stores; 0 where the store cannot say cheaply)."""
    total = 0
    for k in unit.store.list(unit.prefix + "/"):
        local = unit.store.local_path(k)
        total += local.stat().st_size if local is not None and local.is_file() else 0
    return total


def build_run_app(
    store: Store | str,
    run_id: str,
    *,
    dataset: dict[str, Any],
    exports: list[dict[str, Any]],
    explain: list[dict[str, Any]] | None = None,
    champion_uri: str | None = None,
    externals: dict[str, list[dict[str, Any]]] | None = None,
    lungs_uri: str | None = None,
) -> tuple[dict[str, Any], str | None]:
    """(bundle record, why there is no guard or None): the run's bundle with its split's guard
    (fitted once) and the champion marked: ``champion_uri`` (the retrain flow passes the model it
    is about to promote: promotion comes after the bundle), else the store's current champion.
    What ``retrain`` and ``make app`` call."""
    store = as_store(store)
    try:
        guard, note = ensure_guard(store, dataset["split"], dataset["split_hash"]), None
    except GuardUnavailableError as e:
        guard, note = None, str(e)
        log.warning("the app has no out-of-distribution guard: %s", e)
    if champion_uri is None:
        champ = registry.current(store)
        champion_uri = champ["model_uri"] if champ else None
    rec = build_app_bundle(
        store,
        run_id,
        dataset=dataset,
        exports=exports,
        guard=guard,
        guard_note=note,
        champion_uri=champion_uri,
        explain=explain,
        externals=externals,
        lungs_uri=lungs_uri,
    )
    return rec, note
