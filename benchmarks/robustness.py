"""Robustness of each published model to acquisition shifts, on its test split.

    PYTHONPATH=. .venv/bin/python benchmarks/robustness.py [--store .store] [--run ID] [--limit N]
    PYTHONPATH=. .venv/bin/python benchmarks/robustness.py --split val --model-uri SLOT [--model-uri SLOT ...]

``--split val`` scores the validation split instead, the one to choose recipes on (augmentation
for robustness is chosen there; the test split only judges); ``--model-uri`` scores those model
slots instead of a run's published models (e.g. candidate recipes before any run publishes them).

For the run's published (top) models — default: the champion's run — the test images are decoded at
their stored size, shifted (covid_eval.shifts: JPEG q30/50/75, down-up sampling to 128 px, gamma
0.7/1.4, contrast -/+30%, Gaussian noise sigma 5/10, a 5% crop and shift, inversion of 5% of the
images; fixed seeds, the same shifted images for every model), then resized by the pipeline's own
``tf.image.resize`` and scored. Goal: the champion loses at most 2 points of accuracy under every
shift except inversion.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.common import OUT_DIR, machine_info, machine_line, write_json

GOAL_POINTS = 2.0


def _decode(paths: list[str], channels: int) -> np.ndarray:
    import tensorflow as tf

    return np.stack(
        [tf.io.decode_image(tf.io.read_file(p), channels=channels, expand_animations=False).numpy() for p in paths]
    )


def _score(model, images: np.ndarray, y: np.ndarray, size: int) -> dict[str, float]:
    import tensorflow as tf

    x = tf.clip_by_value(tf.round(tf.image.resize(images, (size, size), antialias=True)), 0, 255).numpy()
    pred = model.predict(x.astype("float32"), batch_size=32, verbose=0).argmax(1)
    covid = y == 0
    return {"accuracy": float((pred == y).mean()), "covid_sensitivity": float((pred[covid] == 0).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=".store")
    ap.add_argument("--run", default=None)
    ap.add_argument("--limit", type=int, default=None, help="at most N test images (quick look)")
    ap.add_argument("--split", choices=["test", "val"], default="test", help="test judges; choose recipes on val")
    ap.add_argument("--model-uri", action="append", default=None, help="score this model slot (repeatable)")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/out/robustness[-val].json)")
    args = ap.parse_args()

    from covid_app.serve import resolve_run
    from covid_data.store import open_store
    from covid_eval.shifts import EXEMPT, SHIFTS, apply
    from covid_models.data import load_split_data
    from covid_models.stored import load_trained_model, model_slot
    from covid_registry.champion import current

    store = open_store(args.store)
    run_id = resolve_run(store, args.run)
    run = json.loads(store.read_text(f"runs/{run_id}/run.json"))
    champ = current(store)
    if args.model_uri:
        stored = [model_slot(u).record() for u in args.model_uri]
        models = [{"model": d["config"]["model"], "model_uri": u} for d, u in zip(stored, args.model_uri, strict=True)]
        split_uri, cap = stored[0]["config"]["split"], stored[0]["config"].get("max_per_class")
    else:
        models, split_uri = run["exports"], run["dataset"]["split"]
        cap = (run.get("preset") or {}).get("max_per_class")
    data = load_split_data(split_uri, max_per_class=cap)
    paths, y = data.files(args.split)
    if args.limit:  # a seeded sample across the classes
        keep = np.sort(np.random.default_rng(0).permutation(len(y))[: args.limit])
        paths, y = [paths[i] for i in keep], y[keep]
    res: dict = {"run": run_id, "split": args.split, "n": len(y), "models": {}, "machine": machine_info()}
    for e in models:
        cfg = model_slot(e["model_uri"]).record()["config"]
        model = load_trained_model(open_store(e["model_uri"]).uri_for("model.keras"))
        images = _decode(paths, cfg["channels"])
        rows = {"clean": _score(model, images, y, cfg["input_size"])}
        for name in SHIFTS:
            rows[name] = _score(model, apply(name, images), y, cfg["input_size"])
        is_champ = bool(champ) and champ["model_uri"].rstrip("/") == e["model_uri"].rstrip("/")
        name = e["model"] if e["model"] not in res["models"] else f"{e['model']} ({e['model_uri'].rstrip('/')[-12:]})"
        res["models"][name] = {
            "champion": is_champ,
            "uri": e["model_uri"],
            "input_size": cfg["input_size"],
            "rows": rows,
        }
        print(f"{e['model']}: clean accuracy {rows['clean']['accuracy']:.4f}", flush=True)
    default = OUT_DIR / ("robustness.json" if args.split == "test" else f"robustness-{args.split}.json")
    write_json(res, Path(args.out) if args.out else default)
    print(machine_line(res["machine"]))
    print(f"\nRun `{run_id}`, {res['n']} {args.split} images. Accuracy (change in points) / COVID sensitivity:\n")
    names = list(res["models"])
    print(
        "| shift | " + " | ".join(f"{m}{' (champion)' if res['models'][m]['champion'] else ''}" for m in names) + " |"
    )
    print("|---|" + "---|" * len(names))
    for shift in ["clean", *SHIFTS]:
        cells = []
        for m in names:
            r, c = res["models"][m]["rows"][shift], res["models"][m]["rows"]["clean"]
            d = 100 * (r["accuracy"] - c["accuracy"])
            mark = "" if shift == "clean" or shift in EXEMPT or d >= -GOAL_POINTS else " ✗"
            delta = "" if shift == "clean" else f" ({d:+.1f}{mark})"
            cells.append(f"{r['accuracy']:.3f}{delta} / {r['covid_sensitivity']:.3f}")
        print(f"| {shift} | " + " | ".join(cells) + " |")
    for m in names:
        rows = res["models"][m]["rows"]
        worst = min((100 * (rows[s]["accuracy"] - rows["clean"]["accuracy"]), s) for s in SHIFTS if s not in EXEMPT)
        verdict = "met" if worst[0] >= -GOAL_POINTS else "not met"
        print(f"\n{m}: largest loss {worst[0]:+.1f} points ({worst[1]}); goal (<= {GOAL_POINTS:.0f} points): {verdict}")


if __name__ == "__main__":
    main()
