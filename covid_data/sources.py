"""More labelled sources in one dataset version (``extra_sources``).

A model that only ever saw one collection learns that collection's processing along with the
disease (the shortcut the shared sample's README describes). ``extra_sources`` adds more labelled
folders in the same class layout: each is fetched and inspected as the main source is, and its rows
join the main source's in one content-addressed dataset version under ``sources/<name>/`` (so paths
never collide and a version without extras hashes exactly as before). The split stratifies by class
and source; training draws source-balanced batches (``covid_models.data``).

The source of a row is read from its path alone (``main`` for the main source), so split tables
and manifests written before this module need no new column.

A set kept for the external check (``external_sources``) is never a training source: the flow
refuses an extra source that is, contains or lies inside one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

MAIN = "main"
PREFIX = "sources"
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")


def slug(uri: str) -> str:
    """A source name from its location: the last path part, lowercased, other characters as ``-``."""
    tail = str(uri).rstrip("/").rsplit("/", 1)[-1].removesuffix(".zip")
    tail = tail.split(":", 1)[-1]  # kaggle:owner/slug -> slug
    return re.sub(r"[^a-z0-9_-]+", "-", tail.lower()).strip("-_")[:40] or "extra"


def extra_source(spec: str | Mapping[str, Any]) -> dict[str, str]:
    """``{uri, name}`` of an extra source given as its location or as ``{"uri": ..., "name": ...}``."""
    d = dict(spec) if isinstance(spec, Mapping) else {"uri": str(spec).strip()}
    unknown = set(d) - {"uri", "name"}
    if unknown:
        raise ValueError(f"extra source {d.get('uri')!r}: unknown keys {sorted(unknown)} (uri, name)")
    if not d.get("uri"):
        raise ValueError(f"an extra source needs a uri (a folder, a .zip, kaggle:owner/slug or a store prefix): {d}")
    name = d.get("name") or slug(d["uri"])
    if not _NAME.fullmatch(name) or name == MAIN:
        raise ValueError(
            f"extra source {d['uri']!r}: name {name!r} must be 1-40 of a-z, 0-9, '-' or '_' and not {MAIN!r}"
        )
    return {"uri": str(d["uri"]), "name": name}


def extra_sources(specs: Iterable[str | Mapping[str, Any]] | None) -> list[dict[str, str]]:
    """The parsed extra sources, names unique."""
    out = [extra_source(s) for s in specs or ()]
    names = [s["name"] for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"extra sources share the name(s) {dup}: give each a distinct 'name'")
    return out


def _local(uri: str) -> Path | None:
    text = str(uri).removeprefix("file://")
    if ":" in text.split("/", 1)[0]:  # gs://..., kaggle:...
        return None
    return Path(text).expanduser().resolve()


def refuse_external(extras: list[dict[str, str]], external_uris: Iterable[str]) -> None:
    """Raise when an extra source is, contains or lies inside a set kept for the external check."""
    for ext in external_uris:
        e_local = _local(ext)
        for s in extras:
            s_local = _local(s["uri"])
            same = (
                s_local == e_local or s_local in e_local.parents or e_local in s_local.parents
                if s_local is not None and e_local is not None
                else str(s["uri"]).rstrip("/") == str(ext).rstrip("/")
            )
            if same:
                raise ValueError(
                    f"extra source {s['name']!r} ({s['uri']}) overlaps the external set {ext}: a set kept for the "
                    "external check is never training data (drop it from extra_sources or from external_sources)"
                )


def prefixed(manifest: pd.DataFrame, name: str) -> pd.DataFrame:
    """An extra source's manifest, its version paths moved under ``sources/<name>/``."""
    out = manifest.copy()
    out["path"] = f"{PREFIX}/{name}/" + out["path"].astype(str)
    if "mask_path" in out.columns:
        has = out["mask_path"].notna()
        out.loc[has, "mask_path"] = f"{PREFIX}/{name}/" + out.loc[has, "mask_path"].astype(str)
    return out


def source_of(paths: Iterable[str] | pd.Series) -> np.ndarray:
    """The source name of each version path: ``main``, or ``<name>`` for ``sources/<name>/...``."""
    out = []
    for p in paths:
        p = str(p)
        out.append(p.split("/", 2)[1] if p.startswith(f"{PREFIX}/") else MAIN)
    return np.asarray(out, dtype=object)


def source_counts(manifest: pd.DataFrame) -> dict[str, int]:
    """Images per source (the main source first)."""
    counts = pd.Series(source_of(manifest["path"])).value_counts()
    return {k: int(counts[k]) for k in sorted(counts.index, key=lambda n: (n != MAIN, n))}
