"""The figures of an external evaluation: metrics with intervals, honest about absent classes, and
each headline figure set against the model's own test figure (the change with its interval)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from covid_data.labels import CLASSES
from covid_models.metrics import classification_metrics, wilson_interval

COVID = CLASSES.index("COVID")
HEADLINE = ("accuracy", "macro_f1", "covid_sensitivity", "covid_specificity")


def _f1_from_confusion(cm: np.ndarray, classes: list[int]) -> np.ndarray:
    """Macro-F1 over ``classes`` for one or a stack of confusion matrices (sklearn's, zero_division=0)."""
    cm = np.asarray(cm, dtype="float64")
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    denom = cm.sum(axis=-1) + cm.sum(axis=-2)  # 2tp + fn + fp
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
    return f1[..., classes].mean(axis=-1)


def _resample(cm: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """Bootstrap over images, drawn from the confusion matrix (F1 depends on nothing else)."""
    cm = np.asarray(cm, dtype="int64")
    n = int(cm.sum())
    return rng.multinomial(n, cm.ravel() / n, size=n_boot).reshape(n_boot, *cm.shape)


def macro_f1_interval(
    cm: np.ndarray, classes: list[int], *, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of macro-F1 over ``classes``."""
    if np.asarray(cm).sum() == 0:
        return None
    f1 = _f1_from_confusion(_resample(cm, np.random.default_rng(seed), n_boot), classes)
    return float(np.percentile(f1, 2.5)), float(np.percentile(f1, 97.5))


def _counts(cm: np.ndarray) -> dict[str, tuple[int, int]]:
    """(successes, trials) of accuracy, COVID sensitivity and specificity from a confusion matrix."""
    cm = np.asarray(cm, dtype="int64")
    tp = int(cm[COVID, COVID])
    pos = int(cm[COVID].sum())
    others = [i for i in range(len(CLASSES)) if i != COVID]
    neg = int(cm[others].sum())
    tn = int(cm[np.ix_(others, others)].sum())
    return {
        "accuracy": (int(np.trace(cm)), int(cm.sum())),
        "covid_sensitivity": (tp, pos),
        "covid_specificity": (tn, neg),
    }


def _num(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def external_metrics(probs: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """:func:`classification_metrics` plus intervals, made honest about absent classes: their
    recall and F1 are None (support 0), and macro-F1 is over the classes present (the four-class
    figure, which counts each absent class as F1 0, is kept as ``macro_f1_four_classes``)."""
    y = np.asarray(y, dtype="int64")
    if not len(y):
        raise ValueError("no image of the set is left to score")
    with warnings.catch_warnings():  # per-class AUC of an absent class: undefined, and recorded as such
        warnings.filterwarnings("ignore", message=".*(not defined|Only one class|contains classes not in y_true).*")
        m = classification_metrics(probs, y)
    cm = np.asarray(m["confusion_matrix"])
    present = [i for i in range(len(CLASSES)) if cm[i].sum() > 0]
    absent = [CLASSES[i] for i in range(len(CLASSES)) if i not in present]
    predicted = cm.sum(axis=0)
    for c in CLASSES:
        m["per_class"][c]["predicted"] = int(predicted[CLASSES.index(c)])
    for c in absent:
        pc = m["per_class"][c]
        pc.update(recall=None, f1=None, support=0, absent=True)
        if not pc["predicted"]:
            pc["precision"] = None  # never predicted, never present: nothing to measure
    k = _counts(cm)
    m["accuracy_ci95"] = list(wilson_interval(*k["accuracy"]))
    if absent:
        m["macro_f1_four_classes"] = m["macro_f1"]
        m["macro_f1"] = float(_f1_from_confusion(cm, present))
    m["macro_f1_classes"] = [CLASSES[i] for i in present]
    ci = macro_f1_interval(cm, present)
    m["macro_f1_ci95"] = list(ci) if ci else None
    m["missing_classes"] = absent
    return m


def newcombe_interval(s1: int, n1: int, s2: int, n2: int, alpha: float = 0.05) -> list[float]:
    """Newcombe's hybrid score interval (from the two Wilson intervals) for ``s1/n1 - s2/n2``,
    two independent proportions."""
    from statsmodels.stats.proportion import confint_proportions_2indep  # heavy: imported where used

    lo, hi = confint_proportions_2indep(s1, n1, s2, n2, method="newcomb", compare="diff", alpha=alpha)
    return [max(-1.0, float(lo)), min(1.0, float(hi))]


def compare_to_test(ext: dict[str, Any], test: dict[str, Any] | None) -> dict[str, Any]:
    """Each headline figure on the set and on the model's own test split, with both 95% intervals,
    and the change (set minus test) with its interval. Macro-F1 is compared over the classes the
    set has, on both sides (from the test split's confusion matrix)."""
    classes = ext.get("macro_f1_classes") or list(CLASSES)
    out: dict[str, Any] = {"classes": classes}
    if not test or not test.get("confusion_matrix"):
        out["note"] = "the model has no test metrics (its split has no test share): nothing to compare with"
        for name in HEADLINE:
            out[name] = {
                "external": _num(ext.get(name)),
                "external_ci95": ext.get(f"{name}_ci95"),
                "test": None,
                "test_ci95": None,
                "delta": None,
                "delta_ci95": None,
            }
        return out
    ecm, tcm = np.asarray(ext["confusion_matrix"]), np.asarray(test["confusion_matrix"])
    ek, tk = _counts(ecm), _counts(tcm)
    for name in ("accuracy", "covid_sensitivity", "covid_specificity"):
        (es, en), (ts, tn) = ek[name], tk[name]
        e = es / en if en else None
        t = ts / tn if tn else None
        eci = list(wilson_interval(es, en)) if en else None
        tci = list(wilson_interval(ts, tn)) if tn else None
        both = e is not None and t is not None
        out[name] = {
            "external": e,
            "external_ci95": eci,
            "external_n": en,
            "test": t,
            "test_ci95": tci,
            "test_n": tn,
            "delta": e - t if both else None,
            "delta_ci95": newcombe_interval(es, en, ts, tn) if both else None,
        }
    idx = [CLASSES.index(c) for c in classes]
    e_f1, t_f1 = float(_f1_from_confusion(ecm, idx)), float(_f1_from_confusion(tcm, idx))
    rng = np.random.default_rng(0)
    eb = _f1_from_confusion(_resample(ecm, rng, 2000), idx)
    tb = _f1_from_confusion(_resample(tcm, rng, 2000), idx)
    out["macro_f1"] = {
        "external": e_f1,
        "external_ci95": [float(np.percentile(eb, 2.5)), float(np.percentile(eb, 97.5))],
        "external_n": int(ecm.sum()),
        "test": t_f1,
        "test_ci95": [float(np.percentile(tb, 2.5)), float(np.percentile(tb, 97.5))],
        "test_n": int(tcm.sum()),
        "delta": e_f1 - t_f1,
        "delta_ci95": [float(np.percentile(eb - tb, 2.5)), float(np.percentile(eb - tb, 97.5))],
    }
    if len(classes) < len(CLASSES):
        absent = [c for c in CLASSES if c not in classes]
        out["note"] = (
            f"macro-F1 on both sides over the classes the set has ({', '.join(classes)}); absent: {', '.join(absent)}"
        )
    return out
