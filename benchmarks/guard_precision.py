"""The app's guard as float32, float16 and dynamic-range int8 TFLite files: bytes, and what each flags.

    PYTHONPATH=. COVID_WEIGHTS_DIR=../shared/weights .venv/bin/python benchmarks/guard_precision.py

The guard is fitted as ``covid_app.guard`` fits it (ImageNet MobileNetV2 ``out_relu`` at 128 px, the
training features' top components, the threshold at the validation X-rays' 99.5% quantile) on the shared
sample's split, exported at each precision, and each file scores, one picture at a time as the page does:
the bundle's own check images (``covid_app.app_models.app_guard``'s bounds), the test X-rays, and the
pictures from outside the split (``benchmarks.guard_cut.outside_sets``). Each row counts
the pictures a file flags by score and the pictures on which its flag differs from the float32 file's.
Figures go to ``benchmarks/out/guard_precision.json``; the rule they decide is in BENCHMARKS.md ("The
guard as int8").
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import OUT_DIR, machine_info, machine_line, prepare_split, write_json
from benchmarks.guard_cut import _features, _images, outside_sets

PRECISIONS = ("float32", "float16", "int8")


def main() -> None:
    from covid_app.app_models import GUARD_CHECK_IMAGES
    from covid_app.guard import (
        INPUT_SIZE,
        QUANTILE,
        _weights,
        feature_model,
        fit_subspace,
        score_model,
        scores,
        tflite_scores,
    )
    from covid_models.data import load_split_data
    from covid_registry.convert import export_tflite
    from covid_registry.exports import sample_test_images

    split = prepare_split()
    data = load_split_data(split)
    sets = {
        "check images (the bundle's)": sample_test_images(split, INPUT_SIZE, 1, GUARD_CHECK_IMAGES, None),
        "test X-rays": _images(data.files("test")[0]),
        **outside_sets(),
    }
    fm = feature_model(_weights())
    mean, basis = fit_subspace(_features(fm, _images(data.files("train")[0])))
    thr = float(np.quantile(scores(mean, basis, _features(fm, _images(data.files("val")[0]))), QUANTILE))
    model = score_model(fm, mean, basis, batch_size=1)
    rows, by = [], {}
    with tempfile.TemporaryDirectory(prefix="guard-precision-") as tmp:
        for precision in PRECISIONS:
            f = Path(tmp) / f"guard-{precision}.tflite"
            export_tflite(model, f, precision)
            by[precision] = {k: tflite_scores(f, v) for k, v in sets.items()}
            rows.append({"precision": precision, "bytes": f.stat().st_size})
    for row in rows:
        got, ref = by[row["precision"]], by["float32"]
        row["sets"] = {
            k: {
                "n": len(got[k]),
                "flagged": int((got[k] > thr).sum()),
                "flag_differs": int(((got[k] > thr) != (ref[k] > thr)).sum()),
                "max_score_diff_of_threshold": float(np.abs(got[k] - ref[k]).max() / thr),
            }
            for k in sets
        }
        print(row["precision"], row, flush=True)
    res = {"threshold": thr, "rows": rows, "machine": machine_info()}
    write_json(res, OUT_DIR / "guard_precision.json")
    print(machine_line(res["machine"]))
    print("\n| precision | MB | " + " | ".join(f"{k}: flagged (differs from float32; max Δscore)" for k in sets) + " |")
    print("|---|---:|" + "---|" * len(sets))
    for r in rows:
        cells = [
            f"{s['flagged']}/{s['n']} ({s['flag_differs']}; {s['max_score_diff_of_threshold']:.2%})"
            for s in r["sets"].values()
        ]
        print(f"| {r['precision']} | {r['bytes'] / 1e6:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
