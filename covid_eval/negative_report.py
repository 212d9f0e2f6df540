"""A negative set's figures and their readable forms.

A negative set holds X-rays known not to be COVID (taken before the pandemic, say), in finding
folders (``covid_data.negative``). Its one figure is the **COVID false-alarm rate**: the share of
its images a model calls COVID, with a 95% Wilson interval, overall and per finding folder, beside
the predicted-class counts. It is set against the model's own test false-alarm rate (the share of
its non-COVID test images called COVID, 1 - COVID specificity), with the change's Newcombe interval.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from covid_data.labels import CLASSES
from covid_eval.external_metrics import newcombe_interval
from covid_eval.external_report import MARKER, _ci, _pct, _signed
from covid_models.metrics import wilson_interval

COVID = CLASSES.index("COVID")
KINDS = ("labelled", "negative")
NEGATIVE_PREFIX = "negative:"  # `negative:<source>` declares a set negative where a plain string is expected
DEFAULT_ABOUT = {
    "labelled": "X-rays from elsewhere, labelled with the four classes",
    "negative": "X-rays known not to be COVID (e.g. taken before the pandemic)",
}


# -- which sets --------------------------------------------------------------------------------------
def set_name(source: str) -> str:
    """A short name for a set: its folder's or archive's name (``kaggle:owner/slug``: the slug)."""
    tail = str(source).rstrip("/").removeprefix("kaggle:")
    return PurePosixPath(tail).stem if tail.endswith(".zip") else PurePosixPath(tail).name or tail


def external_set(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """``{uri, kind, name, about}`` of an external set given as a string (``negative:`` before the
    source declares it negative) or a mapping with those keys (``kind`` defaults to labelled)."""
    if isinstance(spec, Mapping):
        d = dict(spec)
    else:
        text = str(spec).strip()
        negative = text.startswith(NEGATIVE_PREFIX)
        d = {"uri": text.removeprefix(NEGATIVE_PREFIX), "kind": "negative" if negative else "labelled"}
    kind = d.get("kind") or "labelled"
    if kind not in KINDS:
        raise ValueError(f"external set {d.get('uri')!r}: kind must be one of {KINDS}, got {kind!r}")
    return {
        "uri": d["uri"],
        "kind": kind,
        "name": d.get("name") or set_name(d["uri"]),
        "about": d.get("about") or DEFAULT_ABOUT[kind],
    }


# -- the figures -------------------------------------------------------------------------------------
def false_alarms(predicted: np.ndarray) -> dict[str, Any]:
    """Of predicted class indices: how many, how many called COVID, the rate with its Wilson
    interval, and the count of each predicted class."""
    predicted = np.asarray(predicted, dtype="int64")
    n, k = len(predicted), int((predicted == COVID).sum())
    return {
        "n": n,
        "covid_predicted": k,
        "false_alarm_rate": k / n if n else None,
        "false_alarm_ci95": list(wilson_interval(k, n)) if n else None,
        "predicted": {c: int((predicted == i).sum()) for i, c in enumerate(CLASSES)},
    }


def negative_metrics(probs: np.ndarray, findings: list[str] | np.ndarray) -> dict[str, Any]:
    """:func:`false_alarms` over every scored image and per finding folder."""
    predicted = np.asarray(probs).argmax(axis=1)
    findings = np.asarray(findings, dtype=object)
    if not len(predicted):
        raise ValueError("no image of the set is left to score")
    out = false_alarms(predicted)
    out["per_finding"] = {str(f): false_alarms(predicted[findings == f]) for f in sorted(set(findings))}
    return out


def own_test_false_alarms(test: dict[str, Any] | None) -> tuple[int, int] | None:
    """(non-COVID test images called COVID, non-COVID test images) from the test confusion matrix."""
    if not test or not test.get("confusion_matrix"):
        return None
    cm = np.asarray(test["confusion_matrix"], dtype="int64")
    others = [i for i in range(len(CLASSES)) if i != COVID]
    return int(cm[others, COVID].sum()), int(cm[others].sum())


def compare_false_alarm(m: dict[str, Any], test: dict[str, Any] | None) -> dict[str, Any]:
    """The set's false-alarm rate beside the model's own test figure, and the change (set minus test)."""
    out = {"external": m["false_alarm_rate"], "external_ci95": m["false_alarm_ci95"], "external_n": m["n"]}
    t = own_test_false_alarms(test)
    if t is None or not t[1]:
        return {**out, "test": None, "test_ci95": None, "test_n": 0, "delta": None, "delta_ci95": None}
    (ts, tn), (es, en) = t, (m["covid_predicted"], m["n"])
    return {
        **out,
        "test": ts / tn,
        "test_ci95": list(wilson_interval(ts, tn)),
        "test_n": tn,
        "delta": es / en - ts / tn,
        "delta_ci95": newcombe_interval(es, en, ts, tn),
    }


# -- readable forms ----------------------------------------------------------------------------------
def negative_report_markdown(record: dict[str, Any]) -> str:
    """``report.md`` of a negative set's evaluation."""
    mdl, ds, m, c, cnt, dup = (record[k] for k in ("model", "dataset", "metrics", "comparison", "counts", "duplicates"))
    lines = [
        f"# COVID false alarms of {mdl['model']} on {ds['name']}",
        "",
        f"**{ds['name']}**: {ds['about']}. Every image is known not to be COVID, so every COVID call is a false alarm.",
        "",
        f"Model `{mdl['key']}` ({mdl['reference']}), {mdl['trained']}; input {mdl['input_size']} px. "
        f"Set `{ds['source']}` published as dataset `{ds['version']}` ({ds['uri']}).",
        "",
        "Research use only: not a medical device.",
        "",
        f"**COVID false-alarm rate: {_pct(m['false_alarm_rate'])}** ({m['covid_predicted']} of {m['n']} images "
        f"called COVID; 95% Wilson interval {_ci(m['false_alarm_ci95'])}). On the model's own test split: "
        f"{_pct(c['test'])} {_ci(c['test_ci95'])} of {c['test_n']} non-COVID images; change "
        f"{_signed(c['delta'])} {_ci(c['delta_ci95'])}.",
        "",
        "## Per finding folder",
        "",
        "| finding | scored | called COVID | false-alarm rate | 95% CI | " + " | ".join(CLASSES) + " |",
        "|---|---:|---:|---:|---|" + "---:|" * len(CLASSES),
    ]
    for f, r in [*m["per_finding"].items(), ("**all**", m)]:
        lines.append(
            f"| {f} | {r['n']} | {r['covid_predicted']} | {_pct(r['false_alarm_rate'])} | "
            f"{_ci(r['false_alarm_ci95'])} | " + " | ".join(str(r["predicted"][k]) for k in CLASSES) + " |"
        )
    lines += [
        "",
        "## Images",
        "",
        f"{cnt['images']} in the set ({', '.join(f'{k} {v}' for k, v in ds['finding_counts'].items())}); "
        f"{cnt['undecodable']} undecodable, left out; {cnt['duplicates_excluded']} seen in the model's training "
        f"(copies or near copies, pHash within {dup['near_dup_distance']} bits, of its train or validation images), "
        + ("**kept in the scores**" if dup["included"] else "left out")
        + f"; **{cnt['scored']} scored**. The list: `duplicates.csv`; each image's prediction: `predictions.csv`.",
        "",
    ]
    if dup.get("covid_matches"):
        lines += [
            f"**{dup['covid_matches']} image(s) of this set match a COVID image of the model's data** (exact or near "
            "copies). An exact copy means the set is not what it claims or the data is mislabelled; a near match "
            "may also be a chance likeness (chest X-rays look alike at low resolution): look at the pairs in "
            "`duplicates.csv`.",
            "",
        ]
    return "\n".join(lines)


def negative_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The small record: where the evaluation is, the false-alarm rate overall and per finding."""
    m, c, ds = record["metrics"], record["comparison"], record["dataset"]
    keep = ("n", "covid_predicted", "false_alarm_rate", "false_alarm_ci95", "predicted")
    return {
        "uri": record["uri"],
        "evaluation": record["uri"].rstrip("/") + f"/{MARKER}",
        "model_uri": record["model"]["uri"],
        "model_key": record["model"]["key"],
        "dataset_version": ds["version"],
        "source": ds["source"],
        "set_kind": "negative",
        "name": ds["name"],
        "about": ds["about"],
        **{k: m[k] for k in keep},
        "per_finding": {f: {k: r[k] for k in keep} for f, r in m["per_finding"].items()},
        "test_false_alarm_rate": c["test"],
        "test_false_alarm_ci95": c["test_ci95"],
        "false_alarm_delta": c["delta"],
        "false_alarm_delta_ci95": c["delta_ci95"],
        "duplicates_excluded": record["counts"]["duplicates_excluded"],
        "seen_in_training": record["duplicates"]["seen_in_training"],
    }
