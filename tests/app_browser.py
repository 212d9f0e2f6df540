"""What the browser tests of the phone app share (tests/test_app_browser.py): Debian's Chromium
and its flags, the app server as ``make app`` runs it, picking and classifying an X-ray, and the
checks a page must pass: axe-core's accessibility rules (injected from the pip package
axe-playwright-python, never fetched) and Chromium's own installability check over CDP.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from covid_data.labels import CLASSES
from tests.conftest import MOBILENET_WEIGHTS, REPO, SAMPLE, SHARED, make_kaggle_folder, require_shared, skip_or_fail

CHROMIUM = Path("/usr/bin/chromium")
# As root in a container, with no network: the flags the machine's notes name.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
]
PHONE = {"width": 390, "height": 844}
SCREENSHOT = REPO / "docs" / "screenshots" / "app-results-390x844.png"
PROB_TOLERANCE = 1e-4
SHENZHEN = SHARED / "data" / "shenzhen-cxr"  # pre-pandemic X-rays: a negative external set
# The run's lung segmenter (the app's lung outline): a small one, trained in seconds on a dozen Shenzhen masks;
# the outline's parity with Python does not depend on how well it segments.
SEGMENTER = {"size": 32, "filters": [4, 8, 16], "steps": 12, "batch_size": 4, "parity_images": 2}


def _require_browser() -> None:
    missing = None
    if not CHROMIUM.exists():
        missing = f"Debian's Chromium at {CHROMIUM} (apt-get install chromium; `make test` installs it)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "the playwright Python package (pip install -e '.[test]')"
    if missing:
        skip_or_fail(f"the browser tests need {missing}")


class Server:
    """``python -m covid_app.serve`` on a free loopback port."""

    def __init__(self, store: Path, env: dict) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "covid_app.serve", "--store", str(store), "--port", "0"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        deadline = time.time() + 120
        for line in self.proc.stdout:
            self.output.append(line)
            m = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
            if m:
                self.url = m.group(1)
                # Keep reading what it says: an unread pipe would block it once full, and a server
                # that dies must say why (see check()).
                threading.Thread(target=self._drain, daemon=True).start()
                return
            if time.time() > deadline:
                break
        self.proc.kill()
        raise RuntimeError(f"the app server did not start: {''.join(self.output)}{self.proc.stdout.read()}")

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)

    def check(self) -> None:
        """Fail with the server's exit code and last words when it is no longer running."""
        code = self.proc.poll()
        assert code is None, f"the app server exited with code {code}; its output ends: {''.join(self.output[-40:])}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def _test_xrays(published, n: int) -> list[Path]:
    """Real test-split X-rays of the published run, one per class first."""
    import pandas as pd

    split = json.loads((published["store"] / "runs" / published["run_id"] / "run.json").read_text())["dataset"]
    table = pd.read_parquet(split["split"])
    test = table[table["split"] == "test"].sort_values("path")
    root = Path(split["split"]).parents[2]
    picks = [test[test["label"] == c].iloc[0]["path"] for c in CLASSES]
    picks += test["path"].tolist()[: max(0, n - len(picks))]
    return [root / p for p in picks[:n]]


def turned_xray(published, view: dict, tmp: Path, n: int = 12) -> tuple[Path, Path, dict]:
    """(upright, turned by 90 degrees, the turned one's cues): the first of ``n`` test X-rays whose
    upright view passes the view check and whose turned view is flagged, by Python's cues."""
    from PIL import Image

    from covid_app import view as V
    from covid_models.data import decode_resize

    assert view["version"] == V.VERSION, view
    for path in _test_xrays(published, n):
        x = decode_resize(str(path), V.INPUT_SIZE, 1).numpy()[..., 0]
        if not V.flagged(V.cues(x), view) and V.flagged(V.cues(np.rot90(x)), view):
            with Image.open(path) as im:
                im.convert("L").transpose(Image.Transpose.ROTATE_90).save(tmp / "turned.png")
            return path, tmp / "turned.png", V.cues(decode_resize(str(tmp / "turned.png"), V.INPUT_SIZE, 1).numpy())
    raise AssertionError(f"none of {n} test X-rays passes the view check upright and is flagged turned")


def _python_probs(tflite: Path, image: Path, size: int, channels: int) -> np.ndarray:
    import tensorflow as tf

    from covid_models.data import decode_resize

    x = decode_resize(str(image), size, channels).numpy().astype("float32")[None]
    it = tf.lite.Interpreter(model_path=str(tflite))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])[0]


@contextlib.contextmanager
def phone_page(browser, server: Server) -> Iterator:
    """A page of the served app at a phone's size, ready; on leaving, no uncaught error in it and the
    server still alive (a test that failed because the server died says so, with its last words)."""
    ctx = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.url)
    pg.wait_for_selector("body[data-ready='true']", timeout=60_000)
    yield pg
    ctx.close()
    server.check()
    assert not errors, f"uncaught errors in the page: {errors}"


def python_lungs(unit: Path, image: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The segmenter unit's lung probabilities ``[size, size]`` on ``image``: (its TFLite file, its Keras model)."""
    import keras

    from covid_models.data import decode_resize

    x = decode_resize(str(image), size, 1).numpy().astype("float32")[None]
    by_keras = keras.saving.load_model(unit / "model.keras").predict(x, verbose=0)[0, ..., 0]
    return _python_probs(unit / "lung_unet.tflite", image, size, 1)[..., 0], by_keras


def _pick(page, path: Path, selector: str = "#file-input") -> None:
    page.set_input_files(selector, str(path))


def _shown_probs(page, model: str) -> np.ndarray:
    page.wait_for_selector(f"#results[data-state='done'][data-model='{model}']", timeout=60_000)
    return np.array([float(page.get_attribute(f"#results [data-class='{c}']", "data-prob")) for c in CLASSES])


def _classify(page, path: Path, model: str) -> np.ndarray:
    page.click(f"#model-list [data-model='{model}']")
    _pick(page, path)
    page.wait_for_function(
        """m => {
            const r = document.querySelector('#results'), w = document.querySelector('#ood-warning');
            return (r && !r.hidden && r.dataset.state === 'done' && r.dataset.model === m) || (w && !w.hidden);
        }""",
        arg=model,
        timeout=60_000,
    )
    if page.is_visible("#ood-warning"):  # a real X-ray the guard doubts: the user may go on
        page.click("#classify-anyway")
    return _shown_probs(page, model)


SERIOUS = ("serious", "critical")


def axe_violations(page, where: str) -> list[str]:
    """axe-core's serious and critical violations on the page as it is, one readable line each."""
    from axe_playwright_python.sync_playwright import Axe

    found = Axe().run(page).response["violations"]
    lines = []
    for v in found:
        if v.get("impact") in SERIOUS:
            nodes = "; ".join(" ".join(map(str, n["target"])) for n in v["nodes"][:5])
            lines.append(f"{where}: {v['id']} ({v['impact']}): {v['help']} at {nodes}")
    return lines


def installability_errors(page) -> list[dict]:
    """Chromium's own check that the page can be installed (manifest, icons, service worker)."""
    cdp = page.context.new_cdp_session(page)
    try:
        return cdp.send("Page.getInstallabilityErrors")["installabilityErrors"]
    finally:
        cdp.detach()


def shenzhen_subset(shenzhen: Path, dest: Path) -> Path:
    """A seeded few X-rays of each finding of the Shenzhen set, and masks/ that is no finding."""
    import random
    import shutil

    for folder in ("Normal", "Tuberculosis", "masks"):
        (dest / folder).mkdir(parents=True)
        for f in random.Random(3).sample(sorted((shenzhen / folder).glob("*.png")), 6 if folder != "masks" else 2):
            shutil.copyfile(f, dest / folder / f.name)
    return dest


def worker_has_webgpu(page) -> bool:
    """What a worker of the app's page answers when asked whether it gets a WebGPU adapter."""
    answer = page.evaluate(
        """() => new Promise((resolve, reject) => {
            const w = new Worker("./inference-worker.js");
            w.onmessage = (e) => { w.terminate(); e.data.error ? reject(e.data.error) : resolve(e.data.result); };
            w.postMessage({ id: 1, type: "webgpu" });
        })"""
    )
    assert isinstance(answer, bool), answer
    return answer


def publish_smoke_run(base: Path, lung_masks: Path) -> dict:
    """A smoke run published with its app bundle, the Shenzhen subset as a negative external set and a lung
    segmenter trained on ``lung_masks``, the custom CNN on its lung fields and MobileNetV2 histogram-equalised:
    store, run id, the bundle's folder and data, the environment."""
    import os

    require_shared(SAMPLE, MOBILENET_WEIGHTS, SHENZHEN)
    store = base / "store"
    negative = shenzhen_subset(SHENZHEN, base / "shenzhen-subset")
    about = "pre-pandemic X-rays from another hospital, none COVID"
    env = {
        **os.environ,
        "COVID_WEIGHTS_DIR": str(MOBILENET_WEIGHTS.parent),
        "COVID_CACHE_DIR": str(base / "cache"),
        "PREFECT_HOME": str(base / "prefect"),
    }
    # A seeded part of the shared sample: the smoke preset trains on at most 40 images a class anyway, and
    # preparing all 3,797 (hashes, near duplicates, validation) took most of the fixture's 9 minutes.
    source = make_kaggle_folder(base / "src", n_per_class=60, seed=41, extras=False)
    cmd = [sys.executable, "-m", "flows.retrain", "--preset", "smoke", "--source", str(source), "--store", str(store)]
    cmd += ["--external-source", json.dumps({"uri": str(negative), "kind": "negative", "about": about})]
    cmd += ["--lung-masks", str(lung_masks), "--segmenter", json.dumps(SEGMENTER)]
    cmd += ["--lung-fields", "custom_cnn"]  # the segmenter inside the custom CNN's graph, and so in its app file
    cmd += ["--overrides", json.dumps({"mobilenet_v2": {"equalize": True}})]  # histogram equalisation in its graph
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_id,) = [p.name for p in (store / "runs").iterdir()]
    app = store / "runs" / run_id / "app"
    assert (app / "bundle.json").is_file(), f"no app bundle: {done.stdout[-2000:]}"
    data = json.loads((app / "data" / "app.json").read_text())
    return {"store": store, "run_id": run_id, "app": app, "data": data, "env": env}


def precache_list(app: Path) -> list[dict]:
    """The service worker's list of a bundle's files (url, md5 revision, lazy), as its sw.js holds it."""
    return json.loads(re.search(r"(\[\{\"url\".*?\}\])", (app / "sw.js").read_text()).group(1))


def client_rects(page, *selectors: str) -> list[dict]:
    """The elements' bounding boxes on the page (x, y, width, height), read in one script so that they
    describe the same frame: the results screen scrolls smoothly into view, and two separate reads can
    straddle a step of that scroll."""
    script = "sels => JSON.stringify(sels.map(s => document.querySelector(s).getBoundingClientRect()))"
    return json.loads(page.evaluate(script, list(selectors)))


def _in_the_page(page, published: dict, name: str, block_ops: set[str]) -> tuple[dict, bool]:
    """Model ``name`` as the app ships it, directly or as an ensemble member: its app file holds
    ``block_ops``, and the page's probabilities are Python's TFLite ones for it (directly, or inside the
    ensemble that averages it). Returns (its app entry, or the ensemble's; whether it is published directly)."""
    import tensorflow as tf

    app, data = published["app"], published["data"]
    direct = [m for m in data["models"] if m["name"] == name]
    members = [(m, x) for m in data["models"] for x in m.get("members", []) if x["name"] == name]
    assert direct or members, f"{name} is neither a published model nor an ensemble member"
    entry, file = (direct[0], direct[0]["file"]) if direct else (members[0][0], members[0][1]["file"])
    it = tf.lite.Interpreter(model_path=str(app / file))
    ops = {d["op_name"] for d in it._get_ops_details()}
    assert block_ops <= ops, ops
    for image in _test_xrays(published, 2):
        shown = _classify(page, image, entry["name"])
        if direct:
            ref = _python_probs(app / file, image, entry["input_size"], entry["channels"])
            assert np.abs(shown - ref).max() <= PROB_TOLERANCE, (image.name, shown, ref)
        assert shown.sum() == pytest.approx(1.0, abs=1e-4)
    return entry, bool(direct)


def _stored_config(published: dict, name: str) -> dict:
    return json.loads((published["app"].parent / "models" / name / "metrics.json").read_text())["config"]


def check_lung_field_model(page, published: dict) -> None:
    """The custom CNN trained on the lung fields: its settings name the run's segmenter unit, what the app says
    it is names it too, and the page runs its app file, the block's ops included, as Python does."""
    run = json.loads((published["store"] / "runs" / published["run_id"] / "run.json").read_text())
    seg_uri = run["shortcut_audit"]["segmenter_uri"]
    key = seg_uri.rstrip("/").rsplit("/", 1)[-1]
    entry, direct = _in_the_page(page, published, "custom_cnn", {"RESIZE_BILINEAR", "MAX_POOL_2D", "AVERAGE_POOL_2D"})
    if direct:
        assert _stored_config(published, "custom_cnn")["lung_fields"] == seg_uri
        assert f"lung fields: the picture outside the lungs that segmenter {key} finds" in entry["weights"]
    else:
        assert "custom_cnn" in entry["weights"]


def check_equalized_model(page, published: dict) -> None:
    """MobileNetV2 with histogram equalisation in its graph: its settings and what the app says it is name it,
    and the page runs its app file, the block's ops included, as Python does."""
    entry, direct = _in_the_page(page, published, "mobilenet_v2", {"MEAN", "MINIMUM", "SUB", "MUL"})
    assert _stored_config(published, "mobilenet_v2")["equalize"] is True
    if direct:
        assert "histogram-equalised inside the model" in entry["weights"]


def check_lung_outline(page, published: dict) -> None:
    """The page's lung probabilities are the run's segmenter unit's, as Keras and Python's TFLite compute
    them; the outline is drawn over the picture's own box and can be hidden (the bundle's side of it:
    tests/test_app_lungs.py)."""
    app, lungs = published["app"], published["data"]["lungs"]
    run = json.loads((published["store"] / "runs" / published["run_id"] / "run.json").read_text())
    unit = Path(run["shortcut_audit"]["segmenter_uri"].removeprefix("file://"))
    assert (app / lungs["file"]).read_bytes() == (unit / "lung_unet.tflite").read_bytes()
    size = lungs["input_size"]
    assert size == SEGMENTER["size"]
    for image in _test_xrays(published, 2):
        _classify(page, image, published["data"]["models"][0]["name"])
        page.wait_for_selector("#lung-outline[data-state='done']", timeout=60_000)
        shown = np.array(page.evaluate("Array.from(window.covidApp.state.pick.lungs.prob)")).reshape(size, size)
        by_tflite, by_keras = python_lungs(unit, image, size)
        assert np.abs(shown - by_tflite).max() <= PROB_TOLERANCE and np.abs(shown - by_keras).max() <= PROB_TOLERANCE
        share = float(page.get_attribute("#lung-outline", "data-share"))
        assert share == pytest.approx(float((by_tflite > lungs["threshold"]).mean()), abs=1.5 / size**2)
        rings = json.loads(page.get_attribute("#lung-outline", "data-rings"))
        assert (len(rings) > 0) == (page.get_attribute("#lung-path", "d") != "") == (share > 0)
        assert page.is_visible("#lung-bar") and page.inner_text("#lung-status").startswith("Lung outline by the run's")
        box, img = client_rects(page, "#lung-outline", "#preview")
        assert all(abs(box[k] - img[k]) <= 1 for k in ("x", "y", "width", "height")), (box, img)
    page.uncheck("#show-lungs")
    assert page.get_attribute("#lung-outline", "hidden") is not None
    page.check("#show-lungs")
    assert page.get_attribute("#lung-outline", "hidden") is None
