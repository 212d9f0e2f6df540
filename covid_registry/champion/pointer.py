"""The champion pointer and its append-only history: read, append, history, rollback.

Layout in the store (as a model registry keeps it):

* ``champion.json`` (the pointer): the champion record (see :func:`covid_registry.bless.candidate_record`)
  plus ``history_seq``, the history entry that made it, and ``promoted``, when. It is only ever
  replaced by compare-and-swap (:meth:`Store.put_if_match`) and only with a record whose model
  slot is complete, so it always parses and points at a usable model.
* ``champion/history/<seq:06d>.json``: one entry per decision (``promote``, ``keep``,
  ``lost_race``, ``rollback``), each written create-only; two writers that pick the same number
  both notice, and the second takes the next one.

Crash safety: a decision writes its history entry first and swaps the pointer second. A kill
between the two leaves an entry that was never applied, and a reader can tell: every applied
entry is on the chain that starts at ``champion.json``'s ``history_seq`` and follows each entry's
``champion_before.history_seq`` back (the swap only succeeds when ``champion_before`` still is
the pointer, so the chain is exactly the sequence of pointers). :func:`history` marks every
promote/rollback entry ``applied`` or not, and says why not (lost the race, or interrupted). A
rerun needs no person: it reads the pointer again and decides again.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from covid_data.store import ObjectExistsError, Store, as_store
from covid_registry.bless import slot_complete

log = logging.getLogger(__name__)

CHAMPION = "champion.json"
HISTORY = "champion/history"
_ENTRY = re.compile(r"(\d{6,})\.json$")
# Keys of the pointer that belong to the pointer, not to the model it points at.
_POINTER_KEYS = ("history_seq", "promoted", "rollback_to")


class ChampionError(RuntimeError):
    """A champion operation was refused (the message says why and what to do)."""


def timestamp() -> str:
    """The time stamp of a history entry (UTC, to the second)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _entry_key(seq: int) -> str:
    return f"{HISTORY}/{seq:06d}.json"


def read_champion(store: Store | str) -> tuple[dict[str, Any] | None, str | None]:
    """The champion record and its version token (for :func:`decide_and_promote`'s ``token``)."""
    data, token = as_store(store).read_versioned(CHAMPION)
    return (json.loads(data) if data is not None else None), token


def current(store: Store | str) -> dict[str, Any] | None:
    """The champion record (``champion.json``), or None when the store has none."""
    return read_champion(store)[0]


def _seqs(store: Store) -> list[int]:
    return sorted(int(m.group(1)) for k in store.list(HISTORY + "/") if (m := _ENTRY.search(k)))


def append_entry(store: Store, build: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """Write a history entry create-only under the next free number; returns the entry."""
    seqs = _seqs(store)
    seq = (seqs[-1] if seqs else 0) + 1
    while True:
        entry = build(seq)
        try:
            store.put_bytes(_entry_key(seq), json.dumps(entry, indent=2, default=_json_default).encode())
            return entry
        except ObjectExistsError:
            seq += 1  # another writer took this number first


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _clean(rec: dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON-safe copy (NaN becomes null, so every entry parses with any JSON reader)."""
    if rec is None:
        return None

    def fix(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [fix(x) for x in v]
        return v

    return fix(json.loads(json.dumps(rec, default=_json_default)))


def model_record(rec: dict[str, Any]) -> dict[str, Any]:
    """The record without the pointer's own keys: the model it points at."""
    return {k: v for k, v in rec.items() if k not in _POINTER_KEYS}


def describe(rec: dict[str, Any] | None) -> str:
    """``<model> of run <run_id>, entry <seq>`` (or ``none``), for reasons and logs."""
    if rec is None:
        return "none"
    seq = rec.get("history_seq")
    return f"{rec.get('model')} of run {rec.get('run_id')}" + (f", entry {seq}" if seq is not None else "")


def decision(entry: dict[str, Any], changed: bool) -> dict[str, Any]:
    """What a promotion or rollback returns, from its history entry."""
    return {
        "changed": changed,
        "action": entry["action"],
        "reason": entry["reason"],
        "rule": entry.get("rule"),
        "seq": entry["seq"],
        "intent_seq": entry.get("intent_seq"),
        "champion": entry["champion_after"],
        "comparison": entry.get("comparison"),
    }


def make_entry(
    seq: int,
    action: str,
    *,
    candidate: dict[str, Any] | None,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    reason: str,
    rule: str | None = None,
    comparison: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A history entry (JSON-safe), numbered ``seq``."""
    return {
        "seq": seq,
        "action": action,
        "time": timestamp(),
        "run_id": (candidate or {}).get("run_id"),
        "model": (candidate or {}).get("model"),
        "reason": reason,
        "rule": rule,
        "candidate": _clean(candidate),
        "champion_before": _clean(before),
        "champion_after": _clean(after),
        "comparison": _clean(comparison),
        **extra,
    }


def record_lost_race(
    store: Store,
    candidate: dict[str, Any] | None,
    intent: dict[str, Any] | None,
    why: str,
    before: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Record that a swap was refused because someone else changed the pointer; returns the entry."""
    winner = current(store)
    intent_seq = intent["seq"] if intent else None
    reason = f"lost the race to run {(winner or {}).get('run_id')}: {why}; the champion is now {describe(winner)}" + (
        f" (entry {intent_seq} was not applied)" if intent_seq else ""
    )
    return append_entry(
        store,
        lambda seq: make_entry(
            seq,
            "lost_race",
            candidate=candidate,
            before=intent["champion_before"] if intent else before,
            after=winner,
            reason=reason,
            rule="lost_race",
            comparison=intent.get("comparison") if intent else None,
            intent_seq=intent_seq,
        ),
    )


def history(store: Store | str) -> list[dict[str, Any]]:
    """Every history entry, oldest first, each with ``applied`` (True/False for promote and
    rollback entries, None for the others) and a readable ``status``."""
    store = as_store(store)
    entries = [json.loads(store.read_text(_entry_key(s))) for s in _seqs(store)]
    by_seq = {e["seq"]: e for e in entries}
    cur = current(store)
    head = cur.get("history_seq") if cur else None
    applied: set[int] = set()
    s = head
    while s is not None and s in by_seq and s not in applied:
        applied.add(s)
        before = by_seq[s].get("champion_before")
        s = before.get("history_seq") if before else None
    lost = {e.get("intent_seq"): e["seq"] for e in entries if e["action"] == "lost_race"}
    for e in entries:
        if e["action"] in ("promote", "rollback"):
            e["applied"] = e["seq"] in applied
            if e["seq"] == head:
                e["status"] = "current champion"
            elif e["applied"]:
                e["status"] = "applied, since replaced"
            elif e["seq"] in lost:
                e["status"] = f"not applied: lost the race (entry {lost[e['seq']]})"
            else:
                e["status"] = "not applied: interrupted before the swap (or still in flight)"
        else:
            e["applied"] = None
            e["status"] = "champion kept" if e["action"] == "keep" else "not promoted"
    return entries


def rollback(store: Store | str, to_seq: int, reason: str = "") -> dict[str, Any]:
    """Make the champion made by history entry ``to_seq`` (a promote or rollback that was applied)
    the champion again, by compare-and-swap, and record a ``rollback`` entry.

    Raises :class:`ChampionError` when the entry does not exist, made no champion, was never
    applied, already is the champion, or its model slot is no longer complete; and when another
    run changed the champion meanwhile (then a ``lost_race`` entry records it).
    """
    store = as_store(store)
    entries = {e["seq"]: e for e in history(store)}
    choices = ", ".join(str(s) for s, e in entries.items() if e["applied"]) or "none"
    if to_seq not in entries:
        raise ChampionError(
            f"no history entry {to_seq} in {store.uri_for(HISTORY)}; entries that made a champion: {choices}"
        )
    target = entries[to_seq]
    if target["action"] not in ("promote", "rollback"):
        raise ChampionError(
            f"history entry {to_seq} is a {target['action']!r} decision and made no champion; "
            f"entries that made a champion: {choices}"
        )
    if not target["applied"]:
        raise ChampionError(
            f"history entry {to_seq} never became the champion ({target['status']}); choose from {choices}"
        )
    record = model_record(target["champion_after"])
    if not slot_complete(record.get("model_uri")):
        raise ChampionError(
            f"the model of history entry {to_seq} ({record.get('model')} of run {record.get('run_id')}) at "
            f"{record.get('model_uri')} is no longer complete (metrics.json or model.keras is missing): "
            "refusing to point the champion at it"
        )
    before, token = read_champion(store)
    if before is not None and before.get("history_seq") == to_seq:
        raise ChampionError(f"history entry {to_seq} already is the current champion")
    why = reason or "manual rollback"
    promoted = timestamp()
    intent = append_entry(
        store,
        lambda seq: make_entry(
            seq,
            "rollback",
            candidate=record,
            before=before,
            after={**record, "history_seq": seq, "promoted": promoted, "rollback_to": to_seq},
            reason=f"rolled back to entry {to_seq}: {record.get('model')} of run {record.get('run_id')} "
            f"(was {describe(before)}): {why}",
            rule="rollback",
            rollback_to=to_seq,
        ),
    )
    if store.put_if_match(CHAMPION, json.dumps(intent["champion_after"], indent=2).encode(), token):
        log.info("champion: %s", intent["reason"])
        return decision(intent, True)
    lost = record_lost_race(store, record, intent, "the champion changed while rolling back")
    raise ChampionError(f"{lost['reason']}; nothing was rolled back: check the history and try again")
