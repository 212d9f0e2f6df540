"""The app's out-of-distribution guard, fitted for real on a seeded sample of the shared X-rays
and scored, through its TFLite file, on real non-chest radiographs and real photographs."""

from __future__ import annotations

import numpy as np
import pytest

from covid_app import guard as G
from tests.conftest import MOBILENET_WEIGHTS, SHARED, make_kaggle_folder, require_shared
from tests.photographs import photographs

OOD = SHARED / "data" / "ood-radiographs"
DICOM_NOT_CHEST = (SHARED / "data" / "dicom" / "RG3_J2KR.dcm", SHARED / "data" / "dicom" / "CR-ModalitySequenceLUT.dcm")


def _images(paths) -> np.ndarray:
    from covid_models.data import decode_resize

    return np.stack([decode_resize(str(p), G.INPUT_SIZE, 1).numpy() for p in paths]).astype("float32")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, monkeypatch_module):
    require_shared(MOBILENET_WEIGHTS, OOD, *DICOM_NOT_CHEST)
    from covid_data.dataset import fetch_dataset, load_manifest
    from covid_data.split import SplitConfig, write_split
    from covid_data.store import open_store

    monkeypatch_module.setenv("COVID_WEIGHTS_DIR", str(MOBILENET_WEIGHTS.parent))
    base = tmp_path_factory.mktemp("guard")
    ref = fetch_dataset(str(make_kaggle_folder(base / "src", n_per_class=60, seed=7, extras=False)), str(base / "s"))
    store = open_store(ref.store)
    split = write_split(store, ref.version, load_manifest(store, ref.version), SplitConfig(0.7, 0.15, 0.15))
    rec = G.ensure_guard(str(base / "s"), split.uri, split.split_hash)
    return rec, split


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_threshold_is_the_validation_quantile(fitted):
    rec, _ = fitted
    assert rec["input_size"] == G.INPUT_SIZE and rec["quantile"] == G.QUANTILE
    n_val = rec["fitted_on"]["val"]
    # By construction at most (1 - quantile) of validation, rounded up to one image, is flagged.
    assert rec["val_false_alarm"] <= max(1 - G.QUANTILE, 1 / n_val) + 1e-9
    assert rec["test_false_alarm"] is not None and rec["test_false_alarm"] <= 0.1


def test_guard_flags_other_radiographs_and_photographs(fitted):
    rec, _ = fitted
    ood = sorted(p for p in OOD.glob("*/*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    assert len(ood) >= 40
    ood_scores = G.tflite_scores(rec["uri"], _images(ood))
    missed = [p.parent.name + "/" + p.name for p, s in zip(ood, ood_scores, strict=True) if s <= rec["threshold"]]
    assert len(missed) <= 0.1 * len(ood), f"missed {len(missed)}/{len(ood)}: {missed}"
    photos = photographs()
    photo_scores = G.tflite_scores(rec["uri"], np.stack(list(photos.values())))
    assert all(photo_scores > rec["threshold"]), dict(zip(photos, photo_scores.round(1), strict=True))


def test_view_check_in_the_record(fitted):
    """The record's view check: its version, thresholds that are the stated quantiles of the train and
    validation X-rays' cues (computed again here, file by file), and its false-alarm rates."""
    from covid_app import view as V
    from covid_models.data import load_split_data

    rec, split = fitted
    view = rec["view"]
    assert view["version"] == V.VERSION and view["quantiles"] == {"asymmetry": 0.995, "midline": 0.005}
    data = load_split_data(split.uri)
    trainval = V.cue_arrays(_images(data.files("train")[0] + data.files("val")[0]))
    n = len(trainval["asymmetry"])
    assert view["fitted_on"]["trainval"] == n == rec["fitted_on"]["train"] + rec["fitted_on"]["val"]
    assert view["asymmetry_threshold"] == float(np.quantile(trainval["asymmetry"], 0.995))
    assert view["midline_threshold"] == float(np.quantile(trainval["midline"], 0.005))
    # Below a linearly interpolated 0.5% quantile lie at most floor(0.005 (n - 1)) + 1 values; above the
    # 99.5% quantile as many: the two cues together flag at most twice that.
    assert view["trainval_false_alarm"] <= 2 * (np.floor(0.005 * (n - 1)) + 1) / n + 1e-9
    assert view["test_false_alarm"] is not None and view["test_false_alarm"] <= 0.1
    # A new view-check definition makes a new guard unit: its version and code are in the key.
    assert G.guard_key("x") != _key_with_view_version(V.VERSION + 1)


def _key_with_view_version(version: int) -> str:
    from covid_app import view as V

    old = V.VERSION
    V.VERSION = version
    try:
        return G.guard_key("x")
    finally:
        V.VERSION = old


def test_guard_with_view_check_flags_non_chest_pictures(fitted):
    """The whole check the page runs (score, then view) on the 44 non-chest radiographs and the DICOM
    ankle and dental films: at least 95% flagged (issue 17's goal)."""
    from covid_app import view as V

    rec, _ = fitted
    paths = sorted(p for p in OOD.glob("*/*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    paths += list(DICOM_NOT_CHEST)
    imgs = _images(paths)
    score = G.tflite_scores(rec["uri"], imgs)
    view = np.array([V.flagged(V.cues(x), rec["view"]) for x in imgs])
    flagged = (score > rec["threshold"]) | view
    missed = [p.name for p, f in zip(paths, flagged, strict=True) if not f]
    assert len(missed) <= 0.05 * len(paths), f"missed {len(missed)}/{len(paths)}: {missed}"


def test_tflite_guard_scores_as_fitted(fitted):
    """The one-file TFLite guard (what the app runs) gives the scores of the fitted subspace."""
    from covid_data.store import open_store
    from covid_models.data import load_split_data

    rec, split = fitted
    sub = np.load(open_store(rec["uri"].rsplit("/", 1)[0]).local_path("subspace.npz"))
    paths = load_split_data(split.uri).files("test")[0][:8]
    imgs = _images(paths)
    features = G.feature_model(MOBILENET_WEIGHTS).predict(imgs, verbose=0)
    expected = G.scores(sub["mean"], sub["basis"], features)
    np.testing.assert_allclose(G.tflite_scores(rec["uri"], imgs), expected, rtol=1e-3, atol=1e-3)


def test_features_taken_at_an_earlier_layer_are_that_layers_and_drop_the_blocks_after_it():
    """``feature_model(layer=...)`` (benchmarks/guard_cut.py) pools that layer's channels, keeps the ImageNet
    weights of the blocks before it (its features on a real X-ray equal the full network's layer output,
    pooled and normalised) and has none of the blocks after it."""
    import keras

    require_shared(MOBILENET_WEIGHTS)
    full = G.feature_model(MOBILENET_WEIGHTS)
    cut = G.feature_model(MOBILENET_WEIGHTS, "block_13_expand_relu")
    assert cut.output.shape[-1] == 576 and full.output.shape[-1] == 1280
    assert cut.count_params() < full.count_params() / 3
    assert not [w for w in cut.weights if "block_14" in w.path or "Conv_1" in w.path]
    normals = SHARED / "data/covid19-radiography-sample/COVID-19_Radiography_Dataset/Normal/images"
    img = _images([next(normals.glob("*.png"))])
    backbone = next(layer for layer in full.layers if isinstance(layer, keras.Model))
    inner = keras.Model(backbone.input, backbone.get_layer("block_13_expand_relu").output)
    x = (img.astype("float32") / 127.5 - 1.0).repeat(3, -1)  # MobileNetV2's preprocess_input, grey -> RGB
    pooled = inner.predict(x, verbose=0).mean((1, 2))
    expected = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
    np.testing.assert_allclose(cut.predict(img, verbose=0), expected, rtol=1e-4, atol=1e-5)


def test_colourfulness_separates_grey_from_colour():
    grey = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    assert G.colourfulness(grey) == 0.0
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    assert G.colourfulness(red) == pytest.approx(1.0)


def test_missing_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("COVID_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(G.GuardUnavailableError, match="mobilenet_v2_.*no_top"):
        G.ensure_guard(str(tmp_path / "store"), "unused", "unused")


def test_a_split_without_test_images_gets_a_guard(tmp_path, monkeypatch):
    """The paper's 80/20 split has no test images: the guard is fitted on train and validation and
    records no test figures (an empty file list must not reach the image decoder)."""
    require_shared(MOBILENET_WEIGHTS)
    from covid_data.dataset import fetch_dataset, load_manifest
    from covid_data.split import SplitConfig, write_split
    from covid_data.store import open_store

    monkeypatch.setenv("COVID_WEIGHTS_DIR", str(MOBILENET_WEIGHTS.parent))
    ref = fetch_dataset(
        str(make_kaggle_folder(tmp_path / "src", n_per_class=10, seed=3, extras=False)), str(tmp_path / "s")
    )
    store = open_store(ref.store)
    split = write_split(store, ref.version, load_manifest(store, ref.version), SplitConfig(0.8, 0.2, 0.0))
    rec = G.ensure_guard(str(tmp_path / "s"), split.uri, split.split_hash)
    assert rec["fitted_on"]["test"] == 0 and rec["test_false_alarm"] is None
    assert rec["fitted_on"]["train"] + rec["fitted_on"]["val"] == 40
    assert rec["view"]["fitted_on"] == {"trainval": 40, "test": 0} and rec["view"]["test_false_alarm"] is None
