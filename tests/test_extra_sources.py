"""``extra_sources``: more labelled folders in one dataset version, split by source, source-balanced batches."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covid_data.labels import CLASSES
from covid_data.manifest import LayoutError
from covid_data.sources import extra_sources, refuse_external, source_of
from covid_data.split import SplitConfig, make_split
from covid_data.store import open_store
from covid_data.validation import DataValidationError
from covid_models.data import SplitData, load_split_data, make_dataset
from covid_models.train import TrainConfig, train_model
from flows.prepare_data import prepare_data
from tasks.models import source_columns
from tests.conftest import SHENZHEN_CXR, make_kaggle_folder, sample_files

SMALL = {"profile": "any", "train": 0.6, "val": 0.2, "test": 0.2}


def other_hospital(dest: Path, n_per_class: int = 10, seed: int = 77, size: int = 256, classes=CLASSES) -> Path:
    """A flat ``<CLASS>/*.jpg`` folder processed unlike the sample (JPEG, another size), as a second
    hospital's export would be."""
    picks = sample_files(n_per_class, seed)
    for c in classes:
        (dest / c).mkdir(parents=True, exist_ok=True)
        for f in picks.get(c, picks[CLASSES[0]]):
            Image.open(f).convert("L").resize((size, size)).save(dest / c / f"{f.stem}.jpg", quality=85)
    return dest


# -- naming and the external-set guard --------------------------------------------------------------
def test_names_come_from_the_location_or_are_given_and_must_be_distinct():
    assert extra_sources(["/data/Hospital B/", {"uri": "gs://b/x", "name": "site-2"}]) == [
        {"uri": "/data/Hospital B/", "name": "hospital-b"},
        {"uri": "gs://b/x", "name": "site-2"},
    ]
    with pytest.raises(ValueError, match="share the name"):
        extra_sources(["/a/site", "/b/site"])
    with pytest.raises(ValueError, match="not 'main'"):
        extra_sources([{"uri": "/a", "name": "main"}])
    with pytest.raises(ValueError, match="unknown keys"):
        extra_sources([{"uri": "/a", "kind": "negative"}])


def test_an_external_set_is_never_a_training_source(tmp_path):
    ext = tmp_path / "shenzhen-cxr"
    (ext / "Normal").mkdir(parents=True)
    for uri in (str(ext), str(ext / "Normal"), f"file://{ext}", str(tmp_path)):
        with pytest.raises(ValueError, match="never training data"):
            refuse_external(extra_sources([uri]), [str(ext)])
    refuse_external(extra_sources([str(tmp_path / "hospital-b")]), [str(ext)])  # a sibling is fine
    with pytest.raises(ValueError, match="never training data"):
        refuse_external(extra_sources(["gs://b/ext/"]), ["gs://b/ext"])


def test_the_retrain_run_refuses_the_shared_external_set_as_an_extra_source():
    from flows.retrain_params import DataParams, PromotionParams, refuse_external_training

    data = DataParams(extra_sources=[str(SHENZHEN_CXR)])
    promotion = PromotionParams(external_sources=[{"uri": str(SHENZHEN_CXR), "kind": "negative"}])
    with pytest.raises(ValueError, match="shenzhen-cxr.*never training data"):
        refuse_external_training(data, promotion)
    with pytest.raises(ValueError, match="must be 1-40"):
        DataParams(extra_sources=[{"uri": "/x", "name": "Bad Name"}])


def test_the_command_line_takes_extra_sources_as_locations_or_json():
    from flows.retrain_params import cli_parameters

    params = cli_parameters(["--extra-source", "/data/site-b", "--extra-source", '{"uri": "/data/c", "name": "c"}'])
    assert params["data"].extra_sources == ["/data/site-b", {"uri": "/data/c", "name": "c"}]
    assert cli_parameters([])["data"].extra_sources is None


# -- the split --------------------------------------------------------------------------------------
def _manifest(n_main: int, n_extra: int, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for src, n in (("main", n_main), ("site-b", n_extra)):
        for c in CLASSES:
            for i in range(n):
                base = f"images/{c}/{i}.png"
                rows.append(
                    {
                        "path": base if src == "main" else f"sources/{src}/{base}",
                        "label": c,
                        "sha256": f"{src}-{c}-{i}",
                        "phash": f"{int(rng.integers(0, 2**63)):016x}",
                        "error": None,
                    }
                )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", [3, 4])
def test_each_class_of_each_source_is_spread_over_the_splits_like_the_ratios(seed):
    table, _ = make_split(_manifest(100, 20, seed=seed), SplitConfig(near_dup_distance=0, seed=seed))
    counts = table.assign(source=source_of(table["path"])).groupby(["source", "label", "split"]).size()
    for c in CLASSES:
        # 70/10/20 of 20 images: stratified by class alone, the small source's share scatters (2-8 in test).
        assert [counts[("site-b", c, s)] for s in ("train", "val", "test")] == [14, 2, 4], c
        assert [counts[("main", c, s)] for s in ("train", "val", "test")] == [70, 10, 20], c


# -- source-balanced batches ------------------------------------------------------------------------
def test_training_batches_draw_each_source_equally_often(tmp_path):
    files = [str(f) for fs in sample_files(4, seed=5).values() for f in fs]  # 16 real X-rays
    # 15 of the main source (label 0) to 1 of the extra (label 1): unbalanced, 1 draw in 16 is the extra's.
    labels = np.array([0] * 15 + [1], dtype="int32")
    sources = np.array(["main"] * 15 + ["site-b"], dtype=object)
    ds = make_dataset(files, labels, size=32, batch_size=16, training=True, sources=sources, seed=1)
    drawn = np.concatenate([y.numpy() for _, y in ds.take(40)])
    assert len(drawn) == 640
    assert 0.42 < drawn.mean() < 0.58  # ~0.5: each example's source chosen uniformly
    plain = make_dataset(files, labels, size=32, batch_size=16, training=True, seed=1)
    assert np.concatenate([y.numpy() for _, y in plain.take(40)]).mean() < 0.15


def test_head_weights_give_each_source_the_same_total():
    frame = pd.DataFrame(
        {"path": [f"images/Normal/{i}.png" for i in range(30)] + ["sources/b/images/Normal/0.png"] * 10}
    )
    data = SplitData("h", "v", Path("."), {"train": frame.assign(label="Normal", y=2)})
    w = data.balanced_weights("train")
    assert w[:30].sum() == pytest.approx(w[30:].sum())
    assert w.mean() == pytest.approx(1.0)
    one = SplitData("h", "v", Path("."), {"train": frame.head(30).assign(label="Normal", y=2)})
    assert one.balanced_weights("train") is None


# -- the prepare-data flow --------------------------------------------------------------------------
@pytest.fixture
def main_source(tmp_path: Path) -> Path:
    return make_kaggle_folder(tmp_path / "main", n_per_class=10, seed=21)


def test_an_extra_source_joins_a_new_version_under_its_name(prefect_server, main_source, tmp_path):
    store = open_store(str(tmp_path / "store"))
    alone = prepare_data(source=str(main_source), store=store.uri, **SMALL)
    stamp = store.read_bytes(f"datasets/{alone['dataset_version']}/manifest.parquet")
    site_b = other_hospital(tmp_path / "Site B")
    out = prepare_data(source=str(main_source), store=store.uri, extra_sources=[str(site_b)], **SMALL)

    assert out["sources"] == ["site-b"]
    assert out["dataset_version"] != alone["dataset_version"]
    # The main-only version stands as it was.
    assert store.read_bytes(f"datasets/{alone['dataset_version']}/manifest.parquet") == stamp
    prefix = f"datasets/{out['dataset_version']}"
    meta = json.loads(store.read_text(f"{prefix}/dataset.json"))
    assert {k: v["n_images"] for k, v in meta["sources"].items()} == {"main": 40, "site-b": 40}
    assert meta["sources"]["site-b"]["source"].endswith("Site B")
    manifest = pd.read_parquet(io.BytesIO(store.read_bytes(f"{prefix}/manifest.parquet")))
    extra = manifest[manifest["path"].str.startswith("sources/site-b/images/")]
    assert len(extra) == 40 and set(extra["label"]) == set(CLASSES)
    first = extra.iloc[0]
    assert store.read_bytes(f"{prefix}/{first['path']}") == (site_b / first["source_path"]).read_bytes()
    # 256-px JPEGs pass: the profile's 299-px check is the main source's; the extra's report is its own.
    reports = [k for k in store.list(f"{prefix}/validation/sources/site-b") if k.endswith("result.json")]
    assert len(reports) == 1 and json.loads(store.read_text(reports[0]))["success"] is True

    data = load_split_data(out["split"])
    for split in ("train", "val", "test"):
        assert set(data.sources(split)) == {"main", "site-b"}, split
    n_b = (data.sources("train") == "site-b").sum()
    assert 18 <= n_b <= 30  # ~0.6 of the 40

    # A model trained on it (source-balanced batches from the disk cache) reports each source's figures.
    cfg = TrainConfig(
        model="custom_cnn", split=out["split"], out=str(tmp_path / "model"), input_size=48, epochs=1,
        patience=0, cache_dir=str(tmp_path / "cache"), verbose=0,
    )  # fmt: skip
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text()) if train_model(cfg) else {}
    for split in ("val", "test"):
        by_source = metrics["metrics"][split]["by_source"]
        assert {k: v["n"] for k, v in by_source.items()} == {
            src: int((data.sources(split) == src).sum()) for src in ("main", "site-b")
        }
        lo, hi = by_source["site-b"]["accuracy_ci95"]
        assert lo <= by_source["site-b"]["accuracy"] <= hi
    # ... and the leaderboard shows each source's test accuracy beside the pooled one.
    cols, notes = source_columns([{"model": "custom_cnn", "status": "trained", "out": cfg.out}])
    test = metrics["metrics"]["test"]["by_source"]
    assert cols["custom_cnn"]["test_accuracy@site-b"] == test["site-b"]["accuracy"]
    assert cols["custom_cnn"]["test_accuracy@main"] == test["main"]["accuracy"]
    assert f"site-b: {test['site-b']['n']} images" in notes[0]
    assert source_columns([{"model": "custom_cnn", "status": "trained", "out": str(tmp_path / "none")}]) == ({}, [])


def test_an_extra_source_with_an_unknown_class_fails_naming_the_source(prefect_server, main_source, tmp_path):
    site = other_hospital(tmp_path / "site-c", n_per_class=3, classes=(*CLASSES, "Tuberculosis"))
    store = tmp_path / "store"
    with pytest.raises(DataValidationError, match=r"(?s)extra source 'site-c'.*Tuberculosis"):
        prepare_data(source=str(main_source), store=str(store), extra_sources=[str(site)], **SMALL)


def test_an_extra_source_that_is_not_a_labelled_folder_fails_with_its_path(prefect_server, main_source, tmp_path):
    wrong = tmp_path / "not-xrays"
    (wrong / "holiday").mkdir(parents=True)
    (wrong / "holiday" / "beach.png").write_bytes(b"\x89PNG")
    with pytest.raises(LayoutError, match="not-xrays"):
        prepare_data(source=str(main_source), store=str(tmp_path / "store"), extra_sources=[str(wrong)], **SMALL)
