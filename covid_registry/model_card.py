"""Model cards: what a published model is, how it was trained, how well it does, and its limits."""

from __future__ import annotations

from typing import Any

from covid_models.describe import describe_weights
from covid_models.ensemble import is_ensemble
from covid_models.metrics import wilson_interval
from covid_registry.convert import DISCLAIMER

# Known limits of the data, on every model card and in the app.
DATA_LIMITS = [
    "Trained and evaluated on one public collection; accuracy on other hospitals' images is unknown, and likely lower.",
    "A model can learn acquisition artefacts (markers, devices, processing) rather than disease.",
    "Class balance differs from any real population: predictive values in practice differ from these figures.",
    "Much of the Viral Pneumonia class comes from a paediatric collection, while the other classes are "
    "mostly adults: age is a shortcut a model can learn, and Viral Pneumonia accuracy may not carry over to "
    "adults.",
    "The data has no patient IDs: images of one patient can sit in different splits. Splits group exact and "
    "near-duplicate images (by content hash and perceptual hash), which catches copies, not repeat studies.",
    "Grayscale frontal views only; lateral views and other findings are out of scope.",
]


def model_card(
    model: str,
    metrics: dict[str, Any],
    config: dict[str, Any],
    dataset: dict[str, Any],
    weights: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
) -> str:
    """A short model card: intended use, data, metrics with confidence intervals, calibration, limits."""

    def pct(v: float) -> str:
        return f"{100 * v:.1f}%"

    lines = [
        f"# Model card: {model}",
        "",
        f"**{DISCLAIMER}**",
        "",
        "## Intended use",
        "Research and education: classifying a frontal chest X-ray into COVID, Lung_Opacity, Normal or "
        "Viral Pneumonia, as in the study this pipeline automates. Not for clinical decisions, triage or screening.",
        "",
        "## Data",
        f"COVID-19 Radiography Database, dataset version `{dataset.get('version')}`, "
        f"split `{dataset.get('split_hash')}` ({dataset.get('counts')}). Images from a small number of public "
        "sources; hospitals, devices and populations are not balanced across classes.",
        "",
        "## Training",
        f"Input {config['input_size']}x{config['input_size']} grayscale (raw pixels; preprocessing inside the model); "
        + (
            f"{describe_weights(model, config, weights)} (each member resized to its own input size, antialiased "
            "as in training; the members are the run's best by validation accuracy and their temperatures were "
            "fitted on validation: its validation accuracy flatters it, so it ranks above its best member only when it "
            "beats that member significantly there)."
            if is_ensemble(model)
            else f"{describe_weights(model, config, weights)}; {config['epochs']} epochs max, learning rate "
            f"{config['learning_rate']}."
        ),
        "",
        "## Metrics",
        "| split | accuracy | macro-F1 | COVID sensitivity (95% CI) | COVID specificity (95% CI) | ECE |",
        "|---|---|---|---|---|---|",
    ]
    for split, m in metrics.items():
        s_lo, s_hi = m["covid_sensitivity_ci95"]
        p_lo, p_hi = m["covid_specificity_ci95"]
        lines.append(
            f"| {split} (n={m['n']}) | {pct(m['accuracy'])} | {m['macro_f1']:.3f} | {pct(m['covid_sensitivity'])} "
            f"({pct(s_lo)}-{pct(s_hi)}) | {pct(m['covid_specificity'])} ({pct(p_lo)}-{pct(p_hi)}) | {m['ece']:.3f} |"
        )
    lines += resolution_lines(metrics.get("test"))
    lines += source_lines(metrics)
    lines += calibration_lines(calibration)
    lines += [
        "",
        "## Limits",
        *(f"- {limit}" for limit in DATA_LIMITS),
        "",
        "Cite: Chowdhury et al., IEEE Access 8 (2020) 132665; Rahman et al., Computers in Biology and Medicine 132 "
        "(2021) 104319.",
    ]
    return "\n".join(lines) + "\n"


def source_lines(metrics: dict[str, dict[str, Any]]) -> list[str]:
    """The "By source" table of a model trained on several labelled sources (``extra_sources``): each
    split's accuracy and COVID sensitivity per source, so that a source the model does poorly on is not
    averaged away. Nothing for a single-source model."""
    rows = [(split, name, s) for split, m in metrics.items() for name, s in (m.get("by_source") or {}).items()]
    if not rows:
        return []
    lines = [
        "",
        "## By source",
        "Each source's images of each split (a source with few images has a wide interval).",
        "",
        "| split | source | n | accuracy (95% CI) | COVID sensitivity |",
        "|---|---|---|---|---|",
    ]
    for split, name, s in rows:
        sens = "no COVID images" if not s["covid_n"] else f"{_pct(s['covid_sensitivity'])} of {s['covid_n']}"
        lines.append(f"| {split} | {name} | {s['n']} | {_pct(s['accuracy'])} ({_ci(s['accuracy_ci95'])}) | {sens} |")
    return lines


def resolution_lines(test: dict[str, Any] | None) -> list[str]:
    """What the test set can resolve: its size, the accuracy's 95% interval, and what that means
    for comparing two models."""
    if not test:
        return ["", "## What the test set can tell", "This model has no test split: its figures are validation only."]
    n, acc = int(test["n"]), float(test["accuracy"])
    lo, hi = wilson_interval(round(acc * n), n)
    return [
        "",
        "## What the test set can tell",
        f"The test split has {n} images. Accuracy {100 * acc:.1f}% has a 95% Wilson interval of "
        f"{100 * lo:.1f}-{100 * hi:.1f}% (about ±{50 * (hi - lo):.1f} points): a difference of that order between two "
        "models, each scored on its own test set, is not resolved. A challenger is compared with the champion on "
        "the same images instead, and McNemar's exact test on the images only one of them gets right says whether "
        "the difference is significant.",
    ]


def calibration_lines(cal: dict[str, Any] | None) -> list[str]:
    """What temperature scaling did, on validation (where it was fitted) and on test."""
    if not cal:
        return []
    t = float(cal["temperature"])
    rows = [
        f"| {split} (n={cal[split]['n']}) | {cal[split]['ece_before']:.3f} | {cal[split]['ece_after']:.3f} |"
        for split in ("val", "test")
        if cal.get(split)
    ]
    return [
        "",
        "## Calibration",
        f"Temperature scaling, T = {t:.3f} ({cal.get('note', 'fitted on validation')}). The published files "
        "(Core ML, TFLite, the phone app) give the calibrated probabilities; the predicted class, and so every "
        "accuracy figure, is unchanged. Expected calibration error (15 bins):",
        "",
        "| split | ECE before | ECE after |",
        "|---|---|---|",
        *rows,
    ]


def export_lines(variants: dict[str, dict[str, Any]] | None) -> list[str]:
    """The card's "Exports" section: each phone format, its size and how closely it matches Keras."""
    if not variants:
        return []
    names = {"coreml": "Core ML (fp16)", "coreml-int8": "Core ML (8-bit weights)", "tflite": "TFLite (float32)"}
    lines = ["", "## Exports", "| format | size | agreement with the Keras model |", "|---|---|---|"]
    for v, rec in variants.items():
        checks = rec.get("checks") or {}
        if "max_prob_diff" in checks:
            check = f"max |Δp| {checks['max_prob_diff']:.1e} on {checks.get('images', '?')} test images, every class"
        elif "runtime_max_prob_diff" in checks:
            check = f"max |Δp| {checks['runtime_max_prob_diff']:.1e} (bound {checks.get('runtime_bound', '?')})"
        else:
            check = str(checks.get("runtime_parity") or "unchecked")
        lines.append(f"| {names.get(v, v)} | {rec.get('bytes', 0) / 1e6:.1f} MB | {check} |")
    return lines


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "-" if not ci or ci[0] is None else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}%"


def _figure(e: dict[str, Any]) -> str:
    """One external set's headline for one model, in words."""
    if e.get("set_kind") == "negative":
        findings = ", ".join(
            f"{f} {_pct(r.get('false_alarm_rate'))} (n={r.get('n')})" for f, r in (e.get("per_finding") or {}).items()
        )
        own = e.get("test_false_alarm_rate")
        return (
            f"COVID false-alarm rate {_pct(e.get('false_alarm_rate'))} (95% CI {_ci(e.get('false_alarm_ci95'))}): "
            f"{e.get('covid_predicted')} of {e.get('n')} images called COVID"
            + (f"; per finding folder: {findings}" if findings else "")
            + (
                f". On its own test split, {_pct(own)} (95% CI {_ci(e.get('test_false_alarm_ci95'))}) of the non-COVID "
                "images were called COVID."
                if own is not None
                else "."
            )
        )
    own = _minus(e.get("accuracy"), e.get("accuracy_delta"))
    return (
        f"accuracy {_pct(e.get('accuracy'))} (95% CI {_ci(e.get('accuracy_ci95'))}), COVID sensitivity "
        f"{_pct(e.get('covid_sensitivity'))} (95% CI {_ci(e.get('covid_sensitivity_ci95'))}), n={e.get('n')}"
        + (f"; on its own test split, accuracy {_pct(own)}." if own is not None else ".")
    )


def external_lines(evals: list[dict[str, Any]] | None) -> list[str]:
    """The card's "On X-rays from elsewhere" section: each external set (``covid_eval.external.summary``
    records), named and said what it is, with the model's figures beside its own test ones."""
    if not evals:
        return []
    lines = ["", "## On X-rays from elsewhere", ""]
    for e in evals:
        lines.append(f"- **{e.get('name') or e.get('source')}** ({e.get('about') or 'an external set'}): {_figure(e)}")
    return lines


def external_report_lines(externals: dict[str, list[dict[str, Any]]] | None) -> list[str]:
    """The run report's table per external set: every evaluated model's figure and its interval."""
    models = {m: evals for m, evals in (externals or {}).items() if evals}
    if not models:
        return []
    lines: list[str] = []
    for i, first in enumerate(next(iter(models.values())), start=1):
        negative = first.get("set_kind") == "negative"
        what = "COVID false-alarm rate (share called COVID)" if negative else "accuracy"
        lines += [
            "",
            f"**ext{i}: {first.get('name')}**, {first.get('about')}: {what}, with its 95% interval.",
            "",
            f"| model | {what} | 95% CI | n | own test split |",
            "|---|---:|---|---:|---:|",
        ]
        for model, evals in models.items():
            e = evals[i - 1] if i <= len(evals) else {}
            value, ci = ("false_alarm_rate", "false_alarm_ci95") if negative else ("accuracy", "accuracy_ci95")
            own = e.get("test_false_alarm_rate") if negative else _minus(e.get("accuracy"), e.get("accuracy_delta"))
            lines.append(f"| {model} | {_pct(e.get(value))} | {_ci(e.get(ci))} | {e.get('n', '-')} | {_pct(own)} |")
    return lines


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b
