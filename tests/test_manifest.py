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
    a = build_manifest(discover(make_kaggle_folder(tmp_path / "a", n_per_class=4, seed=5, masks="none")), workers=1)
    b = build_manifest(discover(make_kaggle_folder(tmp_path / "b", n_per_class=4, seed=5, extras=False)), workers=1)
    assert dataset_version(a) == dataset_version(b)  # xlsx/README don't count, order doesn't matter
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


def _old_version(m: pd.DataFrame) -> str:
    """The dataset version as computed before lung masks were read: (path, label, sha256) only."""
    import hashlib

    h = hashlib.sha256()
    for path, label, sha in sorted(zip(m["path"], m["label"], m["sha256"].fillna(""), strict=True)):
        h.update(f"{path}\t{label}\t{sha}\n".encode())
    return h.hexdigest()[:16]


def test_lung_masks_are_recorded_checked_and_versioned(tmp_path: Path):
    src = make_kaggle_folder(tmp_path / "src", n_per_class=4, seed=3)  # per class: 1 mask, 1 misfiled X-ray
    top = src / "COVID-19_Radiography_Dataset"
    broken = top / "Normal" / "masks" / sorted((top / "Normal" / "images").glob("*.png"))[2].name
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # a third, corrupt mask
    m = manifest_for_folder(src, workers=2).set_index("path")
    used = m[m["mask_path"].notna()]
    assert len(used) == 4 and set(used["label"]) == {"COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"}
    for path, row in used.iterrows():
        name = path.rsplit("/", 1)[1]
        assert row["mask_path"] == f"masks/{row['label']}/{name}"
        assert row["mask_source_path"] == f"COVID-19_Radiography_Dataset/{row['label']}/masks/{name}"
        import hashlib

        assert row["mask_sha256"] == hashlib.sha256((src / row["mask_source_path"]).read_bytes()).hexdigest()
    rejected = m[m["mask_error"].notna()]
    assert len(rejected) == 5 and rejected["mask_path"].isna().all()
    assert (rejected["mask_error"].str.startswith("mask is not binary")).sum() == 4
    assert rejected.loc[f"images/Normal/{broken.name}", "mask_error"].startswith("mask does not decode")
    assert m.loc[~m.index.isin(used.index) & ~m.index.isin(rejected.index), "mask_source_path"].isna().all()
    assert m["error"].isna().all()  # a bad mask never costs the image

    # The version hashes the masks where there are any, and nothing else changes without them.
    with_masks = dataset_version(m.reset_index())
    assert with_masks != _old_version(m.reset_index())
    changed = m.reset_index().copy()
    changed.loc[changed["mask_path"].notna().idxmax(), "mask_sha256"] = "0" * 64
    assert dataset_version(changed) != with_masks
    for d in top.glob("*/masks"):
        shutil.rmtree(d)
    plain = manifest_for_folder(src, workers=1)
    assert plain["mask_path"].isna().all() and plain["mask_error"].isna().all()
    assert dataset_version(plain) == _old_version(plain)
    old = plain.drop(columns=["mask_path", "mask_source_path", "mask_sha256", "mask_error"])
    assert dataset_version(old) == _old_version(plain)  # a manifest written before masks


def test_published_version_holds_the_masks(tmp_path: Path):
    import json

    from covid_data.dataset import Staged, fetch_dataset, load_manifest, manifest_of
    from covid_data.store import open_store

    src = make_kaggle_folder(tmp_path / "src", n_per_class=3, seed=4)
    ref = fetch_dataset(str(src), str(tmp_path / "store"))
    store = open_store(ref.store)
    manifest = load_manifest(store, ref.version)
    masked = manifest[manifest["mask_path"].notna()]
    assert len(masked) == 4
    for key, source in zip(masked["mask_path"], masked["mask_source_path"], strict=True):
        assert store.read_bytes(f"datasets/{ref.version}/{key}") == (src / source).read_bytes()
    meta = json.loads(store.read_text(f"datasets/{ref.version}/dataset.json"))
    assert meta["lung_masks"] == 4 and meta["lung_masks_not_used"] == 4
    # Re-reading the published version (a store prefix as source) gives the same version.
    again = manifest_of(Staged(str(store.local_path(f"datasets/{ref.version}")), "store"))
    assert dataset_version(again) == ref.version
