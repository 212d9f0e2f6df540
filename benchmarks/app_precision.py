"""The phone app's TFLite precisions: bytes, and agreement with the float32 Keras model on a whole test split.

For each stored model slot given (``--model-uri``, repeatable; calibrated with ``--temperature`` in the same
order, default 1), the model is converted to TFLite at float32, float16, dynamic-range int8 weights and
int8 dense weights only (``covid_registry.convert.export_tflite``, what the exports and the app bundle
use) and each file is run
on every test image of ``--split`` (the pipeline's own decoding and resizing) against the float32 Keras
model: largest |Δp| over images and classes, and top-1 agreement. ``--arch name@size`` adds an untrained
model of that architecture (ImageNet backbone where the weights file exists): its bytes only, since the
file size does not depend on what the weights are.

    PYTHONPATH=. .venv/bin/python benchmarks/app_precision.py --split <split.parquet> \\
        --model-uri <slot> [--temperature T] ... [--arch mobilenet_v2@224 --arch custom_cnn@160]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import MOBILENET_V2_WEIGHTS, OUT_DIR, machine_info, machine_line, write_json
from covid_registry.convert import TFLITE_PRECISIONS as PRECISIONS  # float32 first


def test_images(split: str, size: int, channels: int) -> np.ndarray:
    from covid_models.data import image_dataset, load_split_data

    data = load_split_data(split)
    return np.concatenate([x.numpy() for x, _ in image_dataset(data, "test", size=size, channels=channels)])


def measure_slot(uri: str, temperature: float, split: str, tmp: Path) -> dict[str, Any]:
    from covid_eval.calibration import calibrated_model
    from covid_models.stored import StoredModel
    from covid_registry.convert import agreement, export_tflite, tflite_probabilities

    stored = StoredModel(uri)
    model = calibrated_model(stored.keras(), temperature)
    images = test_images(split, stored.input_size, stored.channels)
    ref = model.predict(images, verbose=0, batch_size=32)
    out: dict[str, Any] = {"model": stored.name, "input_size": stored.input_size, "n": len(images), "precisions": {}}
    for precision in PRECISIONS:
        t0 = time.perf_counter()
        rec = export_tflite(model, tmp / f"{stored.name}-{precision}.tflite", precision)
        seconds = time.perf_counter() - t0
        found = agreement(tflite_probabilities(Path(rec.path), images), ref)
        out["precisions"][precision] = {"bytes": rec.bytes, "convert_s": round(seconds, 1), **found}
    return out


def measure_arch(spec: str, tmp: Path) -> dict[str, Any]:
    import keras

    from covid_models.builders import build_model
    from covid_registry.convert import export_tflite

    name, size = spec.split("@")
    weights = str(MOBILENET_V2_WEIGHTS) if name == "mobilenet_v2" and MOBILENET_V2_WEIGHTS.is_file() else "none"
    keras.utils.set_random_seed(0)
    model = build_model(name, input_size=int(size), channels=1, weights=weights)
    sizes = {p: export_tflite(model, tmp / f"{name}-{size}-{p}.tflite", p).bytes for p in PRECISIONS}
    return {"model": name, "input_size": int(size), "params": int(model.count_params()), "bytes": sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", required=False)
    ap.add_argument("--model-uri", action="append", default=[])
    ap.add_argument("--temperature", action="append", type=float, default=[])
    ap.add_argument("--arch", action="append", default=[])
    args = ap.parse_args()
    temps = args.temperature + [1.0] * (len(args.model_uri) - len(args.temperature))
    res: dict[str, Any] = {"machine": machine_info(), "split": args.split, "models": [], "architectures": []}
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        for uri, t in zip(args.model_uri, temps, strict=True):
            res["models"].append(measure_slot(uri, t, args.split, Path(tmp)))
        for spec in args.arch:
            res["architectures"].append(measure_arch(spec, Path(tmp)))
    write_json(res, OUT_DIR / "app_precision.json")
    print(machine_line(res["machine"]))
    if res["models"]:
        print("\n| model | input | test images | precision | TFLite MB | max abs Δp | top-1 agreement |")
        print("|---|---:|---:|---|---:|---:|---:|")
        for m in res["models"]:
            for p, r in m["precisions"].items():
                print(
                    f"| {m['model']} | {m['input_size']} px | {m['n']} | {p} | {r['bytes'] / 1e6:.2f} "
                    f"| {r['max_prob_diff']:.2e} | {r['top1_agreement']:.4f} |"
                )
    if res["architectures"]:
        print("\n| architecture | input | parameters | float32 MB | float16 MB | int8 MB | int8-dense MB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for a in res["architectures"]:
            b = a["bytes"]
            print(
                f"| {a['model']} | {a['input_size']} px | {a['params']:,} | {b['float32'] / 1e6:.1f} "
                f"| {b['float16'] / 1e6:.1f} | {b['int8'] / 1e6:.1f} | {b['int8-dense'] / 1e6:.1f} |"
            )


if __name__ == "__main__":
    main()
