"""The split: stratified, seeded, and no identical or near-identical image across splits."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from covid_data.labels import CLASSES
from covid_data.manifest import manifest_for_folder
from covid_data.near_duplicates import duplicate_groups
from covid_data.split import SplitConfig, make_split, split_hash, write_split
from covid_data.store import open_store
from tests.conftest import make_kaggle_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = make_kaggle_folder(tmp_path_factory.mktemp("split"), n_per_class=40, seed=11, extras=False)
    top = folder / "COVID-19_Radiography_Dataset"
    for label in ("COVID", "Normal"):
        imgs = sorted((top / label / "images").glob("*.png"))
        for i, src in enumerate(imgs[:4]):
            shutil.copyfile(src, top / label / "images" / f"exact-copy-{i}.png")
            im = Image.open(src)  # a re-encoded, slightly brighter copy: different bytes, same X-ray
            buf = io.BytesIO()
            ImageEnhance.Brightness(im).enhance(1.05).save(buf, "JPEG", quality=80)
            (top / label / "images" / f"near-copy-{i}.jpg").write_bytes(buf.getvalue())
    return folder


@pytest.fixture(scope="module")
def manifest(folder) -> pd.DataFrame:
    return manifest_for_folder(folder, workers=2)


def test_deterministic_for_a_seed(manifest):
    a, _ = make_split(manifest, SplitConfig(seed=1))
    b, _ = make_split(manifest.sample(frac=1, random_state=3), SplitConfig(seed=1))
    c, _ = make_split(manifest, SplitConfig(seed=2))
    assert split_hash("v", a) == split_hash("v", b)
    assert split_hash("v", a) != split_hash("v", c)


def test_stratified_ratios(manifest):
    table, _ = make_split(manifest, SplitConfig())
    frac = table.groupby("label")["split"].value_counts(normalize=True).unstack()
    assert ((frac["train"] - 0.7).abs() < 0.08).all(), frac
    assert ((frac["val"] - 0.1).abs() < 0.06).all(), frac
    assert ((frac["test"] - 0.2).abs() < 0.08).all(), frac


def test_copies_never_cross_splits(manifest):
    table, n_groups = make_split(manifest, SplitConfig(seed=5))
    assert n_groups >= 8  # the 8 originals with their copies (the sample may add its own)
    by_path = table.set_index("path")
    for label in ("COVID", "Normal"):
        copies = table[table["path"].str.contains(f"images/{label}/(?:exact|near)-copy-", regex=True)]
        for _, row in copies.iterrows():
            group = table[table["group"] == row["group"]]
            assert len(group) >= 3, group  # original + exact copy + near copy
            assert group["split"].nunique() == 1
    assert by_path["split"].isin(["train", "val", "test"]).all()
    for _, g in table.groupby("sha256"):
        assert g["split"].nunique() == 1


def test_exact_only_grouping_misses_near_copies(manifest):
    table, _ = make_split(manifest, SplitConfig(near_dup_distance=0))
    near = table[table["path"].str.contains("near-copy-")]
    assert all((table["group"] == g).sum() == 1 for g in near["group"])


def test_paper_80_20_and_bad_ratios(manifest):
    table, _ = make_split(manifest, SplitConfig.paper())
    assert set(table["split"]) == {"train", "val"}
    assert abs((table["split"] == "val").mean() - 0.2) < 0.05
    with pytest.raises(ValueError, match="sum to 1"):
        SplitConfig(train=0.7, val=0.2, test=0.2)


def test_unusable_rows_are_excluded_and_split_is_stored(manifest, tmp_path):
    m = manifest.copy()
    m.loc[m.index[0], "error"] = "does not decode"
    store = open_store(tmp_path / "store")
    ref = write_split(store, "abc", m, SplitConfig())
    assert ref.excluded == 1
    stored = pd.read_parquet(ref.uri)
    assert m.iloc[0]["path"] not in set(stored["path"])
    assert split_hash("abc", stored, SplitConfig()) == ref.split_hash
    assert sum(sum(c.values()) for c in ref.counts.values()) == len(m) - 1
    again = write_split(store, "abc", m, SplitConfig())
    assert again.split_hash == ref.split_hash  # idempotent: same key, nothing replaced


# -- stable splits across dataset versions -------------------------------------------------------
@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> pd.DataFrame:
    """The manifest of 165 real X-rays per class: enough for a release and its successor."""
    folder = make_kaggle_folder(tmp_path_factory.mktemp("pool"), n_per_class=165, seed=23, extras=False)
    return manifest_for_folder(folder, workers=2)


def _releases(pool: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(version 1, version 2 = v1 + 10% new - 2% removed, the removed rows)."""
    rows = pool.sample(frac=1, random_state=7).reset_index(drop=True)
    n1 = 600
    v1 = rows.iloc[:n1]
    new = rows.iloc[n1 : n1 + n1 // 10]
    removed = v1.sample(n=n1 // 50, random_state=8)
    v2 = pd.concat([v1.drop(removed.index), new])
    return v1.reset_index(drop=True), v2.reset_index(drop=True), removed


def _publish(store, manifest: pd.DataFrame, cfg: SplitConfig):
    from covid_data.manifest import dataset_version

    return write_split(store, dataset_version(manifest), manifest, cfg)


def _assignment(ref) -> dict[str, str]:
    table = pd.read_parquet(ref.uri)
    return dict(zip(table["path"], table["split"], strict=True))


def test_new_version_keeps_every_surviving_assignment(pool, tmp_path):
    v1, v2, _ = _releases(pool)
    store = open_store(tmp_path / "store")
    cfg = SplitConfig()
    ref1 = _publish(store, v1, cfg)
    ref2 = _publish(store, v2, cfg)
    assert ref1.parent is None and ref1.carried == 0
    assert ref2.parent == ref1.split_hash
    assert ref2.carried == v2["sha256"].isin(v1["sha256"]).sum() >= 588  # survivors (+ copies of them)
    assert json.loads(store.read_text(f"{ref2.prefix}/split.json"))["parent"] == ref1.split_hash
    a1, a2 = _assignment(ref1), _assignment(ref2)
    survivors = set(a1) & set(a2)
    assert len(survivors) == 588
    assert [p for p in survivors if a1[p] != a2[p]] == []
    table = pd.read_parquet(ref2.uri)
    share = table.groupby("label")["split"].value_counts(normalize=True).unstack()
    for s, target in cfg.ratios().items():
        assert ((share[s] - target).abs() <= 0.02).all(), share


def test_same_inputs_give_the_same_split_hashes(pool, tmp_path):
    v1, v2, _ = _releases(pool)
    hashes = []
    for name in ("a", "b"):
        store = open_store(tmp_path / name)
        ref1 = _publish(store, v1, SplitConfig(seed=3))
        ref2 = _publish(store, v2.sample(frac=1, random_state=len(name)), SplitConfig(seed=3))  # row order is moot
        hashes.append((ref1.split_hash, ref2.split_hash))
    assert hashes[0] == hashes[1]
    other = _publish(open_store(tmp_path / "c"), v1, SplitConfig(seed=4))
    assert other.split_hash != hashes[0][0]


def test_removed_then_readded_image_keeps_its_split(pool, tmp_path):
    v1, v2, removed = _releases(pool)
    store = open_store(tmp_path / "store")
    ref1, ref2 = _publish(store, v1, SplitConfig()), _publish(store, v2, SplitConfig())
    v3 = pd.concat([v2, removed]).reset_index(drop=True)
    ref3 = _publish(store, v3, SplitConfig())
    assert ref3.parent == ref2.split_hash  # v2 no longer holds them: the lineage's ledger does
    a1, a3 = _assignment(ref1), _assignment(ref3)
    assert {p: a3[p] for p in removed["path"]} == {p: a1[p] for p in removed["path"]}
    assert len(set(a1[p] for p in removed["path"])) > 1  # the test covers more than one split


def test_group_joining_two_splits_goes_to_the_strictest(pool, tmp_path):
    v1, _, _ = _releases(pool)
    store = open_store(tmp_path / "store")
    ref1 = _publish(store, v1, SplitConfig())
    t1 = pd.read_parquet(ref1.uri).set_index("path")
    a = v1[v1["path"] == t1.index[t1["split"] == "train"][0]].iloc[0]
    b = v1[v1["path"] == t1.index[t1["split"] == "test"][0]].iloc[0]
    bridge = a.copy()  # a copy of a (same bytes) whose pHash is b's: it links the two groups
    bridge["path"], bridge["phash"] = "images/COVID/bridge.png", b["phash"]
    ref2 = _publish(store, pd.concat([v1, bridge.to_frame().T]), SplitConfig())
    a2 = _assignment(ref2)
    assert a2[a["path"]] == a2[b["path"]] == a2["images/COVID/bridge.png"] == "test"


def test_other_config_starts_its_own_lineage(pool, tmp_path):
    v1, v2, _ = _releases(pool)
    store = open_store(tmp_path / "store")
    _publish(store, v1, SplitConfig())
    assert _publish(store, v2, SplitConfig(seed=9)).parent is None
    assert _publish(store, v2, SplitConfig(max_group_share=0.01)).parent is not None  # grouping only


# -- crash safety --------------------------------------------------------------------------------
def test_incomplete_split_is_replaced_and_complete_one_never_rewritten(manifest, tmp_path):
    cfg = SplitConfig()
    fresh = write_split(open_store(tmp_path / "reference"), "v1", manifest, cfg)
    store = open_store(tmp_path / "store")
    parquet = tmp_path / "store" / fresh.prefix / "split.parquet"
    parquet.parent.mkdir(parents=True)
    parquet.write_bytes(b"half of an earlier attempt")  # no split.json: an interrupted attempt
    ref = write_split(store, "v1", manifest, cfg)
    assert ref.split_hash == fresh.split_hash
    assert pd.read_parquet(parquet).equals(pd.read_parquet(fresh.uri))
    assert (tmp_path / "store" / fresh.prefix / "split.json").is_file()

    # Complete now: another pandas/pyarrow would write other bytes; they must not matter.
    other_bytes = pd.read_parquet(parquet)
    other_bytes.to_parquet(parquet, index=False, compression="gzip")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in parquet.parent.iterdir()}
    again = write_split(store, "v1", manifest, cfg)
    assert again == ref
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in parquet.parent.iterdir()} == before


# -- near-duplicate groups -----------------------------------------------------------------------
def _chain_manifest(chain: int, others: int, seed: int = 0) -> pd.DataFrame:
    """A chain of pHashes one bit apart (its ends far apart), two exact copies inside it, and
    unrelated images: a chain longer than the bound must not become one group."""
    rng = np.random.default_rng(seed)
    h = int(rng.integers(0, 2**63))
    rows = []
    for i in range(chain):
        h ^= 1 << i  # each link flips one more bit
        rows.append({"sha256": f"chain{i:03d}", "phash": f"{h:016x}"})
    rows.append({"sha256": "chain005", "phash": rows[5]["phash"]})  # exact copies of link 5
    rows.append({"sha256": "chain005", "phash": rows[5]["phash"]})
    for i in range(others):
        rows.append({"sha256": f"other{i:04d}", "phash": f"{int(rng.integers(0, 2**63)) * 2:016x}"})
    df = pd.DataFrame(rows)
    return df.assign(
        path=[f"images/{CLASSES[i % 4]}/{i:05d}.png" for i in range(len(df))],
        label=[CLASSES[i % 4] for i in range(len(df))],
        error=None,
    )


def test_long_near_duplicate_chain_is_split_back(caplog):
    m = _chain_manifest(chain=30, others=400)
    unbounded = duplicate_groups(m["sha256"], m["phash"], 4)
    assert len(set(unbounded[:30])) == 1  # transitively one group of 32 images
    with caplog.at_level(logging.WARNING, logger="covid_data"):
        table, _ = make_split(m, SplitConfig())
    assert SplitConfig().group_bound(len(m)) == 20
    assert "group of 32 images" in caplog.text
    chain = table[table["sha256"].str.startswith("chain")]
    assert chain.groupby("group").size().max() == 3  # only the exact copies stay together
    assert chain[chain["sha256"] == "chain005"]["group"].nunique() == 1
    assert chain[chain["sha256"] == "chain005"]["split"].nunique() == 1
    wide = SplitConfig(max_group_share=1.0)
    table, _ = make_split(m, wide)
    assert table[table["sha256"].str.startswith("chain")]["group"].nunique() == 1


def test_chain_is_cut_at_its_loose_links_not_its_tight_ones():
    """Links 3 bits apart, each with a near copy 1 bit away: the chain is cut at 2 bits, where
    every X-ray still keeps its near copy."""
    rng = np.random.default_rng(1)
    h = int(rng.integers(0, 2**63))
    rows = []
    for i in range(12):
        for bit in range(3 * i, 3 * i + 3):
            h ^= 1 << bit
        rows.append({"sha256": f"link{i:02d}", "phash": f"{h:016x}"})
        rows.append({"sha256": f"copy{i:02d}", "phash": f"{h ^ (1 << (40 + i)):016x}"})
    sha, phash = pd.Series([r["sha256"] for r in rows]), pd.Series([r["phash"] for r in rows])
    assert len(set(duplicate_groups(sha, phash, 4))) == 1  # one chain of 24
    groups = duplicate_groups(sha, phash, 4, max_group=20)
    assert len(set(groups)) == 12
    assert all(groups[2 * i] == groups[2 * i + 1] for i in range(12))


@pytest.mark.parametrize("distance", [1, 4, 8, 20])
def test_banded_grouping_matches_all_pairs(distance):
    rng = np.random.default_rng(distance)
    base = rng.integers(0, 2**63, size=150, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    flips = rng.integers(0, 64, size=(600, distance + 2))
    h = base[rng.integers(0, 150, size=600)]
    for k in range(flips.shape[1]):  # near copies: up to distance+2 random bit flips
        h ^= np.where(rng.random(600) < 0.5, np.uint64(1) << flips[:, k].astype(np.uint64), np.uint64(0))
    phash = pd.Series([f"{int(x):016x}" for x in h])
    sha = pd.Series([f"s{i}" for i in range(600)])
    got = duplicate_groups(sha, phash, distance)
    close = np.bitwise_count(h[:, None] ^ h[None, :]) <= distance
    from scipy.sparse.csgraph import connected_components

    _, want = connected_components(close, directed=False)
    assert (pd.factorize(pd.Series(got))[0] == pd.factorize(pd.Series(want))[0]).all()
    assert len(set(got)) < 600  # the data did have near copies to find
