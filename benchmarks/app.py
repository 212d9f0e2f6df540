"""Phone-app speed in headless Chromium: page ready, and per model the first and the median of 20
later predictions, with the bundle size per model.

It serves a published run's app bundle (default: the champion's run in ``.store``, else the newest
run) with ``covid_app.serve``'s handler, adds a MobileNetV2 at 224 px (ImageNet backbone, untrained
head: speed does not depend on the head's values) to a copy of the bundle so that goal is measured
whatever the run published, and drives Debian's Chromium (``/usr/bin/chromium``) with Playwright.
Service workers are blocked, so their precaching does not compete with the timings.

    PYTHONPATH=. .venv/bin/python benchmarks/app.py [--store .store] [--run ID]   (or `make bench-app`)

Goals: page ready <= 3 s on loopback; MobileNetV2 at 224 px <= 100 ms per prediction; every
published model <= 1 s per prediction.
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

from benchmarks.common import MOBILENET_V2_WEIGHTS, OUT_DIR, SHARED_SAMPLE, machine_info, machine_line, write_json

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
            per_model[name] = {
                "first_ms": times[0],
                "median_later_ms": statistics.median(times[1:]),
                # pick to probabilities on screen: decode, guard, preprocessing, model (and its loading, first)
                "first_wall_ms": walls[0],
                "median_later_wall_ms": statistics.median(walls[1:]),
            }
        browser.close()
    return {"page_ready_s": ready_s, "models": per_model}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=".store")
    ap.add_argument("--run", default=None)
    args = ap.parse_args()

    from covid_app.serve import ensure_bundle, handler_for, resolve_run
    from covid_data.store import open_store

    run = resolve_run(open_store(args.store), args.run)
    ensure_bundle(args.store, run)
    src = Path(args.store) / "runs" / run / "app"
    with tempfile.TemporaryDirectory(prefix="bench-app-") as tmp:
        app = Path(tmp) / "runs" / run / "app"
        shutil.copytree(src, app)
        # The page as it is built now (a stored bundle keeps the page of its day).
        from covid_app.bundle import ensure_dist

        shutil.copytree(ensure_dist(), app, dirs_exist_ok=True, ignore=shutil.ignore_patterns("sw.js", "*.map"))
        add_mobilenet_224(app)
        data = json.loads((app / "data/app.json").read_text())
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(open_store(tmp), f"runs/{run}/app"))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        image = sorted((SHARED_SAMPLE / "COVID-19_Radiography_Dataset/COVID/images").glob("*.png"))[0]
        res = measure(f"http://127.0.0.1:{server.server_port}/", [m["name"] for m in data["models"]], image)
        server.shutdown()
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


if __name__ == "__main__":
    main()
