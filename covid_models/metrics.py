"""Evaluation: the metrics the product publishes, and the plots people look at."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from covid_data.labels import CLASSES

COVID = CLASSES.index("COVID")


def wilson_interval(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval (95% by default) for a proportion; NaNs when there is nothing to count."""
    if n == 0:
        return (float("nan"), float("nan"))
    from statsmodels.stats.proportion import proportion_confint  # heavy: imported where used

    lo, hi = proportion_confint(successes, n, alpha=alpha, method="wilson")
    return (max(0.0, float(lo)), min(1.0, float(hi)))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: images only model A got right and
    images only model B got right (a binomial test of ``only_a`` in ``only_a + only_b`` at 1/2)."""
    if only_a + only_b == 0:
        return 1.0
    from statsmodels.stats.contingency_tables import mcnemar  # heavy: imported where used

    return float(min(1.0, mcnemar([[0, only_a], [only_b, 0]], exact=True).pvalue))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def metrics_by_source(probs: np.ndarray, y: np.ndarray, sources: np.ndarray) -> dict[str, dict[str, Any]]:
    """Accuracy (Wilson 95% interval) and COVID sensitivity of each source's rows: how a model trained on
    several sources does on each (``extra_sources``)."""
    pred, y, sources = np.asarray(probs).argmax(axis=1), np.asarray(y), np.asarray(sources)
    out = {}
    for name in sorted(set(sources.tolist()), key=lambda n: (n != "main", n)):
        rows = sources == name
        right, covid = int((pred[rows] == y[rows]).sum()), rows & (y == COVID)
        found = int((pred[covid] == COVID).sum())
        out[name] = {
            "n": int(rows.sum()),
            "accuracy": right / int(rows.sum()),
            "accuracy_ci95": list(wilson_interval(right, int(rows.sum()))),
            "covid_n": int(covid.sum()),
            "covid_sensitivity": found / int(covid.sum()) if covid.any() else float("nan"),
        }
    return out


def split_metrics(probs: np.ndarray, y: np.ndarray, sources: np.ndarray | None = None) -> dict[str, Any]:
    """:func:`classification_metrics`, with ``by_source`` where the rows come from several sources."""
    m = classification_metrics(probs, y)
    if sources is not None and len(set(np.asarray(sources).tolist())) > 1:
        m["by_source"] = metrics_by_source(probs, y, sources)
    return m


def classification_metrics(probs: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Every metric the leaderboard and model card use, for one split."""
    from sklearn.metrics import (
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        log_loss,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    probs = np.asarray(probs, dtype="float64")
    probs = np.clip(probs, 1e-7, 1.0)
    probs = probs / probs.sum(axis=1, keepdims=True)  # float32 softmax sums to 1 only within 1e-7
    y = np.asarray(y)
    labels = list(range(len(CLASSES)))
    pred = probs.argmax(axis=1)
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    is_covid, pred_covid = y == COVID, pred == COVID
    tp, fn = int((is_covid & pred_covid).sum()), int((is_covid & ~pred_covid).sum())
    tn, fp = int((~is_covid & ~pred_covid).sum()), int((~is_covid & pred_covid).sum())
    try:
        auc = roc_auc_score(y, probs, multi_class="ovr", labels=labels, average=None)
        auc_per_class = {c: float(a) for c, a in zip(CLASSES, auc, strict=True)}
        auc_macro = float(np.mean(auc))
    except ValueError:  # a class absent from y
        auc_per_class, auc_macro = {}, float("nan")
    sens, spec = (tp / (tp + fn) if tp + fn else float("nan")), (tn / (tn + fp) if tn + fp else float("nan"))
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "loss": float(log_loss(y, probs, labels=labels)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {
            c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(CLASSES, prec, rec, f1, support, strict=True)
        },
        "roc_auc_ovr": auc_per_class,
        "roc_auc_macro": auc_macro,
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "covid_sensitivity": sens,
        "covid_sensitivity_ci95": list(wilson_interval(tp, tp + fn)),
        "covid_specificity": spec,
        "covid_specificity_ci95": list(wilson_interval(tn, tn + fp)),
        "ece": expected_calibration_error(probs, y),
    }


def plot_history(history: dict[str, list[float]], title: str, out: Path) -> Path:
    """Accuracy and loss per epoch, train and validation (the paper's figures)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = range(1, len(history.get("loss", [])) + 1)
    for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
        ax.plot(epochs, history.get(metric, []), label=f"train {metric}")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], label=f"validation {metric}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_confusion(matrix: list[list[int]], title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=30, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
