"""Two models on the same images: the challenger's test split, minus what the champion has seen.

:func:`score_model` predicts one stored model on one split; :func:`compare` scores the challenger
and the re-loaded champion on the challenger's test images, leaves out every image the champion
has seen (copies or near copies of its train or validation images: ``covid_eval.duplicates``),
and keeps both models' per-image results for McNemar's test and the COVID non-inferiority check.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covid_data.dataset import default_cache_dir
from covid_data.labels import CLASSES
from covid_data.split import load_split
from covid_data.store import open_store
from covid_eval.duplicates import seen_images, training_images
from covid_models.data import load_split_data
from covid_models.metrics import classification_metrics, mcnemar_exact
from covid_models.stored import MARKER as METRICS_FILE
from covid_models.stored import StoredModel

COVID = CLASSES.index("COVID")


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


@dataclass
class Comparison:
    """Challenger and champion scored on exactly the same test images."""

    split_uri: str  # the challenger's split; its test images
    n: int  # images compared
    excluded: int  # test images left out: the champion has seen them (train or val, copies or near copies)
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
    labels: list[int] = field(default_factory=list)  # the compared images' classes (COVID non-inferiority)

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
            "covid_sensitivity_difference": self.covid_sensitivity_difference(),
        }

    def covid_sensitivity_difference(self) -> tuple[float, float, float, int] | None:
        """(challenger minus champion COVID sensitivity, 95% interval low, high, COVID images) on the
        compared images: Agresti and Min's (2005) adjusted interval for matched proportions."""
        covid = np.asarray(self.labels, int) == COVID
        n = int(covid.sum())
        if not n:
            return None
        a, b = np.asarray(self.challenger_correct, bool)[covid], np.asarray(self.champion_correct, bool)[covid]
        only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
        # Add half an image to each cell (Agresti and Min): no zero-width interval at 0 discordant pairs.
        pa, pb, m = only_a + 0.5, only_b + 0.5, n + 2.0
        d = (pa - pb) / m
        half = 1.959964 * math.sqrt(max((pa + pb) - (pa - pb) ** 2 / m, 0.0)) / m
        return (only_a - only_b) / n, max(-1.0, d - half), min(1.0, d + half), n

    @property
    def mcnemar_p(self) -> float:
        a, b = np.asarray(self.challenger_correct, bool), np.asarray(self.champion_correct, bool)
        return mcnemar_exact(int((a & ~b).sum()), int((~a & b).sum()))


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
        rows = training_images(chal_split).set_index("path").loc[chal.paths].reset_index()
        seen = seen_images(rows, champ_split)  # copies or near copies of the champion's train or val images
    except ScoringError:
        raise
    except Exception as e:
        raise ScoringError(f"cannot read the champion's training split: {type(e).__name__}: {e}") from e
    champ = score_model(champ_model, chal_split, split="test", cache_dir=cache_dir)
    if chal.sha256 != champ.sha256:  # same split, same rows: anything else is a bug upstream
        raise ScoringError(f"the two scorings of {chal_split} returned different images")
    keep = ~seen
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
        labels=chal_k.labels.astype(int).tolist(),
    )
