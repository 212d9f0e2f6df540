"""The app's lung outline (issue 16 §2): the page's contour code (``app/src/lungs.js`` under node) on
probability grids whose outline is known by hand, and against scikit-image's marching squares
(``measure.find_contours``, the same linear interpolation and saddle rule) on smooth random grids,
point for point; the stats the page shows against numpy. The segmenter itself in the page, against
Python's TFLite: ``tests/test_app_browser.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.app_browser import precache_list
from tests.conftest import REPO, run_page_code, skip_or_fail

NODE_HELPER = REPO / "app" / "test" / "lungs-node.mjs"


def _in_node(tmp: Path, grids: list[np.ndarray], threshold: float = 0.5) -> list[dict]:
    items = []
    for i, g in enumerate(grids):
        f = tmp / f"{i}.f32"
        f.write_bytes(np.ascontiguousarray(g, "<f4").tobytes())
        items.append({"file": str(f), "size": int(g.shape[0]), "threshold": threshold})
    return run_page_code(NODE_HELPER, items, tmp, "the lung outline's test")


def _area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))) / 2


def _skimage_rings(grid: np.ndarray, threshold: float = 0.5) -> list[np.ndarray]:
    """scikit-image's contours of the zero-padded grid, as (x, y) in the page's units (pixel i spans
    [i, i + 1]): its (row, col) are padded indices, whose centres sit at index - 1 + 0.5."""
    from skimage import measure

    padded = np.pad(np.asarray(grid, np.float32).astype(np.float64), 1)
    rings = measure.find_contours(padded, threshold, fully_connected="low")
    return [np.stack([c[:-1, 1] - 0.5, c[:-1, 0] - 0.5], axis=1) for c in rings]  # closed: last == first


def _cone(size: int, centre: tuple[float, float], radius: float, slope: float = 8.0) -> np.ndarray:
    """1/2 exactly on the circle, rising inwards: linear interpolation finds the circle."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    d = np.hypot(xx - centre[0], yy - centre[1])
    return np.clip(0.5 + (radius - d) / slope, 0, 1).astype(np.float32)


def test_outlines_worked_out_by_hand(tmp_path):
    size = 96
    disc = _cone(size, (40.0, 48.0), 20.0)
    full = np.ones((size, size), np.float32)
    checker = np.zeros((4, 4), np.float32)
    checker[1, 1] = checker[2, 2] = 1.0  # two lung pixels touching at a corner only
    empty = np.zeros((size, size), np.float32)
    res = _in_node(tmp_path, [disc, full, checker, empty])

    # A disc of radius 20: one ring, the inscribed polygon's area a hair under pi r^2.
    assert len(res[0]["rings"]) == 1
    assert math.pi * 400 * 0.99 < res[0]["areas"][0] <= math.pi * 400
    xs = np.array(res[0]["rings"][0])
    assert np.allclose(np.hypot(xs[:, 0] - 40, xs[:, 1] - 48), 20, atol=0.05)  # every point on the circle
    # Lung everywhere: the zero padding closes the ring half way to the padding's centres, on the image's
    # edge, less a corner triangle of legs 1/2 at each corner (one lung corner in that cell): 96^2 - 4/8.
    assert len(res[1]["rings"]) == 1 and res[1]["areas"][0] == pytest.approx(size * size - 0.5, abs=1e-9)
    assert {tuple(p) for p in res[1]["rings"][0]} >= {(0, 0.5), (96, 95.5), (0.5, 96), (95.5, 0)}
    # A saddle keeps the two corners apart: two diamonds of half-diagonal 1/2, area 1/2 each.
    assert sorted(res[2]["areas"]) == pytest.approx([0.5, 0.5], abs=1e-12)
    assert res[3]["rings"] == [] and res[3]["path"] == "" and res[3]["stats"]["share"] == 0


def test_the_outline_is_scikit_images_contour(tmp_path):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(7)
    grids = [
        _cone(96, (30.0, 50.0), 18.0) + _cone(96, (66.0, 50.0), 16.0),  # two lungs
        _cone(96, (4.0, 48.0), 15.0),  # a lung cut by the image's edge
    ]
    for sigma in (1.5, 3.0, 5.0):  # smooth random fields: many rings, holes and saddles
        g = gaussian_filter(rng.random((96, 96)), sigma)
        grids.append(((g - g.min()) / (g.max() - g.min())).astype(np.float32))
    grids.append(rng.random((32, 32)).astype(np.float32))  # rough: saddles everywhere
    res = _in_node(tmp_path, grids)
    for i, (g, r) in enumerate(zip(grids, res, strict=True)):
        ref = _skimage_rings(g)
        assert len(r["rings"]) == len(ref) and len(ref) >= 1, (i, len(r["rings"]), len(ref))
        # Ring for ring, the same points (rings are matched by their point sets; start and direction may differ).
        mine = sorted(sorted(map(tuple, np.round(np.array(x), 6))) for x in r["rings"])
        theirs = sorted(sorted(map(tuple, np.round(x, 6))) for x in ref)
        assert mine == theirs, i
        assert sorted(r["areas"]) == pytest.approx(sorted(_area(x) for x in ref), abs=1e-6)
    assert max(len(r["rings"]) for r in res) >= 20  # the rough grid's saddles were met


def test_the_stats_are_the_share_of_pixels_over_the_threshold_in_each_half(tmp_path):
    rng = np.random.default_rng(3)
    grids = [rng.random((96, 96)).astype(np.float32), _cone(96, (30.0, 50.0), 18.0)]
    for g, r in zip(grids, _in_node(tmp_path, grids, threshold=0.6), strict=True):
        over = g > 0.6
        assert r["stats"]["share"] == pytest.approx(over.mean(), abs=1e-12)
        assert r["stats"]["left"] == pytest.approx(over[:, :48].sum() / over.size, abs=1e-12)
        assert r["stats"]["right"] == pytest.approx(over[:, 48:].sum() / over.size, abs=1e-12)
    assert _in_node(tmp_path, grids[1:])[0]["stats"]["right"] == 0  # a lung on the image's left only


def test_the_bundle_ships_the_runs_segmenter_for_after_the_first_result(tmp_path, shenzhen_few, caplog):
    """A real (tiny) segmenter unit in a real bundle: its TFLite file as stored, what it is in app.json
    (no local path), fetched after the first result (lazy); a unit that is not complete leaves the app
    without an outline, and the bundle is still built."""
    from covid_app import bundle
    from covid_eval.segmenter_unit import SegmenterConfig, train_segmenter_unit

    store = tmp_path / "store"
    tiny = SegmenterConfig(size=32, filters=(4, 8, 16), steps=4, batch_size=4, parity_images=2)
    seg = train_segmenter_unit(str(shenzhen_few), str(store), tiny)
    try:
        rec = bundle.build_app_bundle(str(store), "r1", dataset={}, exports=[], guard=None, lungs_uri=seg["uri"])
    except bundle.AppBuildUnavailable as e:
        skip_or_fail(f"the bundle needs the app's built page: {e}")
    app = store / "runs" / "r1" / "app"
    lungs = json.loads((app / "data" / "app.json").read_text())["lungs"]
    unit = Path(seg["uri"].removeprefix("file://"))
    assert rec["lungs"] is True and (app / lungs["file"]).read_bytes() == (unit / "lung_unet.tflite").read_bytes()
    assert lungs["bytes"] == (app / lungs["file"]).stat().st_size and lungs["input_size"] == 32
    assert lungs["trained_on"] == shenzhen_few.name and lungs["masks"] == 12 and lungs["threshold"] == 0.5
    heldout = seg["heldout_metrics"]
    assert lungs["heldout"] == {k: heldout[k] for k in ("images", "dice", "dice_ci95", "iou", "iou_ci95")}
    assert next(e for e in precache_list(app) if e["url"] == lungs["file"])["lazy"] is True

    gone = store / "segmenters" / "killed-before-its-marker"
    gone.mkdir()
    (gone / "lung_unet.tflite").write_bytes(b"half")
    rec2 = bundle.build_app_bundle(str(store), "r2", dataset={}, exports=[], guard=None, lungs_uri=str(gone))
    assert rec2["lungs"] is False and (store / "runs" / "r2" / "app" / "bundle.json").is_file()
    assert json.loads((store / "runs" / "r2" / "app" / "data" / "app.json").read_text())["lungs"] is None
    assert not (store / "runs" / "r2" / "app" / "lungs").exists()
    assert "no lung outline" in caplog.text and "killed-before-its-marker" in caplog.text
