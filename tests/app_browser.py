"""What the browser tests of the phone app share (tests/test_app_browser.py): Debian's Chromium
and its flags, the app server as ``make app`` runs it, picking and classifying an X-ray, and the
checks a page must pass: axe-core's accessibility rules (injected from the pip package
axe-playwright-python, never fetched) and Chromium's own installability check over CDP.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from covid_data.labels import CLASSES
from tests.conftest import REPO, skip_or_fail

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
