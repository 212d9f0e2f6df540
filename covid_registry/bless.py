"""Blessing a challenger: TFX Evaluator-style re-evaluation before a model may become champion.

A stored test accuracy is a claim about one split. Two models are only comparable when they are
scored on the same images, so the current champion's stored model is re-scored on the
challenger's test split, images the champion was trained on are left out, and both models are
compared image by image. The rules, in order (each decision carries a reason and a rule code):

1. the run must have fully succeeded (``run_failed``);
2. a capped run (``max_per_class`` set, as the smoke preset does) is never comparable with an
   uncapped one and never becomes a store's champion (``capped``);
3. a run without a test split (the paper's 80/20/0) cannot promote (``no_test_split``);
4. the challenger's COVID sensitivity on its test split must reach the floor (``sensitivity_floor``);
5. a candidate that already is the champion is kept (``already_champion``: a rerun after a crash);
6. with no champion, the challenger is blessed (``first_champion``);
7. otherwise the challenger must beat the re-scored champion on the same images by more than the
   margin (``beats_champion`` / ``does_not_beat``); with ``require_significance`` McNemar's exact
   test on the discordant images must also give p < ``alpha`` (``not_significant``). A champion
   whose stored model or split cannot be read is never replaced silently
   (``champion_unreadable``; ``challenger_unreadable`` when it is the challenger's model or split
   that fails), and a comparison with no images left after excluding the champion's training
   images promotes nothing (``no_common_images``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covid_data.dataset import default_cache_dir
from covid_data.split import load_split
from covid_data.store import open_store
from covid_models.data import load_split_data
from covid_models.metrics import classification_metrics
from covid_models.stored import MARKER as METRICS_FILE
from covid_models.stored import StoredModel


class ScoringError(RuntimeError):
    """A stored model or split could not be read or scored."""


class ChallengerScoringError(ScoringError):
    """The challenger itself could not be scored on its own test split."""


@dataclass
class Scores:
    """One model's predictions on one split, image by image (rows in the split's order)."""

    model_uri: str
    split_uri: str
    split: str
    paths: list[str]
    sha256: list[str]
    labels: np.ndarray  # int class indices (covid_data.labels.CLASSES order)
    probabilities: np.ndarray  # (n, classes)
    metrics: dict[str, Any]  # classification_metrics on these rows

    @property
    def correct(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1) == self.labels

    def subset(self, keep: np.ndarray) -> Scores:
        """The same scores restricted to the rows where ``keep`` is true (metrics recomputed)."""

        keep = np.asarray(keep, dtype=bool)
        probs, labels = self.probabilities[keep], self.labels[keep]
        return Scores(
            model_uri=self.model_uri,
            split_uri=self.split_uri,
            split=self.split,
            paths=[p for p, k in zip(self.paths, keep, strict=True) if k],
            sha256=[s for s, k in zip(self.sha256, keep, strict=True) if k],
            labels=labels,
            probabilities=probs,
            metrics=classification_metrics(probs, labels) if len(labels) else {"n": 0},
        )


def read_slot_metrics(model_uri: str) -> dict[str, Any]:
    """``metrics.json`` of a model slot (its config, result and per-split metrics)."""
    return json.loads(open_store(model_uri).read_text(METRICS_FILE))


def slot_complete(model_uri: str | None) -> bool:
    """A model slot is usable when both its model and its metrics (written last) are there."""
    if not model_uri:
        return False
    try:
        return StoredModel(model_uri).complete
    except (OSError, ValueError):
        return False


def score_model(
    model_uri: str,
    split_uri: str,
    *,
    split: str = "test",
    max_per_class: int | None = None,
    cache_dir: str | Path | None = None,
) -> Scores:
    """Predict one stored model slot on one split of ``split_uri``.

    The slot's ``metrics.json`` says at which size and with how many channels the model was
    trained; the images go through the same tf.data pipeline as in training.
    """
    model = StoredModel(model_uri)
    try:
        model.input_size, model.channels, model.keras()  # noqa: B018 (read now: a bad slot fails here)
    except Exception as e:  # a missing, truncated or foreign file: the caller decides what that means
        raise ScoringError(f"cannot load the model stored at {model_uri}: {type(e).__name__}: {e}") from e
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        data = load_split_data(split_uri, cache, max_per_class)
    except Exception as e:
        raise ScoringError(f"cannot read the split {split_uri}: {type(e).__name__}: {e}") from e
    if not data.size(split):
        raise ScoringError(f"the split {split_uri} has no {split!r} images")
    probs, frame = model.predict_split(data, split, cache_dir=cache)
    labels = frame["y"].to_numpy(dtype="int32")
    return Scores(
        model_uri=model_uri,
        split_uri=split_uri,
        split=split,
        paths=frame["path"].astype(str).tolist(),
        sha256=frame["sha256"].astype(str).tolist(),
        labels=labels,
        probabilities=probs,
        metrics=classification_metrics(probs, labels),
    )


def split_sha256(split_uri: str, split: str = "train") -> set[str]:
    """The content hashes of one split's images (all of them: caps only ever train on fewer)."""

    table = load_split(split_uri)
    return set(table.loc[table["split"] == split, "sha256"].astype(str))


def candidate_record(
    run_id: str,
    model_uri: str,
    *,
    exports: dict[str, str] | None = None,
    preset: str | None = None,
) -> dict[str, Any]:
    """A candidate/champion record built from a model slot's own ``metrics.json``."""
    doc = read_slot_metrics(model_uri)
    cfg, result = doc["config"], doc["result"]
    split_uri = cfg["split"]
    parts = split_uri.rstrip("/").split("/")
    # .../datasets/<version>/splits/<hash>/split.parquet
    split_hash = parts[-2] if len(parts) >= 2 else None
    version = parts[-4] if len(parts) >= 4 and parts[-3] == "splits" else None
    return {
        "run_id": run_id,
        "model": cfg["model"],
        "model_uri": model_uri,
        "exports": dict(exports or {}),
        "split_uri": split_uri,
        "split_hash": split_hash,
        "dataset_version": version,
        "max_per_class": cfg.get("max_per_class"),
        "preset": preset,
        "val_accuracy": result.get("val_accuracy"),
        "test_accuracy": result.get("test_accuracy"),
        "test_covid_sensitivity": result.get("test_covid_sensitivity"),
    }


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: images only model A got right and
    images only model B got right (a binomial test of ``only_a`` in ``only_a + only_b`` at 1/2)."""
    if only_a + only_b == 0:
        return 1.0
    from statsmodels.stats.contingency_tables import mcnemar  # heavy: imported where used

    return float(min(1.0, mcnemar([[0, only_a], [only_b, 0]], exact=True).pvalue))


@dataclass
class Comparison:
    """Challenger and champion scored on exactly the same test images."""

    split_uri: str  # the challenger's split; its test images
    n: int  # images compared
    excluded: int  # test images left out because the champion trained on them
    challenger: dict[str, Any]  # classification_metrics of the challenger on the compared images
    champion: dict[str, Any]  # ... and of the champion, re-scored on the same images
    margin: float
    # The headline numbers, also as fields: a plain dataclasses.asdict() of a blessing carries them.
    challenger_accuracy: float | None = None
    champion_accuracy: float | None = None
    sha256: list[str] = field(default_factory=list)  # the compared images, in order
    challenger_correct: list[bool] = field(default_factory=list)  # per image (for McNemar's test)
    champion_correct: list[bool] = field(default_factory=list)
    excluded_sha256: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What history and run reports keep: counts and headline metrics, no per-image lists."""
        a, b = np.asarray(self.challenger_correct, bool), np.asarray(self.champion_correct, bool)
        return {
            "split_uri": self.split_uri,
            "n": self.n,
            "excluded": self.excluded,
            "margin": self.margin,
            "challenger_accuracy": self.challenger.get("accuracy"),
            "champion_accuracy": self.champion.get("accuracy"),
            "challenger_covid_sensitivity": self.challenger.get("covid_sensitivity"),
            "champion_covid_sensitivity": self.champion.get("covid_sensitivity"),
            # The discordant pairs are all McNemar's test needs.
            "only_challenger_right": int((a & ~b).sum()),
            "only_champion_right": int((~a & b).sum()),
            "mcnemar_p": self.mcnemar_p,
        }

    @property
    def mcnemar_p(self) -> float:
        a, b = np.asarray(self.challenger_correct, bool), np.asarray(self.champion_correct, bool)
        return mcnemar_exact(int((a & ~b).sum()), int((~a & b).sum()))


@dataclass
class Blessing:
    blessed: bool
    reason: str
    rule: str  # a short code for the rule that decided (see the module docstring)
    champion: dict[str, Any] | None = None  # the champion.json content this blessing compared against
    comparison: Comparison | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _describe(rec: dict[str, Any]) -> str:
    return f"{rec.get('model')} of run {rec.get('run_id')}"


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def compare(
    challenger: dict[str, Any],
    champion: dict[str, Any],
    *,
    margin: float,
    cache_dir: str | Path | None = None,
) -> Comparison:
    """Score both models on the challenger's test images, minus the champion's training images.

    Raises :class:`ScoringError` when either model or split cannot be read.
    """
    try:
        chal_split = challenger.get("split_uri") or read_slot_metrics(challenger["model_uri"])["config"]["split"]
        # The challenger first: its own failure must not be blamed on the champion.
        chal = score_model(challenger["model_uri"], chal_split, split="test", cache_dir=cache_dir)
    except Exception as e:
        raise ChallengerScoringError(str(e)) from e
    champ_model = champion.get("model_uri")
    if not champ_model:
        raise ScoringError("the champion record names no model_uri")
    try:
        # A record from before split_uri existed still has its slot's training config.
        champ_split = champion.get("split_uri") or read_slot_metrics(champ_model)["config"]["split"]
        seen = split_sha256(champ_split, "train")
    except ScoringError:
        raise
    except Exception as e:
        raise ScoringError(f"cannot read the champion's training split: {type(e).__name__}: {e}") from e
    champ = score_model(champ_model, chal_split, split="test", cache_dir=cache_dir)
    if chal.sha256 != champ.sha256:  # same split, same rows: anything else is a bug upstream
        raise ScoringError(f"the two scorings of {chal_split} returned different images")
    keep = np.array([s not in seen for s in chal.sha256], dtype=bool)
    chal_k, champ_k = chal.subset(keep), champ.subset(keep)
    return Comparison(
        split_uri=chal_split,
        n=int(keep.sum()),
        excluded=int((~keep).sum()),
        challenger=chal_k.metrics,
        champion=champ_k.metrics,
        margin=margin,
        challenger_accuracy=chal_k.metrics.get("accuracy"),
        champion_accuracy=champ_k.metrics.get("accuracy"),
        sha256=chal_k.sha256,
        challenger_correct=chal_k.correct.tolist(),
        champion_correct=champ_k.correct.tolist(),
        excluded_sha256=[s for s, k in zip(chal.sha256, keep, strict=True) if not k],
    )


def _capped(candidate: dict[str, Any]) -> int | None:
    """The candidate's per-class cap, from its record or (when the record omits it) its slot."""
    if candidate.get("max_per_class") is not None:
        return candidate["max_per_class"]
    uri = candidate.get("model_uri")
    if uri and slot_complete(uri):
        # Trust the slot over a hand-built record: a capped model must not slip through.
        return read_slot_metrics(uri)["config"].get("max_per_class")
    return None


def bless(
    challenger: dict[str, Any],
    champion: dict[str, Any] | None,
    *,
    run_succeeded: bool,
    margin: float,
    covid_sensitivity_floor: float,
    cache_dir: str | Path | None = None,
    require_significance: bool = False,
    alpha: float = 0.05,
) -> Blessing:
    """Decide whether ``challenger`` may replace ``champion`` (see the module docstring)."""
    if not run_succeeded:
        return Blessing(False, "the run did not fully succeed; the champion stays", "run_failed", champion)
    cap = _capped(challenger)
    if cap is not None:
        return Blessing(
            False,
            f"the run is capped at {cap} images per class and split (a smoke/quick run): its test set is not "
            "comparable with an uncapped one, and a capped run never becomes the store's champion",
            "capped",
            champion,
        )
    acc, sens = challenger.get("test_accuracy"), challenger.get("test_covid_sensitivity")
    if acc is None:
        return Blessing(
            False,
            "the run has no test split (e.g. the paper's 80/20/0): nothing unseen to compare on, so it cannot promote",
            "no_test_split",
            champion,
        )
    if sens is None or math.isnan(sens):
        return Blessing(
            False,
            "COVID sensitivity on test is undefined (no COVID test images): cannot promote",
            "sensitivity_floor",
            champion,
        )
    if sens < covid_sensitivity_floor:
        return Blessing(
            False,
            f"COVID sensitivity on test {sens:.4f} is below the floor {covid_sensitivity_floor:.4f}",
            "sensitivity_floor",
            champion,
        )
    if champion is not None and (
        champion.get("model_uri") == challenger.get("model_uri") and champion.get("run_id") == challenger.get("run_id")
    ):
        return Blessing(
            False,
            f"{_describe(challenger)} already is the champion (history entry {champion.get('history_seq')}); "
            "nothing to do",
            "already_champion",
            champion,
        )
    if champion is None:
        return Blessing(True, f"{_describe(challenger)} is the store's first champion", "first_champion", None)
    try:
        cmp = compare(challenger, champion, margin=margin, cache_dir=cache_dir)
    except ChallengerScoringError as e:
        return Blessing(
            False,
            f"this run's model could not be scored on its own test split ({e}); not promoted",
            "challenger_unreadable",
            champion,
        )
    except ScoringError as e:
        return Blessing(
            False,
            f"the champion {_describe(champion)} could not be re-scored on this run's test split ({e}); "
            "not promoted: the champion is never replaced without a comparison (fix its slot or roll back)",
            "champion_unreadable",
            champion,
        )
    if cmp.n == 0:
        return Blessing(
            False,
            f"all {cmp.excluded} test images of this run were in the champion's training split: nothing left to "
            "compare on, not promoted",
            "no_common_images",
            champion,
            cmp,
        )
    ca, pa = cmp.challenger["accuracy"], cmp.champion["accuracy"]
    where = f"on the same {cmp.n} test images ({cmp.excluded} excluded: in the champion's training split)"
    p = cmp.mcnemar_p
    where += f"; McNemar's exact test p = {p:.3g}"
    if ca > pa + margin and require_significance and not p < alpha:
        return Blessing(
            False,
            f"test accuracy {_fmt(ca)} beats the champion {_describe(champion)}'s {_fmt(pa)} {where}, but the "
            f"difference is not significant (p ≥ {alpha}) and significance is required",
            "not_significant",
            champion,
            cmp,
        )
    if ca > pa + margin:  # beating means strictly better, by the margin
        return Blessing(
            True,
            f"test accuracy {_fmt(ca)} beats the champion {_describe(champion)}'s {_fmt(pa)} by more than the "
            f"margin {margin:.4f} {where}",
            "beats_champion",
            champion,
            cmp,
        )
    return Blessing(
        False,
        f"test accuracy {_fmt(ca)} does not beat the champion {_describe(champion)}'s {_fmt(pa)} by more than the "
        f"margin {margin:.4f} {where}",
        "does_not_beat",
        champion,
        cmp,
    )


def external_gate(
    blessing: dict[str, Any] | None, externals: list[dict[str, Any]], floor: float | None
) -> dict[str, Any] | None:
    """The blessing, withdrawn when the challenger's accuracy on an external set is below ``floor``
    (rule ``external_floor``). ``externals`` are the challenger's evaluations (external_eval.summary)."""
    if blessing is None or floor is None or not blessing.get("blessed"):
        return blessing
    low = [e for e in externals if e.get("accuracy") is None or e["accuracy"] < floor]
    if not low:
        return {**blessing, "external": [{"source": e["source"], "accuracy": e["accuracy"]} for e in externals]}
    worst = ", ".join(f"{e['source']}: {_fmt(e.get('accuracy'))} (n={e.get('n')})" for e in low)
    return {
        **blessing,
        "blessed": False,
        "rule": "external_floor",
        "reason": f"external accuracy below the floor {floor:.4f} on {worst}",
    }
