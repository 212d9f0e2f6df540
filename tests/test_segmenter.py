"""The lung segmenter (issue 16 §2): Dice/IoU, the mask sources, the stored unit, the TFLite export.

The unit test trains for real on a seeded handful of the Shenzhen masks at 32 px (seconds, and a
Dice of nothing in particular: what it checks is the unit, not the segmenter's quality, which
BENCHMARKS.md measures).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covid_data.lung_masks import MaskSourceError, find_mask_pairs, heldout_split
from covid_data.store import open_store
from covid_eval.segmentation import bootstrap_interval, dice_iou, segmentation_metrics
from covid_eval.segmenter_unit import (
    MARKER,
    TFLITE_FILE,
    SegmenterConfig,
    segmenter_key,
    segmenter_unit,
    train_segmenter_unit,
)
from tests.conftest import lung_mask_png, make_kaggle_folder, store_writes_logged

TINY = SegmenterConfig(size=32, filters=(4, 8, 16), steps=4, batch_size=4, parity_images=4)


# -- Dice and IoU ---------------------------------------------------------------------------------
def test_dice_and_iou_match_a_hand_computed_case():
    pred = np.zeros((4, 4), bool)
    ref = np.zeros((4, 4), bool)
    pred[0, 0:3] = True  # 3 pixels
    ref[0, 1:4] = ref[1, 1] = True  # 4 pixels; 2 shared with pred
    # Dice 2*2/(3+4) = 4/7; IoU 2/(3+4-2) = 2/5
    assert dice_iou(pred, ref) == pytest.approx((4 / 7, 2 / 5))
    assert dice_iou(ref, ref) == (1.0, 1.0)
    assert dice_iou(pred, np.roll(ref, 2, axis=0)) == (0.0, 0.0)
    assert dice_iou(np.zeros((2, 2)), np.zeros((2, 2))) == (1.0, 1.0)  # nothing to find, nothing found
    with pytest.raises(ValueError, match="shape"):
        dice_iou(pred, ref[:3])


def test_metrics_average_images_and_give_an_interval():
    ref = np.zeros((4, 4), bool)
    ref[0, 1:4] = ref[1, 1] = True
    perfect = ref.astype("float32")
    half = np.zeros((4, 4), "float32")
    half[0, 1:3] = 0.9  # 2 of the 4 reference pixels: Dice 2*2/(2+4) = 2/3, IoU 1/2
    m = segmentation_metrics(np.stack([perfect, half]), [ref, ref], ["a", "b"])
    assert m["dice"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["iou"] == pytest.approx((1 + 1 / 2) / 2)
    lo, hi = m["dice_ci95"]
    assert 2 / 3 <= lo <= m["dice"] <= hi <= 1.0
    assert m["per_image"]["b"] == {"dice": pytest.approx(2 / 3, abs=1e-5), "iou": 0.5}
    assert m["worst"][0]["id"] == "b"
    assert bootstrap_interval(np.full(10, 0.9)) == pytest.approx((0.9, 0.9))


def test_predictions_are_scored_at_the_reference_masks_size():
    ref = np.zeros((8, 8), bool)
    ref[:, :4] = True  # the left half
    probs = np.array([[1.0, 0.0], [1.0, 0.0]], "float32")  # the left half, at a quarter of the size
    m = segmentation_metrics(probs[None], [ref], ["x"])
    assert m["dice"] > 0.7  # bilinear resize and a 0.5 threshold keep most of the half


# -- mask sources -----------------------------------------------------------------------------------
def _xray(path: Path, size: int = 64, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype="uint8")).save(path)
    return path


def _shenzhen_like(root: Path, n: int = 4) -> Path:
    """``masks/<name>`` beside ``Normal/<name>``, synthetic pixels."""
    (root / "masks").mkdir(parents=True)
    for i in range(n):
        _xray(root / "Normal" / f"x{i}.png", seed=i)
        lung_mask_png(root / "masks" / f"x{i}.png", size=64)
    return root


def test_a_folder_without_masks_is_refused_by_name(tmp_path):
    _xray(tmp_path / "src" / "Normal" / "a.png")
    with pytest.raises(MaskSourceError, match=r"src: no lung masks found"):
        find_mask_pairs(tmp_path / "src")
    with pytest.raises(MaskSourceError, match="no such folder"):
        train_segmenter_unit(tmp_path / "absent", tmp_path / "store", TINY)


def test_a_mask_without_its_image_is_named(tmp_path):
    root = _shenzhen_like(tmp_path / "src")
    (root / "Normal" / "x2.png").unlink()
    with pytest.raises(MaskSourceError, match=r"masks/x2\.png: mask without its image"):
        find_mask_pairs(root)


def test_a_corrupt_or_wrong_mask_stops_training_before_it_starts_and_names_the_file(tmp_path):
    root = _shenzhen_like(tmp_path / "src", n=6)
    (root / "masks" / "x3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(MaskSourceError, match=r"masks/x3\.png: does not decode"):
        train_segmenter_unit(root, tmp_path / "store", TINY)
    lung_mask_png(root / "masks" / "x3.png", size=64)
    shutil.copyfile(root / "Normal" / "x1.png", root / "masks" / "x1.png")  # an X-ray misfiled as its mask
    with pytest.raises(MaskSourceError, match=r"masks/x1\.png: mask is not binary"):
        train_segmenter_unit(root, tmp_path / "store", TINY)
    assert not (tmp_path / "store" / "segmenters").exists()  # nothing was written


def test_the_kaggle_layout_and_its_published_version_pair_each_mask_with_its_image(tmp_path):
    from covid_data.dataset import fetch_dataset

    root = make_kaggle_folder(tmp_path / "src", n_per_class=3, masks="some")
    pairs = find_mask_pairs(root)
    assert len(pairs) == 8  # per class, a lung mask and an X-ray misfiled as a mask
    for p in pairs:
        assert p.image.parent.name == "images" and p.mask.parent.name == "masks" and p.image.name == p.mask.name
    assert len({p.group for p in pairs}) == 4  # one group per class: each class is held out alike
    # The published version keeps only the masks that passed the manifest's checks: masks/<label>/<name>
    ref = fetch_dataset(str(root), str(tmp_path / "store"))
    published = find_mask_pairs(tmp_path / "store" / "datasets" / ref.version)
    assert len(published) == 4
    for p in published:
        assert p.mask.relative_to(tmp_path / "store" / "datasets" / ref.version).parts[0] == "masks"
        assert p.image.parts[-3:] == ("images", p.mask.parent.name, p.mask.name)


def test_the_heldout_split_is_seeded_and_drawn_within_each_folder(tmp_path):
    root = tmp_path / "src"
    (root / "masks").mkdir(parents=True)
    for finding, n in (("Normal", 10), ("Tuberculosis", 5)):
        for i in range(n):
            name = f"{finding[0]}{i}.png"
            _xray(root / finding / name, size=8)
            lung_mask_png(root / "masks" / name, size=8)
    pairs = find_mask_pairs(root)
    train, held = heldout_split(pairs, 0.2, seed=7)
    assert heldout_split(pairs, 0.2, seed=7) == (train, held)
    assert heldout_split(pairs, 0.2, seed=8)[1] != held
    assert sorted(p.group for p in held) == ["Normal", "Normal", "Tuberculosis"]
    assert not {p.id for p in train} & {p.id for p in held}


# -- the stored unit, trained for real --------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(shenzhen_few, tmp_path_factory):
    """The unit trained once over what an interrupted attempt left; every store write logged."""
    from covid_data.lung_masks import fingerprint

    base = tmp_path_factory.mktemp("segmenter-unit")
    store = open_store(str(base / "store"))
    unit = segmenter_unit(store, segmenter_key(fingerprint(find_mask_pairs(shenzhen_few)), TINY))
    unit.put_bytes("model.keras", b"half a zip from a killed attempt")
    # its epoch log (no weights: killed before the first checkpoint), as covid_models.checkpoints writes it
    unit.put_text("backup/segmenter/history.csv", "epoch,seconds,loss,accuracy,val_loss,val_accuracy\n0,1.0,0.9,,,\n")
    with store_writes_logged(base) as written:
        record = train_segmenter_unit(shenzhen_few, store, TINY, cache_dir=base / "cache")
        writes = written()
        again = train_segmenter_unit(shenzhen_few, store, TINY, cache_dir=base / "cache")
        writes_again = written()[len(writes) :]
    return {"store": store, "unit": unit, "record": record, "again": again, "writes": writes, "again_w": writes_again}


def test_the_unit_is_written_with_its_marker_last(trained):
    unit, writes = trained["unit"], trained["writes"]
    assert trained["record"]["status"] == "trained"
    assert writes[-1] == unit.key(MARKER)
    assert {unit.key(n) for n in ("model.keras", TFLITE_FILE, "heldout.json", "MODEL_CARD.md")} <= set(writes)
    rec = unit.record()
    assert set(rec["objects"]) == {
        "model.keras",
        TFLITE_FILE,
        "heldout.json",
        "evaluation.json",
        "history.csv",
        "MODEL_CARD.md",
    }  # the killed attempt's checkpoints are gone; its half-written model was replaced
    assert unit.verify() == []


def test_the_interrupted_attempts_objects_were_replaced(trained):
    import keras

    store, unit = trained["store"], trained["unit"]
    path = store.local_path(unit.key("model.keras"))
    model = keras.saving.load_model(path, safe_mode=True)
    assert model.input_shape == (None, 32, 32, 1) and model.output_shape == (None, 32, 32, 1)


def test_a_complete_unit_is_reused_and_never_rewritten(trained):
    assert trained["again"]["status"] == "cached"
    assert trained["again_w"] == []  # not one store write
    assert trained["again"]["heldout_metrics"] == trained["record"]["heldout_metrics"]


def test_the_unit_records_the_heldout_masks_and_its_figures(trained, shenzhen_few):
    store, unit, rec = trained["store"], trained["unit"], trained["record"]
    split = json.loads(store.read_text(unit.key("heldout.json")))
    assert len(split["heldout"]) == rec["source"]["heldout"] == 2  # 20% of each finding's masks, seed 42
    assert not set(split["heldout"]) & set(split["train"])
    assert len(split["heldout"]) + len(split["train"]) == 12
    m = rec["heldout_metrics"]
    assert 0.0 <= m["dice_ci95"][0] <= m["dice"] <= m["dice_ci95"][1] <= 1.0
    per_image = json.loads(store.read_text(unit.key("evaluation.json")))["per_image"]
    assert sorted(per_image) == sorted(split["heldout"])
    card = store.read_text(unit.key("MODEL_CARD.md"))
    assert f"Dice | {m['dice']:.3f} (95% CI {m['dice_ci95'][0]:.3f}-{m['dice_ci95'][1]:.3f})" in card
    assert "IoU |" in card and "Another hospital's masks: not measured" in card
    assert rec["tflite"]["bytes"] == (Path(unit.uri) / TFLITE_FILE).stat().st_size
    assert rec["tflite"]["bytes"] < 2_000_000


def test_tflite_export_predicts_what_keras_predicts(trained, shenzhen_few):
    """Parity on real X-rays, read as the unit reads them, at the unit's size."""
    import keras

    from covid_data.lung_masks import read_pair
    from covid_models.segmenter import predict, resize_images, tflite_predict

    store, unit = trained["store"], trained["unit"]
    pairs = find_mask_pairs(shenzhen_few)[:4]
    images = resize_images([read_pair(p)[0] for p in pairs], TINY.size)
    model = keras.saving.load_model(store.local_path(unit.key("model.keras")), safe_mode=True)
    ref = predict(model, images)
    lite = tflite_predict(store.local_path(unit.key(TFLITE_FILE)), images)
    assert lite.shape == ref.shape == (4, 32, 32)
    assert np.abs(lite - ref).max() < 1e-4
    assert ref.std() > 0  # not a constant map, where parity would be trivial
