"""The shortcut audit (issue 16 §3) on the whole shared sample: a lung segmenter trained on the Shenzhen
masks, the lungs blacked out, a small classifier fitted on train and scored on test.

    PYTHONPATH=. COVID_WEIGHTS_DIR=../shared/weights .venv/bin/python benchmarks/shortcut_audit.py \\
        [--store benchmarks/out/store] [--steps 700] [--features mobilenet_v2] [--margin 0.05] \\
        [--no-hull] [--region lungs|fixed]

The split is prepared as the other benchmarks prepare it (``prepare_split``); the segmenter unit and
the audit unit are reused when complete (a second call with the same settings computes nothing:
delete the store, or change a setting, to measure again). Results: ``benchmarks/out/shortcut_audit_<settings>.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import DEFAULT_STORE, OUT_DIR, SHARED, machine_info, machine_line, prepare_split, write_json

SHENZHEN = SHARED / "data" / "shenzhen-cxr"


def main(argv: list[str] | None = None) -> None:
    from covid_eval.segmenter_unit import SegmenterConfig, train_segmenter_unit
    from covid_eval.shortcut_audit import AuditConfig
    from covid_eval.shortcut_audit_unit import audit_split

    d = AuditConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, default=DEFAULT_STORE)
    ap.add_argument("--masks", type=Path, default=SHENZHEN, help="the segmenter's mask source")
    ap.add_argument("--steps", type=int, default=SegmenterConfig().steps, help="the segmenter's training batches")
    ap.add_argument("--features", choices=["mobilenet_v2", "pixels"], default=d.features)
    ap.add_argument("--margin", type=float, default=d.margin, help="dilation, a share of the image side")
    ap.add_argument("--no-hull", action="store_true", help="black out the predicted lung pixels only")
    ap.add_argument("--region", choices=["lungs", "fixed"], default=d.region, help="each image's own cover, or one")
    ap.add_argument("--size", type=int, default=d.size)
    a = ap.parse_args(argv)

    split = prepare_split(a.store)
    t0 = time.perf_counter()
    seg = train_segmenter_unit(a.masks, str(a.store), SegmenterConfig(steps=a.steps))
    seg_s = time.perf_counter() - t0
    cfg = AuditConfig(size=a.size, margin=a.margin, hull=not a.no_hull, region=a.region, features=a.features)
    t0 = time.perf_counter()
    rec = audit_split(split, seg["uri"], cfg)
    audit_s = time.perf_counter() - t0
    res = {
        "split": split,
        "segmenter": {k: seg[k] for k in ("uri", "status", "heldout_metrics", "train_seconds")},
        "segmenter_wall_s": seg_s,
        "audit_wall_s": audit_s,
        "audit": rec,
        "machine": machine_info(),
    }
    name = f"shortcut_audit_{a.features}_{a.region}_m{a.margin:g}{'_nohull' if a.no_hull else ''}_s{a.steps}.json"
    write_json(res, OUT_DIR / name)
    m, u, s, c, b = rec["masked"], rec["unmasked"], rec["mask_only"], rec["chance"], rec["blacked_out"]
    print(machine_line(res["machine"]))
    print(
        f"\nSegmenter {seg['status']} (held-out Dice {seg['heldout_metrics']['dice']:.3f}, {seg_s:.0f} s); "
        f"audit {rec['status']} ({audit_s:.0f} s): {rec['meaning']}\n"
    )
    print("| images | test accuracy (95% CI) |\n|---|---|")
    for what, x in (("lungs blacked out", m), ("whole images (reference)", u), ("black region alone", s)):
        print(f"| {what} | {x['accuracy']:.3f} ({x['accuracy_ci95'][0]:.3f}–{x['accuracy_ci95'][1]:.3f}) |")
    print(f"\nChance: {c['majority']:.3f} (majority, {c['majority_class']}), {c['uniform']:.3f} (1/K).")
    print(f"Blacked out: {b['mean_share']:.1%} of each image on average; per class {b['per_class']}.")
    print("Recall with the lungs blacked out:", {k: round(v, 3) for k, v in m["recall"].items()})
    print("Confusion (rows true):", m["confusion_matrix"])


if __name__ == "__main__":
    main()
