"""External evaluation (flows/evaluate.py, covid_models/external_eval.py) on real X-rays and a real,
tiny trained model: renamed class folders, a missing class, copies of training images, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from covid_data.store import open_store
from covid_eval import external as ee
from covid_eval.external_metrics import HEADLINE
from covid_registry.references import resolve_model
from tests.conftest import CLASSES, REPO, SAMPLE_ROOT, make_kaggle_folder, sample_files

# Flat layout, class folders named as other mirrors name them.
RENAMED = {"COVID": "covid", "Lung_Opacity": "lung opacity", "Normal": "NORMAL", "Viral Pneumonia": "viral_pneumonia"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A store with a published 8-per-class dataset, its 60/20/20 split, a custom CNN trained on it
    (32 px, one epoch), a run folder naming it and a champion pointing at it."""
    from covid_data.dataset import fetch_dataset, load_manifest
    from covid_data.split import SplitConfig, write_split
    from covid_models.train import TrainConfig, train_model
    from covid_registry.champion import CHAMPION
    from covid_registry.run_folder import run_unit

    base = tmp_path_factory.mktemp("evaluate")
    ref = fetch_dataset(str(make_kaggle_folder(base / "src", n_per_class=8, seed=41, extras=False)), str(base / "s"))
    store = open_store(ref.store)
    split = write_split(store, ref.version, load_manifest(store, ref.version), SplitConfig(0.6, 0.2, 0.2))
    slot = store.uri_for(f"models/{split.split_hash}/custom_cnn-test")
    cfg = TrainConfig(
        model="custom_cnn",
        split=split.uri,
        out=slot,
        weights="none",
        input_size=32,
        epochs=1,
        patience=0,
        cache_dir=str(base / "cache"),
        verbose=0,
    )
    train_model(cfg)
    run_unit(store.uri, "run-1").complete({"records": [{"model": "custom_cnn", "status": "trained", "out": slot}]})
    assert store.put_if_match(CHAMPION, json.dumps({"model_uri": slot, "run_id": "run-1"}).encode(), None)
    table = pd.read_parquet(split.uri)
    return {
        "store": store.uri,
        "slot": slot,
        "split": split,
        "table": table,
        "dataset_root": Path(store.uri) / f"datasets/{ref.version}",
        "used": {p.name for files in sample_files(8, 41).values() for p in files},
        "cache": str(base / "cache"),
    }


def unseen_files(trained: dict, n_per_class: int, seed: int) -> dict[str, list[Path]]:
    """Real X-rays of the shared sample that are not in the model's dataset."""
    rng = random.Random(seed)
    out = {}
    for c in CLASSES:
        pool = [p for p in sorted((SAMPLE_ROOT / c / "images").glob("*.png")) if p.name not in trained["used"]]
        out[c] = rng.sample(pool, n_per_class)
    return out


def flat_set(dest: Path, files: dict[str, list[Path]]) -> Path:
    for c, paths in files.items():
        (dest / RENAMED[c]).mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copyfile(p, dest / RENAMED[c] / p.name)
    return dest


def _record(summary: dict) -> dict:
    return json.loads(open_store(summary["uri"]).read_text("evaluation.json"))


def test_renamed_class_folders_are_scored_once_and_reused(trained, tmp_path):
    src = flat_set(tmp_path / "theirs", unseen_files(trained, 3, seed=1))
    out = ee.evaluate_external(resolve_model("champion", trained["store"]), str(src), trained["store"])
    rec = _record(out)

    assert out["n"] == 12 and rec["counts"]["scored"] == 12 and rec["counts"]["images"] == 12
    assert rec["counts"]["scored_per_class"] == {c: 3 for c in CLASSES}
    assert rec["missing_classes"] == [] and rec["duplicates"]["seen_in_training"] == 0
    assert out["model_uri"] == trained["slot"] and rec["model"]["model"] == "custom_cnn"
    assert rec["model"]["input_size"] == 32 and rec["model"]["trained"] == "trained from scratch (all layers)"
    split_hash = trained["split"].split_hash
    doc = json.loads((Path(trained["slot"]) / "metrics.json").read_text())
    where = ("out", "split", "cache_dir", "verbose")
    identity = {"metrics": doc.get("metrics"), "config": {k: v for k, v in doc["config"].items() if k not in where}}
    marker = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    assert out["model_key"] == f"{split_hash}/custom_cnn-test-{marker}"  # the slot's name and the model's digest
    assert out["uri"] == open_store(trained["store"]).uri_for(
        f"evaluations/{split_hash}/custom_cnn-test-{marker}/{out['dataset_version']}"
    )
    m = rec["metrics"]
    assert 0 <= m["accuracy"] <= 1 and len(m["accuracy_ci95"]) == 2 and len(m["macro_f1_ci95"]) == 2
    assert m["accuracy_ci95"][0] <= m["accuracy"] <= m["accuracy_ci95"][1]
    assert sum(map(sum, m["confusion_matrix"])) == 12
    for name in HEADLINE:
        c = rec["comparison"][name]
        assert c["test"] is not None and c["test_ci95"] and c["external_ci95"] and c["delta_ci95"], name
        assert c["delta"] == pytest.approx(c["external"] - c["test"])
    # With the four classes present, macro-F1 from the test split's confusion matrix is the stored one.
    slot_doc = json.loads(open_store(trained["slot"]).read_text("metrics.json"))
    assert rec["comparison"]["macro_f1"]["test"] == pytest.approx(slot_doc["metrics"]["test"]["macro_f1"])
    unit = open_store(out["uri"])
    assert {"evaluation.json", "confusion.png", "duplicates.csv", "predictions.csv", "report.md"} <= set(unit.list())
    assert set(rec["objects"]) == set(unit.list()) - {"evaluation.json"}  # the marker vouches for each object
    assert len(pd.read_csv(Path(out["uri"]) / "predictions.csv")) == 12
    assert "# External evaluation of custom_cnn" in unit.read_text("report.md")

    stamps = {p: p.stat().st_mtime_ns for p in Path(out["uri"]).iterdir()}
    again = ee.evaluate_external(
        resolve_model("run-1/custom_cnn", trained["store"]), str(src), trained["store"]
    )  # the same slot, named by run
    assert again == out
    assert {p: p.stat().st_mtime_ns for p in Path(out["uri"]).iterdir()} == stamps


def test_a_missing_class_is_reported_and_the_rest_scored(trained, tmp_path):
    files = unseen_files(trained, 3, seed=2)
    extra = files.pop("Viral Pneumonia")
    src = flat_set(tmp_path / "theirs", files)
    (src / "covid" / "broken.png").write_text("a text file, not an image")
    (src / "Tuberculosis").mkdir()
    shutil.copyfile(extra[0], src / "Tuberculosis" / "tb-1.png")
    # An interrupted earlier attempt at the same evaluation: replaced, not trusted.
    model = resolve_model(trained["slot"], trained["store"])
    version = ee.ingest(str(src), trained["store"])["version"]
    stale = open_store(trained["store"]).unit(ee.evaluation_prefix(model.key, version), marker=ee.MARKER)
    stale.put_text("report.md", "half a report")

    out = ee.evaluate_external(trained["slot"], str(src), trained["store"])
    rec = _record(out)

    assert out["uri"] == stale.uri and open_store(out["uri"]).read_text("report.md") != "half a report"
    assert out["missing_classes"] == rec["missing_classes"] == ["Viral Pneumonia"]
    assert out["n"] == 9
    assert rec["counts"] | {"scored_per_class": None} == {
        "images": 11,
        "undecodable": 1,
        "unknown_class": 1,
        "duplicates_excluded": 0,
        "scored": 9,
        "scored_per_class": None,
    }
    assert rec["dataset"]["unknown_classes"] == {"Tuberculosis": 1}
    assert [u["path"] for u in rec["dataset"]["undecodable"]] == ["images/COVID/broken.png"]
    m = rec["metrics"]
    vp = m["per_class"]["Viral Pneumonia"]
    assert vp["support"] == 0 and vp["recall"] is None and vp["f1"] is None and vp["absent"] is True
    assert m["macro_f1_classes"] == ["COVID", "Lung_Opacity", "Normal"]
    assert m["roc_auc_macro"] is None  # undefined with a class absent, recorded as null
    assert rec["comparison"]["macro_f1"]["external"] == pytest.approx(m["macro_f1"])
    assert "Viral Pneumonia" in rec["comparison"]["note"]
    report = open_store(out["uri"]).read_text("report.md")
    assert "Classes with no images:** Viral Pneumonia" in report and "Viral Pneumonia (absent)" in report


def test_copies_of_training_images_are_reported_and_left_out(trained, tmp_path):
    from PIL import Image

    src = flat_set(tmp_path / "theirs", unseen_files(trained, 2, seed=3))
    table, root = trained["table"], trained["dataset_root"]
    train = table[table["split"] == "train"].sort_values("path")
    val = table[table["split"] == "val"].sort_values("path")
    test = table[table["split"] == "test"].sort_values("path")

    def put(row, name: str) -> Path:
        dest = src / RENAMED[row["label"]] / name
        shutil.copyfile(root / row["path"], dest)
        return dest

    put(train.iloc[0], "copy-of-train.png")
    put(val.iloc[0], "copy-of-val.png")
    put(test.iloc[0], "copy-of-test.png")  # not training data: reported, still scored
    near = put(train.iloc[1], "near-train.png")
    with Image.open(near) as im:
        px = im.convert("L")
    for xy in [(10, 10), (11, 10), (50, 60), (120, 7)]:
        px.putpixel(xy, min(255, px.getpixel(xy) + 1))
    px.save(near)

    out = ee.evaluate_external(resolve_model("champion", trained["store"]), str(src), trained["store"])
    rec = _record(out)
    dups = pd.read_csv(Path(out["uri"]) / "duplicates.csv").set_index("path")
    names = {Path(p).name: r for p, r in dups.iterrows()}
    assert set(names) == {"copy-of-train.png", "copy-of-val.png", "copy-of-test.png", "near-train.png"}
    assert (names["copy-of-train.png"]["kind"], names["copy-of-train.png"]["seen_in"]) == ("exact", "train")
    assert (names["copy-of-val.png"]["kind"], names["copy-of-val.png"]["seen_in"]) == ("exact", "val")
    assert names["near-train.png"]["kind"] == "near" and names["near-train.png"]["seen_in"] == "train"
    assert names["near-train.png"]["distance"] <= ee.DEFAULT_NEAR_DUP_DISTANCE
    assert names["near-train.png"]["match_path"] == train.iloc[1]["path"]
    assert not names["copy-of-test.png"]["excluded"] and names["copy-of-train.png"]["excluded"]
    d = rec["duplicates"]
    assert d["exact"] == {"train": 1, "val": 1, "test": 1} and d["near"] == {"train": 1, "val": 0, "test": 0}
    assert d["excluded"] == out["duplicates_excluded"] == 3 and d["seen_in_training"] == 3
    assert out["n"] == rec["counts"]["scored"] == 8 + 1  # the unseen images and the test copy
    scored = set(pd.read_csv(Path(out["uri"]) / "predictions.csv")["path"].map(lambda p: Path(p).name))
    assert not scored & {"copy-of-train.png", "copy-of-val.png", "near-train.png"}

    both = ee.evaluate_external(
        resolve_model("champion", trained["store"]), str(src), trained["store"], include_duplicates=True
    )
    assert both["n"] == 12 and both["duplicates_excluded"] == 0 and both["seen_in_training"] == 3
    assert both["uri"] == out["uri"] + "-with-duplicates"
    assert _record(both)["duplicates"]["included"] is True


def _dicom_of(png: Path, out: Path) -> None:
    """A MONOCHROME1 DICOM of an 8-bit X-ray: stored values inverted, a window that maps them back 1:1,
    so after the VOI window and the inversion its grey pixels are the PNG's."""
    import numpy as np
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    with Image.open(png) as im:
        px = np.asarray(im.convert("L"))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "CR", "Test^Patient"
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.WindowCenter, ds.WindowWidth = "128", "256"  # LINEAR: y = x exactly
    ds.PixelData = (255 - px).astype(np.uint8).tobytes()
    ds.save_as(out, enforce_file_format=True)


def test_dicom_and_camera_jpegs_are_scored_as_their_pixels(trained, tmp_path):
    """An external set of DICOM files and rotated camera JPEGs: each is scored exactly as the PNG of
    the pixels the app shows (DICOM: window and MONOCHROME1 applied; JPEG: turned upright by its EXIF
    orientation, here checked against numpy's rotation of the stored pixels)."""
    import numpy as np
    from PIL import Image

    files = unseen_files(trained, 2, seed=7)
    theirs, reference = tmp_path / "theirs", tmp_path / "reference"
    for c, paths in files.items():
        for d in (theirs, reference):
            (d / RENAMED[c]).mkdir(parents=True)
        for p in paths[:1]:
            _dicom_of(p, theirs / RENAMED[c] / f"{p.stem}.dcm")
            shutil.copyfile(p, reference / RENAMED[c] / f"{p.stem}-dcm.png")
        for p in paths[1:]:
            with Image.open(p) as im:
                stored = im.convert("L").crop((0, 0, 299, 260)).transpose(Image.Transpose.ROTATE_90)
            exif = Image.Exif()
            exif[0x0112] = 6  # the camera held sideways: display rotated 90 degrees clockwise
            jpeg = theirs / RENAMED[c] / f"{p.stem}.jpg"
            stored.save(jpeg, "JPEG", quality=90, exif=exif.tobytes())
            with Image.open(jpeg) as im:
                plain = np.asarray(im)  # the stored pixels, orientation ignored
            Image.fromarray(np.rot90(plain, k=-1)).save(reference / RENAMED[c] / f"{p.stem}-jpg.png")
    model = resolve_model("champion", trained["store"])
    out = ee.evaluate_external(model, str(theirs), trained["store"], cache_dir=trained["cache"])
    rec = _record(out)
    assert rec["counts"]["scored"] == 8 and rec["counts"]["images"] == 8
    got = pd.read_csv(Path(out["uri"]) / "predictions.csv")
    ref = ee.predict(model, sorted(str(f) for f in reference.rglob("*.png")))
    names = sorted(str(f.relative_to(reference)) for f in reference.rglob("*.png"))
    ours = {Path(p).stem: i for i, p in enumerate(got["path"])}
    prob_cols = [f"p_{c}" for c in CLASSES]
    for i, name in enumerate(names):
        key = Path(name).stem.rsplit("-", 1)[0]
        assert np.allclose(got.loc[ours[key], prob_cols].to_numpy(float), ref[i], atol=1e-6), name


def test_bad_input_fails_with_a_clear_message(trained, tmp_path):
    (tmp_path / "holiday-photos" / "beach").mkdir(parents=True)
    (tmp_path / "holiday-photos" / "beach" / "x.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="no class folders found under .*holiday-photos"):
        ee.evaluate_external(
            resolve_model("champion", trained["store"]), str(tmp_path / "holiday-photos"), trained["store"]
        )

    unknown = "unknown model reference .no-run/custom_cnn.*no runs/no-run/run.json"
    with pytest.raises(ee.EvaluationError, match=unknown):
        resolve_model("no-run/custom_cnn", trained["store"])
    with pytest.raises(ee.EvaluationError, match="run run-1 .* has no model 'vgg16'; its models: \\['custom_cnn'\\]"):
        resolve_model("run-1/vgg16", trained["store"])
    with pytest.raises(ee.EvaluationError, match="has no champion \\(no champion.json\\)"):
        resolve_model("champion", str(tmp_path / "empty-store"))
    half = tmp_path / "half-slot"
    half.mkdir()
    (half / "model.keras").write_bytes(b"interrupted")
    with pytest.raises(ee.EvaluationError, match="half-slot is not a complete model slot: no metrics.json"):
        resolve_model(str(half), trained["store"])


def test_every_flow_parameter_is_a_cli_option():
    import contextlib
    import io

    from flows.evaluate import evaluate, main

    params = set(evaluate.parameters.properties)
    assert params == {
        "model",
        "source",
        "store",
        "include_duplicates",
        "near_dup_distance",
        "cache_dir",
        "kaggle_secret_block",
        "negative",
    }
    assert evaluate.parameters.properties["near_dup_distance"]["default"] == 4  # the project's distance
    help_out = io.StringIO()  # not capsys: TensorFlow, imported by the tests before, holds the captured streams
    with pytest.raises(SystemExit), contextlib.redirect_stdout(help_out):
        main(["--help"])
    help_text = help_out.getvalue()
    for name in params:
        assert f"--{name.replace('_', '-')} " in help_text, name


@pytest.mark.slow
def test_the_cli_runs_the_flow(trained, tmp_path):
    """`python -m flows.evaluate` in its own process, on Prefect's temporary local server."""
    files = unseen_files(trained, 1, seed=4)
    src = flat_set(tmp_path / "theirs", files)
    cmd = [sys.executable, "-m", "flows.evaluate", "--model", "run-1/custom_cnn", "--source", str(src)]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # Prefect starts its own server
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), COVID_CACHE_DIR=trained["cache"])
    res = subprocess.run(
        [*cmd, "--store", trained["store"], "--include-duplicates", "--near-dup-distance", "2"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout[res.stdout.index("{") :])
    assert out["n"] == 4 and out["uri"].endswith("-with-duplicates-d2")
    rec = _record(out)
    assert rec["settings"] == {"include_duplicates": True, "near_dup_distance": 2}
    for task in ("resolve-model", "validate-external", "find-duplicates", "score-model", "write-evaluation"):
        assert task in res.stderr + res.stdout, task
