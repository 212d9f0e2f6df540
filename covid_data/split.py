"""Leak-free, stratified, seeded train / validation / test split, stable across dataset versions.

Identical images (same sha256) and near-identical ones (perceptual hashes within
``near_dup_distance`` bits) form one group, and a group always lands in one split.

* The first split of a lineage (no earlier split with the same ratios, seed and distance in
  the store) uses scikit-learn's ``StratifiedGroupKFold``: the ratios are turned into a
  number of folds (70/10/20 -> 10 folds: 7 train, 1 val, 2 test; 80/20 -> 5 folds).
* Every later split carries the assignment of each surviving image forward from the newest
  complete split of the same lineage (matched by sha256, including images that were removed
  and come back), so a new release never moves an image between splits. Only new groups are
  placed, deterministically, each into the split with the largest deficit for its class.

Store layout of one split (``datasets/<version>/splits/<split hash>/``): ``split.parquet``,
``assignments.parquet`` (every image the lineage has ever assigned, for the next version),
then, written last and create-only, the completion marker ``split.json``. A folder without
``split.json`` is an interrupted attempt and is overwritten; a complete one is never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from fractions import Fraction

import numpy as np
import pandas as pd

from covid_data.labels import CLASSES
from covid_data.manifest import read_parquet_bytes, to_parquet_bytes
from covid_data.near_duplicates import duplicate_groups
from covid_data.sources import source_of
from covid_data.store import Store, UnitCompleteError, open_store, read_object

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# When groups that were assigned differently merge, the strictest split wins, so nothing
# that was ever evaluated on moves into training.
_PRIORITY = {"train": 0, "val": 1, "test": 2}
MARKER = "split.json"
# A near-duplicate group is never bounded below this many images: genuine copies of one
# X-ray (re-encodings, crops) number a handful; on the shared sample at 4 bits the largest
# group has 3 images.
MIN_GROUP_BOUND = 20
_SPLIT_URI = re.compile(r"(.+)/datasets/([^/]+)/splits/([^/]+)/split\.parquet")
_SPLIT_JSON = re.compile(r"datasets/[^/]+/splits/[^/]+/split\.json")


@dataclass(frozen=True)
class SplitConfig:
    train: float = 0.7
    val: float = 0.1
    test: float = 0.2
    seed: int = 42
    near_dup_distance: int = 4  # Hamming bits between 64-bit pHashes; 0 = exact copies only
    # Near-duplicate groups larger than max(MIN_GROUP_BOUND, share x usable images) are
    # pHash chains, not copies of one image, and are regrouped at tighter distances (down to
    # exact copies) until each part is within the bound.
    # 0.2% keeps one group below a third of the smallest stratum of the Kaggle release
    # (Viral Pneumonia in validation: ~134 images, 0.64%), so stratification stays possible.
    # 1.0 disables the bound.
    max_group_share: float = 0.002

    def __post_init__(self):
        ratios = (self.train, self.val, self.test)
        if any(r < 0 for r in ratios) or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
            raise ValueError(f"split ratios must be non-negative and sum to 1, got {ratios}")
        if self.train <= 0:
            raise ValueError("the train ratio must be positive")
        if not 0 <= self.near_dup_distance <= 64:
            raise ValueError(f"near_dup_distance must be 0..64 bits, got {self.near_dup_distance}")
        if not 0 <= self.max_group_share <= 1:
            raise ValueError(f"max_group_share must be in [0, 1], got {self.max_group_share}")

    @classmethod
    def paper(cls, seed: int = 42) -> SplitConfig:
        """The study's 80/20 train/validation split."""
        return cls(train=0.8, val=0.2, test=0.0, seed=seed)

    def ratios(self) -> dict[str, float]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def lineage_key(self) -> dict[str, float | int]:
        """What a predecessor split must share for its assignments to be carried forward. The
        group bound is left out: it only changes how images are grouped, not where they go."""
        return {
            "train": round(self.train, 6),
            "val": round(self.val, 6),
            "test": round(self.test, 6),
            "seed": int(self.seed),
            "near_dup_distance": int(self.near_dup_distance),
        }

    def group_bound(self, n_rows: int) -> int:
        return max(MIN_GROUP_BOUND, math.floor(self.max_group_share * n_rows))

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
    largest_group: int = 1  # images in the largest group after the bound
    parent: str | None = None  # split hash this one carried its assignments from
    carried: int = 0  # images whose split came from the parent lineage

    @property
    def prefix(self) -> str:
        return f"datasets/{self.version}/splits/{self.split_hash}"

    @property
    def uri(self) -> str:
        return open_store(self.store).uri_for(f"{self.prefix}/split.parquet")

    def to_dict(self) -> dict:
        return {**asdict(self), "uri": self.uri}

    @staticmethod
    def locate(uri: str) -> tuple[str, str, str]:
        """(store root, dataset version, split hash) of a split URI, read from the URI alone."""
        m = _SPLIT_URI.fullmatch(str(uri).rstrip("/"))
        if m is None:
            raise ValueError(f"{uri!r} is not a split URI (<store>/datasets/<version>/splits/<hash>/split.parquet)")
        return m.group(1), m.group(2), m.group(3)

    @classmethod
    def from_uri(cls, uri: str) -> SplitRef:
        """The split that ``<store>/datasets/<version>/splits/<hash>/split.parquet`` names; its counts
        and lineage from ``split.json`` where that marker is there (zeros where it is not)."""
        root, version, split_hash = cls.locate(uri)
        store = open_store(root)
        key = f"datasets/{version}/splits/{split_hash}/{MARKER}"
        info = json.loads(store.read_text(key)) if store.exists(key) else {}
        names = {f.name for f in fields(cls)} - {"store", "version", "split_hash"}
        base = {"counts": {}, "duplicate_groups": 0, "excluded": 0}
        kept = {k: v for k, v in info.items() if k in names}
        return cls(store=store.uri, version=version, split_hash=split_hash, **{**base, **kept})

    @property
    def dataset_uri(self) -> str:
        return open_store(self.store).uri_for(f"datasets/{self.version}")

    def dataset_store(self) -> Store:
        """The dataset version's folder as a store (its images, masks and ``manifest.parquet``)."""
        return open_store(self.dataset_uri)

    def cache_key(self, max_per_class: int | None = None) -> str:
        """The split hash, with the cap where the rows are capped: what local caches are keyed on."""
        return self.split_hash + (f"-cap{max_per_class}" if max_per_class else "")


def usable_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    usable = manifest[manifest["error"].isna() & manifest["label"].isin(CLASSES)]
    return usable.sort_values("path", kind="stable").reset_index(drop=True)


def _assign_folds(usable: pd.DataFrame, groups: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """The first split of a lineage: StratifiedGroupKFold."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_folds, (k_train, k_val, _k_test) = cfg.folds()
    smallest = usable["label"].value_counts().min()
    if smallest < n_folds:
        raise ValueError(
            f"the smallest class has {smallest} usable images; a {cfg.train}/{cfg.val}/{cfg.test} split needs "
            f"at least {n_folds} per class"
        )
    strata = usable["label"]
    source = pd.Series(source_of(usable["path"]), index=usable.index)
    if source.nunique() > 1:
        # With extra sources, each source's classes spread over the splits like the main source's, where
        # every (class, source) has enough images for the folds; a smaller one is stratified by class only.
        by_source = usable["label"] + "|" + source
        sizes = by_source.value_counts()
        small = sorted(sizes[sizes < n_folds].index)
        if small:
            log.warning("(class|source) strata %s have under %d images: stratified by class alone", small, n_folds)
        else:
            strata = by_source
    fold_of = np.empty(len(usable), dtype=int)
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=cfg.seed)
    for fold, (_, idx) in enumerate(sgkf.split(np.zeros(len(usable)), strata, groups)):
        fold_of[idx] = fold
    return np.where(fold_of < k_train, "train", np.where(fold_of < k_train + k_val, "val", "test"))


def _carry_forward(usable: pd.DataFrame, groups: np.ndarray, cfg: SplitConfig, prior: pd.Series) -> np.ndarray:
    """Later splits: surviving groups keep their split; new groups fill per-class deficits."""
    rank = usable["sha256"].map(prior).map(_PRIORITY)  # NaN for images never assigned
    df = pd.DataFrame({"group": groups, "label": usable["label"], "sha256": usable["sha256"], "rank": rank})
    per_group = df.groupby("group").agg(rank=("rank", "max"), low=("rank", "min"), min_sha=("sha256", "min"))
    mixed = per_group[per_group["low"] < per_group["rank"]]
    if len(mixed):
        moved = int(((df["rank"] < df["group"].map(per_group["rank"])) & df["group"].isin(mixed.index)).sum())
        log.warning(
            "%d duplicate groups joined images from different earlier splits; %d images moved to the "
            "strictest of them (test > val > train), so nothing seen in evaluation is trained on",
            len(mixed),
            moved,
        )
    # Groups with any earlier assignment keep the strictest one.
    split_of_group: dict[int, str] = {int(g): SPLITS[int(r)] for g, r in per_group["rank"].dropna().items()}

    active = [s for s in SPLITS if cfg.ratios()[s] > 0]
    totals = df["label"].value_counts()
    target = {(c, s): cfg.ratios()[s] * totals.get(c, 0) for c in CLASSES for s in active}
    carried_rows = df[df["group"].isin(split_of_group)]
    counts = {(c, s): 0 for c in CLASSES for s in active}
    for (c, s), k in (
        carried_rows.assign(split=carried_rows["group"].map(split_of_group)).groupby(["label", "split"]).size().items()
    ):
        counts[(c, s)] = counts.get((c, s), 0) + int(k)

    new = per_group[per_group["rank"].isna()]
    # Deterministic, seed-dependent and independent of paths: a group's place in the queue
    # comes from its content alone.
    keys = [hashlib.sha256(f"{cfg.seed}:{s}".encode()).hexdigest() for s in new["min_sha"]]
    queue = new.index[np.argsort(np.array(keys), kind="stable")]
    per_label = df[df["group"].isin(new.index)].groupby(["group", "label"]).size().rename("n").reset_index()
    # A group's class is its majority label (near-duplicates across classes are rare; ties by name).
    majority = per_label.sort_values(["group", "n", "label"], ascending=[True, False, True]).drop_duplicates("group")
    label_of = dict(zip(majority["group"], majority["label"], strict=True))
    members: dict[int, list[tuple[str, int]]] = {}
    for g, lab, k in zip(per_label["group"], per_label["label"], per_label["n"], strict=True):
        members.setdefault(int(g), []).append((lab, int(k)))
    for g in queue:
        c = label_of[g]
        # Largest deficit against the class's target; ties go to the larger ratio, then train first.
        s = max(active, key=lambda s: (target[(c, s)] - counts[(c, s)], cfg.ratios()[s], -SPLITS.index(s)))
        split_of_group[int(g)] = s
        for lab, k in members[int(g)]:
            counts[(lab, s)] += k
    return df["group"].map(split_of_group).to_numpy()


def make_split(manifest: pd.DataFrame, cfg: SplitConfig, prior: pd.Series | None = None) -> tuple[pd.DataFrame, int]:
    """Assign each usable row to a split. Returns (table, number of duplicate groups).

    ``prior`` (sha256 -> split) holds the assignments of the lineage so far; when any usable
    image is in it, those assignments are carried forward, otherwise the split is drawn afresh."""
    usable = usable_rows(manifest)
    groups = duplicate_groups(
        usable["sha256"], usable["phash"], cfg.near_dup_distance, max_group=cfg.group_bound(len(usable))
    )
    sizes = pd.Series(groups).value_counts()
    n_dup_groups = int((sizes > 1).sum())
    if prior is not None and usable["sha256"].isin(prior.index).any():
        split = _carry_forward(usable, groups, cfg, prior)
    else:
        split = _assign_folds(usable, groups, cfg)
    table = usable[["path", "label", "sha256"]].assign(group=groups, split=split)
    return table, n_dup_groups


def split_hash(version: str, table: pd.DataFrame, cfg: SplitConfig | None = None, parent: str | None = None) -> str:
    """Content address of a split: dataset version, config, parent and every (path, split)."""
    h = hashlib.sha256(version.encode())
    if cfg is not None:
        h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    if parent:
        h.update(f"\nparent {parent}".encode())
    for path, split in sorted(zip(table["path"], table["split"], strict=True)):
        h.update(f"\n{path}\t{split}".encode())
    return h.hexdigest()[:16]


def split_counts(table: pd.DataFrame) -> dict[str, dict[str, int]]:
    c = table.groupby(["split", "label"]).size()
    return {s: {lab: int(c.get((s, lab), 0)) for lab in CLASSES} for s in SPLITS if s in set(table["split"])}


# -- the store -----------------------------------------------------------------------------------
def _ref_from_info(store: Store, info: dict) -> SplitRef:
    names = {f.name for f in fields(SplitRef)}
    return SplitRef(**{**{k: v for k, v in info.items() if k in names}, "store": store.uri})


def _complete_splits(store: Store, prefix: str = "datasets") -> list[dict]:
    """The ``split.json`` of every complete split under ``prefix`` (with ``_key`` added)."""
    out = []
    for key in store.list(prefix):
        if _SPLIT_JSON.fullmatch(key):
            try:
                info = json.loads(store.read_text(key))
            except (ValueError, FileNotFoundError) as e:
                log.warning("ignoring unreadable split marker %s: %s", store.uri_for(key), e)
                continue
            out.append({**info, "_key": key})
    return out


def _lineage(info: dict) -> dict | None:
    cfg = info.get("config") or {}
    try:
        return SplitConfig(**cfg).lineage_key()
    except (TypeError, ValueError):
        return None


def find_split(store: Store, version: str, cfg: SplitConfig) -> SplitRef | None:
    """The complete split of ``version`` made with exactly ``cfg``, if there is one (the oldest)."""
    same = [i for i in _complete_splits(store, f"datasets/{version}/splits") if i.get("config") == asdict(cfg)]
    if not same:
        return None
    return _ref_from_info(store, min(same, key=lambda i: (i.get("created", ""), i["split_hash"])))


def find_parent(store: Store, cfg: SplitConfig) -> dict | None:
    """The newest complete split of the same lineage (ratios, seed, distance), of any version."""
    key = cfg.lineage_key()
    same = [i for i in _complete_splits(store) if _lineage(i) == key]
    return max(same, key=lambda i: (i.get("created", ""), i["split_hash"])) if same else None


def load_assignments(store: Store, info: dict) -> pd.Series:
    """sha256 -> split: every image the lineage of this split has assigned."""

    prefix = info["_key"].rsplit("/", 1)[0]
    key = f"{prefix}/assignments.parquet"
    table = read_parquet_bytes(store.read_bytes(key if store.exists(key) else f"{prefix}/split.parquet"))
    return _ledger(table)


def _ledger(table: pd.DataFrame) -> pd.Series:
    """One split per sha256 (the strictest, should one ever appear twice)."""
    ranked = table[["sha256", "split"]].assign(rank=table["split"].map(_PRIORITY))
    best = ranked.sort_values(["sha256", "rank"]).drop_duplicates("sha256", keep="last")
    return best.set_index("sha256")["split"]


def write_split(store: Store, version: str, manifest: pd.DataFrame, cfg: SplitConfig) -> SplitRef:
    """Compute and store the split of ``version``, or return the complete one already there."""

    existing = find_split(store, version, cfg)
    if existing is not None:
        log.info("split %s of dataset %s is already complete in %s", existing.split_hash, version, store.uri)
        return existing

    parent = find_parent(store, cfg)
    prior = load_assignments(store, parent) if parent else None
    table, n_dup = make_split(manifest, cfg, prior)
    carried = int(table["sha256"].isin(prior.index).sum()) if prior is not None else 0
    parent_hash = parent["split_hash"] if parent and carried else None
    h = split_hash(version, table, cfg, parent_hash)
    ref = SplitRef(
        store=store.uri,
        version=version,
        split_hash=h,
        counts=split_counts(table),
        duplicate_groups=n_dup,
        excluded=len(manifest) - len(table),
        largest_group=int(table["group"].value_counts().max()) if len(table) else 0,
        parent=parent_hash,
        carried=carried,
    )
    unit = store.unit(ref.prefix, marker=MARKER)
    done = unit.record()
    if done is not None:  # completed meanwhile (or by an identical earlier run)
        return _ref_from_info(store, done)
    ledger = _ledger(table)
    if parent_hash:
        assert prior is not None
        ledger = pd.concat([prior[~prior.index.isin(ledger.index)], ledger]).sort_index()
    assignments = ledger.rename_axis("sha256").reset_index()
    try:
        # Until the marker exists, objects an interrupted attempt left are replaced: their bytes
        # may differ (another pandas/pyarrow) and only the marker vouches for them.
        unit.put_bytes("split.parquet", to_parquet_bytes(table))
        unit.put_bytes("assignments.parquet", to_parquet_bytes(assignments))
        completed = unit.complete({"config": asdict(cfg), "created": datetime.now(UTC).isoformat(), **ref.to_dict()})
    except UnitCompleteError:
        completed = False
    if not completed:  # a concurrent run completed the same split first: theirs stands
        return _ref_from_info(store, unit.record() or {})
    log.info(
        "split %s of dataset %s: %s; %d duplicate groups kept within one split (largest %d images); "
        "%d images carried from split %s; %d rows excluded",
        h,
        version,
        {s: sum(v.values()) for s, v in ref.counts.items()},
        n_dup,
        ref.largest_group,
        carried,
        parent_hash,
        ref.excluded,
    )
    return ref


def load_split(uri: str) -> pd.DataFrame:

    return read_parquet_bytes(read_object(uri))
