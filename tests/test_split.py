"""The split: stratified, seeded, and no identical or near-identical image across splits."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from covid_data.manifest import manifest_for_folder
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
    assert split_hash("abc", stored) == ref.split_hash
    assert sum(sum(c.values()) for c in ref.counts.values()) == len(m) - 1
    again = write_split(store, "abc", m, SplitConfig())
    assert again.split_hash == ref.split_hash  # idempotent: same key, nothing replaced
