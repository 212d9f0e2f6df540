"""Images of an external set that the model has already seen: exact (sha256) or near (pHash) copies
of its split's images, found with the project's one near-duplicate matcher."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from covid_data.manifest import read_parquet_bytes
from covid_data.near_duplicates import nearest, phash_ints
from covid_data.split import SplitConfig, SplitRef, load_split

DEFAULT_NEAR_DUP_DISTANCE = SplitConfig.near_dup_distance  # the project's near-duplicate distance (bits)
SEEN_SPLITS = ("train", "val")  # what the model learnt from (val: early stopping, best epoch)
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


class EvaluationError(ValueError):
    """The model or the set cannot be evaluated; the message names what is missing."""


def training_images(split_uri: str) -> pd.DataFrame:
    """Every image of the model's split (path, label, sha256, phash, split), from the split table
    and its dataset's manifest."""
    try:
        table = load_split(split_uri)
        manifest = read_parquet_bytes(SplitRef.from_uri(split_uri).dataset_store().read_bytes("manifest.parquet"))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise EvaluationError(
            f"cannot read the split the model was trained on ({split_uri}), needed to find its training images "
            f"among the set: {type(e).__name__}: {e}"
        ) from e
    table = table[["path", "label", "sha256", "split"]].merge(manifest[["path", "phash"]], on="path", how="left")
    return table.assign(rank=table["split"].map(SPLIT_ORDER).fillna(9)).sort_values(["rank", "path"])


DUPLICATE_COLUMNS = ["path", "label", "kind", "distance", "seen_in", "match_path", "match_label", "excluded"]


def _matches(rows: pd.DataFrame, seen: pd.DataFrame, distance: int) -> list[dict[str, Any]]:
    """The best match in ``seen`` of each row that has one: exact before near, then the smaller
    distance, then train, val, test."""
    out: list[dict[str, Any]] = []
    if seen.empty or rows.empty:
        return out
    by_sha = seen.drop_duplicates("sha256").set_index("sha256")  # seen is in train, val, test order
    exact = rows["sha256"].isin(by_sha.index).to_numpy()
    for i in np.flatnonzero(exact):
        m = by_sha.loc[rows["sha256"].iloc[i]]
        out.append({"idx": i, "kind": "exact", "distance": 0, "match": m})
    if distance > 0:
        with_hash = seen[seen["phash"].notna()]
        todo = np.flatnonzero(~exact & rows["phash"].notna().to_numpy())
        ref, _ = phash_ints(with_hash["phash"])
        mine, _ = phash_ints(rows["phash"].iloc[todo])
        best, dist = nearest(mine, ref, distance, with_hash["rank"].to_numpy(dtype=np.int64))
        for j in np.flatnonzero(best >= 0):
            out.append({"idx": todo[j], "kind": "near", "distance": int(dist[j]), "match": with_hash.iloc[best[j]]})
    return out


def find_duplicates(
    rows: pd.DataFrame, seen: pd.DataFrame, distance: int = DEFAULT_NEAR_DUP_DISTANCE, *, exclude: bool = True
) -> pd.DataFrame:
    """One row per image of ``rows`` that is an exact (sha256) or near (pHash within ``distance``
    bits; 0: exact only) copy of an image of ``seen`` (:func:`training_images`).

    "Seen" has one meaning in the project (here, in blessing and in external evaluation): a copy
    or near copy of any image of the model's train or validation split. Such a row is matched
    against those splits first (and ``excluded`` when ``exclude``), even where it also copies a
    test image; the other rows are matched against the test split and only listed. Within a
    search the best match is kept: exact before near, then the smaller distance, then train before
    val."""
    if not 0 <= distance <= 64:
        raise EvaluationError(f"near_dup_distance must be 0..64 bits, got {distance}")
    learnt = seen["split"].isin(SEEN_SPLITS).to_numpy()
    found = _matches(rows, seen[learnt], distance)
    rest = np.setdiff1d(np.arange(len(rows)), [o["idx"] for o in found])
    for o in _matches(rows.iloc[rest], seen[~learnt], distance):
        found.append({**o, "idx": rest[o["idx"]]})
    records = [
        {
            "path": rows["path"].iloc[o["idx"]],
            "label": rows["label"].iloc[o["idx"]],
            "kind": o["kind"],
            "distance": o["distance"],
            "seen_in": o["match"]["split"],
            "match_path": o["match"]["path"],
            "match_label": o["match"]["label"],
            "excluded": bool(exclude and o["match"]["split"] in SEEN_SPLITS),
        }
        for o in found
    ]
    return pd.DataFrame(records, columns=DUPLICATE_COLUMNS).sort_values("path", kind="stable").reset_index(drop=True)


def seen_images(rows: pd.DataFrame, model_split_uri: str, distance: int = DEFAULT_NEAR_DUP_DISTANCE) -> np.ndarray:
    """Per row of ``rows`` (path, label, sha256, phash): has the model trained on ``model_split_uri``
    seen it (the one definition of :func:`find_duplicates`)?"""
    dups = find_duplicates(rows, training_images(model_split_uri), distance, exclude=True)
    return rows["path"].isin(set(dups.loc[dups["excluded"], "path"])).to_numpy()


def duplicates_summary(dups: pd.DataFrame, distance: int, include_duplicates: bool) -> dict[str, Any]:
    def count(kind: str) -> dict[str, int]:
        d = dups[dups["kind"] == kind]
        return {s: int((d["seen_in"] == s).sum()) for s in SPLIT_ORDER}

    seen = dups[dups["seen_in"].isin(SEEN_SPLITS)]
    return {
        "near_dup_distance": int(distance),
        "exact": count("exact"),
        "near": count("near"),
        "seen_in_training": len(seen),  # train or val
        "excluded": int(dups["excluded"].sum()),
        "included": bool(include_duplicates),
        "label_disagreements": int((dups["label"] != dups["match_label"]).sum()),
        "csv": "duplicates.csv",
    }
