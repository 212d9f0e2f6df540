"""A smaller guard: the app's out-of-distribution guard with MobileNetV2 cut at an earlier layer.

    PYTHONPATH=. COVID_WEIGHTS_DIR=../shared/weights .venv/bin/python benchmarks/guard_cut.py

For each cut (``--layer``, today's ``out_relu`` among them) the guard is fitted as ``covid_app.guard``
fits it (train features, the validation X-rays' 99.5% quantile) and scored, Keras float32, on what
the rule in BENCHMARKS.md ("A smaller guard") names: the non-chest radiographs, non-chest DICOM films
and photographs (misses, score or view), the Shenzhen frontal X-rays (flags by score), and for the
record the test X-rays and the squeezed-film proxy. Its float16 TFLite file is then exported as the
bundle exports it, sized, and checked against its float32 file by the guard's float16 bounds
(``covid_app.app_models.app_guard``). Figures go to ``benchmarks/out/guard_cut.json``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import OUT_DIR, machine_info, machine_line, prepare_split, write_json
from benchmarks.ood_guard import DICOM, DICOM_CHEST, OOD, SHENZHEN, _squeezed

CUTS = ("block_9_add", "block_12_add", "block_13_expand_relu", "out_relu")
FIT = ("train", "val")  # what a guard is fitted on; every other set is scored
MAX_FP16_BYTES = 1_100_000  # what a custom CNN champion's bundle leaves the guard within 15 MB


def _images(paths) -> np.ndarray:
    from covid_app.guard import INPUT_SIZE
    from covid_models.data import decode_resize

    return np.stack([decode_resize(str(p), INPUT_SIZE, 1).numpy() for p in paths])


def outside_sets() -> dict[str, np.ndarray]:
    """The pictures from outside the split that a guard is scored on, as its 128 px input: the non-chest
    radiographs, the non-chest DICOM films, the photographs and the Shenzhen frontal X-rays."""
    from tests.photographs import photographs

    ood = sorted(p for p in OOD.glob("*/*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    shenzhen = sorted(p for d in ("Normal", "Tuberculosis") for p in (SHENZHEN / d).glob("*.png"))
    return {
        "non-chest radiographs": _images(ood),
        "non-chest DICOM films": _images(sorted(p for p in DICOM.glob("*.dcm") if p.name not in DICOM_CHEST)),
        "photographs": np.stack(list(photographs().values())),
        "Shenzhen frontal X-rays": _images(shenzhen),
    }


def _features(model, images: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(model.predict_on_batch(images[i : i + 64].astype("float32")))
                           for i in range(0, len(images), 64)])  # fmt: skip


def main() -> None:
    from covid_app import view as V
    from covid_app.app_models import GUARD_CHECK_IMAGES, GUARD_MAX_SCORE_DIFF
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
    from covid_models.metrics import wilson_interval
    from covid_registry.convert import export_tflite
    from covid_registry.exports import sample_test_images

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", action="append", choices=CUTS, help="cuts to measure (default: all)")
    args = ap.parse_args()
    split = prepare_split()
    data = load_split_data(split)
    weights = _weights()
    sets = {
        "train": _images(data.files("train")[0]),
        "val": _images(data.files("val")[0]),
        "test": _images(data.files("test")[0]),
        **outside_sets(),
    }
    sets["test squeezed (proxy)"] = _squeezed(sets["test"])
    # The view check is training-free with thresholds from train+val cues: the same for every cut.
    tv = V.cue_arrays(np.concatenate([sets["train"], sets["val"]]))
    view_rec = V.record(tv, V.cue_arrays(sets["test"]))
    view = {k: np.asarray(V.flagged(V.cue_arrays(v), view_rec), bool) for k, v in sets.items() if k not in FIT}
    check = sample_test_images(split, INPUT_SIZE, 1, GUARD_CHECK_IMAGES, None)
    results = []
    for layer in args.layer or CUTS:
        fm = feature_model(weights, layer)
        feats = {k: _features(fm, v) for k, v in sets.items()}
        mean, basis = fit_subspace(feats["train"])
        thr = float(np.quantile(scores(mean, basis, feats["val"]), QUANTILE))
        row: dict = {"layer": layer, "params": int(fm.count_params()), "dims": int(feats["train"].shape[1])}
        row["threshold"] = thr
        for k in sets:
            if k in FIT:
                continue
            by_score = scores(mean, basis, feats[k]) > thr
            either = by_score | view[k]
            row[k] = {"n": len(by_score), "score": int(by_score.sum()), "score_or_view": int(either.sum()),
                      "score_ci95": list(wilson_interval(int(by_score.sum()), len(by_score)))}  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="guard-cut-") as tmp:
            model = score_model(fm, mean, basis, batch_size=1)
            f32, f16 = Path(tmp) / "f32.tflite", Path(tmp) / "f16.tflite"
            export_tflite(model, f32, "float32")
            export_tflite(model, f16, "float16")
            ref, got = tflite_scores(f32, check), tflite_scores(f16, check)
            row["bytes"] = {"float32": f32.stat().st_size, "float16": f16.stat().st_size}
            row["fp16_check"] = {
                "max_score_diff_of_threshold": float(np.abs(got - ref).max() / thr),
                "same_flag": float(np.mean((got > thr) == (ref > thr))),
                "images": len(check),
            }
        c = row["fp16_check"]
        row["fp16_within_bounds"] = c["max_score_diff_of_threshold"] <= GUARD_MAX_SCORE_DIFF and c["same_flag"] == 1.0
        results.append(row)
        print(layer, row, flush=True)
    view_thresholds = {k: v for k, v in view_rec.items() if k != "method"}
    res = {"cuts": results, "max_fp16_bytes": MAX_FP16_BYTES, "view": view_thresholds, "machine": machine_info()}
    write_json(res, OUT_DIR / "guard_cut.json")
    print(machine_line(res["machine"]))
    print("\n| cut | params | fp16 MB | fp16 check (max Δ of threshold, same flags) | non-chest radiographs missed | "
          "non-chest DICOM missed | photographs missed (score) | Shenzhen flagged (score) | test flagged (score) | "
          "squeezed proxy flagged (score or view) |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")

    def miss(r: dict, k: str, how: str = "score_or_view") -> str:
        return f"{r[k]['n'] - r[k][how]}/{r[k]['n']}"

    def flag(r: dict, k: str, how: str = "score") -> str:
        return f"{r[k][how]}/{r[k]['n']} ({r[k][how] / r[k]['n']:.1%})"

    for r in results:
        c = r["fp16_check"]
        cells = [
            f"`{r['layer']}`",
            f"{r['params']:,}",
            f"{r['bytes']['float16'] / 1e6:.2f}",
            f"{c['max_score_diff_of_threshold']:.2%}, {c['same_flag']:.0%}",
            miss(r, "non-chest radiographs"),
            miss(r, "non-chest DICOM films"),
            miss(r, "photographs", "score"),
            flag(r, "Shenzhen frontal X-rays"),
            flag(r, "test"),
            flag(r, "test squeezed (proxy)", "score_or_view"),
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
