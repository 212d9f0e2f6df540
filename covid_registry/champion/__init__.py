"""The champion: a registry pointer with compare-and-swap, an append-only history, and rollback.

    python -m covid_registry.champion show --store URI
    python -m covid_registry.champion history --store URI
    python -m covid_registry.champion rollback --store URI --to SEQ [--reason TEXT]

The modules: ``pointer`` (``champion.json`` and its history: read, append, history, rollback;
its docstring describes the layout and why a crash never needs a person), ``promote`` (bless a
candidate against the champion, record the decision, swap the pointer) and ``cli`` (the
command line above).
"""

from covid_registry.champion.cli import format_history, main
from covid_registry.champion.pointer import (
    CHAMPION,
    HISTORY,
    ChampionError,
    current,
    history,
    read_champion,
    rollback,
)
from covid_registry.champion.promote import decide_and_promote, evaluate_and_promote

__all__ = [
    "CHAMPION",
    "HISTORY",
    "ChampionError",
    "current",
    "decide_and_promote",
    "evaluate_and_promote",
    "format_history",
    "history",
    "main",
    "read_champion",
    "rollback",
]
