"""Blessing a challenger: TFX Evaluator-style re-evaluation before a model may become champion.

A stored test accuracy is a claim about one split. Two models are only comparable when they are
scored on the same images, so the current champion's stored model is re-scored on the
challenger's test split, images the champion has seen are left out (copies or near copies of its
train or validation images, the project's one definition: ``covid_eval.duplicates``), and both
models are compared image by image (``covid_registry.comparison``). The rules, in order (each
decision carries a reason and a rule code):

1. the run must have fully succeeded (``run_failed``);
2. a capped run (``max_per_class`` set, as the smoke preset does) is never comparable with an
   uncapped one and never becomes a store's champion (``capped``);
3. a run without a test split (the paper's 80/20/0) cannot promote (``no_test_split``);
4. the challenger's COVID sensitivity on its test split must reach the floor (``sensitivity_floor``);
5. a candidate that already is the champion is kept (``already_champion``: a rerun after a crash);
6. with no champion, the challenger is blessed (``first_champion``);
7. otherwise the challenger must beat the re-scored champion on the same images by more than the
   margin (``beats_champion`` / ``does_not_beat``), and, by default, significantly: McNemar's exact
   test on the discordant images must give p < ``alpha`` (``not_significant``; off with
   ``require_significance=False``), so that a champion does not ratchet on the luck of one test set;
8. its COVID sensitivity on the same images must be non-inferior to the champion's: the lower end
   of the 95% interval of the paired difference (Agresti and Min) above ``-covid_noninferiority_margin``
   (default 0.05; ``covid_noninferiority``; off with ``None``).

After these, two optional gates on the external sets (``covid_eval.external``, ``covid_eval.negative``)
may withdraw a blessing: the challenger's accuracy on every labelled set must reach
``external_floor`` (``external_floor``), and its COVID false-alarm rate (the share of images called
COVID) on every negative set, X-rays known not to be COVID, must not exceed
``external_false_alarm_ceiling`` (``external_false_alarm_ceiling``). A withdrawn blessing keeps the
champion; the run is still published.

A champion whose stored model or split cannot be read is never replaced silently
(``champion_unreadable``; ``challenger_unreadable`` when it is the challenger's model or split that
fails), and a comparison with no images left after leaving out what the champion has seen
promotes nothing (``no_common_images``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from covid_data.split import SplitRef
from covid_registry.comparison import (
    ChallengerScoringError,
    Comparison,
    ScoringError,
    compare,
    read_slot_metrics,
    slot_complete,
)


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
    try:
        _, version, split_hash = SplitRef.locate(split_uri)
    except ValueError:  # a split written outside a store's datasets/ (hand-made): no version to name
        version = split_hash = None
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
    require_significance: bool = True,
    alpha: float = 0.05,
    covid_noninferiority_margin: float | None = 0.05,
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
            f"all {cmp.excluded} test images of this run were seen by the champion (copies or near copies of its "
            "train or validation images): nothing left to compare on, not promoted",
            "no_common_images",
            champion,
            cmp,
        )
    ca, pa = cmp.challenger["accuracy"], cmp.champion["accuracy"]
    where = f"on the same {cmp.n} test images ({cmp.excluded} excluded: seen by the champion)"
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
    if ca > pa + margin and covid_noninferiority_margin is not None:
        diff = cmp.covid_sensitivity_difference()
        if diff is None or diff[1] <= -covid_noninferiority_margin:
            said = (
                "no COVID image is left to compare on"
                if diff is None
                else f"COVID sensitivity changes by {diff[0]:+.4f} (95% CI {diff[1]:+.4f} to {diff[2]:+.4f}, "
                f"{diff[3]} COVID images)"
            )
            return Blessing(
                False,
                f"test accuracy {_fmt(ca)} beats the champion {_describe(champion)}'s {_fmt(pa)} {where}, but "
                f"{said}: not shown non-inferior to the champion's within {covid_noninferiority_margin:.2f}",
                "covid_noninferiority",
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
    """The blessing, withdrawn when the challenger's accuracy on a labelled external set is below
    ``floor`` (rule ``external_floor``). ``externals`` are the challenger's evaluations
    (``covid_eval.external.summary``); negative sets have no accuracy and are the ceiling's."""
    externals = [e for e in externals if e.get("set_kind", "labelled") == "labelled"]
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


def false_alarm_gate(
    blessing: dict[str, Any] | None, externals: list[dict[str, Any]], ceiling: float | None
) -> dict[str, Any] | None:
    """The blessing, withdrawn when the challenger's COVID false-alarm rate on a negative external
    set (X-rays known not to be COVID) is above ``ceiling`` (rule ``external_false_alarm_ceiling``).
    The point estimate is compared: its interval is in the evaluation, beside it. With no negative
    set there is nothing to check, and the blessing stands (as ``external_floor`` without sets)."""
    negatives = [e for e in externals if e.get("set_kind") == "negative"]
    if blessing is None or ceiling is None or not blessing.get("blessed"):
        return blessing
    high = [e for e in negatives if e.get("false_alarm_rate") is None or e["false_alarm_rate"] > ceiling]
    checked = [{k: e.get(k) for k in ("source", "name", "false_alarm_rate", "false_alarm_ci95")} for e in negatives]
    if not high:
        return {**blessing, "external_false_alarms": checked}
    worst = ", ".join(
        f"{e.get('name') or e['source']}: {_fmt(e.get('false_alarm_rate'))} "
        f"({e.get('covid_predicted')} of {e.get('n')} called COVID)"
        for e in high
    )
    return {
        **blessing,
        "blessed": False,
        "rule": "external_false_alarm_ceiling",
        "reason": f"COVID false-alarm rate above the ceiling {ceiling:.4f} on X-rays known not to be COVID: {worst}",
        "external_false_alarms": checked,
    }
