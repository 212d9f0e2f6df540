"""The run folder: everything one retraining run publishes, under ``runs/<run id>/``.

It is a stored unit completed by ``run.json``, written last: the leaderboard (CSV and Markdown),
a copy of every trained model's files (``models/<model>/``), the phone exports of the top models
(``exports/<model>/``), their model cards, the champion comparison (``bless.json``) and the
report. A run restarted under the same run id (a Prefect retry) replaces an incomplete folder;
a complete one is never written again.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from covid_data.store import Store, Unit, open_store
from covid_models.model_card import describe_weights, model_card

MARKER = "run.json"
MODEL_FILES = ("model.keras", "metrics.json", "history.json", "history.csv", "curves.png")


def run_unit(store_uri: str, run_id: str) -> Unit:
    return Unit(open_store(store_uri), f"runs/{run_id}", MARKER)


def _copy_objects(src: Store, keys: list[str], dst: Unit, rename) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="run-copy-") as tmp:
        for key in keys:
            local = src.local_path(key) or src.get_file(key, Path(tmp) / key.replace("/", "_"))
            dst.put_file(rename(key), local)
    return [dst.store.uri_for(dst.key(rename(k))) for k in keys]


def write_run_folder(
    store_uri: str,
    run_id: str,
    *,
    dataset: dict[str, Any],
    board_rows: list[dict[str, Any]],
    board_markdown: str,
    records: list[dict[str, Any]],
    exports: list[dict[str, Any]],
    blessing: dict[str, Any] | None,
) -> dict[str, str]:
    """Write the run folder's objects (not its marker); ``{model: URI of its copy}``."""
    import pandas as pd

    unit = run_unit(store_uri, run_id)
    if unit.is_complete():
        return unit.record()["models"]
    unit.put_text("leaderboard.csv", pd.DataFrame(board_rows).to_csv(index=False))
    unit.put_text("leaderboard.md", board_markdown)
    published: dict[str, str] = {}
    card_data = {  # prepare-data's record, in the model card's terms
        "version": dataset.get("dataset_version"),
        "split_hash": dataset.get("split_hash"),
        "counts": dataset.get("split_counts"),
    }
    for r in records:
        if r.get("status") not in ("trained", "cached"):
            continue
        src = open_store(r["out"])
        keys = [k for k in src.list() if k in MODEL_FILES or (k.startswith("confusion_") and "/" not in k)]
        _copy_objects(src, keys, unit, lambda k, m=r["model"]: f"models/{m}/{k}")
        published[r["model"]] = unit.store.uri_for(unit.key(f"models/{r['model']}"))
    for e in exports:
        src = open_store(e["model_uri"])
        for variant in e["variants"].values():
            prefix = f"exports/{variant['variant']}/{variant['file']}"
            keys = src.list(prefix)
            _copy_objects(src, keys, unit, lambda k, m=e["model"], v=variant: f"exports/{m}/{k.split('/', 2)[2]}")
        stored = json.loads(src.read_text("metrics.json"))
        card = model_card(e["model"], stored["metrics"], stored["config"], card_data, stored.get("weights"))
        unit.put_text(f"model_cards/{e['model']}.md", card)
    if blessing is not None:
        unit.put_text("bless.json", json.dumps(blessing, indent=2, default=str))
    return published


def complete_run(store_uri: str, run_id: str, run: dict[str, Any], report: str) -> dict[str, Any]:
    """Write the report, then ``run.json`` (the marker). A folder already complete stays as it is."""
    unit = run_unit(store_uri, run_id)
    if unit.is_complete():
        return unit.record()
    unit.put_text("report.md", report)
    unit.complete(run)
    return unit.record()


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def report_markdown(run: dict[str, Any], board_markdown: str) -> str:
    """The run report (also the Prefect ``retrain-report`` artifact)."""
    ds = run["dataset"]
    lines = [
        f"# Retrain {run['run_id']}",
        "",
        f"Dataset `{ds['dataset_version']}`, split `{ds['split_hash']}`, preset `{run['preset']['name']}`.",
        "",
        board_markdown,
    ]
    decision = run.get("champion")
    if decision:
        lines += ["", f"**Champion:** {decision['reason']}"]
    bless = run.get("blessing")
    if bless and bless.get("comparison"):
        c = bless["comparison"]
        lines += [
            "",
            "Challenger and champion on the same test images "
            f"(n={c.get('n')}, excluded {c.get('excluded', 0)} seen in the champion's training): accuracy "
            f"{_fmt(c.get('challenger_accuracy'))} against {_fmt(c.get('champion_accuracy'))}.",
        ]
    for e in run["exports"]:
        v = e["variants"]
        int8 = v.get("coreml-int8")
        tfl = v.get("tflite", {})
        cfg = e.get("config", {})
        lines += [
            "",
            f"## {e['model']}",
            f"{describe_weights(e['model'], cfg, e.get('weights'))}; input {cfg.get('input_size')} px.",
            f"Core ML {v['coreml']['bytes'] / 1e6:.1f} MB; int8 "
            + (f"{int8['bytes'] / 1e6:.1f} MB" if int8 else "not built")
            + f"; TFLite {tfl.get('bytes', 0) / 1e6:.1f} MB, TFLite vs Keras max |Δp| "
            f"{tfl.get('checks', {}).get('max_prob_diff', float('nan')):.1e}; Core ML runtime check: "
            + str(v["coreml"]["checks"].get("runtime_max_prob_diff", v["coreml"]["checks"].get("runtime_parity"))),
        ]
    app = run.get("app") or {}
    if app.get("status") == "built":
        lines += ["", f"**Phone app:** `{app['path']}` ({app['bytes'] / 1e6:.1f} MB); serve it with `make app`."]
    elif app:
        lines += ["", f"**Phone app:** {app['status']}: {app.get('reason')}"]
    for model, uri in run["models"].items():
        lines.append(f"- {model}: `{uri}` (curves: `{uri}/curves.png`)")
    return "\n".join(lines) + "\n"
