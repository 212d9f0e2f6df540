"""Leak-free, stratified, seeded train / validation / test split.

Identical images (same sha256) and near-identical ones (perceptual hashes within
``near_dup_distance`` bits) form one group, and a group always lands in one split. The
assignment uses scikit-learn's ``StratifiedGroupKFold``: the ratios are turned into a number
of folds (70/10/20 -> 10 folds: 7 train, 1 val, 2 test; 80/20 -> 5 folds), so every split is
stratified by label and deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np
import pandas as pd

from covid_data.labels import CLASSES
from covid_data.store import Store, open_store

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    train: float = 0.7
    val: float = 0.1
    test: float = 0.2
    seed: int = 42
    near_dup_distance: int = 4  # Hamming bits between 64-bit pHashes; 0 = exact copies only

    def __post_init__(self):
        ratios = (self.train, self.val, self.test)
        if any(r < 0 for r in ratios) or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
            raise ValueError(f"split ratios must be non-negative and sum to 1, got {ratios}")
        if self.train <= 0:
            raise ValueError("the train ratio must be positive")

    @classmethod
    def paper(cls, seed: int = 42) -> SplitConfig:
        """The study's 80/20 train/validation split."""
        return cls(train=0.8, val=0.2, test=0.0, seed=seed)

    def folds(self) -> tuple[int, tuple[int, int, int]]:
        fr = [Fraction(r).limit_denominator(100) for r in (self.train, self.val, self.test)]
        n = math.lcm(*(f.denominator for f in fr))
        if n > 100:
            raise ValueError(f"split ratios {self.train}/{self.val}/{self.test} need {n} folds; use whole percents")
        return n, tuple(int(f * n) for f in fr)  # type: ignore[return-value]


@dataclass(frozen=True)
class SplitRef:
    store: str
    version: str
    split_hash: str
    counts: dict[str, dict[str, int]]  # split -> label -> images
    duplicate_groups: int  # groups of 2+ identical or near-identical images
    excluded: int

    @property
    def prefix(self) -> str:
        return f"datasets/{self.version}/splits/{self.split_hash}"

    @property
    def uri(self) -> str:
        return open_store(self.store).uri_for(f"{self.prefix}/split.parquet")

    def to_dict(self) -> dict:
        return {**asdict(self), "uri": self.uri}


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def duplicate_groups(sha256: pd.Series, phash: pd.Series, max_distance: int, chunk: int = 512) -> np.ndarray:
    """Group id per row: rows with equal sha256 or pHashes within ``max_distance`` bits share one."""
    n = len(sha256)
    uf = _UnionFind(n)
    first: dict[str, int] = {}
    for i, s in enumerate(sha256):
        if s in first:
            uf.union(first[s], i)
        else:
            first[s] = i
    if max_distance > 0 and n > 1:
        h = np.array([int(x, 16) for x in phash], dtype=np.uint64)
        for start in range(0, n, chunk):
            block = h[start : start + chunk]
            dist = np.bitwise_count(block[:, None] ^ h[None, :])
            rows, cols = np.nonzero(dist <= max_distance)
            for r, c in zip(rows + start, cols, strict=True):
                if c > r:
                    uf.union(int(r), int(c))
    return np.array([uf.find(i) for i in range(n)])


def make_split(manifest: pd.DataFrame, cfg: SplitConfig) -> tuple[pd.DataFrame, int]:
    """Assign each usable row to a split. Returns (table, number of duplicate groups)."""
    from sklearn.model_selection import StratifiedGroupKFold

    usable = manifest[manifest["error"].isna() & manifest["label"].isin(CLASSES)]
    usable = usable.sort_values("path", kind="stable").reset_index(drop=True)
    groups = duplicate_groups(usable["sha256"], usable["phash"], cfg.near_dup_distance)
    sizes = pd.Series(groups).value_counts()
    n_dup_groups = int((sizes > 1).sum())

    n_folds, (k_train, k_val, _k_test) = cfg.folds()
    smallest = usable["label"].value_counts().min()
    if smallest < n_folds:
        raise ValueError(
            f"the smallest class has {smallest} usable images; a {cfg.train}/{cfg.val}/{cfg.test} split needs "
            f"at least {n_folds} per class"
        )
    fold_of = np.empty(len(usable), dtype=int)
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=cfg.seed)
    for fold, (_, idx) in enumerate(sgkf.split(np.zeros(len(usable)), usable["label"], groups)):
        fold_of[idx] = fold
    split = np.where(fold_of < k_train, "train", np.where(fold_of < k_train + k_val, "val", "test"))
    table = usable[["path", "label", "sha256"]].assign(group=groups, split=split)
    return table, n_dup_groups


def split_hash(version: str, table: pd.DataFrame) -> str:
    h = hashlib.sha256(version.encode())
    for path, split in sorted(zip(table["path"], table["split"], strict=True)):
        h.update(f"\n{path}\t{split}".encode())
    return h.hexdigest()[:16]


def split_counts(table: pd.DataFrame) -> dict[str, dict[str, int]]:
    c = table.groupby(["split", "label"]).size()
    return {s: {lab: int(c.get((s, lab), 0)) for lab in CLASSES} for s in SPLITS if s in set(table["split"])}


def write_split(store: Store, version: str, manifest: pd.DataFrame, cfg: SplitConfig) -> SplitRef:
    from covid_data.manifest import to_parquet_bytes

    table, n_dup = make_split(manifest, cfg)
    h = split_hash(version, table)
    ref = SplitRef(
        store=store.uri,
        version=version,
        split_hash=h,
        counts=split_counts(table),
        duplicate_groups=n_dup,
        excluded=len(manifest) - len(table),
    )
    store.put_bytes(f"{ref.prefix}/split.parquet", to_parquet_bytes(table))
    info = {"config": asdict(cfg), **ref.to_dict()}
    if not store.exists(f"{ref.prefix}/split.json"):
        store.put_text(f"{ref.prefix}/split.json", json.dumps(info, indent=2, sort_keys=True))
    log.info(
        "split %s of dataset %s: %s; %d duplicate groups kept within one split; %d rows excluded",
        h,
        version,
        {s: sum(v.values()) for s, v in ref.counts.items()},
        n_dup,
        ref.excluded,
    )
    return ref


def load_split(uri: str) -> pd.DataFrame:
    from covid_data.manifest import read_parquet_bytes
    from covid_data.store import read_object

    return read_parquet_bytes(read_object(uri))
