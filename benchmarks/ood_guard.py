"""The app's out-of-distribution guard on the whole shared sample: false alarms on the test X-rays,
misses on real non-chest radiographs and on photographs.

    PYTHONPATH=. COVID_WEIGHTS_DIR=../shared/weights .venv/bin/python benchmarks/ood_guard.py

The guard is fitted on the train split and its threshold set on the validation split (as ``retrain``
does); the scores here come from its TFLite file, the one the app runs.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_STORE, OUT_DIR, SHARED, machine_info, machine_line, prepare_split, write_json

OOD = SHARED / "data" / "ood-radiographs"


def main() -> None:
    from covid_app.guard import INPUT_SIZE, ensure_guard, tflite_scores
    from covid_models.data import decode_resize, load_split_data
    from tests.photographs import photographs

    split = prepare_split()
    split_hash = Path(split).parent.name
    rec = ensure_guard(str(DEFAULT_STORE), split, split_hash)
    thr = rec["threshold"]

    def score(paths):
        return tflite_scores(rec["uri"], np.stack([decode_resize(str(p), INPUT_SIZE, 1).numpy() for p in paths]))

    test = load_split_data(split).files("test")[0]
    test_scores = score(test)
    ood = sorted(p for p in OOD.glob("*/*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    ood_scores = score(ood)
    photos = photographs()
    photo_scores = tflite_scores(rec["uri"], np.stack(list(photos.values())))
    kinds = collections.defaultdict(list)
    for p, s in zip(ood, ood_scores, strict=True):
        kinds[p.parent.name].append(s > thr)
    rows = [("test X-rays (in distribution)", len(test), int((test_scores > thr).sum()), "false alarms")]
    rows += [(f"{k} radiographs", len(v), int(len(v) - sum(v)), "missed") for k, v in sorted(kinds.items())]
    rows += [("photographs (scikit-learn, scikit-image)", len(photos), int((photo_scores <= thr).sum()), "missed")]
    res = {
        "threshold": thr,
        "val_false_alarm": rec["val_false_alarm"],
        "test_false_alarm": float(np.mean(test_scores > thr)),
        "ood_miss": float(np.mean(ood_scores <= thr)),
        "photo_miss": float(np.mean(photo_scores <= thr)),
        "rows": rows,
        "machine": machine_info(),
    }
    write_json(res, OUT_DIR / "ood_guard.json")
    print(machine_line(res["machine"]))
    print(f"\nThreshold {thr:.2f} (validation false alarms {rec['val_false_alarm']:.2%})\n")
    print("| images | n | flagged wrongly / missed | rate |")
    print("|---|---:|---:|---:|")
    for name, n, bad, what in rows:
        print(f"| {name} | {n} | {bad} {what} | {bad / n:.1%} |")


if __name__ == "__main__":
    main()
