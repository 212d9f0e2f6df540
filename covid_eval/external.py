"""External evaluation: score a published model on someone else's labelled X-rays (no Prefect).

    resolve model -> ingest the set -> validate -> dedupe against training -> score -> write

* **The model** (:func:`resolve_model`): ``champion`` (the store's ``champion.json``),
  ``<run id>/<model>`` (that run's ``run.json`` record of the model) or a model slot URI, which
  must be complete (``metrics.json`` and ``model.keras``).
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
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covid_data.labels import CLASSES
from covid_data.split import SplitConfig
from covid_data.store import Store, Unit, open_store

log = logging.getLogger(__name__)

MARKER = "evaluation.json"
PROFILE = "external"
DEFAULT_NEAR_DUP_DISTANCE = SplitConfig.near_dup_distance  # the project's near-duplicate distance (bits)
SEEN_SPLITS = ("train", "val")  # what the model learnt from (val: early stopping, best epoch)
_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
_RUN_REF = re.compile(r"[^/:]+/[^/:]+")
COVID = CLASSES.index("COVID")
HEADLINE = ("accuracy", "macro_f1", "covid_sensitivity", "covid_specificity")


class EvaluationError(ValueError):
    """The model or the set cannot be evaluated; the message names what is missing."""


# -- the model -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """A complete model slot, and what its ``metrics.json`` says about it."""

    reference: str  # what the caller asked for
    uri: str  # the slot
    key: str  # <split hash>/<slot name>
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
        from covid_registry.model_card import describe_weights

        parts = self.split_uri.rstrip("/").split("/")
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
            "split_hash": parts[-2] if len(parts) >= 4 else None,
            "dataset_version": parts[-4] if len(parts) >= 4 and parts[-3] == "splits" else None,
            "max_per_class": self.config.get("max_per_class"),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _slot(uri: str, what: str) -> ModelRef:
    """The complete slot at ``uri`` (``what`` says how it was named, for the errors)."""
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
    split_parts = str(cfg["split"]).rstrip("/").split("/")
    split_hash = split_parts[-2] if len(split_parts) >= 2 else "nosplit"
    return ModelRef(
        reference=what,
        uri=slot.uri,
        key=f"{split_hash}/{slot.uri.rstrip('/').rsplit('/', 1)[-1]}",
        model=str(cfg.get("model") or doc.get("result", {}).get("model")),
        run_id=None,
        config=cfg,
        weights=doc.get("weights"),
        test_metrics=(doc.get("metrics") or {}).get("test"),
    )


def resolve_model(reference: str, store: str) -> ModelRef:
    """``champion``, ``<run id>/<model>`` or a model slot URI -> the complete slot it names."""
    from covid_registry.champion import current
    from covid_registry.run_folder import run_unit

    ref = str(reference).strip()
    st = open_store(store)
    if ref == "champion":
        rec = current(st)
        if rec is None:
            raise EvaluationError(
                f"the store {st.uri} has no champion (no champion.json): name the model as <run id>/<model> "
                "or by its model slot URI"
            )
        if not rec.get("model_uri"):
            raise EvaluationError(f"{st.uri_for('champion.json')} names no model_uri")
        found = _slot(rec["model_uri"], f"the champion of {st.uri}")
        return ModelRef(**{**found.to_dict(), "reference": ref, "run_id": rec.get("run_id")})
    run_hint = ""
    if _RUN_REF.fullmatch(ref):
        run_id, name = ref.split("/")
        unit = run_unit(st.uri, run_id)
        rec = unit.record()
        if rec is not None:
            records = [r for r in rec.get("records") or [] if r.get("model") == name]
            if not records:
                have = sorted({str(r.get("model")) for r in rec.get("records") or []})
                raise EvaluationError(f"run {run_id} in {st.uri} has no model {name!r}; its models: {have}")
            r = records[0]
            if r.get("status") not in ("trained", "cached") or not r.get("out"):
                raise EvaluationError(
                    f"model {name} of run {run_id} has no trained model (status {r.get('status')!r}: "
                    f"{r.get('reason') or r.get('error') or 'no slot'})"
                )
            found = _slot(r["out"], f"model {name} of run {run_id}")
            return ModelRef(**{**found.to_dict(), "reference": ref, "run_id": run_id})
        if st.list(f"runs/{run_id}/"):
            raise EvaluationError(f"run {run_id} in {st.uri} is incomplete (no runs/{run_id}/run.json)")
        run_hint = f"not a run of {st.uri} (no runs/{run_id}/run.json) and "
    try:
        slot_store = open_store(ref)
        exists = bool(slot_store.exists("metrics.json") or slot_store.list())
    except (ValueError, OSError):
        exists = False
    if not exists:
        raise EvaluationError(
            f"unknown model reference {ref!r}: not 'champion', {run_hint}not a model slot "
            "(no metrics.json there); use champion, <run id>/<model> or a model slot URI"
        )
    return _slot(ref, f"model {ref}")


# -- the set ---------------------------------------------------------------------------------------
def ingest(source: str, store: str, *, cache_dir: str | None = None, kaggle_credentials=None) -> dict[str, Any]:
    """Publish the set as a dataset version of ``store`` (the data half's fetch and publish)."""
    from covid_data.dataset import fetch_dataset

    ref = fetch_dataset(
        source, store, cache_dir=Path(cache_dir) if cache_dir else None, kaggle_credentials=kaggle_credentials
    )
    return ref.to_dict()


def validate_external(store: str, version: str) -> dict[str, Any]:
    """The ``external`` profile over the version's manifest: the result and summary go beside the
    version's other validations; a critical failure raises. Missing classes, unknown class folders
    and undecodable files are reported, not errors."""
    from covid_data.dataset import load_manifest
    from covid_data.validation import DataValidationError, get_profile, validate_manifest

    st = open_store(store)
    manifest = load_manifest(st, version)
    cfg = get_profile(PROFILE)
    report = validate_manifest(manifest, cfg)
    prefix = f"datasets/{version}/validation/{PROFILE}-{cfg.fingerprint()}"
    where = st.uri_for(f"datasets/{version}")
    summary = report.summary_markdown(where)
    # Derived and re-derivable, as prepare-data's validations: replacing one never touches the data.
    st.put_text(f"{prefix}/result.json", report.to_json(), overwrite=True)
    st.put_text(f"{prefix}/summary.md", summary, overwrite=True)
    if not report.success:
        raise DataValidationError(report.failure_message(where) + f"\nfull report: {st.uri_for(prefix)}")
    labels = manifest["label"].astype(str)
    counts = {c: int((labels == c).sum()) for c in CLASSES}
    unknown = manifest[~labels.isin(CLASSES)]
    bad = manifest[manifest["error"].notna() & labels.isin(CLASSES)]
    return {
        "version": version,
        "result_uri": st.uri_for(f"{prefix}/result.json"),
        "n_images": len(manifest),
        "class_counts": counts,
        "missing_classes": [c for c in CLASSES if counts[c] == 0],
        "unknown_classes": {str(k): int(v) for k, v in unknown["label"].value_counts().sort_index().items()},
        "undecodable": [{"path": str(p), "error": str(e)} for p, e in zip(bad["path"], bad["error"], strict=True)],
        "warnings": [f"{f.description}: {f.observed}" for f in report.warnings],
    }


def usable_rows(store: str, version: str) -> pd.DataFrame:
    """Rows that can be scored: one of the four classes, and the file decodes."""
    from covid_data.dataset import load_manifest

    m = load_manifest(open_store(store), version)
    keep = m["label"].astype(str).isin(CLASSES) & m["error"].isna()
    return m.loc[keep, ["path", "label", "sha256", "phash"]].reset_index(drop=True)


# -- duplicates of the training images -------------------------------------------------------------
def training_images(split_uri: str) -> pd.DataFrame:
    """Every image of the model's split (path, label, sha256, phash, split), from the split table
    and its dataset's manifest."""
    from covid_data.manifest import read_parquet_bytes
    from covid_data.split import load_split
    from covid_data.store import read_object, split_object_uri

    try:
        table = load_split(split_uri)
        split_store, _ = split_object_uri(split_uri)  # .../datasets/<v>/splits/<hash>/split.parquet
        dataset_uri = split_store.uri.rsplit("/splits/", 1)[0]
        manifest = read_parquet_bytes(read_object(f"{dataset_uri}/manifest.parquet"))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise EvaluationError(
            f"cannot read the split the model was trained on ({split_uri}), needed to find its training images "
            f"among the set: {type(e).__name__}: {e}"
        ) from e
    table = table[["path", "label", "sha256", "split"]].merge(manifest[["path", "phash"]], on="path", how="left")
    return table.assign(rank=table["split"].map(_SPLIT_ORDER).fillna(9)).sort_values(["rank", "path"])


DUPLICATE_COLUMNS = ["path", "label", "kind", "distance", "seen_in", "match_path", "match_label", "excluded"]


def find_duplicates(
    rows: pd.DataFrame, seen: pd.DataFrame, distance: int = DEFAULT_NEAR_DUP_DISTANCE, *, exclude: bool = True
) -> pd.DataFrame:
    """One row per image of ``rows`` that is an exact (sha256) or near (pHash within ``distance``
    bits; 0: exact only) copy of an image of ``seen`` (:func:`training_images`). The best match
    is kept: exact before near, then the smaller distance, then train, val, test. Matches in the
    train and val splits are ``excluded`` when ``exclude``."""
    if not 0 <= distance <= 64:
        raise EvaluationError(f"near_dup_distance must be 0..64 bits, got {distance}")
    out: list[dict[str, Any]] = []
    first = seen.drop_duplicates("sha256")  # seen is in train, val, test order
    by_sha = first.set_index("sha256")
    exact = rows["sha256"].isin(by_sha.index).to_numpy()
    for i in np.flatnonzero(exact):
        m = by_sha.loc[rows["sha256"].iloc[i]]
        out.append({"idx": i, "kind": "exact", "distance": 0, "seen_in": m["split"], "match_path": m["path"], "ml": m})
    if distance > 0:
        with_hash = seen[seen["phash"].notna()]
        ref = np.array([int(h, 16) for h in with_hash["phash"]], dtype=np.uint64)
        ranks = with_hash["rank"].to_numpy(dtype=np.int64)
        todo = np.flatnonzero(~exact & rows["phash"].notna().to_numpy())
        if len(ref) and len(todo):
            mine = np.array([int(h, 16) for h in rows["phash"].iloc[todo]], dtype=np.uint64)
            for start in range(0, len(mine), 256):
                block = mine[start : start + 256]
                d = np.bitwise_count(block[:, None] ^ ref[None, :]).astype(np.int64)
                score = np.where(d <= distance, d * 16 + ranks[None, :], np.iinfo(np.int64).max)
                best = score.argmin(axis=1)
                for j, b in enumerate(best):
                    if score[j, b] == np.iinfo(np.int64).max:
                        continue
                    m = with_hash.iloc[b]
                    out.append(
                        {
                            "idx": todo[start + j],
                            "kind": "near",
                            "distance": int(d[j, b]),
                            "seen_in": m["split"],
                            "match_path": m["path"],
                            "ml": m,
                        }
                    )
    records = [
        {
            "path": rows["path"].iloc[o["idx"]],
            "label": rows["label"].iloc[o["idx"]],
            "kind": o["kind"],
            "distance": o["distance"],
            "seen_in": o["seen_in"],
            "match_path": o["match_path"],
            "match_label": o["ml"]["label"],
            "excluded": bool(exclude and o["seen_in"] in SEEN_SPLITS),
        }
        for o in out
    ]
    return pd.DataFrame(records, columns=DUPLICATE_COLUMNS).sort_values("path", kind="stable").reset_index(drop=True)


def duplicates_summary(dups: pd.DataFrame, distance: int, include_duplicates: bool) -> dict[str, Any]:
    def count(kind: str) -> dict[str, int]:
        d = dups[dups["kind"] == kind]
        return {s: int((d["seen_in"] == s).sum()) for s in _SPLIT_ORDER}

    seen = dups[dups["seen_in"].isin(SEEN_SPLITS)]
    return {
        "near_dup_distance": int(distance),
        "exact": count("exact"),
        "near": count("near"),
        "seen_in_training": len(seen),  # train or val
        "excluded": int(dups["excluded"].sum()),
        "included": bool(include_duplicates),
        "label_disagreements": int((dups["label"] != dups["match_label"]).sum()),
        "csv": "duplicates.csv",
    }


# -- scoring ---------------------------------------------------------------------------------------
def local_images(store: str, version: str, paths: list[str], cache_dir: str | None = None) -> list[str]:
    """Local files of a dataset version's images (staged once from ``gs://`` into the cache)."""
    from concurrent.futures import ThreadPoolExecutor

    from covid_data.dataset import default_cache_dir

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
    from covid_models.data import make_dataset
    from covid_models.train import load_trained_model

    size, channels = int(model.config["input_size"]), int(model.config["channels"])
    try:
        keras_model = load_trained_model(open_store(model.uri).uri_for("model.keras"))
    except Exception as e:
        raise EvaluationError(f"cannot load the model stored at {model.uri}: {type(e).__name__}: {e}") from e
    ds = make_dataset(files, np.zeros(len(files), dtype="int32"), size=size, channels=channels, batch_size=batch_size)
    return np.asarray(keras_model.predict(ds, verbose=0), dtype="float64")


# -- metrics and the comparison --------------------------------------------------------------------
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
    from covid_models.metrics import classification_metrics, wilson_interval

    y = np.asarray(y, dtype="int64")
    if not len(y):
        raise EvaluationError("no image of the set is left to score")
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


def _newcombe(p1: float, ci1: list[float], p2: float, ci2: list[float]) -> list[float]:
    """Newcombe's hybrid score interval for the difference of two independent proportions."""
    (l1, u1), (l2, u2) = ci1, ci2
    d = p1 - p2
    return [max(-1.0, d - math.hypot(p1 - l1, u2 - p2)), min(1.0, d + math.hypot(u1 - p1, p2 - l2))]


def compare_to_test(ext: dict[str, Any], test: dict[str, Any] | None) -> dict[str, Any]:
    """Each headline figure on the set and on the model's own test split, with both 95% intervals,
    and the change (set minus test) with its interval. Macro-F1 is compared over the classes the
    set has, on both sides (from the test split's confusion matrix)."""
    from covid_models.metrics import wilson_interval

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
            "delta_ci95": _newcombe(e, eci, t, tci) if both else None,
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


# -- the stored evaluation -------------------------------------------------------------------------
def evaluation_prefix(
    model_key: str,
    version: str,
    *,
    include_duplicates: bool = False,
    near_dup_distance: int = DEFAULT_NEAR_DUP_DISTANCE,
) -> str:
    tags = (["with-duplicates"] if include_duplicates else []) + (
        [f"d{near_dup_distance}"] if near_dup_distance != DEFAULT_NEAR_DUP_DISTANCE else []
    )
    return f"evaluations/{model_key}/{version}" + "".join(f"-{t}" for t in tags)


def evaluation_unit(store: str | Store, prefix: str) -> Unit:
    st = store if isinstance(store, Store) else open_store(store)
    return st.unit(prefix, marker=MARKER)


def _clean(v: Any) -> Any:
    """JSON-safe: NaN -> None, numpy scalars and tuples to plain values."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
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
    from covid_models.metrics import plot_confusion

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
    record = _clean(
        {
            "kind": "external-evaluation",
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
    unit.put_text("duplicates.csv", _csv(duplicates))
    unit.put_text("predictions.csv", _csv(pred))
    unit.put_text("report.md", report)
    if not unit.complete(record):
        log.info("another attempt completed %s first; its evaluation stands", unit.uri)
    return unit.record() or record


def _csv(df: pd.DataFrame) -> str:
    buf = io.StringIO()
    df.to_csv(buf, index=False, quoting=csv.QUOTE_MINIMAL)
    return buf.getvalue()


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
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """(duplicates, scored rows, probabilities) of the set's usable images."""
    rows = usable_rows(store, version)
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
    model_uri: str,
    source: str,
    store: str,
    *,
    include_duplicates: bool = False,
    near_dup_distance: int = DEFAULT_NEAR_DUP_DISTANCE,
    cache_dir: str | None = None,
    kaggle_credentials=None,
) -> dict[str, Any]:
    """Score the model (``champion``, ``<run id>/<model>`` or a slot URI) on the labelled set at
    ``source``; returns :func:`summary` of the stored evaluation (computed once, then reused)."""
    model = resolve_model(model_uri, store)
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
