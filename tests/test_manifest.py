"""Manifest building on real X-rays: layouts, label variants and every kind of broken file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from covid_data.manifest import LayoutError, build_manifest, dataset_version, discover, manifest_for_folder
from tests.conftest import make_kaggle_folder, sample_files


def test_kaggle_layout_ignores_masks_and_metadata(kaggle_folder: Path):
    m = manifest_for_folder(kaggle_folder, workers=2)
    assert len(m) == 48
    assert m["label"].value_counts().to_dict() == {"COVID": 12, "Lung_Opacity": 12, "Normal": 12, "Viral Pneumonia": 12}
    assert not m["source_path"].str.contains("masks|xlsx|README").any()
    assert m["error"].isna().all()
    assert set(m["width"]) == {299} and set(m["height"]) == {299} and set(m["mode"]) == {"L"}
    row = m.iloc[0]
    src = kaggle_folder / row["source_path"]
    import hashlib

    assert row["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert row["bytes"] == src.stat().st_size
    assert row["path"] == f"images/{row['label']}/{src.name}"


def test_flat_layout_with_folder_name_variants(tmp_path: Path):
    names = {"COVID": "covid", "Lung_Opacity": "Lung Opacity", "Normal": "NORMAL", "Viral Pneumonia": "viral_pneumonia"}
    for label, files in sample_files(3, seed=1).items():
        d = tmp_path / "flat" / names[label]
        d.mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, d / f.name)
    m = manifest_for_folder(tmp_path / "flat", workers=1)
    assert sorted(m["label"].unique()) == ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    assert m["path"].str.startswith("images/Viral Pneumonia/").sum() == 3


def test_broken_files_are_kept_with_their_error(kaggle_folder: Path):
    covid = kaggle_folder / "COVID-19_Radiography_Dataset" / "COVID" / "images"
    good = sorted(covid.glob("*.png"))
    data = good[0].read_bytes()
    (covid / "truncated.png").write_bytes(data[: len(data) // 3])
    (covid / "empty.png").write_bytes(b"")
    (covid / "notes.txt").write_text("radiologist notes, not an image")
    flipped = bytearray(data)
    flipped[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # damage the compressed stream
    (covid / "corrupt.png").write_bytes(bytes(flipped))
    Image.open(good[1]).save(covid / "bitmap.bmp")
    m = manifest_for_folder(kaggle_folder, workers=2).set_index("path")
    err = m["error"]
    assert err["images/COVID/empty.png"] == "empty file (0 bytes)"
    assert err["images/COVID/notes.txt"].startswith("not an image")
    assert "does not decode" in err["images/COVID/truncated.png"]
    assert "does not decode" in err["images/COVID/corrupt.png"]
    assert err["images/COVID/bitmap.bmp"] == "unsupported image format BMP"
    assert err.notna().sum() == 5


def test_unknown_class_folder_keeps_its_name(kaggle_folder: Path):
    top = kaggle_folder / "COVID-19_Radiography_Dataset"
    (top / "Tuberculosis" / "images").mkdir(parents=True)
    shutil.copyfile(next((top / "Normal" / "images").glob("*.png")), top / "Tuberculosis" / "images" / "t.png")
    m = manifest_for_folder(kaggle_folder, workers=1)
    assert (m["label"] == "Tuberculosis").sum() == 1


def test_wrong_folder_is_a_layout_error(tmp_path: Path):
    (tmp_path / "photos" / "holiday").mkdir(parents=True)
    with pytest.raises(LayoutError, match="no class folders found under .*photos"):
        discover(tmp_path / "photos")
    with pytest.raises(LayoutError, match="does not exist"):
        discover(tmp_path / "nowhere")


def test_version_is_a_content_address(tmp_path: Path):
    a = build_manifest(discover(make_kaggle_folder(tmp_path / "a", n_per_class=4, seed=5)), workers=1)
    b = build_manifest(discover(make_kaggle_folder(tmp_path / "b", n_per_class=4, seed=5, extras=False)), workers=1)
    assert dataset_version(a) == dataset_version(b)  # masks/xlsx don't count, order doesn't matter
    assert dataset_version(a.iloc[::-1]) == dataset_version(a)
    c = a.copy()
    c.loc[0, "sha256"] = "0" * 64
    assert dataset_version(c) != dataset_version(a)


def test_incomplete_version_is_replaced_and_complete_one_never_rewritten(tmp_path: Path):
    from covid_data.dataset import MANIFEST, publish_version
    from covid_data.store import open_store

    src = make_kaggle_folder(tmp_path / "src", n_per_class=3, seed=9, extras=False)
    m = manifest_for_folder(src, workers=1)
    store = open_store(tmp_path / "store")
    folder = tmp_path / "store" / "datasets" / dataset_version(m)
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text('{"left": "by an interrupted attempt"}')  # no manifest: incomplete
    ref = publish_version(store, m, src, source="test")
    assert ref.uploaded == 12
    assert '"n_images": 12' in (folder / "dataset.json").read_text()
    assert pd.read_parquet(folder / MANIFEST).equals(m)

    # Complete now: a manifest written by another pandas/pyarrow has other bytes; no matter.
    m.to_parquet(folder / MANIFEST, index=False, compression="gzip")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}
    again = publish_version(store, m, src, source="test")
    assert again.version == ref.version and again.uploaded == 0
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()} == before
