"""Ranking trained models: the leaderboard."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

COLUMNS = [
    "rank",
    "model",
    "status",
    "weights",
    "val_accuracy",
    "val_loss",
    "test_accuracy",
    "test_macro_f1",
    "test_covid_sensitivity",
    "params",
    "file_mb",
    "train_seconds",
    "epochs",
    "error",
]
# Validation only: the test split judges the winner (champion gate), so ranking on it too would
# be selection on test.
RANK_KEYS = {"val_accuracy": False, "val_loss": True}


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _below(record: dict[str, Any]) -> str | None:
    """The model a record must rank just below, where it says so (the ensemble: selected on validation)."""
    return record.get("rank_below") or (record.get("extra") or {}).get("rank_below")


def _rank_below(df: pd.DataFrame, below: dict[str, str]) -> pd.DataFrame:
    """Move each model of ``below`` to just under the model it names, when it ranks above it."""
    order = list(df["model"])
    for model, other in below.items():
        if model in order and other in order and order.index(model) < order.index(other):
            order.remove(model)
            order.insert(order.index(other) + 1, model)
    return df.set_index("model", drop=False).loc[order].reset_index(drop=True)


def leaderboard(records: list[dict[str, Any]], rank_by: str = "val_accuracy") -> pd.DataFrame:
    """One row per model; succeeded models ranked by ``rank_by`` (validation accuracy, the
    paper's choice), ties broken by validation loss, then by name; failed and skipped models last,
    with the reason in ``error``."""
    if rank_by.startswith("test"):
        raise ValueError(
            f"cannot rank by {rank_by!r}: ranking on the test split and then gating the champion on it is "
            f"selection on test; rank by {' or '.join(sorted(RANK_KEYS))}"
        )
    if rank_by not in RANK_KEYS:
        raise ValueError(f"cannot rank by {rank_by!r}; choose from {sorted(RANK_KEYS)}")
    rows = []
    for r in records:
        ok = r.get("status") in ("trained", "cached")
        rows.append(
            {
                "model": r["model"],
                "status": r.get("status", "failed"),
                "weights": r.get("weights_desc", ""),
                "val_accuracy": _num(r.get("val_accuracy")) if ok else float("nan"),
                "val_loss": _num(r.get("val_loss")) if ok else float("nan"),
                "test_accuracy": _num(r.get("test_accuracy")) if ok else float("nan"),
                "test_macro_f1": _num(r.get("test_macro_f1")) if ok else float("nan"),
                "test_covid_sensitivity": _num(r.get("test_covid_sensitivity")) if ok else float("nan"),
                "params": int(r.get("params") or 0),
                "file_mb": round((r.get("file_bytes") or 0) / 1e6, 2),
                "train_seconds": round(_num(r.get("train_seconds")), 1) if ok else float("nan"),
                "epochs": int(r.get("epochs") or 0),
                "error": "" if ok else str(r.get("error", ""))[:300],
                "_ok": ok,
            }
        )
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=COLUMNS)
    ascending = RANK_KEYS[rank_by]
    primary = df[rank_by].fillna(math.inf if ascending else -math.inf)
    df = df.assign(_primary=primary if ascending else -primary, _failed=~df["_ok"])
    df = df.sort_values(["_failed", "_primary", "val_loss", "model"], kind="stable").reset_index(drop=True)
    df = _rank_below(df, {r["model"]: _below(r) for r in records if _below(r)})
    df.insert(0, "rank", range(1, len(df) + 1))
    df.loc[df["_failed"], "rank"] = pd.NA
    return df[COLUMNS]


_DECIMALS = {"file_mb": 1, "train_seconds": 0}


def with_columns(
    board: dict[str, Any],
    values: dict[str, dict[str, Any]],
    *,
    after: str | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """The leaderboard record (``rows``, ``markdown``) with extra columns per model (external sets,
    shortcut scores), added after the ranking: they never change it. They go at the end, or just
    after the column ``after`` (external figures beside the test ones); ``notes`` (what the columns
    are) go under the table, and stay there as later columns are added."""
    extra = list(dict.fromkeys(c for v in values.values() for c in v))
    rows = [{**r, **{c: values.get(r["model"], {}).get(c) for c in extra}} for r in board["rows"]]
    known = [c for c in board["rows"][0] if c in rows[0]] if rows else list(COLUMNS)
    new = [c for c in extra if c not in known]
    at = known.index(after) + 1 if after in known else len(known)
    cols = [*known[:at], *new, *known[at:]]
    # The rows keep the column order, so that the next call (and leaderboard.csv) keeps it too.
    rows = [{c: r.get(c) for c in cols} for r in rows]
    kept = [*board.get("notes", []), *(notes or [])]
    table = to_markdown(pd.DataFrame(rows, columns=cols), cols)
    markdown = table + ("\n" + "\n".join(f"- {n}" for n in kept) + "\n" if kept else "")
    return {**board, "rows": rows, "markdown": markdown, **({"notes": kept} if kept else {})}


def to_markdown(board: pd.DataFrame, columns: list[str] | None = None) -> str:
    columns = columns or COLUMNS

    def fmt(col: str, v: Any) -> str:
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            return ""
        if col in ("rank", "params", "epochs"):
            return f"{int(v):,}" if col == "params" else str(int(v))
        if isinstance(v, float):
            return f"{v:.{_DECIMALS.get(col, 4)}f}"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(fmt(c, row[c]) for c in columns) + " |\n" for _, row in board.iterrows())
