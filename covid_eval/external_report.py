"""The external evaluation's record made readable: ``report.md`` and the short summary tasks log."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from covid_data.labels import CLASSES
from covid_eval.external_metrics import HEADLINE

MARKER = "evaluation.json"  # the evaluation unit's completion marker


def clean_json(v: Any) -> Any:
    """JSON-safe: NaN -> None, numpy scalars and tuples to plain values."""
    if isinstance(v, dict):
        return {str(k): clean_json(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [clean_json(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _ci(v: Any) -> str:
    return "-" if not v or v[0] is None else f"[{100 * v[0]:.1f}, {100 * v[1]:.1f}]"


def _signed(v: Any) -> str:
    return "-" if v is None else f"{100 * v:+.1f} pt"


def _by_split(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none"


def report_markdown(record: dict[str, Any]) -> str:
    """The evaluation as people read it (``report.md`` and the Prefect artifact)."""
    mdl, ds, m, cmp_, cnt, dup = (
        record["model"],
        record["dataset"],
        record["metrics"],
        record["comparison"],
        record["counts"],
        record["duplicates"],
    )
    lines = [
        f"# External evaluation of {mdl['model']} on {ds['version']}",
        "",
        f"Model `{mdl['key']}` ({mdl['reference']}), {mdl['trained']}; input {mdl['input_size']} px, "
        f"{mdl['channels']} channel(s); trained on split `{mdl['split_hash']}` of dataset `{mdl['dataset_version']}`.",
        f"Set `{ds['source']}` published as dataset `{ds['version']}` ({ds['uri']}).",
        "",
        "Research use only: not a medical device.",
        "",
        "## Images",
        "",
        "| | images |",
        "|---|---:|",
        f"| in the set | {cnt['images']} |",
        f"| undecodable (left out) | {cnt['undecodable']} |",
        f"| in unknown class folders (left out) | {cnt['unknown_class']} |",
        f"| seen in training, left out | {cnt['duplicates_excluded']} |",
        f"| **scored** | **{cnt['scored']}** |",
        "",
    ]
    if record["missing_classes"]:
        lines += [f"**Classes with no images:** {', '.join(record['missing_classes'])}.", ""]
    unscored = [c for c in record["unscored_classes"] if c not in record["missing_classes"]]
    if unscored:
        lines += [f"**Classes whose every image was seen in training:** {', '.join(unscored)}.", ""]
    if ds.get("unknown_classes"):
        lines += [
            f"**Unknown class folders:** {', '.join(f'{k} ({v})' for k, v in ds['unknown_classes'].items())}.",
            "",
        ]
    lines += [
        f"Duplicates of the model's images (sha256, or pHash within {dup['near_dup_distance']} bits): "
        f"exact {_by_split(dup['exact'])}; near {_by_split(dup['near'])}. {dup['seen_in_training']} seen in training "
        "(train or val): "
        + (
            "**kept in the scores** (include_duplicates)."
            if dup["included"]
            else f"{dup['excluded']} left out. The list: `duplicates.csv`."
        ),
        "",
        "## Against the model's own test split",
        "",
        "| metric | this set | 95% CI | own test | 95% CI | change | 95% CI |",
        "|---|---:|---|---:|---|---:|---|",
    ]
    for name in HEADLINE:
        c = cmp_[name]
        lines.append(
            f"| {name.replace('_', ' ')} | {_pct(c['external'])} | {_ci(c['external_ci95'])} | {_pct(c['test'])} | "
            f"{_ci(c['test_ci95'])} | {_signed(c['delta'])} | {_ci(c['delta_ci95'])} |"
        )
    if cmp_.get("note"):
        lines += ["", f"_{cmp_['note']}_"]
    lines += [
        "",
        "## Per class",
        "",
        "| class | support | predicted | precision | recall | F1 | ROC AUC |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in CLASSES:
        pc = m["per_class"][c]
        auc = (m.get("roc_auc_ovr") or {}).get(c)
        absent = " (absent)" if pc.get("absent") else ""
        lines.append(
            f"| {c}{absent} | {pc['support']} | {pc['predicted']} | {_pct(pc['precision'])} | {_pct(pc['recall'])} | "
            f"{_pct(pc['f1'])} | {'-' if auc is None else f'{auc:.3f}'} |"
        )
    lines += [
        "",
        f"Loss {m['loss']:.4f}, balanced accuracy {_pct(m['balanced_accuracy'])}, ECE {m['ece']:.4f}.",
        "",
        "![confusion matrix](confusion.png)",
        "",
    ]
    return "\n".join(lines)


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """The small record: where the evaluation is and its headline figures."""
    m, cmp_ = record["metrics"], record["comparison"]
    out = {
        "uri": record["uri"],
        "evaluation": record["uri"].rstrip("/") + f"/{MARKER}",
        "model_uri": record["model"]["uri"],
        "model_key": record["model"]["key"],
        "dataset_version": record["dataset"]["version"],
        "source": record["dataset"]["source"],
        "n": m["n"],
        "missing_classes": record["missing_classes"],
        "duplicates_excluded": record["counts"]["duplicates_excluded"],
        "seen_in_training": record["duplicates"]["seen_in_training"],
    }
    for name in HEADLINE:
        out[name] = cmp_[name]["external"]
        out[f"{name}_ci95"] = cmp_[name]["external_ci95"]
        out[f"{name}_delta"] = cmp_[name]["delta"]
        out[f"{name}_delta_ci95"] = cmp_[name]["delta_ci95"]
    return out
