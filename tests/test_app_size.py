"""What a phone downloads: a real app bundle built by ``build_app_bundle`` from real (untrained, seeded)
models, a MobileNetV2 at 48 px and a custom CNN at 32 px, their ensemble (the champion) and the guard
fitted on real X-rays, without a browser.

The byte budget (issue 17 §1): from opening the app to the first result at most 15 MB, counted over the
bundle's own files and its service-worker list (what the worker precaches, one WASM build, gzip where
``covid_app.serve`` compresses); the app's int8 TFLite files against their float32 Keras models; the
ensemble computed from its members' files as the page computes it, against its Keras graph.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from covid_app import budget
from covid_app.app_models import combine_members, ensemble_probabilities
from covid_app.bundle import build_app_bundle, ensure_dist
from covid_app.guard import GuardUnavailableError, ensure_guard
from covid_data.store import open_store
from covid_eval.calibration import calibrated_model
from covid_models.ensemble import build_and_evaluate, ensemble_slot_uri
from covid_models.stored import StoredModel
from covid_registry.convert import (
    TFLITE_COMPACT_MAX_PROB_DIFF,
    TFLITE_COMPACT_MIN_TOP1_AGREEMENT,
    agreement,
)
from covid_registry.exports import sample_test_images
from tests.conftest import MOBILENET_WEIGHTS

pytest.importorskip("tensorflow")


def _slot(root: Path, name: str, size: int, seed: int, temperature: float) -> str:
    """A complete model slot holding a real, untrained (seeded) model, and its stored calibration."""
    import keras

    from covid_data.store import Unit
    from covid_eval.calibration import calibration_unit
    from covid_models.builders import build_model

    keras.utils.set_random_seed(seed)
    local = root / f"{name}.keras"
    build_model(name, input_size=size, weights="none").save(local)
    slot = Unit(open_store(str(root / f"slot-{name}")), "", "metrics.json")
    slot.put_file("model.keras", local)
    cfg = {"model": name, "input_size": size, "channels": 1, "epochs": 0, "weights": "none"}
    slot.complete({"config": cfg, "result": {"model": name}, "metrics": {}})
    calibration_unit(slot.uri).complete({"temperature": temperature, "method": "temperature scaling"})
    return slot.uri


@pytest.fixture(scope="module")
def bundle(small_split, tmp_path_factory, monkeypatch_module) -> dict:
    from covid_eval.calibration import calibration_unit

    if not (ensure_dist() / "app.js").is_file():
        pytest.skip("the page is not built (no Node.js)")
    monkeypatch_module.setenv("COVID_WEIGHTS_DIR", str(MOBILENET_WEIGHTS.parent))
    root = tmp_path_factory.mktemp("app-size")
    store = str(root / "store")
    members = [
        {"model": "mobilenet_v2", "out": _slot(root, "mobilenet_v2", 48, 1, 1.7), "temperature": 1.7},
        {"model": "custom_cnn", "out": _slot(root, "custom_cnn", 32, 2, 0.8), "temperature": 0.8},
    ]
    ens = ensemble_slot_uri(store, "h", members)
    build_and_evaluate(members, small_split, ens)
    calibration_unit(ens).complete({"temperature": 1.3, "method": "temperature scaling"})
    try:
        guard = ensure_guard(store, small_split, "h")
    except GuardUnavailableError:
        guard = None
    exports = [
        {"model": "ensemble", "model_uri": ens, "version": "t", "variants": {}, "calibration": {"temperature": 1.3}},
        {
            "model": "custom_cnn",
            "model_uri": members[1]["out"],
            "version": "t",
            "variants": {},
            "calibration": {"temperature": 0.8},
        },
    ]
    dataset = {"split": small_split, "split_hash": "h", "dataset_version": "v", "split_counts": {}}
    rec = build_app_bundle(store, "r1", dataset=dataset, exports=exports, guard=guard, champion_uri=ens)
    app = Path(store) / "runs" / "r1" / "app"
    data = json.loads((app / "data/app.json").read_text())
    return {"record": rec, "app": app, "data": data, "members": members, "guard": guard}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@contextlib.contextmanager
def served_page(store_root: Path, prefix: str):
    """A phone-sized Chromium page (no service worker) on a loopback server of the bundle at ``prefix``
    in the store at ``store_root``, ready to classify."""
    import threading
    from http.server import ThreadingHTTPServer

    from playwright.sync_api import sync_playwright

    from covid_app.serve import handler_for
    from tests.app_browser import CHROMIUM, CHROMIUM_ARGS, PHONE

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(open_store(str(store_root)), prefix))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            page = browser.new_context(viewport=PHONE, service_workers="block").new_page()
            page.goto(f"http://127.0.0.1:{server.server_port}/")
            page.wait_for_selector("body[data-ready='true']", timeout=60_000)
            yield page
            browser.close()
    finally:
        server.shutdown()


def _worker_list(app: Path) -> list[dict]:
    sw = (app / "sw.js").read_text()
    return json.loads(re.search(r"(\[\{\"url\".*?\}\])", sw).group(1))


def test_first_result_bytes_are_within_15_mb(bundle):
    """The worker's list names every file with its md5; what the first result needs is precached, the
    rest is lazy; the bytes to the first result, recounted here from the files, are at most 15 MB."""
    app, data = bundle["app"], bundle["data"]
    files = _worker_list(app)
    on_disk = {p.relative_to(app).as_posix() for p in app.rglob("*") if p.is_file()} - {"sw.js", "bundle.json"}
    assert {f["url"] for f in files} == on_disk
    for f in files:
        assert hashlib.md5((app / f["url"]).read_bytes()).hexdigest() == f["revision"], f["url"]
    champ = next(m for m in data["models"] if m["champion"])
    assert champ["name"] == "ensemble"
    eager = {f["url"] for f in files if not f.get("lazy")}
    assert {m["file"] for m in champ["members"]} <= eager  # the champion's files: precached
    assert "data/app.json" in eager and "index.html" in eager and "app.js" in eager
    assert data["guard"] is None or data["guard"]["file"] in eager
    if data["guard"] is not None:  # float16 weights when they keep the float32 guard's flags on real X-rays
        checks = data["guard"]["checks"]
        within = checks["same_flag"] == 1.0 and checks["max_score_diff_of_threshold"] <= checks["max_score_diff_bound"]
        assert data["guard"]["precision"] == ("float16" if within else "float32")
    other = next(m for m in data["models"] if not m["champion"])
    assert other["file"] not in eager or other["file"] in {m["file"] for m in champ["members"]}
    assert not [u for u in eager if u.startswith("models/") and u.endswith(".png")]  # plots: with their page

    # Recount: every precached file once (gzip where the server compresses), one WASM build, the worker.
    wasm = sorted(
        (u for u in eager if u.startswith("wasm/") and u.endswith(".wasm")), key=lambda u: (app / u).stat().st_size
    )
    skipped = set(wasm[:-1]) | {u.removesuffix(".wasm") + ".js" for u in wasm[:-1]}

    def wire(u: str) -> int:
        raw = (app / u).read_bytes()
        return len(gzip.compress(raw, 6, mtime=0)) if u.endswith(budget.GZIP_SUFFIXES) else len(raw)

    first = sum(wire(u) for u in (eager - skipped) | {"sw.js"})
    b = bundle["record"]["budget"]
    assert b["first_result_bytes"] == first
    kept = sum((app / f["url"]).stat().st_size for f in files if f["url"] not in skipped)
    assert b["cached_bytes"] == kept
    assert first <= budget.FIRST_RESULT_BUDGET, f"{first / 1e6:.1f} MB to the first result: {b}"
    assert kept <= budget.CACHED_BUDGET, f"{kept / 1e6:.1f} MB kept: {b}"


def test_the_ensemble_ships_no_weights_of_its_own_and_matches_its_keras_graph(bundle, small_split):
    import tensorflow as tf

    """The page's ensemble (its members' files, each at its size, averaged, then the ensemble's
    temperature) is the Keras ensemble: exactly with float32 member files, within the int8 bounds
    with the files the app ships."""
    app, data = bundle["app"], bundle["data"]
    ens = next(m for m in data["models"] if m["name"] == "ensemble")
    assert "file" not in ens and not list(app.glob("models/ensemble.tflite"))
    sizes = [m["input_size"] for m in ens["members"]]
    assert (
        sizes == [48, 32]
        and ens["temperature"] == 1.3
        and ens["bytes"] == sum((app / m["file"]).stat().st_size for m in ens["members"])
    )
    stored = StoredModel(ens_uri := _ensemble_uri(bundle))
    assert stored.input_size == 48
    model = calibrated_model(stored.keras(), ens["temperature"])
    images = sample_test_images(small_split, 48, 1, 12, None)
    ref = model.predict(images, verbose=0)

    # With the float32 Keras members the combination is the graph's exactly: only quantisation differs.
    members = []
    for m, size in zip(bundle["members"], sizes, strict=True):
        x = images if size == 48 else tf.image.resize(images, (size, size), method="bilinear", antialias=True).numpy()
        members.append(calibrated_model(StoredModel(m["out"]).keras(), m["temperature"]).predict(x, verbose=0))
    assert np.abs(combine_members(members, ens["temperature"]) - ref).max() < 1e-4, ens_uri

    shipped = ensemble_probabilities([app / m["file"] for m in ens["members"]], sizes, ens["temperature"], images)
    found = agreement(shipped, ref)
    assert found["max_prob_diff"] <= TFLITE_COMPACT_MAX_PROB_DIFF["int8"]
    assert found["top1_agreement"] >= TFLITE_COMPACT_MIN_TOP1_AGREEMENT["int8"]
    assert ens["checks"]["images"] >= 8 and ens["checks"]["max_prob_diff"] <= TFLITE_COMPACT_MAX_PROB_DIFF["int8"]


def _ensemble_uri(bundle: dict) -> str:
    store = open_store(str(bundle["app"].parents[2]))
    (key,) = [k for k in store.list("models/h/") if k.endswith("/metrics.json") and "/ensemble-" in k]
    return store.uri_for(key.rsplit("/", 1)[0])


def test_int8_files_are_a_quarter_and_agree_with_float32_keras(bundle):
    """Each shipped model file is its tflite-int8 export: about a quarter of the float32 file, its
    agreement with the float32 Keras model measured on 32 real test images and within the bounds."""
    data = bundle["data"]
    cnn = next(m for m in data["models"] if m["name"] == "custom_cnn")
    assert cnn["precision"] == "int8"
    checks = cnn["checks"]
    assert checks["images"] >= 8 and checks["max_prob_diff"] <= TFLITE_COMPACT_MAX_PROB_DIFF["int8"]
    assert checks["top1_agreement"] >= TFLITE_COMPACT_MIN_TOP1_AGREEMENT["int8"]
    params = StoredModel(bundle["members"][1]["out"]).keras().count_params()  # 4 bytes each in float32
    assert cnn["bytes"] < 0.3 * 4 * params, (cnn["bytes"], params)


def test_the_page_computes_the_ensemble_from_its_members_as_python_does(bundle):
    """In Chromium: the page's probabilities for the ensemble (its members' files, resized inputs,
    averaged, its temperature) and for an int8 model equal Python's on the same files and image."""

    from covid_models.data import decode_resize
    from tests.app_browser import _classify, _python_probs, _require_browser
    from tests.conftest import sample_files

    _require_browser()
    app, data = bundle["app"], bundle["data"]
    image = next(iter(sample_files(1, seed=5).values()))[0]
    with served_page(app.parent, "app") as page:
        for m in data["models"]:
            shown = _classify(page, image, m["name"])
            if m.get("members"):
                x = decode_resize(str(image), m["input_size"], 1).numpy().astype("float32")[None]
                files = [app / q["file"] for q in m["members"]]
                ref = ensemble_probabilities(files, [q["input_size"] for q in m["members"]], m["temperature"], x)[0]
            else:
                ref = _python_probs(app / m["file"], image, m["input_size"], m["channels"])
            assert np.abs(shown - ref).max() <= 1e-5, (m["name"], shown, ref)


def test_a_float16_guard_outside_its_bounds_ships_the_float32_guard(bundle, small_split, tmp_path, monkeypatch):
    """A tighter bound than any float16 file meets (a real conversion, a real difference): the check is
    recorded once, the float32 guard's own file is what the page gets, and nothing is converted again."""
    import shutil

    from covid_app import app_models

    guard = bundle["guard"]
    if guard is None:
        pytest.skip("no guard: its ImageNet MobileNetV2 weights are absent")
    copy = tmp_path / "guard"
    shutil.copytree(Path(guard["uri"]).parent, copy, ignore=shutil.ignore_patterns("fp16"))
    g = {**guard, "uri": str(copy / Path(guard["uri"]).name)}
    monkeypatch.setattr(app_models, "GUARD_MAX_SCORE_DIFF", 0.0)
    small = app_models.app_guard(g, small_split)
    assert small["precision"] == "float32" and small["rejected"] == "float16"
    assert small["checks"]["max_score_diff_of_threshold"] > 0.0 and small["checks"]["max_score_diff_bound"] == 0.0
    assert Path(small["uri"]).read_bytes() == Path(g["uri"]).read_bytes()

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(app_models, "export_tflite", no_conversion)
    assert app_models.app_guard(g, small_split) == small


def test_the_page_runs_an_int8_dense_file_as_python_does(bundle, tmp_path):
    """In Chromium: a model file whose dense weights are int8 behind DEQUANTIZE ops (``int8-dense``, what
    the app ships for a fine-tuned MobileNetV2 with the paper's head) gives the page the probabilities
    Python's interpreter gives. The ensemble's MobileNetV2 member (48 px: a 5,120 x 256 flatten-dense
    kernel) is served as a model of its own from a copy of the bundle (a complete bundle is never
    rewritten)."""
    import shutil

    import tensorflow as tf

    from covid_registry.convert import export_tflite
    from tests.app_browser import _classify, _python_probs, _require_browser
    from tests.conftest import sample_files

    _require_browser()
    app = tmp_path / "runs" / "r1" / "app"
    shutil.copytree(bundle["app"], app)
    member = bundle["members"][0]
    model = calibrated_model(StoredModel(member["out"]).keras(), member["temperature"])
    rec = export_tflite(model, app / "models" / "mnv2-int8-dense.tflite", "int8-dense")
    tensors = tf.lite.Interpreter(model_path=rec.path).get_tensor_details()
    assert any(t["dtype"] == np.int8 for t in tensors) and not any(t["dtype"] == np.float16 for t in tensors)
    data = json.loads((app / "data" / "app.json").read_text())
    cnn = next(m for m in data["models"] if m["name"] == "custom_cnn")
    entry = {**cnn, "name": "mnv2_int8_dense", "file": "models/mnv2-int8-dense.tflite", "input_size": 48}
    entry |= {"bytes": rec.bytes, "precision": "int8-dense", "rank": len(data["models"]) + 1, "champion": False}
    data["models"].append(entry)
    (app / "data" / "app.json").write_text(json.dumps(data))
    image = next(iter(sample_files(1, seed=6).values()))[0]
    ref = _python_probs(Path(rec.path), image, 48, 1)
    with served_page(tmp_path, "runs/r1/app") as page:
        shown = _classify(page, image, "mnv2_int8_dense")
    assert np.abs(shown - ref).max() <= 1e-5, (shown, ref)
