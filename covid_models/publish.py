"""Publishing a retraining run: exports of the top models, model cards, and the champion.

Everything of a run goes under ``runs/<run id>/`` in the store. The ``champion.json`` pointer at
the store's root is replaced (atomically) only when the whole run succeeded and the new best
model beats the current champion on the same test split by a margin while keeping COVID
sensitivity above a floor; otherwise it stays, and the report says why.
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from covid_data.store import Store, open_store
from covid_models.export import (
    COREML_MAX_PROB_DIFF,
    DISCLAIMER,
    TFLITE_MAX_PROB_DIFF,
    ExportCheckError,
    convert_coreml,
    coreml_parity,
    export_tflite,
    tflite_parity,
)

log = logging.getLogger(__name__)

MODEL_FILES = ("model.keras", "metrics.json", "history.json", "history.csv", "curves.png")
CHAMPION = "champion.json"


def _copy(src: Store, key: str, dst: Store, dst_key: str, tmp: Path) -> None:
    local = src.local_path(key)
    if local is None:
        local = src.get_file(key, tmp / key.replace("/", "_"))
    dst.put_file(dst_key, local)


def copy_model_artefacts(model_uri: str, store: Store, prefix: str) -> list[str]:
    """Copy a trained model's files (model, metrics, history, plots) under ``prefix``."""
    src = open_store(model_uri)
    keys = [k for k in src.list() if k in MODEL_FILES or k.startswith("confusion_")]
    with tempfile.TemporaryDirectory() as tmp:
        for k in keys:
            _copy(src, k, store, f"{prefix}/{k}", Path(tmp))
    return [store.uri_for(f"{prefix}/{k}") for k in keys]


def _test_images(split_uri: str, input_size: int, channels: int, n: int, max_per_class: int | None) -> np.ndarray:
    from covid_models.data import load_split_data, split_dataset

    data = load_split_data(split_uri, max_per_class=max_per_class)
    split = "test" if data.size("test") else "val"
    images = [
        x.numpy() for x, _ in split_dataset(data, split, size=input_size, channels=channels, batch_size=n).take(1)
    ]
    return images[0]


@dataclass
class ExportResult:
    model: str
    coreml: str
    coreml_bytes: int
    coreml_int8: str | None
    coreml_int8_bytes: int | None
    tflite: str
    tflite_bytes: int
    tflite_max_prob_diff: float
    checks: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _upload_tree(store: Store, prefix: str, path: Path) -> None:
    if path.is_dir():
        items = [(f"{prefix}/{p.relative_to(path).as_posix()}", p) for p in path.rglob("*") if p.is_file()]
        store.put_many(items, prefix=prefix)
    else:
        store.put_file(prefix, path)


def _copy_tree(src: Store, src_prefix: str, dst: Store, dst_prefix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for key in src.list(src_prefix):
            _copy(src, key, dst, dst_prefix + key[len(src_prefix) :], Path(tmp))


def _make_exports(
    src: Store,
    *,
    split_uri: str,
    version: str,
    metrics: dict[str, Any],
    int8: bool,
    parity_images: int,
    max_per_class: int | None,
) -> dict[str, Any]:
    """Convert, check and store the exports beside the trained model (``exports/``); the record
    ``exports/export.json`` is written last and marks them complete."""
    from covid_models.train import load_trained_model

    model = load_trained_model(src.uri_for("model.keras"))
    cfg = json.loads(src.read_text("metrics.json"))["config"]
    name, size, channels = cfg["model"], cfg["input_size"], cfg["channels"]
    images = _test_images(split_uri, size, channels, parity_images, max_per_class)
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        tmp = Path(tmp)
        fp16 = convert_coreml(model, tmp / f"{name}.mlpackage", model_name=name, version=version, metrics=metrics)
        q8 = None
        if int8:
            q8 = convert_coreml(
                model,
                tmp / f"{name}-int8.mlpackage",
                model_name=name,
                version=version,
                metrics=metrics,
                quantize="int8",
            )
        if platform.system() == "Darwin":  # the Core ML runtime exists only on macOS
            fp16.checks["runtime_max_prob_diff"] = coreml_parity(Path(fp16.path), model, images)
            if fp16.checks["runtime_max_prob_diff"] > COREML_MAX_PROB_DIFF:
                raise ExportCheckError(
                    f"Core ML package of {name} differs from Keras by {fp16.checks['runtime_max_prob_diff']:.2e} "
                    f"in probability on {len(images)} real test images (bound {COREML_MAX_PROB_DIFF:.0e})"
                )
        tfl = export_tflite(model, tmp / f"{name}.tflite")
        diff = tflite_parity(Path(tfl.path), model, images)
        if diff > TFLITE_MAX_PROB_DIFF:
            raise ExportCheckError(
                f"TFLite export of {name} differs from Keras by {diff:.2e} in probability on {len(images)} real "
                f"test images (bound {TFLITE_MAX_PROB_DIFF:.0e})"
            )
        for rec in (fp16, q8, tfl):
            if rec is not None:
                _upload_tree(src, f"exports/{Path(rec.path).name}", Path(rec.path))
    record = {
        "model": name,
        "coreml_bytes": fp16.bytes,
        "coreml_int8_bytes": q8.bytes if q8 else None,
        "tflite_bytes": tfl.bytes,
        "tflite_max_prob_diff": diff,
        "checks": {"coreml": fp16.checks, "coreml_int8": q8.checks if q8 else None, "tflite_images": len(images)},
        "version": version,
    }
    src.put_text("exports/export.json", json.dumps(record, indent=2))
    log.info(
        "exported %s: Core ML %.1f MB (int8 %s), TFLite %.1f MB, TFLite-Keras max |dp| %.1e",
        name,
        fp16.bytes / 1e6,
        f"{q8.bytes / 1e6:.1f} MB" if q8 else "-",
        tfl.bytes / 1e6,
        diff,
    )
    return record


def export_model(
    model_uri: str,
    store_uri: str,
    prefix: str,
    *,
    split_uri: str,
    version: str,
    metrics: dict[str, Any],
    int8: bool = True,
    parity_images: int = 32,
    max_per_class: int | None = None,
) -> ExportResult:
    """Core ML (fp16, and int8 weights) and TFLite exports of one trained model, checked, copied
    under ``prefix``. A model exported before (same trained model) is not converted again."""
    src = open_store(model_uri)
    record = json.loads(src.read_text("exports/export.json")) if src.exists("exports/export.json") else None
    if record is None or (int8 and record["coreml_int8_bytes"] is None):
        record = _make_exports(
            src,
            split_uri=split_uri,
            version=version,
            metrics=metrics,
            int8=int8,
            parity_images=parity_images,
            max_per_class=max_per_class,
        )
    else:
        log.info("exports of %s are already stored beside the model: not converted again", record["model"])
    store = open_store(store_uri)
    name = record["model"]
    files = [f"{name}.mlpackage", f"{name}.tflite"] + ([f"{name}-int8.mlpackage"] if int8 else [])
    for f in files:
        _copy_tree(src, f"exports/{f}", store, f"{prefix}/{f}")
    return ExportResult(
        model=name,
        coreml=store.uri_for(f"{prefix}/{name}.mlpackage"),
        coreml_bytes=record["coreml_bytes"],
        coreml_int8=store.uri_for(f"{prefix}/{name}-int8.mlpackage") if int8 else None,
        coreml_int8_bytes=record["coreml_int8_bytes"] if int8 else None,
        tflite=store.uri_for(f"{prefix}/{name}.tflite"),
        tflite_bytes=record["tflite_bytes"],
        tflite_max_prob_diff=record["tflite_max_prob_diff"],
        checks=record["checks"],
    )


def model_card(model: str, metrics: dict[str, Any], config: dict[str, Any], dataset: dict[str, Any]) -> str:
    """A short model card: intended use, data, metrics with confidence intervals, limits."""

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
        f"Input {config['input_size']}x{config['input_size']} grayscale (raw pixels; preprocessing inside the model), "
        f"weights `{config['weights']}`, {config['epochs']} epochs max, learning rate {config['learning_rate']}.",
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
    lines += [
        "",
        "## Limits",
        "- Trained and evaluated on one public collection; accuracy on other hospitals' images is unknown, "
        "and likely lower.",
        "- A model can learn acquisition artefacts (markers, devices, processing) rather than disease.",
        "- Class balance differs from any real population: predictive values in practice differ from these figures.",
        "- Grayscale frontal views only; lateral views, paediatric images and other findings are out of scope.",
        "",
        "Cite: Chowdhury et al., IEEE Access 8 (2020) 132665; Rahman et al., Computers in Biology and Medicine 132 "
        "(2021) 104319.",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class ChampionDecision:
    changed: bool
    reason: str
    champion: dict[str, Any] | None


def decide_champion(
    store: Store,
    candidate: dict[str, Any],
    *,
    run_succeeded: bool,
    margin: float,
    covid_sensitivity_floor: float,
) -> ChampionDecision:
    """Replace ``champion.json`` if the candidate earns it (see the module docstring)."""
    current = json.loads(store.read_text(CHAMPION)) if store.exists(CHAMPION) else None
    sens = candidate.get("test_covid_sensitivity")
    acc = candidate.get("test_accuracy")
    if not run_succeeded:
        return ChampionDecision(False, "the run did not fully succeed; the champion stays", current)
    if acc is None or sens is None:
        return ChampionDecision(
            False, "the best model has no test metrics (no test split); the champion stays", current
        )
    if sens < covid_sensitivity_floor:
        return ChampionDecision(
            False, f"COVID sensitivity {sens:.4f} is below the floor {covid_sensitivity_floor:.4f}", current
        )
    if current is not None:
        if current.get("split_hash") != candidate.get("split_hash"):
            return ChampionDecision(
                False,
                f"the champion was tested on split {current.get('split_hash')}, this run on "
                f"{candidate.get('split_hash')}: not comparable, the champion stays (re-evaluate it on this split "
                "to promote)",
                current,
            )
        if not acc > current["test_accuracy"] + margin:  # beating means strictly better, by the margin
            return ChampionDecision(
                False,
                f"test accuracy {acc:.4f} does not beat the champion's {current['test_accuracy']:.4f} by the margin "
                f"{margin:.4f}",
                current,
            )
    new = {**candidate, "promoted": datetime.now(UTC).isoformat(timespec="seconds")}
    store.put_text(CHAMPION, json.dumps(new, indent=2), overwrite=True)  # an atomic replace on both backends
    before = f"{current['model']} of run {current['run_id']}" if current else "none"
    return ChampionDecision(True, f"promoted {candidate['model']} of run {candidate['run_id']} (was {before})", new)
