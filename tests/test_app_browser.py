"""The phone app in a real browser: Debian's headless Chromium driven by Playwright, on the app
bundle of a real published smoke run (``flows.retrain --preset smoke`` on the shared sample),
served by ``python -m covid_app.serve`` as ``make app`` does.

Probabilities shown are checked against Python's TFLite interpreter on the same image file, the
heatmap against the same occlusion computed in Python, and the app against offline use and bad
input. A 390x844 screenshot of the results screen is taken; it replaces the README's picture in
docs/screenshots/ only on request (COVID_SCREENSHOTS=docs/screenshots).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from covid_data.labels import CLASSES
from tests.conftest import MOBILENET_WEIGHTS, REPO, SAMPLE, SHARED, require_shared, skip_or_fail

pytestmark = pytest.mark.slow

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


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict:
    """A smoke run published with its app bundle: store, run id, the bundle's data."""
    _require_browser()
    require_shared(SAMPLE, MOBILENET_WEIGHTS, SHENZHEN)
    base = tmp_path_factory.mktemp("app-run")
    store = base / "store"
    negative = base / "shenzhen-subset"  # a seeded few of each finding, and masks/ that is no finding
    for folder in ("Normal", "Tuberculosis", "masks"):
        (negative / folder).mkdir(parents=True)
        for f in random.Random(3).sample(sorted((SHENZHEN / folder).glob("*.png")), 6 if folder != "masks" else 2):
            shutil.copyfile(f, negative / folder / f.name)
    about = "pre-pandemic X-rays from another hospital, none COVID"
    env = {
        **os.environ,
        "COVID_WEIGHTS_DIR": str(MOBILENET_WEIGHTS.parent),
        "COVID_CACHE_DIR": str(base / "cache"),
        "PREFECT_HOME": str(base / "prefect"),
    }
    cmd = [sys.executable, "-m", "flows.retrain", "--preset", "smoke", "--source", str(SAMPLE), "--store", str(store)]
    cmd += ["--external-source", json.dumps({"uri": str(negative), "kind": "negative", "about": about})]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_id,) = [p.name for p in (store / "runs").iterdir()]
    app = store / "runs" / run_id / "app"
    assert (app / "bundle.json").is_file(), f"no app bundle: {done.stdout[-2000:]}"
    data = json.loads((app / "data" / "app.json").read_text())
    return {"store": store, "run_id": run_id, "app": app, "data": data, "env": env}


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
        deadline = time.time() + 120
        for line in self.proc.stdout:
            m = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
            if m:
                self.url = m.group(1)
                return
            if time.time() > deadline:
                break
        self.proc.kill()
        raise RuntimeError(f"the app server did not start: {self.proc.stdout.read()}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(published):
    s = Server(published["store"], published["env"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.url)
    pg.wait_for_selector("body[data-ready='true']", timeout=60_000)
    yield pg
    ctx.close()
    assert not errors, f"uncaught errors in the page: {errors}"


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


def _python_probs(tflite: Path, image: Path, size: int, channels: int) -> np.ndarray:
    import tensorflow as tf

    from covid_models.data import decode_resize

    x = decode_resize(str(image), size, channels).numpy().astype("float32")[None]
    it = tf.lite.Interpreter(model_path=str(tflite))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])[0]


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


def test_bundle_lists_the_runs_top_three(published):
    data, app = published["data"], published["app"]
    run = json.loads((published["store"] / "runs" / published["run_id"] / "run.json").read_text())
    assert [m["name"] for m in data["models"]] == [e["model"] for e in run["exports"]]
    assert len(data["models"]) == 3 and data["classes"] == list(CLASSES)
    for m in data["models"]:
        stored = json.loads((app.parent / "models" / m["name"] / "metrics.json").read_text())
        assert m["metrics"] == stored["metrics"]  # the model page shows what retrain measured
        assert (app / m["file"]).is_file() and m["bytes"] == (app / m["file"]).stat().st_size
        assert m["weights"] and m["input_size"] == run["preset"]["input_size"]
        assert m["test_accuracy_ci95"][0] <= m["test_accuracy"] <= m["test_accuracy_ci95"][1]
    assert data["guard"] is not None and (app / data["guard"]["file"]).is_file()
    # The service worker precaches every file of the bundle, at its current checksum.
    import hashlib

    sw = (app / "sw.js").read_text()
    entries = {e["url"]: e["revision"] for e in json.loads(re.search(r"(\[\{\"url\".*?\}\])", sw).group(1))}
    files = {p.relative_to(app).as_posix() for p in app.rglob("*") if p.is_file()} - {"sw.js", "bundle.json"}
    assert set(entries) == files
    for url, rev in entries.items():
        assert hashlib.md5((app / url).read_bytes()).hexdigest() == rev, url


def test_server_headers(server):
    import httpx

    wasm = next(p for p in httpx.get(server.url + "sw.js").text.split('"') if p.endswith(".wasm"))
    r = httpx.get(server.url + wasm)
    assert r.status_code == 200 and r.headers["content-type"] == "application/wasm"
    assert httpx.get(server.url).headers["content-type"].startswith("text/html")
    assert httpx.get(server.url + "manifest.webmanifest").headers["content-type"] == "application/manifest+json"
    assert httpx.get(server.url + "../../champion.json").status_code == 404
    assert httpx.get(server.url + "bundle.json").status_code == 404


def test_probabilities_match_python_tflite(page, published):
    app = published["app"]
    worst = 0.0
    for image in _test_xrays(published, 2):
        for m in published["data"]["models"]:
            shown = _classify(page, image, m["name"])
            ref = _python_probs(app / m["file"], image, m["input_size"], m["channels"])
            worst = max(worst, float(np.abs(shown - ref).max()))
            assert np.abs(shown - ref).max() <= PROB_TOLERANCE, (m["name"], image.name, shown, ref)
            assert page.inner_text("#predicted").strip().find(CLASSES[int(ref.argmax())]) >= 0
    print(f"largest |browser - python| probability difference: {worst:.2e}")


def test_compare_all_models(page, published):
    image = _test_xrays(published, 1)[0]
    _classify(page, image, published["data"]["models"][0]["name"])
    page.click("#compare-all")
    page.wait_for_selector("#compare-table[data-state='done']", timeout=120_000)
    for m in published["data"]["models"]:
        row = [
            float(page.get_attribute(f"#compare-table tr[data-model='{m['name']}'] td[data-class='{c}']", "data-prob"))
            for c in CLASSES
        ]
        ref = _python_probs(published["app"] / m["file"], image, m["input_size"], m["channels"])
        np.testing.assert_allclose(row, ref, atol=PROB_TOLERANCE)


def test_model_page_shows_its_metrics(page, published):
    m = published["data"]["models"][1]
    page.goto(page.url.split("#")[0] + f"#/model/{m['name']}")
    page.wait_for_selector(f"#model-page[data-model='{m['name']}']", timeout=30_000)
    text = page.inner_text("#model-page")
    test = m["metrics"]["test"]
    assert f"{100 * test['accuracy']:.1f}" in text, text[:2000]
    assert f"{100 * test['covid_sensitivity']:.1f}" in text
    assert m["weights"].split(";")[0] in text
    assert "Model card" in text and "not a medical device" in text.lower()
    (ext,) = m["external"]  # the negative set, beside the test metrics
    assert (
        ext["set_kind"] == "negative" and 0 < ext["n"] <= 12 and set(ext["per_finding"]) == {"Normal", "Tuberculosis"}
    )
    assert sum(r["n"] for r in ext["per_finding"].values()) == ext["n"]  # masks/ was not scored
    assert "On X-rays from elsewhere" in text and "shenzhen-subset" in text and "none COVID" in text
    assert f"{100 * ext['false_alarm_rate']:.1f}%" in text and "Tuberculosis" in text
    page.wait_for_selector("#model-list .false-alarm", state="attached", timeout=30_000)  # the list, beside test acc
    assert "COVID false alarms on shenzhen-subset" in page.text_content("#model-list")


def test_heatmap_matches_python_occlusion(page, published):
    m = published["data"]["models"][0]
    image = _test_xrays(published, 1)[0]
    _classify(page, image, m["name"])
    page.click("#explain")
    page.wait_for_selector("#heatmap[data-state='done']", timeout=120_000)
    grid = np.array(json.loads(page.get_attribute("#heatmap", "data-grid")))
    g = published["data"]["heatmap"]["grid"]
    assert grid.shape == (g * g,)

    import tensorflow as tf

    from covid_models.data import decode_resize

    x = decode_resize(str(image), m["input_size"], m["channels"]).numpy().astype("float32")
    it = tf.lite.Interpreter(model_path=str(published["app"] / m["file"]))
    it.allocate_tensors()

    def run(a):
        it.set_tensor(it.get_input_details()[0]["index"], a[None])
        it.invoke()
        return it.get_tensor(it.get_output_details()[0]["index"])[0]

    base = run(x)
    k = int(base.argmax())
    fill = np.float32(x.mean())
    s = m["input_size"]
    ref = []
    for r in range(g):
        for c in range(g):
            occ = x.copy()
            occ[r * s // g : (r + 1) * s // g, c * s // g : (c + 1) * s // g] = fill
            ref.append(max(0.0, float(base[k] - run(occ)[k])))
    np.testing.assert_allclose(grid, ref, atol=1e-3)


def test_offline_after_first_visit(browser, published):
    """With the server stopped after the first visit, the app still loads and classifies."""
    own = Server(published["store"], published["env"])
    ctx = browser.new_context(viewport=PHONE)
    try:
        pg = ctx.new_page()
        pg.goto(own.url)
        pg.wait_for_selector("body[data-offline='ready']", timeout=120_000)
        own.stop()
        pg.reload()
        pg.wait_for_selector("body[data-ready='true']", timeout=60_000)
        m = published["data"]["models"][0]
        image = _test_xrays(published, 1)[0]
        shown = _classify(pg, image, m["name"])
        ref = _python_probs(published["app"] / m["file"], image, m["input_size"], m["channels"])
        assert np.abs(shown - ref).max() <= PROB_TOLERANCE
    finally:
        ctx.close()
        if own.proc.poll() is None:
            own.stop()


def _expect_error(page, path: Path, kind: str) -> str:
    _pick(page, path)
    page.wait_for_selector(f"#error[data-kind='{kind}']", state="visible", timeout=60_000)
    assert not page.is_visible("#results[data-state='done']"), "a stale result is still on screen"
    return page.inner_text("#error")


def test_bad_input_gets_a_clear_message_and_no_stale_result(page, published, tmp_path):
    from PIL import Image

    model = published["data"]["models"][0]["name"]
    good = _test_xrays(published, 1)[0]
    text = tmp_path / "notes.png"
    text.write_text("this is a text file, not an image\n" * 20)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    huge = tmp_path / "huge.png"
    Image.new("L", (10_000, 10_000)).save(huge, optimize=True)
    for path, kind, words in ((text, "not-image", "image"), (empty, "empty", "empty"), (huge, "too-large", "large")):
        _classify(page, good, model)  # a result on screen first
        msg = _expect_error(page, path, kind)
        assert words in msg.lower(), msg
        assert page.evaluate("document.querySelectorAll('#results [data-prob]').length") == 0 or not page.is_visible(
            "#results"
        )
    _classify(page, good, model)  # and the app still works after them
    assert not page.is_visible("#error")


def test_out_of_distribution_images_are_flagged(page, published, tmp_path):
    import skimage.data
    from PIL import Image

    cat = tmp_path / "cat.jpg"
    Image.fromarray(skimage.data.chelsea()).save(cat, quality=90)
    knee = sorted((SHARED / "data" / "ood-radiographs" / "knee").iterdir())[0]
    hand = sorted((SHARED / "data" / "ood-radiographs" / "hand").iterdir())[0]
    model = published["data"]["models"][0]["name"]
    good = _test_xrays(published, 1)[0]
    for path in (cat, knee, hand):
        _classify(page, good, model)
        _pick(page, path)
        page.wait_for_selector("#ood-warning", state="visible", timeout=60_000)
        assert "chest x-ray" in page.inner_text("#ood-warning").lower()
        assert not page.is_visible("#results[data-state='done']"), f"probabilities shown for {path.name}"
        assert float(page.get_attribute("#ood-warning", "data-score")) > 0


def test_results_screenshot_at_phone_size(page, published, tmp_path):
    image = _test_xrays(published, 1)[0]
    _classify(page, image, published["data"]["models"][0]["name"])
    page.click("#explain")
    page.wait_for_selector("#heatmap[data-state='done']", timeout=120_000)
    # A test never rewrites a tracked file: the README's picture is refreshed only on request,
    # COVID_SCREENSHOTS=docs/screenshots pytest tests/test_app_browser.py -k screenshot
    shot = Path(os.environ.get("COVID_SCREENSHOTS") or tmp_path) / SCREENSHOT.name
    shot.parent.mkdir(parents=True, exist_ok=True)
    # The results section's top just under the sticky header: what a person sees after picking.
    page.evaluate(
        """() => {
            const top = document.querySelector('#results').closest('section') || document.querySelector('#results');
            const bar = document.querySelector('header');
            window.scrollTo(0, top.getBoundingClientRect().top + window.scrollY - (bar ? bar.offsetHeight : 0) - 8);
        }"""
    )
    page.screenshot(path=str(shot))  # what the phone's screen shows
    from PIL import Image

    with Image.open(shot) as im:
        assert im.width == PHONE["width"] * 2  # device scale factor 2
