"""Phone-app speed and bytes in headless Chromium: page ready, and per model the first and the median of
20 later predictions, with the bundle size per model; then a cold first visit with the service worker on:
bytes to the first result with the default model and bytes the worker keeps, on loopback and on a
throttled phone profile.

It serves a published run's app bundle (default: the champion's run in ``.store``, else the newest
run) with ``covid_app.serve``'s handler, adds a MobileNetV2 at 224 px (ImageNet backbone, untrained
head: speed does not depend on the head's values) to a copy of the bundle so that goal is measured
whatever the run published, and drives Debian's Chromium (``/usr/bin/chromium``) with Playwright.
Service workers are blocked for the timings, so their precaching does not compete with them.

Bytes are counted by the server (every byte it writes, headers included, gzip where it compresses), from
opening the page to the first result with the default model (the champion), which includes what the
service worker fetches in that time; then after the worker is installed, and after every other model
has been picked once (fetched on demand and kept). "Kept" is the size of everything in Cache Storage.
The throttled profile is Chromium's network emulation at 9 Mbit/s down, 150 ms round trip, with 4x CPU
throttling (issue 17 §1's phone profile; the goal there is <= 8 s to the first result on a cold visit).

    PYTHONPATH=. .venv/bin/python benchmarks/app.py [--store .store] [--run ID]   (or `make bench-app`)

Goals: page ready <= 3 s on loopback; MobileNetV2 at 224 px <= 100 ms per prediction; every
published model <= 1 s per prediction; the lung outline (where the run has a segmenter) <= 50 ms per image
(issue 16 §2); <= 15 MB to the first result and <= 40 MB kept (issue 17).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

from benchmarks.common import (
    MOBILENET_V2_WEIGHTS,
    OUT_DIR,
    SHARED_SAMPLE,
    bundle_with_current_page,
    machine_info,
    machine_line,
    write_json,
)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-quic"]  # fmt: skip
LATER = 20
EXTRA = "mobilenet_v2_224_speed"


def add_mobilenet_224(app: Path) -> None:
    """A fixed-batch TFLite MobileNetV2 at 224 px (grey in, four classes out) in the copied bundle."""
    import keras

    from covid_models.builders import build_model
    from covid_registry.convert import export_tflite

    model = build_model("mobilenet_v2", input_size=224, channels=1, weights=str(MOBILENET_V2_WEIGHTS))
    out = app / "models" / f"{EXTRA}.tflite"
    export_tflite(model, out)
    keras.backend.clear_session()
    data = json.loads((app / "data/app.json").read_text())
    data["models"].append(
        {
            "name": EXTRA,
            "rank": len(data["models"]) + 1,
            "champion": False,
            "file": f"models/{EXTRA}.tflite",
            "bytes": out.stat().st_size,
            "input_size": 224,
            "channels": 1,
            "weights": "ImageNet MobileNetV2 backbone, untrained head (speed only)",
            "training": "not trained: speed benchmark",
            "metrics": {},
            "images": {},
        }
    )
    (app / "data/app.json").write_text(json.dumps(data))


def measure(url: str, models: list[str], image: Path) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        ctx = browser.new_context(viewport={"width": 390, "height": 844}, service_workers="block")
        page = ctx.new_page()
        t0 = time.perf_counter()
        page.goto(url)
        page.wait_for_selector("body[data-ready='true']", timeout=60_000)
        ready_s = time.perf_counter() - t0
        lungs = page.evaluate("!!(window.covidApp.state.app && window.covidApp.state.app.lungs)")
        per_model = {}
        for name in models:
            page.click(f"#model-list [data-model='{name}']")
            times, walls = [], []
            for _ in range(1 + LATER):
                page.evaluate("document.querySelector('#results')?.removeAttribute('data-state')")
                t = time.perf_counter()
                page.set_input_files("#file-input", str(image))
                page.wait_for_function(
                    """m => { const r = document.querySelector('#results'), w = document.querySelector('#ood-warning');
                        return (r && r.dataset.state === 'done' && r.dataset.model === m) || (w && !w.hidden); }""",
                    arg=name,
                    timeout=120_000,
                )
                if page.is_visible("#classify-anyway"):
                    page.click("#classify-anyway")
                page.wait_for_selector(f"#results[data-state='done'][data-model='{name}']", timeout=120_000)
                walls.append(1000 * (time.perf_counter() - t))
                times.append(float(page.get_attribute("#results", "data-infer-ms")))
                if lungs:  # the outline runs after the result: let it finish before the next pick
                    page.wait_for_selector("#lung-outline[data-state='done']", state="attached", timeout=120_000)
            per_model[name] = {
                "first_ms": times[0],
                "median_later_ms": statistics.median(times[1:]),
                # pick to probabilities on screen: decode, guard, preprocessing, model (and its loading, first)
                "first_wall_ms": walls[0],
                "median_later_wall_ms": statistics.median(walls[1:]),
            }
        outline = page.evaluate("window.covidApp.timings.filter(t => t.model === 'lung segmenter').map(t => t.ms)")
        browser.close()
    res = {"page_ready_s": ready_s, "models": per_model}
    if outline:  # the segmenter's run, once per pick (the first includes loading it)
        res["lungs"] = {"first_ms": outline[0], "median_later_ms": statistics.median(outline[1:]), "runs": len(outline)}
    return res


class Counter:
    """Bytes the server wrote, with the time of each write."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.total = 0
        self.paths: dict[str, int] = {}
        self.writes: list[tuple[float, int]] = []  # (time.time(), bytes)

    def add(self, path: str, n: int) -> None:
        with self.lock:
            self.total += n
            self.paths[path] = self.paths.get(path, 0) + n
            self.writes.append((time.time(), n))

    def until(self, t: float, since: int = 0) -> int:
        """Bytes written up to the wall-clock time ``t``, of the writes from index ``since`` on."""
        with self.lock:
            return sum(n for at, n in self.writes[since:] if at <= t)


def counting(handler: type, counter: Counter) -> type:
    class _Writer:
        def __init__(self, raw, path_of) -> None:
            self.raw, self.path_of = raw, path_of

        def write(self, data) -> int:
            counter.add(self.path_of(), len(data))
            return self.raw.write(data)

        def __getattr__(self, name):
            return getattr(self.raw, name)

    class Counting(handler):
        def setup(self) -> None:
            super().setup()
            self.wfile = _Writer(self.wfile, lambda: getattr(self, "path", "?").split("?")[0])

    return Counting


CACHE_BYTES = """async () => {
  let total = 0;
  for (const name of await caches.keys()) {
    const cache = await caches.open(name);
    for (const req of await cache.keys()) total += (await (await cache.match(req)).arrayBuffer()).byteLength;
  }
  return total;
}"""


def cold_visit(url: str, counter: Counter, models: list[str], default: str, image: Path, throttle: bool) -> dict:
    """A first visit with the service worker on: bytes (and seconds) to the first result with the
    default model, after the worker's install, and kept with every model picked once."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # A profile on disk, as a phone's browser has: its HTTP cache keeps large files, so the worker's
        # install revalidates what the page has just downloaded (an incognito context's memory cache does not).
        profile = tempfile.mkdtemp(prefix="bench-app-profile-")
        ctx = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=ARGS, headless=True, viewport={"width": 390, "height": 844}
        )
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        if throttle:
            cdp = ctx.new_cdp_session(page)
            cdp.send("Network.enable")
            cdp.send(
                "Network.emulateNetworkConditions",
                {"offline": False, "latency": 150, "downloadThroughput": 9e6 / 8, "uploadThroughput": 9e6 / 8},
            )
            cdp.send("Emulation.setCPUThrottlingRate", {"rate": 4})
        start, first_write = counter.total, len(counter.writes)
        t0 = time.perf_counter()
        page.goto(url)
        page.wait_for_selector("body[data-ready='true']", timeout=120_000)
        page.set_input_files("#file-input", str(image))
        page.wait_for_function(
            """m => { const r = document.querySelector('#results'), w = document.querySelector('#ood-warning');
                return (r && r.dataset.state === 'done' && r.dataset.model === m) || (w && !w.hidden); }""",
            arg=default,
            timeout=300_000,
        )
        if page.is_visible("#classify-anyway"):
            page.click("#classify-anyway")
        page.wait_for_selector(f"#results[data-state='done'][data-model='{default}']", timeout=300_000)
        first_s = time.perf_counter() - t0
        # Up to the moment the page drew the result (its clock is this machine's): what the page fetches after
        # it (the lung outline's file, once the result is there) is not part of the first result.
        drawn = page.evaluate(f"window.covidApp.timings.find(t => t.model === {json.dumps(default)}).at") / 1000
        first_bytes = counter.until(drawn, first_write)
        page.wait_for_selector("body[data-offline='ready']", timeout=300_000)
        page.wait_for_timeout(500)
        installed = counter.total - start
        kept_installed = page.evaluate(CACHE_BYTES)
        for name in models:
            if name != default:
                page.click(f"#model-list [data-model='{name}']")
                page.wait_for_selector(f"#results[data-state='done'][data-model='{name}']", timeout=300_000)
        page.wait_for_timeout(1000)
        out = {
            "throttled": throttle,
            "first_result_s": first_s,
            "first_result_bytes": first_bytes,
            "bytes_after_install": installed,
            "kept_after_install": kept_installed,
            "bytes_all_models": counter.total - start,
            "kept_all_models": page.evaluate(CACHE_BYTES),
        }
        ctx.close()
        shutil.rmtree(profile, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=".store")
    ap.add_argument("--run", default=None)
    ap.add_argument("--no-throttle", action="store_true", help="skip the throttled phone-profile visit")
    args = ap.parse_args()

    from covid_app.serve import ensure_bundle, handler_for, resolve_run
    from covid_data.store import open_store

    run = resolve_run(open_store(args.store), args.run)
    ensure_bundle(args.store, run)
    src = Path(args.store) / "runs" / run / "app"
    with tempfile.TemporaryDirectory(prefix="bench-app-") as tmp:
        app = bundle_with_current_page(args.store, run, Path(tmp))
        add_mobilenet_224(app)
        data = json.loads((app / "data/app.json").read_text())
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(open_store(tmp), f"runs/{run}/app"))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        image = sorted((SHARED_SAMPLE / "COVID-19_Radiography_Dataset/COVID/images").glob("*.png"))[0]
        res = measure(f"http://127.0.0.1:{server.server_port}/", [m["name"] for m in data["models"]], image)
        server.shutdown()
        # The bytes: the bundle as published (the speed stand-in left out), its worker and list included.
        visits = []
        for throttle in (False,) if args.no_throttle else (False, True):
            counter = Counter()
            plain = open_store(str(src.parents[2]))
            server = ThreadingHTTPServer(("127.0.0.1", 0), counting(handler_for(plain, f"runs/{run}/app"), counter))
            threading.Thread(target=server.serve_forever, daemon=True).start()
            published = json.loads((src / "data/app.json").read_text())["models"]
            default = next((m for m in published if m.get("champion")), published[0])["name"]
            names = [m["name"] for m in published]
            visits.append(
                cold_visit(f"http://127.0.0.1:{server.server_port}/", counter, names, default, image, throttle)
            )
            visits[-1]["largest"] = sorted(counter.paths.items(), key=lambda kv: -kv[1])[:6]
            server.shutdown()
        res["visits"] = visits
    sizes = {m["name"]: (m["bytes"], m["input_size"]) for m in data["models"]}
    res |= {"run": run, "machine": machine_info(), "sizes": sizes}
    write_json(res, OUT_DIR / "app.json")
    print(machine_line(res["machine"]))
    print(f"\nRun `{run}`; page ready (models listed): **{res['page_ready_s']:.2f} s** (goal <= 3 s)\n")
    print("Model run (LiteRT.js, WASM), and pick-to-probabilities on screen (decode, guard, preprocessing, model;")
    print("the first one of each model includes loading it, the very first one the runtime too):\n")
    print("| model | input | TFLite MB | first run ms | median of 20 later ms | first pick-to-result ms "
          "| median later pick-to-result ms | goal (per prediction) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, t in res["models"].items():
        goal = "<= 100 ms" if name == EXTRA else "<= 1000 ms"
        b, size = sizes[name]
        print(
            f"| {name} | {size} px | {b / 1e6:.1f} | {t['first_ms']:.0f} | {t['median_later_ms']:.1f} "
            f"| {t['first_wall_ms']:.0f} | {t['median_later_wall_ms']:.0f} | {goal} |"
        )
    if "lungs" in res:
        lg, seg = res["lungs"], data["lungs"]
        print(
            f"\nLung outline (the run's segmenter, {seg['input_size']} px, {seg['bytes'] / 1e6:.2f} MB): first run "
            f"{lg['first_ms']:.0f} ms, median of {lg['runs'] - 1} later runs **{lg['median_later_ms']:.1f} ms** "
            "(goal <= 50 ms per image, issue 16 §2)"
        )
    print(
        "\nCold first visit, service worker on (bytes written by the server, headers included; kept = Cache Storage):\n"
    )
    print("| profile | to first result MB | s | + worker install MB | kept MB | all models picked MB | kept MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v in res["visits"]:
        print(
            f"| {'9 Mbit/s, 150 ms, CPU x4' if v['throttled'] else 'loopback'} | {v['first_result_bytes'] / 1e6:.1f} "
            f"| {v['first_result_s']:.1f} | {v['bytes_after_install'] / 1e6:.1f} | {v['kept_after_install'] / 1e6:.1f} "
            f"| {v['bytes_all_models'] / 1e6:.1f} | {v['kept_all_models'] / 1e6:.1f} |"
        )


if __name__ == "__main__":
    main()
