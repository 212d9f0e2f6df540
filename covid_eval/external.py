"""External evaluation: score a published model on someone else's labelled X-rays (no Prefect).

    resolve model -> ingest the set -> validate -> dedupe against training -> score -> write

* **The model** (:class:`ModelRef`): a complete model slot (``metrics.json`` and ``model.keras``);
  ``covid_registry.references.resolve_model`` turns ``champion`` or ``<run id>/<model>`` into one.
* **The set** is published like any dataset (:func:`covid_data.dataset.fetch_dataset`): the
  Kaggle or the flat layout, with the class-folder name variants of ``prepare-data``, as a
  content-addressed version in the same store. It is validated with the ``external`` profile: a
  class with no images is allowed and reported; images of unknown class folders and undecodable
  files are reported and left out.
* **Duplicates**: an image whose sha256 equals, or whose pHash is within ``near_dup_distance``
  bits of, an image of the model's own train or validation split has been seen in training; such
  images are listed (``duplicates.csv``) and, by default, not scored. Matches with the model's
  test split are listed too (they stay in).
* **Scores**: the images go through the pipeline's reader (``decode_resize``) at the model's
  input size; the metrics are :func:`covid_models.metrics.classification_metrics` with 95%
  intervals, and each headline figure is set against the model's own test figure.

Output: a stored unit ``evaluations/<model key>/<dataset version>/`` (``confusion.png``,
``duplicates.csv``, ``predictions.csv``, ``report.md``), completed by ``evaluation.json``, written
last. ``<model key>`` is ``<split hash>/<slot name>``: it mirrors the slot's place,
``models/<split hash>/<model>-<key>/`` (the slot name alone repeats across splits, since the slot
key leaves the split out). Settings other than the defaults get a sibling folder
(``<dataset version>-with-duplicates``, ``-d<bits>``). A complete evaluation is returned as it is
and never recomputed; an incomplete one is replaced.

A *negative* set (X-rays known not to be COVID, in finding folders) is scored by
``covid_eval.negative`` with the pieces here; its unit is ``<dataset version>-negative``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covid_data.dataset import default_cache_dir, fetch_dataset, load_manifest
from covid_data.labels import CLASSES, NEGATIVE_LABEL
from covid_data.split import SplitRef
from covid_data.store import Store, Unit, as_store, open_store
from covid_data.validation import DataValidationError, get_profile, validate_manifest
from covid_eval.duplicates import (
    DEFAULT_NEAR_DUP_DISTANCE,
    EvaluationError,
    duplicates_summary,
    find_duplicates,
    training_images,
)
from covid_eval.external_metrics import compare_to_test, external_metrics
from covid_eval.external_report import MARKER, clean_json, report_markdown
from covid_eval.external_report import summary as labelled_summary
from covid_eval.negative_report import external_set, negative_summary
from covid_models.describe import describe_weights
from covid_models.metrics import plot_confusion
from covid_models.stored import ModelLoadError, StoredModel

log = logging.getLogger(__name__)

PROFILE = "external"


# -- the model -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """A complete model slot, and what its ``metrics.json`` says about it."""

    reference: str  # what the caller asked for
    uri: str  # the slot
    key: str  # <split hash>/<slot name>-<digest of its figures and settings>
    model: str
    run_id: str | None
    config: dict[str, Any]
    weights: dict[str, Any] | None
    test_metrics: dict[str, Any] | None

    @property
    def split_uri(self) -> str:
        return self.config["split"]

    def identity(self) -> dict[str, Any]:
        """The model as the evaluation record names it."""
        try:
            _, version, split_hash = SplitRef.locate(self.split_uri)
        except ValueError:
            version = split_hash = None
        return {
            "reference": self.reference,
            "uri": self.uri,
            "key": self.key,
            "model": self.model,
            "run_id": self.run_id,
            "input_size": int(self.config["input_size"]),
            "channels": int(self.config["channels"]),
            "weights": self.weights,
            "trained": describe_weights(self.model, self.config, self.weights),
            "split": self.split_uri,
            "split_hash": split_hash,
            "dataset_version": version,
            "max_per_class": self.config.get("max_per_class"),
        }

    @property
    def stored(self) -> StoredModel:
        return StoredModel(self.uri)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_ref(uri: str, what: str | None = None) -> ModelRef:
    """The complete slot at ``uri`` (``what`` says how it was named, for the errors)."""
    what = what or f"model {uri}"
    try:
        slot = open_store(uri)
    except ValueError as e:
        raise EvaluationError(f"{what}: {e}") from None
    if not slot.exists("metrics.json"):
        present = "it is empty or absent" if not slot.list() else "it is incomplete (an interrupted training?)"
        raise EvaluationError(f"{what}: {slot.uri} is not a complete model slot: no metrics.json ({present})")
    if not slot.exists("model.keras"):
        raise EvaluationError(f"{what}: the model slot {slot.uri} has metrics.json but no model.keras")
    doc = json.loads(slot.read_text("metrics.json"))
    cfg = doc.get("config") or {}
    if not cfg.get("split") or not cfg.get("input_size"):
        raise EvaluationError(f"{what}: {slot.uri}/metrics.json names no training split or input size")
    try:
        split_hash = SplitRef.locate(cfg["split"])[2]
    except ValueError:
        split_hash = "nosplit"
    # The slot's name, and a digest of the model's own figures and settings (not its timings or paths): two
    # slots of one name (".../model" folders a user trained by hand) are different models and never share an
    # evaluation, while one model stored twice, trained deterministically, gets the same key.
    where = ("out", "split", "cache_dir", "verbose")
    identity = {"metrics": doc.get("metrics"), "config": {k: v for k, v in cfg.items() if k not in where}}
    marker = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return ModelRef(
        reference=what,
        uri=slot.uri,
        key=f"{split_hash}/{slot.uri.rstrip('/').rsplit('/', 1)[-1]}-{marker}",
        model=str(cfg.get("model") or doc.get("result", {}).get("model")),
        run_id=None,
        config=cfg,
        weights=doc.get("weights"),
        test_metrics=(doc.get("metrics") or {}).get("test"),
    )


# -- the set ---------------------------------------------------------------------------------------
def ingest(source: str, store: str, *, cache_dir: str | None = None, kaggle_credentials=None) -> dict[str, Any]:
    """Publish the set as a dataset version of ``store`` (the data half's fetch and publish)."""
    ref = fetch_dataset(
        source, store, cache_dir=Path(cache_dir) if cache_dir else None, kaggle_credentials=kaggle_credentials
    )
    return ref.to_dict()


def stored_validation(store: str, version: str, profile: str) -> tuple[pd.DataFrame, Any, str]:
    """(manifest, report, result URI) of ``profile`` over the version's manifest: the result and
    summary go beside the version's other validations; a critical failure raises."""
    st = open_store(store)
    manifest = load_manifest(st, version)
    cfg = get_profile(profile)
    report = validate_manifest(manifest, cfg)
    prefix = f"datasets/{version}/validation/{profile}-{cfg.fingerprint()}"
    where = st.uri_for(f"datasets/{version}")
    # Derived and re-derivable, as prepare-data's validations: replacing one never touches the data.
    st.put_text(f"{prefix}/result.json", report.to_json(), overwrite=True)
    st.put_text(f"{prefix}/summary.md", report.summary_markdown(where), overwrite=True)
    if not report.success:
        raise DataValidationError(report.failure_message(where) + f"\nfull report: {st.uri_for(prefix)}")
    return manifest, report, st.uri_for(f"{prefix}/result.json")


def validate_external(store: str, version: str) -> dict[str, Any]:
    """The ``external`` profile over the version's manifest (:func:`stored_validation`). Missing
    classes, unknown class folders and undecodable files are reported, not errors."""
    manifest, report, result_uri = stored_validation(store, version, PROFILE)
    labels = manifest["label"].astype(str)
    counts = {c: int((labels == c).sum()) for c in CLASSES}
    unknown = manifest[~labels.isin(CLASSES)]
    bad = manifest[manifest["error"].notna() & labels.isin(CLASSES)]
    return {
        "version": version,
        "result_uri": result_uri,
        "n_images": len(manifest),
        "class_counts": counts,
        "missing_classes": [c for c in CLASSES if counts[c] == 0],
        "unknown_classes": {str(k): int(v) for k, v in unknown["label"].value_counts().sort_index().items()},
        "undecodable": [{"path": str(p), "error": str(e)} for p, e in zip(bad["path"], bad["error"], strict=True)],
        "warnings": [f"{f.description}: {f.observed}" for f in report.warnings],
    }


def usable_rows(store: str, version: str, *, negative: bool = False) -> pd.DataFrame:
    """Rows that can be scored: one of the four classes (``negative``: any finding folder of a
    negative set, with its ``finding``), and the file decodes."""
    m = load_manifest(open_store(store), version)
    if negative:
        keep = (m["label"].astype(str) == NEGATIVE_LABEL) & m["error"].isna()
        return m.loc[keep, ["path", "label", "sha256", "phash", "finding"]].reset_index(drop=True)
    keep = m["label"].astype(str).isin(CLASSES) & m["error"].isna()
    return m.loc[keep, ["path", "label", "sha256", "phash"]].reset_index(drop=True)


# -- scoring ---------------------------------------------------------------------------------------
def local_images(store: str, version: str, paths: list[str], cache_dir: str | None = None) -> list[str]:
    """Local files of a dataset version's images (staged once from ``gs://`` into the cache)."""
    dataset = open_store(store).child(f"datasets/{version}")
    root = dataset.local_path("")
    if root is None:
        root = (Path(cache_dir) if cache_dir else default_cache_dir()) / "images" / version
        missing = [p for p in paths if not (root / p).is_file()]
        if missing:
            log.info("staging %d images from %s into %s", len(missing), dataset.uri, root)
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda p: dataset.get_file(p, root / p), missing))
    return [str(Path(root) / p) for p in paths]


def predict(model: ModelRef, files: list[str], *, batch_size: int = 32) -> np.ndarray:
    """Class probabilities, the images read as in training (decode, convert, resize)."""
    try:
        return model.stored.predict_files(files, batch_size=batch_size)
    except ModelLoadError as e:
        raise EvaluationError(str(e)) from e


# -- the stored evaluation -------------------------------------------------------------------------
def evaluation_prefix(
    model_key: str,
    version: str,
    *,
    include_duplicates: bool = False,
    near_dup_distance: int = DEFAULT_NEAR_DUP_DISTANCE,
    negative: bool = False,
) -> str:
    # A negative set's version already differs from the same folder's labelled one (its label is
    # hashed in); the tag also says so in the key, so the two evaluations can never share a unit.
    tags = (
        (["negative"] if negative else [])
        + (["with-duplicates"] if include_duplicates else [])
        + ([f"d{near_dup_distance}"] if near_dup_distance != DEFAULT_NEAR_DUP_DISTANCE else [])
    )
    return f"evaluations/{model_key}/{version}" + "".join(f"-{t}" for t in tags)


def evaluation_unit(store: str | Store, prefix: str) -> Unit:
    return as_store(store).unit(prefix, marker=MARKER)


def existing(store: str, model: ModelRef, version: str, **settings: Any) -> dict[str, Any] | None:
    """The complete evaluation of ``model`` on ``version`` with these settings, if there is one."""
    return evaluation_unit(store, evaluation_prefix(model.key, version, **settings)).record()


def write_evaluation(
    store: str,
    model: ModelRef,
    dataset: dict[str, Any],
    validation: dict[str, Any],
    duplicates: pd.DataFrame,
    scored: pd.DataFrame,
    probs: np.ndarray,
    *,
    include_duplicates: bool = False,
    near_dup_distance: int = DEFAULT_NEAR_DUP_DISTANCE,
) -> dict[str, Any]:
    """Metrics, comparison, plots and the report into the evaluation's unit, ``evaluation.json``
    last. A unit that is already complete is returned as it is."""
    version = dataset["version"]
    unit = evaluation_unit(
        store,
        evaluation_prefix(
            model.key, version, include_duplicates=include_duplicates, near_dup_distance=near_dup_distance
        ),
    )
    done = unit.record()
    if done is not None:
        return done
    if unit.store.list(unit.prefix + "/"):
        log.info("replacing the interrupted evaluation at %s", unit.uri)
    y = scored["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy(dtype="int64")
    metrics = external_metrics(probs, y)
    comparison = compare_to_test(metrics, model.test_metrics)
    if model.config.get("max_per_class"):  # a quick run's test set is capped: its figures are rough
        comparison["test_capped_per_class"] = int(model.config["max_per_class"])
    dups = duplicates_summary(duplicates, near_dup_distance, include_duplicates)
    counts = {
        "images": int(validation["n_images"]),
        "undecodable": len(validation["undecodable"]),
        "unknown_class": int(sum(validation["unknown_classes"].values())),
        "duplicates_excluded": dups["excluded"],
        "scored": len(scored),
        "scored_per_class": {c: int((scored["label"] == c).sum()) for c in CLASSES},
    }
    record = clean_json(
        {
            "kind": "external-evaluation",
            "set_kind": "labelled",
            "uri": unit.uri,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": model.identity(),
            "dataset": {
                "source": dataset.get("source"),
                "version": version,
                "uri": dataset.get("uri"),
                "manifest_uri": dataset.get("manifest_uri"),
                "class_counts": validation["class_counts"],
                "unknown_classes": validation["unknown_classes"],
                "undecodable": validation["undecodable"][:100],
                "validation": validation["result_uri"],
                "validation_warnings": validation.get("warnings", []),
            },
            "settings": {"include_duplicates": include_duplicates, "near_dup_distance": near_dup_distance},
            "missing_classes": validation["missing_classes"],  # no image in the set
            "unscored_classes": metrics["missing_classes"],  # none scored (absent, or every one seen in training)
            "counts": counts,
            "duplicates": dups,
            "metrics": metrics,
            "test_metrics": {
                k: (model.test_metrics or {}).get(k)
                for k in ("n", "accuracy", "macro_f1", "covid_sensitivity", "covid_specificity")
            }
            if model.test_metrics
            else None,
            "comparison": comparison,
            "files": {
                "confusion": "confusion.png",
                "duplicates": "duplicates.csv",
                "predictions": "predictions.csv",
                "report": "report.md",
            },
        }
    )
    report = report_markdown(record)
    pred = scored[["path", "label"]].assign(predicted=[CLASSES[i] for i in np.asarray(probs).argmax(axis=1)])
    for i, c in enumerate(CLASSES):
        pred[f"p_{c}"] = np.round(np.asarray(probs)[:, i], 6)
    with tempfile.TemporaryDirectory(prefix="covid-eval-") as tmp:
        png = plot_confusion(
            metrics["confusion_matrix"], f"{model.model} on {version} (n={metrics['n']})", Path(tmp) / "confusion.png"
        )
        unit.put_file("confusion.png", png)
    unit.put_text("duplicates.csv", csv_text(duplicates))
    unit.put_text("predictions.csv", csv_text(pred))
    unit.put_text("report.md", report)
    if not unit.complete(record):
        log.info("another attempt completed %s first; its evaluation stands", unit.uri)
    return unit.record() or record


def csv_text(df: pd.DataFrame) -> str:
    buf = io.StringIO()
    df.to_csv(buf, index=False, quoting=csv.QUOTE_MINIMAL)
    return buf.getvalue()


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """The small record of an evaluation of either kind (records written before negative sets
    existed are labelled ones)."""
    if record.get("set_kind") == "negative":
        return negative_summary(record)
    named = external_set(record["dataset"].get("source") or "")
    return {**labelled_summary(record), "set_kind": "labelled", "name": named["name"], "about": named["about"]}


def read_report(record: dict[str, Any]) -> str:
    """``report.md`` of a complete evaluation."""
    st = open_store(record["uri"])
    return st.read_text("report.md")


# -- one call --------------------------------------------------------------------------------------
def score_set(
    store: str,
    model: ModelRef,
    version: str,
    *,
    include_duplicates: bool = False,
    near_dup_distance: int = DEFAULT_NEAR_DUP_DISTANCE,
    cache_dir: str | None = None,
    negative: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """(duplicates, scored rows, probabilities) of the set's usable images (``negative``: of a
    negative set, every finding folder's)."""
    rows = usable_rows(store, version, negative=negative)
    if rows.empty:
        raise EvaluationError(
            f"dataset {version} in {open_store(store).uri} has no image that can be scored "
            "(each is undecodable or in an unknown class folder)"
        )
    dups = find_duplicates(rows, training_images(model.split_uri), near_dup_distance, exclude=not include_duplicates)
    scored = rows[~rows["path"].isin(dups.loc[dups["excluded"], "path"])].reset_index(drop=True)
    if scored.empty:
        raise EvaluationError(
            f"every image of dataset {version} was seen in the model's training ({len(dups)} duplicates); "
            "nothing is left to score (include_duplicates scores them anyway)"
        )
    probs = predict(model, local_images(store, version, scored["path"].tolist(), cache_dir))
    return dups, scored, probs


def evaluate_external(
    model: ModelRef | str,
    source: str,
    store: str,
    *,
    include_duplicates: bool = False,
    near_dup_distance: int = DEFAULT_NEAR_DUP_DISTANCE,
    cache_dir: str | None = None,
    kaggle_credentials=None,
) -> dict[str, Any]:
    """Score the model (a :class:`ModelRef`, or a slot URI) on the labelled set at ``source``;
    returns :func:`summary` of the stored evaluation (computed once, then reused)."""
    if not isinstance(model, ModelRef):
        model = model_ref(model)
    dataset = ingest(source, store, cache_dir=cache_dir, kaggle_credentials=kaggle_credentials)
    settings = {"include_duplicates": include_duplicates, "near_dup_distance": near_dup_distance}
    done = existing(store, model, dataset["version"], **settings)
    if done is not None:
        log.info("%s is already evaluated on %s: %s", model.key, dataset["version"], done["uri"])
        return summary(done)
    validation = validate_external(store, dataset["version"])
    dups, scored, probs = score_set(store, model, dataset["version"], cache_dir=cache_dir, **settings)
    record = write_evaluation(store, model, dataset, validation, dups, scored, probs, **settings)
    return summary(record)
