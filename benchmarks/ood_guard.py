"""The app's out-of-distribution guard on the whole shared sample: false alarms on the test X-rays,
misses on real non-chest radiographs and on photographs; then the view check (frontal or not) on frontal
X-rays from the test split and another hospital, non-chest radiographs, the DICOM files, and test X-rays
turned or squeezed as proxies for non-frontal views (there is no lateral set here).

    PYTHONPATH=. COVID_WEIGHTS_DIR=../shared/weights .venv/bin/python benchmarks/ood_guard.py

The guard is fitted on the train split and its threshold set on the validation split (as ``retrain``
does), the view check's thresholds on train and validation; the scores here come from its TFLite file,
the one the app runs, and the view cues from ``covid_app.view`` (the page's ``view.js`` gives the same
floats: tests/test_app_view.py).
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_STORE, OUT_DIR, SHARED, machine_info, machine_line, prepare_split, write_json

OOD = SHARED / "data" / "ood-radiographs"
SHENZHEN = SHARED / "data" / "shenzhen-cxr"
DICOM = SHARED / "data" / "dicom"
DICOM_CHEST = ("CR-MONO1-10-chest.dcm", "RG1_J2KI.dcm", "nih_dx_chest.dcm")


def _squeezed(images: np.ndarray) -> np.ndarray:
    """Each guard input squeezed to half its width and centred on black: a narrower film."""
    import tensorflow as tf

    size = images.shape[1]
    half = tf.image.resize(images.astype("float32"), (size, size // 2), antialias=True).numpy()
    out = np.zeros_like(images)
    out[:, :, size // 4 : size // 4 + size // 2] = np.clip(np.round(half), 0, 255)
    return out


def view_rows(rec: dict, sets: dict[str, tuple[np.ndarray, np.ndarray]], goal: dict[str, str]) -> list[dict]:
    """Per set: n, flagged by the view check alone, flagged by score or view, Wilson 95% intervals."""
    from covid_app import view as V
    from covid_models.metrics import wilson_interval

    rows = []
    for name, (images, score) in sets.items():
        cues = V.cue_arrays(images)
        view = np.asarray(V.flagged(cues, rec["view"]), bool)
        either = view | (score > rec["threshold"])
        row = {"images": name, "n": len(images), "goal": goal[name]}
        for key, f in (("view", view), ("guard", either)):
            k = int(f.sum())
            row[key] = k
            row[f"{key}_ci95"] = list(wilson_interval(k, len(images)))
        rows.append(row)
    return rows


def main() -> None:
    from covid_app.guard import INPUT_SIZE, ensure_guard, tflite_scores
    from covid_models.data import decode_resize, load_split_data
    from tests.photographs import photographs

    split = prepare_split()
    split_hash = Path(split).parent.name
    rec = ensure_guard(str(DEFAULT_STORE), split, split_hash)
    thr = rec["threshold"]

    def load(paths) -> np.ndarray:
        return np.stack([decode_resize(str(p), INPUT_SIZE, 1).numpy() for p in paths])

    def score(images):
        return tflite_scores(rec["uri"], images)

    test = load_split_data(split).files("test")[0]
    test_images = load(test)
    test_scores = score(test_images)
    ood = sorted(p for p in OOD.glob("*/*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    ood_images = load(ood)
    ood_scores = score(ood_images)
    photos = photographs()
    photo_scores = tflite_scores(rec["uri"], np.stack(list(photos.values())))
    kinds = collections.defaultdict(list)
    for p, s in zip(ood, ood_scores, strict=True):
        kinds[p.parent.name].append(s > thr)
    rows = [("test X-rays (in distribution)", len(test), int((test_scores > thr).sum()), "false alarms")]
    rows += [(f"{k} radiographs", len(v), int(len(v) - sum(v)), "missed") for k, v in sorted(kinds.items())]
    rows += [("photographs (scikit-learn, scikit-image)", len(photos), int((photo_scores <= thr).sum()), "missed")]

    # The view check, and the guard as the page runs it (score, then view; colour aside: grey inputs).
    shenzhen = sorted(p for d in ("Normal", "Tuberculosis") for p in (SHENZHEN / d).glob("*.png"))
    shen_images = load(shenzhen)
    dicom_chest = load([DICOM / f for f in DICOM_CHEST])
    dicom_other = load(sorted(p for p in DICOM.glob("*.dcm") if p.name not in DICOM_CHEST))
    turned = np.rot90(test_images, 1, axes=(1, 2)).copy()
    squeezed = _squeezed(test_images)
    sets = {
        "test X-rays, frontal (split's test)": (test_images, test_scores),
        "Shenzhen X-rays, frontal (another hospital)": (shen_images, score(shen_images)),
        "DICOM chest X-rays, frontal": (dicom_chest, score(dicom_chest)),
        "non-chest radiographs": (ood_images, ood_scores),
        "DICOM ankle and dental films": (dicom_other, score(dicom_other)),
        "test X-rays turned 90° (proxy: not frontal)": (turned, score(turned)),
        "test X-rays squeezed to half width (proxy)": (squeezed, score(squeezed)),
    }
    goal = dict.fromkeys(sets, "flagged ≥ 95%")
    goal["test X-rays, frontal (split's test)"] = "flagged ≤ 2%"
    goal["Shenzhen X-rays, frontal (another hospital)"] = goal["DICOM chest X-rays, frontal"] = "flagged: few"
    vrows = view_rows(rec, sets, goal)
    res = {
        "threshold": thr,
        "val_false_alarm": rec["val_false_alarm"],
        "test_false_alarm": float(np.mean(test_scores > thr)),
        "ood_miss": float(np.mean(ood_scores <= thr)),
        "photo_miss": float(np.mean(photo_scores <= thr)),
        "rows": rows,
        "view": {k: v for k, v in rec["view"].items() if k != "method"},
        "view_rows": vrows,
        "machine": machine_info(),
    }
    write_json(res, OUT_DIR / "ood_guard.json")
    print(machine_line(res["machine"]))
    print(f"\nThreshold {thr:.2f} (validation false alarms {rec['val_false_alarm']:.2%})\n")
    print("| images | n | flagged wrongly / missed | rate |")
    print("|---|---:|---:|---:|")
    for name, n, bad, what in rows:
        print(f"| {name} | {n} | {bad} {what} | {bad / n:.1%} |")
    v = rec["view"]
    print(
        f"\nView check: asymmetry > {v['asymmetry_threshold']:.4f} or midline < {v['midline_threshold']:.4f}; "
        f"train+val false alarms {v['trainval_false_alarm']:.2%} of {v['fitted_on']['trainval']}\n"
    )
    print("| images | n | flagged by the view check [95% CI] | flagged by score or view [95% CI] | goal |")
    print("|---|---:|---:|---:|---|")
    for r in vrows:
        ci = {k: r[f"{k}_ci95"] for k in ("view", "guard")}
        cells = [f"{r[k]} ({r[k] / r['n']:.1%}) [{ci[k][0]:.1%}–{ci[k][1]:.1%}]" for k in ("view", "guard")]
        print(f"| {r['images']} | {r['n']} | {cells[0]} | {cells[1]} | {r['goal']} |")


if __name__ == "__main__":
    main()
