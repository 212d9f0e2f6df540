"""The shortcut audit (issue 16 §3): lungs blacked out, a small classifier on the rest.

Synthetic X-rays with a known lung region stand in for the segmenter where the point is what the
audit reads (a label drawn outside the lungs must be found, one drawn only inside them must not);
the stored unit is run for real: a tiny segmenter trained on a dozen Shenzhen masks, audited on
real X-rays of the shared sample with the weight-free "pixels" classifier.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from prefect.exceptions import ParameterTypeError

from covid_data.store import open_store
from covid_eval.segmenter_unit import SegmenterConfig, train_segmenter_unit
from covid_eval.shortcut_audit import (
    AuditConfig,
    audit_arrays,
    audit_key,
    black_out,
    chance,
    cover,
    report_lines,
    score,
)
from covid_eval.shortcut_audit_unit import EXAMPLES, MARKER, audit_split, audit_unit
from covid_models.presets import get_preset
from covid_models.segmenter import SegmenterUnitError
from covid_models.weights import MissingWeightsError
from covid_registry.run_folder import report_markdown
from flows.retrain import retrain
from flows.retrain_params import DataParams, cli_parameters
from tasks.audit import audit_data
from tests.conftest import store_writes_logged

SIZE = 64
PIXELS = AuditConfig(size=SIZE, features="pixels", pixels=16)


# -- the figures, by hand ---------------------------------------------------------------------------
def test_the_wilson_interval_matches_a_hand_computed_case():
    # 8 right of 10: p = 0.8, z = 1.959964; centre (p + z²/2n) / (1 + z²/n) = 0.716735,
    # half-width z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n) = 0.226573
    m = score(np.array([0] * 10), np.array([0] * 8 + [1] * 2), ["a", "b"])
    assert m["accuracy"] == 0.8 and m["correct"] == 8 and m["n"] == 10
    assert m["accuracy_ci95"] == pytest.approx([0.490162, 0.943308], abs=1e-5)


def test_recall_confusion_and_chance_match_a_hand_case():
    y, pred = np.array([0, 0, 0, 1, 2]), np.array([0, 0, 1, 1, 0])
    m = score(y, pred, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 0], [1, 0, 0]]  # rows: true class
    assert m["recall"] == {"a": pytest.approx(2 / 3), "b": 1.0, "c": 0.0}
    assert chance(y, ["a", "b", "c", "d"]) == {"majority": 0.6, "majority_class": "a", "uniform": 0.25}


def test_the_cover_hulls_both_lungs_and_adds_the_margin():
    m = np.zeros((1, 40, 40), bool)
    m[0, 10:30, 8:14] = m[0, 10:30, 26:32] = True  # two "lungs" with a gap between them
    plain = cover(m, margin=0.0, hull=False)
    assert (plain == m).all()
    hulled = cover(m, margin=0.0, hull=True)
    assert hulled[0, 20, 20] and not hulled[0, 5, 20]  # the mediastinum is covered, above the lungs is not
    wide = cover(m, margin=0.1, hull=True)  # 4 px at 40 px
    assert wide[0, 6, 20] and wide[0, 20, 4] and not wide[0, 5, 20] and not wide[0, 20, 3]
    assert not wide[0, 0, 0]
    speck = m.copy()
    speck[0, 38, 38] = True  # a stray pixel far from the lungs must not stretch the hull
    assert not cover(speck, margin=0.0, hull=True)[0, 34, 30]
    img = np.full((1, 40, 40), 200, "uint8")
    assert (black_out(img, wide)[wide] == 0).all() and (black_out(img, wide)[~wide] == 200).all()


# -- what the audit reads -----------------------------------------------------------------------------
def _lungs(size: int = SIZE) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    lungs = np.zeros((size, size), bool)
    for cx in (0.3, 0.7):
        lungs |= ((x - cx) / 0.13) ** 2 + ((y - 0.5) / 0.28) ** 2 <= 1
    return lungs


def _xrays(n_per_class: int, where: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes of noisy synthetic chests; class 1 carries a bright mark ``where``: in the top-left
    corner (outside the lungs) or in the middle of the left lung (inside only)."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n_per_class)
    images = rng.normal(110, 25, (len(y), SIZE, SIZE))
    images[:, _lungs()] -= 50  # lungs darker than the rest, as on an X-ray
    for i in np.flatnonzero(y == 1):
        if where == "outside":
            images[i, 2:8, 2:8] += 120
        else:
            images[i, 28:36, 16:22] += 120
    return np.clip(images, 0, 255).astype("uint8"), y


def _audit(where: str, cfg: AuditConfig = PIXELS, lungs_of=lambda label: _lungs()) -> dict:
    """The audit of synthetic train (60 a class) and test (50 a class) images; ``lungs_of(label)``: the
    mask the segmenter stand-in draws (by default, the true lungs for every image)."""
    (xtr, ytr), (xte, yte) = _xrays(60, where, seed=1), _xrays(50, where, seed=2)
    lungs = {s: np.stack([lungs_of(v) for v in y]) for s, y in (("train", ytr), ("test", yte))}
    return audit_arrays({"train": xtr, "test": xte}, {"train": ytr, "test": yte}, lungs, ["plain", "marked"], cfg)


def test_a_label_written_outside_the_lungs_is_read_with_the_lungs_blacked_out():
    res = _audit("outside")
    m = res["masked"]
    assert m["accuracy"] >= 0.95 and m["accuracy_ci95"][0] > res["chance"]["majority"] == 0.5
    assert res["meaning"].startswith("labels readable from outside the lungs:")
    assert m["n"] == 100 and sum(map(sum, m["confusion_matrix"])) == 100
    assert 0.2 < res["blacked_out"]["mean_share"] < 0.6
    assert res["mask_only"]["accuracy"] < 0.7  # the same mask for every image: its shape says nothing


def test_a_label_only_inside_the_lungs_is_at_chance_once_they_are_blacked_out():
    res = _audit("inside")
    assert res["unmasked"]["accuracy"] >= 0.95  # the reference: the mark is easy to see
    m = res["masked"]
    assert m["accuracy"] < 0.7 and m["accuracy_ci95"][0] <= res["chance"]["majority"]
    assert res["meaning"].startswith("labels not readable from outside the lungs:")
    assert (res["blacked"][:, _lungs()] == 0).all()


def test_a_mask_shape_that_carries_the_label_is_named_and_a_fixed_region_hides_it():
    """A segmenter that draws one class's lungs larger (it fails alike on sick lungs) leaks the label through
    the black region's shape: the control reads it; one fixed region for every image does not."""
    big = _lungs()
    big[16:48, 8:56] = True

    def lungs_of(label: int) -> np.ndarray:
        return big if label == 1 else _lungs()

    res = _audit("inside", lungs_of=lungs_of)
    assert res["mask_only"]["accuracy"] >= 0.95 and "the black region's shape alone reads" in res["meaning"]
    fixed = _audit("inside", replace(PIXELS, region="fixed"), lungs_of)
    assert fixed["mask_only"]["accuracy"] < 0.7 and fixed["masked"]["accuracy"] < 0.7
    assert "shape alone" not in fixed["meaning"]


# -- the stored unit, for real ------------------------------------------------------------------------
TINY = SegmenterConfig(size=32, filters=(4, 8, 16), steps=4, batch_size=4, parity_images=2)


@pytest.fixture(scope="module")
def segmenter(shenzhen_few, tmp_path_factory) -> str:
    """A tiny real segmenter unit trained on them (seconds; its quality is beside the point): its URI."""
    base = tmp_path_factory.mktemp("audit-segmenter")
    return train_segmenter_unit(shenzhen_few, base / "store", TINY, cache_dir=base / "cache")["uri"]


@pytest.fixture(scope="module")
def audited(small_split, segmenter, tmp_path_factory):
    """The audit computed over what a killed attempt left, then asked for again; every store write logged."""
    from covid_data.split import SplitRef

    base = tmp_path_factory.mktemp("audit-unit")
    ref = SplitRef.from_uri(small_split)
    key = audit_key(ref.split_hash, Path(segmenter).name, PIXELS, None)
    unit = audit_unit(open_store(ref.store), ref.version, ref.split_hash, key)
    unit.put_bytes(EXAMPLES, b"half a PNG from a killed attempt")
    with store_writes_logged(base) as written:
        first = audit_split(small_split, segmenter, PIXELS, cache_dir=base / "cache")
        writes = written()
        again = audit_split(small_split, segmenter, PIXELS, cache_dir=base / "cache")
        writes_again = written()[len(writes) :]
    return {"unit": unit, "first": first, "again": again, "writes": writes, "again_w": writes_again}


def test_the_unit_replaces_a_killed_attempt_and_writes_its_marker_last(audited):
    unit, first = audited["unit"], audited["first"]
    assert first["status"] == "computed" and first["uri"] == unit.uri
    assert audited["writes"] == [unit.key(EXAMPLES), unit.key(MARKER)]
    png = unit.store.read_bytes(unit.key(EXAMPLES))
    assert png.startswith(b"\x89PNG\r\n\x1a\n")  # the killed attempt's half PNG was replaced
    assert unit.verify() == [] and set(unit.record()["objects"]) == {EXAMPLES}
    # beside the dataset version's dataset.json, which stays as it was
    assert unit.prefix.startswith(f"datasets/{first['dataset_version']}/audits/{first['split_hash']}/")


def test_a_complete_unit_is_reused_and_never_rewritten(audited):
    assert audited["again"]["status"] == "cached"
    assert audited["again_w"] == []
    assert audited["again"]["masked"] == audited["first"]["masked"]


def test_the_record_holds_the_figures_on_real_xrays(audited, small_split):
    rec = audited["first"]
    stored = json.loads(audited["unit"].store.read_text(audited["unit"].key(MARKER)))
    assert stored["masked"] == rec["masked"] and stored["meaning"] == rec["meaning"]
    assert rec["n"] == {"train": 36, "test": 12}  # 15 per class at 60/20/20
    assert rec["chance"] == {"majority": 0.25, "majority_class": "COVID", "uniform": 0.25}
    for k in ("masked", "unmasked", "mask_only"):
        lo, hi = rec[k]["accuracy_ci95"]
        assert 0 <= lo <= rec[k]["accuracy"] <= hi <= 1 and rec[k]["n"] == 12
    assert 0.0 <= rec["blacked_out"]["mean_share"] <= 1.0 and set(rec["blacked_out"]["per_class"]) == {
        "COVID",
        "Lung_Opacity",
        "Normal",
        "Viral Pneumonia",
    }
    assert rec["segmenter"]["key"] == Path(audited["first"]["segmenter"]["uri"]).name


def test_without_the_weights_the_error_names_the_file_and_the_way_out(small_split, segmenter, tmp_path, monkeypatch):
    monkeypatch.setenv("COVID_WEIGHTS_DIR", str(tmp_path / "no-weights"))  # and no downloads (conftest)
    with pytest.raises(MissingWeightsError, match=r"(?s)mobilenet_v2_weights.*no-weights.*features='pixels'"):
        audit_split(small_split, segmenter, replace(PIXELS, features="mobilenet_v2"), cache_dir=tmp_path)


def test_an_incomplete_segmenter_is_refused_by_name(small_split, tmp_path):
    (tmp_path / "segmenters" / "abc").mkdir(parents=True)
    with pytest.raises(SegmenterUnitError, match=r"abc: not a complete segmenter unit"):
        audit_split(small_split, str(tmp_path / "segmenters" / "abc"), PIXELS, cache_dir=tmp_path)


def test_the_run_report_shows_the_accuracy_its_interval_and_meaning(audited):
    rec = audited["first"]
    run = {"run_id": "r1", "dataset": {"dataset_version": "v", "split_hash": "h"}, "preset": {"name": "cpu"}}
    report = report_markdown({**run, "exports": [], "models": {}, "shortcut_audit": rec}, "| board |")
    lo, hi = rec["masked"]["accuracy_ci95"]
    assert f"Test accuracy {rec['masked']['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}, n=12)" in report
    assert rec["meaning"] in report and rec["uri"] in report
    failed = report_lines({"status": "failed", "reason": "no weights"})
    assert failed[-1].endswith("not computed: no weights")
    assert "Shortcut audit" not in report_markdown({**run, "exports": [], "models": {}}, "| board |")
    capped = report_lines({**rec, "max_per_class": 40})[-1]
    assert "n=12, the split capped at 40 images per class)" in capped


# -- the retrain flow's option ------------------------------------------------------------------------
def test_the_option_is_off_by_default_and_checked_before_the_run():
    assert DataParams().lung_masks is None and DataParams().segmenter is None
    argv = ["--lung-masks", "/m", "--segmenter", '{"steps": 300}']
    data = cli_parameters(argv)["data"]
    assert data == retrain.validate_parameters({"data": {"lung_masks": "/m", "segmenter": {"steps": 300}}})["data"]
    kw = data.prepare_kwargs(get_preset("cpu"))
    assert "lung_masks" not in kw and "segmenter" not in kw  # the prepare-data subflow takes neither
    with pytest.raises(ParameterTypeError, match="not a segmenter recipe"):
        retrain.validate_parameters({"data": {"segmenter": {"stepz": 300}}})


def test_the_flow_stage_audits_and_a_failure_is_recorded_not_raised(
    prefect_server, shenzhen_few, segmenter, small_split
):
    from prefect import flow

    store = str(Path(segmenter).parents[1])  # where the segmenter unit is: the stage reuses it

    @flow
    def stage(masks: str | None, audit: dict) -> dict | None:
        return audit_data(masks, store, small_split, TINY.to_dict(), audit)

    assert stage(None, PIXELS.to_dict()) is None
    wider = {**PIXELS.to_dict(), "margin": 0.08}  # a recipe of its own: computed here, not found complete
    rec = stage(str(shenzhen_few), wider)
    assert rec["status"] == "computed" and rec["segmenter"]["uri"] == segmenter == rec["segmenter_uri"]
    assert rec["config"]["margin"] == 0.08 and rec["masked"]["n"] == 12 and rec["meaning"]
    bad = stage(str(shenzhen_few), {**PIXELS.to_dict(), "margin": 0.7})
    assert bad["status"] == "failed" and "margin is a share of the image side" in bad["reason"]
    assert bad["segmenter_uri"] == segmenter  # the Grad-CAM shortcut score still gets its outline
    assert "not computed: the shortcut audit failed" in report_lines(bad)[-1]


def test_the_shortcut_score_uses_the_segmenters_masks_where_the_dataset_has_none(small_split, segmenter, tmp_path):
    from covid_data.labels import CLASSES
    from covid_eval.gallery import _pool, explain_model, load_images, segmenter_masks
    from covid_eval.gradcam import shortcut_baseline
    from covid_models.data import load_split_data
    from tests.test_gradcam import _model_slot

    uri = _model_slot(tmp_path, size=64)
    banded = explain_model(uri, small_split, tmp_path / "band", pool_per_class=3)
    outlined = explain_model(uri, small_split, tmp_path / "lungs", pool_per_class=3, segmenter_uri=segmenter)
    assert banded["method"] == "border band 10%"  # the shared sample ships no lung masks
    assert outlined["method"] == "segmenter lung masks"
    # The same pooled test images, outlined by the segmenter: the uniform map's score is their area outside.
    data = load_split_data(small_split)
    rows = _pool(data, "test", list(CLASSES), 3, 0)
    images = load_images([str(data.root / p) for p in rows["path"]], 64, 1)
    masks = segmenter_masks(segmenter, images)
    assert masks.shape == (len(rows), 64, 64) and masks.dtype == bool
    assert outlined["baseline"] == pytest.approx(shortcut_baseline((64, 64), masks), abs=5e-4)
    assert outlined["n"] == banded["n"] == len(rows)
    assert 0.05 < masks.mean() < 0.95, masks.mean()  # even this tiny segmenter outlines something ...
    assert outlined["baseline"] != pytest.approx(banded["baseline"], abs=1e-3)  # ... which the band is not
    # A segmenter that cannot run (moved, half-written) costs the outline, never the explanation.
    gone = explain_model(uri, small_split, tmp_path / "gone", pool_per_class=3, segmenter_uri=str(tmp_path / "nope"))
    assert gone["method"] == "border band 10%" and gone["baseline"] == banded["baseline"]
