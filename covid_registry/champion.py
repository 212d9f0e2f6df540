"""The champion: a registry pointer with compare-and-swap, an append-only history, and rollback.

    python -m covid_registry.champion show --store URI
    python -m covid_registry.champion history --store URI
    python -m covid_registry.champion rollback --store URI --to SEQ [--reason TEXT]

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

import argparse
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from covid_data.store import ObjectExistsError, Store, open_store
from covid_registry.bless import Blessing, Comparison, bless, slot_complete

log = logging.getLogger(__name__)

CHAMPION = "champion.json"
HISTORY = "champion/history"
_ENTRY = re.compile(r"(\d{6,})\.json$")
# Keys of the pointer that belong to the pointer, not to the model it points at.
_POINTER_KEYS = ("history_seq", "promoted", "rollback_to")


# "No token given" for decide_and_promote: None already means "champion.json was absent".
_UNREAD: Any = object()


class ChampionError(RuntimeError):
    """A champion operation was refused (the message says why and what to do)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _open(store: Store | str) -> Store:
    return store if isinstance(store, Store) else open_store(store)


def _entry_key(seq: int) -> str:
    return f"{HISTORY}/{seq:06d}.json"


def read_champion(store: Store | str) -> tuple[dict[str, Any] | None, str | None]:
    """The champion record and its version token (for :func:`decide_and_promote`'s ``token``)."""
    data, token = _open(store).read_versioned(CHAMPION)
    return (json.loads(data) if data is not None else None), token


def current(store: Store | str) -> dict[str, Any] | None:
    """The champion record (``champion.json``), or None when the store has none."""
    return read_champion(store)[0]


def _seqs(store: Store) -> list[int]:
    return sorted(int(m.group(1)) for k in store.list(HISTORY + "/") if (m := _ENTRY.search(k)))


def _append(store: Store, build: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
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


def _model_record(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in _POINTER_KEYS}


def _who(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "none"
    seq = rec.get("history_seq")
    return f"{rec.get('model')} of run {rec.get('run_id')}" + (f", entry {seq}" if seq is not None else "")


def _decision(entry: dict[str, Any], changed: bool) -> dict[str, Any]:
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


def _entry(
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
    return {
        "seq": seq,
        "action": action,
        "time": _now(),
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


def _lost(
    store: Store,
    candidate: dict[str, Any] | None,
    intent: dict[str, Any] | None,
    why: str,
    before: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Record that a swap was refused because someone else changed the pointer; returns the entry."""
    winner = current(store)
    intent_seq = intent["seq"] if intent else None
    reason = f"lost the race to run {(winner or {}).get('run_id')}: {why}; the champion is now {_who(winner)}" + (
        f" (entry {intent_seq} was not applied)" if intent_seq else ""
    )
    return _append(
        store,
        lambda seq: _entry(
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
    store = _open(store)
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
        entry = _append(
            store,
            lambda seq: _entry(
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
        log.info("champion stays (%s): %s", _who(now), reason)
        return _decision(entry, False)
    if now != before:
        entry = _lost(store, candidate, None, "the champion changed after this candidate was compared with it", before)
        log.info("champion: %s", entry["reason"])
        return _decision(entry, False)

    record = _model_record(candidate)
    promoted = _now()
    intent = _append(
        store,
        lambda seq: _entry(
            seq,
            "promote",
            candidate=candidate,
            before=before,
            after={**record, "history_seq": seq, "promoted": promoted},
            reason=f"promoted {candidate.get('model')} of run {candidate.get('run_id')} (was {_who(before)}): "
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
        return _decision(intent, True)
    entry = _lost(store, candidate, intent, "it replaced champion.json after this run read it")
    log.info("champion: %s", entry["reason"])
    return _decision(entry, False)


def evaluate_and_promote(
    store: Store | str,
    candidate: dict[str, Any],
    *,
    run_succeeded: bool,
    margin: float,
    covid_sensitivity_floor: float,
    cache_dir: str | Path | None = None,
    require_significance: bool = False,
) -> dict[str, Any]:
    """Read the champion (and its version), bless the candidate against it, decide and swap.

    The one call a retraining run needs. The decision also carries the whole blessing as a dict
    (``blessing``: rule, reason and the comparison with per-image correctness of both models).
    """
    store = _open(store)
    champ, token = read_champion(store)
    blessing = bless(
        candidate,
        champ,
        run_succeeded=run_succeeded,
        margin=margin,
        covid_sensitivity_floor=covid_sensitivity_floor,
        cache_dir=cache_dir,
        require_significance=require_significance,
    )
    return {**decide_and_promote(store, candidate, blessing, token=token), "blessing": blessing.to_dict()}


def history(store: Store | str) -> list[dict[str, Any]]:
    """Every history entry, oldest first, each with ``applied`` (True/False for promote and
    rollback entries, None for the others) and a readable ``status``."""
    store = _open(store)
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
    store = _open(store)
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
    record = _model_record(target["champion_after"])
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
    promoted = _now()
    intent = _append(
        store,
        lambda seq: _entry(
            seq,
            "rollback",
            candidate=record,
            before=before,
            after={**record, "history_seq": seq, "promoted": promoted, "rollback_to": to_seq},
            reason=f"rolled back to entry {to_seq}: {record.get('model')} of run {record.get('run_id')} "
            f"(was {_who(before)}): {why}",
            rule="rollback",
            rollback_to=to_seq,
        ),
    )
    if store.put_if_match(CHAMPION, json.dumps(intent["champion_after"], indent=2).encode(), token):
        log.info("champion: %s", intent["reason"])
        return _decision(intent, True)
    lost = _lost(store, record, intent, "the champion changed while rolling back")
    raise ChampionError(f"{lost['reason']}; nothing was rolled back: check the history and try again")


# -- command line ------------------------------------------------------------------------------
def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}%"


def format_history(entries: list[dict[str, Any]]) -> str:
    """A readable table of the history, one line per entry."""
    head = ("seq", "time", "action", "run", "model", "compared", "status", "reason")
    rows = []
    for e in entries:
        c = e.get("comparison") or {}
        compared = (
            f"{_pct(c.get('challenger_accuracy'))} vs {_pct(c.get('champion_accuracy'))} on {c.get('n')} "
            f"(-{c.get('excluded')})"
            if c
            else "-"
        )
        rows.append(
            (
                str(e["seq"]),
                e.get("time", ""),
                e["action"],
                str(e.get("run_id") or "-"),
                str(e.get("model") or "-"),
                compared,
                e.get("status", ""),
                e.get("reason", ""),
            )
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    lines = []
    for r in [head, *rows]:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m covid_registry.champion",
        description="Show the champion model of a store, its decision history, or roll it back.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{show,history,rollback}")

    def with_store(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--store",
            default=os.environ.get("COVID_STORE", ".store"),
            help="the store: a folder, file:///path or gs://bucket/prefix (default: $COVID_STORE or .store)",
        )

    sp = sub.add_parser("show", help="print the current champion record (champion.json)")
    with_store(sp)
    sp = sub.add_parser("history", help="print every champion decision, oldest first")
    with_store(sp)
    sp.add_argument("--json", action="store_true", help="print the entries as JSON instead of a table")
    sp = sub.add_parser("rollback", help="make the champion of an earlier history entry the champion again")
    with_store(sp)
    sp.add_argument(
        "--to", type=int, required=True, metavar="SEQ", help="the history entry (a promote or rollback) to go back to"
    )
    sp.add_argument("--reason", default="", help="why: recorded in the rollback's history entry")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    store = open_store(args.store)
    if args.command == "show":
        champ = current(store)
        if champ is None:
            print(f"no champion in {store.uri}")
            return 0
        print(json.dumps(champ, indent=2))
        print(f"model slot complete: {'yes' if slot_complete(champ.get('model_uri')) else 'NO'}")
        return 0
    if args.command == "history":
        entries = history(store)
        if args.json:
            print(json.dumps(entries, indent=2))
        elif not entries:
            print(f"no champion history in {store.uri}")
        else:
            print(format_history(entries))
        return 0
    try:
        decision = rollback(store, args.to, args.reason)
    except ChampionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(decision["reason"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
