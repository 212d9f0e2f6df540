"""The promotion decision: bless a candidate against the champion, record it, swap the pointer."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from covid_data.store import Store, as_store
from covid_registry.bless import Blessing, Comparison, bless, slot_complete
from covid_registry.champion.pointer import (
    CHAMPION,
    append_entry,
    decision,
    describe,
    make_entry,
    model_record,
    read_champion,
    record_lost_race,
    timestamp,
)

log = logging.getLogger(__name__)

# "No token given" for decide_and_promote: None already means "champion.json was absent".
_UNREAD: Any = object()


def _summary(comparison: Comparison | dict[str, Any] | None) -> dict[str, Any] | None:
    if comparison is None:
        return None
    if isinstance(comparison, dict):  # a blessing that went through dataclasses.asdict / JSON
        comparison = Comparison(**comparison)
    return comparison.summary()


def decide_and_promote(
    store: Store | str,
    candidate: dict[str, Any],
    blessing: Blessing | dict[str, Any],
    *,
    token: str | None = _UNREAD,
) -> dict[str, Any]:
    """Record the decision for ``candidate`` and, if blessed, swap ``champion.json`` to it.

    ``token`` is the version :func:`read_champion` returned together with the champion that
    ``blessing`` compared against (None when there was none). Without it, the pointer is read now
    and must still hold that same champion. Either way, if another run changed the pointer after
    the blessing, nothing is promoted and a ``lost_race`` entry names the winner.

    Returns the decision: ``{"changed", "action", "reason", "rule", "seq", "intent_seq",
    "champion", "comparison"}`` (``champion``: the champion after the decision).
    """
    store = as_store(store)
    if isinstance(blessing, dict):  # e.g. a task result: the same fields as a Blessing
        blessing = Blessing(
            blessed=bool(blessing["blessed"]),
            reason=blessing["reason"],
            rule=blessing.get("rule") or ("blessed" if blessing["blessed"] else "not_blessed"),
            champion=blessing.get("champion"),
            comparison=blessing.get("comparison"),
        )
    summary = _summary(blessing.comparison)
    before = blessing.champion  # the champion the blessing was decided against
    now = before
    if token is _UNREAD:
        now, token = read_champion(store)
    reason, rule = blessing.reason, blessing.rule
    if blessing.blessed and not slot_complete(candidate.get("model_uri")):
        # The pointer must always lead to a usable model.
        reason = f"the model slot {candidate.get('model_uri')} is incomplete (no metrics.json or model.keras)"
        rule = "incomplete_slot"
    if not blessing.blessed or rule == "incomplete_slot":
        entry = append_entry(
            store,
            lambda seq: make_entry(
                seq,
                "keep",
                candidate=candidate,
                before=before,
                after=now,
                reason=reason,
                rule=rule,
                comparison=summary,
            ),
        )
        log.info("champion stays (%s): %s", describe(now), reason)
        return decision(entry, False)
    if now != before:
        entry = record_lost_race(
            store, candidate, None, "the champion changed after this candidate was compared with it", before
        )
        log.info("champion: %s", entry["reason"])
        return decision(entry, False)

    record = model_record(candidate)
    promoted = timestamp()
    intent = append_entry(
        store,
        lambda seq: make_entry(
            seq,
            "promote",
            candidate=candidate,
            before=before,
            after={**record, "history_seq": seq, "promoted": promoted},
            reason=f"promoted {candidate.get('model')} of run {candidate.get('run_id')} (was {describe(before)}): "
            + blessing.reason,
            rule=blessing.rule,
            comparison=summary,
        ),
    )
    # The entry is stored before the pointer moves: a kill here leaves an unapplied entry, never a
    # pointer to a decision nobody recorded.
    new = intent["champion_after"]
    if store.put_if_match(CHAMPION, json.dumps(new, indent=2).encode(), token):
        log.info("champion: %s", intent["reason"])
        return decision(intent, True)
    entry = record_lost_race(store, candidate, intent, "it replaced champion.json after this run read it")
    log.info("champion: %s", entry["reason"])
    return decision(entry, False)


def evaluate_and_promote(
    store: Store | str,
    candidate: dict[str, Any],
    *,
    run_succeeded: bool,
    margin: float,
    covid_sensitivity_floor: float,
    cache_dir: str | Path | None = None,
    require_significance: bool = True,
    covid_noninferiority_margin: float | None = 0.05,
) -> dict[str, Any]:
    """Read the champion (and its version), bless the candidate against it, decide and swap.

    The one call a retraining run needs. The decision also carries the whole blessing as a dict
    (``blessing``: rule, reason and the comparison with per-image correctness of both models).
    """
    store = as_store(store)
    champ, token = read_champion(store)
    blessing = bless(
        candidate,
        champ,
        run_succeeded=run_succeeded,
        margin=margin,
        covid_sensitivity_floor=covid_sensitivity_floor,
        cache_dir=cache_dir,
        require_significance=require_significance,
        covid_noninferiority_margin=covid_noninferiority_margin,
    )
    return {**decide_and_promote(store, candidate, blessing, token=token), "blessing": blessing.to_dict()}
