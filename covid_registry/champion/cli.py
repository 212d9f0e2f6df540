"""The champion's command line (``python -m covid_registry.champion``)::

python -m covid_registry.champion show --store URI
python -m covid_registry.champion history --store URI
python -m covid_registry.champion rollback --store URI --to SEQ [--reason TEXT]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from covid_data.store import open_store
from covid_registry.bless import slot_complete
from covid_registry.champion.pointer import ChampionError, current, history, rollback


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
