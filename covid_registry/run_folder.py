"""The run folder: everything one retraining run publishes, under ``runs/<run id>/``.

It is a stored unit completed by ``run.json``, written last: the leaderboard (CSV and Markdown),
a copy of every trained model's files (``models/<model>/``), the phone exports of the top models
(``exports/<model>/``), their model cards, the champion comparison (``bless.json``) and the
report. A run restarted under the same run id (a Prefect retry) replaces an incomplete folder;
a complete one is never written again.
"""

from __future__ import annotations

import base64
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from covid_data.store import Store, Unit, open_store
from covid_eval.gallery import card_lines, contact_sheet, small_png
from covid_eval.gradcam import shortcut_meaning
from covid_eval.shortcut_audit import report_lines as audit_report_lines
from covid_registry.model_card import (
    describe_weights,
    export_lines,
    external_lines,
    external_report_lines,
    model_card,
)

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
    explain: list[dict[str, Any]] | None = None,
    externals: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, str]:
    """Write the run folder's objects (not its marker); ``{model: URI of its copy}``.

    ``explain`` (records of ``tasks.explain.explain_models``) adds a "Where the model looks"
    section (the Grad-CAM shortcut score and what it means) to each top model's card; ``externals``
    (``{model: [external evaluation summaries]}``) an "On X-rays from elsewhere" section.
    """
    explained = {x["model"]: x for x in explain or [] if x.get("model")}
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
            folder = variant.get("prefix") or f"exports/{variant['variant']}"  # records before the key had T
            keys = src.list(f"{folder}/{variant['file']}")
            _copy_objects(src, keys, unit, lambda k, m=e["model"], f=folder: f"exports/{m}/{k[len(f) + 1 :]}")
        stored = json.loads(src.read_text("metrics.json"))
        card = model_card(
            e["model"], stored["metrics"], stored["config"], card_data, stored.get("weights"), e.get("calibration")
        )
        card = with_card_section(card, export_lines(e.get("variants")))
        card = with_card_section(card, card_lines(explained.get(e["model"])))
        card = with_card_section(card, external_lines((externals or {}).get(e["model"])))
        unit.put_text(f"model_cards/{e['model']}.md", card)
    if blessing is not None:
        unit.put_text("bless.json", json.dumps(blessing, indent=2, default=str))
    return published


def with_card_section(card: str, lines: list[str]) -> str:
    """``card`` with ``lines`` (a section) inserted before its "## Limits" section, else at the end."""
    if not lines:
        return card
    section = "\n".join(lines).strip("\n") + "\n"
    head, sep, tail = card.partition("\n## Limits")
    if sep:
        return f"{head.rstrip()}\n\n{section}{sep}{tail}"
    return f"{card.rstrip()}\n\n{section}"


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


# Inline pictures (data: URIs) in the report: Prefect's markdown artifacts render them, so the UI
# shows the curves, confusion matrices and Grad-CAM galleries, not file paths. Each picture is
# downscaled to a palette PNG; past the budget the report links to the files instead.
REPORT_IMAGE_BUDGET = 3_000_000  # bytes of base64 in all
CURVES_PX, CONFUSION_PX, GALLERY_CELL_PX = 560, 340, 150


class _Embedder:
    """Reads a run's PNGs from the store and writes them as inline markdown images, within a budget."""

    def __init__(self, store: Store | str | None, run_id: str, budget: int = REPORT_IMAGE_BUDGET):
        self.store = open_store(store) if isinstance(store, str) else store
        self.prefix, self.budget, self.used, self.skipped = f"runs/{run_id}", budget, 0, 0

    def read(self, rel: str) -> bytes | None:
        key = f"{self.prefix}/{rel}"
        if self.store is None or not self.store.exists(key):
            return None
        return self.store.read_bytes(key)

    def markdown(self, alt: str, png: bytes | None, rel: str) -> str | None:
        if png is None:
            return None
        data = base64.b64encode(png).decode("ascii")
        if self.used + len(data) > self.budget:
            self.skipped += 1
            return f"({alt}: `{rel}` in the run folder; left out of this report to keep it small)"
        self.used += len(data)
        return f"![{alt}](data:image/png;base64,{data})"

    def picture(self, alt: str, rel: str, max_px: int) -> str | None:
        raw = self.read(rel)
        return self.markdown(alt, small_png(raw, max_px) if raw else None, rel)


def _gallery_grid(exp: dict[str, Any], emb: _Embedder) -> str | None:
    """One picture: a row per true class, right predictions then wrong ones."""
    model = exp["model"]
    folder = f"gradcam/{model}"
    recs = exp.get("gallery") or [{"file": Path(p).name} for p in exp.get("images", [])]
    if not recs:
        return None
    if all("true" in r for r in recs):
        right = max(sum(1 for x in recs if x["true"] == r["true"] and x["correct"]) for r in recs)
        wrong = max(sum(1 for x in recs if x["true"] == r["true"] and not x["correct"]) for r in recs)
        rows: dict[str, list[bytes | None]] = {}
        for r in recs:
            row = rows.setdefault(r["true"], [None] * (right + wrong))
            slot = [i for i in (range(right) if r["correct"] else range(right, right + wrong)) if row[i] is None][0]
            row[slot] = emb.read(f"{folder}/{r['file']}")
        cells, columns = [c for row in rows.values() for c in row], right + wrong
    else:
        cells, columns = [emb.read(f"{folder}/{r['file']}") for r in recs], 4
    if not any(cells):
        return None
    sheet = contact_sheet(cells, columns=columns, cell_px=GALLERY_CELL_PX)
    return emb.markdown(f"Grad-CAM gallery of {model}", sheet, f"{folder}/")


def _explain_lines(exp: dict[str, Any] | None, emb: _Embedder) -> list[str]:
    if not exp:
        return []
    lines = ["", f"### Where {exp['model']} looks (Grad-CAM)", ""]
    if exp.get("error"):
        return [*lines, f"Grad-CAM was not computed: {exp['error']}"]
    lines.append(shortcut_meaning(exp.get("shortcut_score"), exp.get("baseline"), exp.get("method", "")))
    grid = _gallery_grid(exp, emb)
    if grid:
        lines += [
            "",
            f"Fixed test images, a row per true class: right predictions, then wrong ones (titles: true / "
            f"predicted class and its probability). Full-size PNGs: `gradcam/{exp['model']}/`.",
            "",
            grid,
        ]
    return lines


def shortcut_table(explain: list[dict[str, Any]] | None) -> list[str]:
    """The top models' shortcut scores as a small Markdown table, with what the number means."""
    rows = [x for x in explain or [] if x.get("model")]
    if not rows:
        return []
    lines = [
        "",
        "**Where the models look** (Grad-CAM shortcut score: the share of the heat outside the lungs, from "
        "the lung masks where the dataset has them, else the run's lung segmenter's masks where it has one, else "
        "in the outer 10% border band where text markers and "
        "collimation edges sit; lower is better, and a map spread evenly over the image scores the baseline):",
        "",
        "| model | shortcut score | uniform-map baseline | method | images |",
        "|---|---|---|---|---|",
    ]
    for x in rows:
        if x.get("error"):
            lines.append(f"| {x['model']} | not computed | - | - | - |")
            continue
        lines.append(
            f"| {x['model']} | {_fmt(x.get('shortcut_score'), 2)} | {_fmt(x.get('baseline'), 2)} | "
            f"{x.get('method', '-')} | {x.get('n', '-')} |"
        )
    return lines


def report_markdown(
    run: dict[str, Any],
    board_markdown: str,
    store: Store | str | None = None,
    *,
    image_budget: int = REPORT_IMAGE_BUDGET,
) -> str:
    """The run report (also the Prefect ``retrain-report`` artifact).

    With ``store`` (the run's store, a URI or a :class:`Store`), each top model's training curves,
    test confusion matrix and Grad-CAM gallery (``run["explain"]``, records of
    ``tasks.explain.explain_models``) are embedded as small inline PNGs (``data:`` URIs, at most
    ``image_budget`` bytes of base64 in all), so the Prefect UI shows pictures, not paths.
    """
    emb = _Embedder(store, run["run_id"], image_budget)
    explained = {x["model"]: x for x in run.get("explain") or [] if x.get("model")}
    ds = run["dataset"]
    lines = [
        f"# Retrain {run['run_id']}",
        "",
        f"Dataset `{ds['dataset_version']}`, split `{ds['split_hash']}`, preset `{run['preset']['name']}`.",
        "",
        board_markdown,
    ]
    lines += external_report_lines(run.get("external"))
    lines += shortcut_table(run.get("explain"))
    lines += audit_report_lines(run.get("shortcut_audit"))
    promotion = run.get("promotion")
    if promotion:
        lines += ["", f"**Promotion:** {promotion['reason']}"]
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
            + (f"{int8['bytes'] / 1e6:.1f} MB" if int8 and int8.get("bytes") else "not built")
            + f"; TFLite {tfl.get('bytes', 0) / 1e6:.1f} MB, TFLite vs Keras max |Δp| "
            f"{tfl.get('checks', {}).get('max_prob_diff', float('nan')):.1e}; Core ML runtime check: "
            + str(v["coreml"]["checks"].get("runtime_max_prob_diff", v["coreml"]["checks"].get("runtime_parity"))),
        ]
        pics = [
            emb.picture(f"{e['model']} training curves", f"models/{e['model']}/curves.png", CURVES_PX),
            emb.picture(
                f"{e['model']} confusion matrix, test", f"models/{e['model']}/confusion_test.png", CONFUSION_PX
            ),
        ]
        if any(pics):
            lines += ["", " ".join(p for p in pics if p)]
        lines += _explain_lines(explained.get(e["model"]), emb)
    app = run.get("app") or {}
    if app.get("status") == "built":
        lines += ["", f"**Phone app:** `{app['path']}` ({app['bytes'] / 1e6:.1f} MB); serve it with `make app`."]
    elif app:
        lines += ["", f"**Phone app:** {app['status']}: {app.get('reason')}"]
    for model, uri in run["models"].items():
        lines.append(f"- {model}: `{uri}` (curves: `{uri}/curves.png`)")
    return "\n".join(lines) + "\n"
