"""Wall time of the retrain flow end to end, per stage, and the leaderboard it produced.

    python benchmarks/retrain.py --preset smoke
    python benchmarks/retrain.py --preset cpu      # about an hour on 2 cores

Each preset runs in a fresh store and cache under benchmarks/out/retrain-<preset>/ (so nothing is
reused from an earlier run), on the shared sample, with the shared MobileNetV2 ImageNet weights
as the local weights folder. The flow runs on a temporary local Prefect server.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import OUT_DIR, SHARED, SHARED_SAMPLE, machine_info, machine_line, write_json  # noqa: E402


def run_preset(preset: str, keep: bool) -> dict:
    base = OUT_DIR / f"retrain-{preset}"
    if base.exists() and not keep:
        shutil.rmtree(base)
    os.environ["COVID_CACHE_DIR"] = str(base / "cache")
    os.environ.setdefault("COVID_WEIGHTS_DIR", str(SHARED / "weights"))
    from covid_models.leaderboard import to_markdown
    from flows.retrain import retrain

    t0 = time.perf_counter()
    out = retrain(source=str(SHARED_SAMPLE), store=str(base / "store"), preset=preset, profile="shared-sample")
    wall = time.perf_counter() - t0
    import pandas as pd

    board = pd.DataFrame(out["leaderboard"])
    return {
        "preset": preset,
        "wall_seconds": round(wall, 1),
        "stage_seconds": out["seconds"],
        "leaderboard_markdown": to_markdown(board),
        "leaderboard": out["leaderboard"],
        "champion": out["champion"],
        "run": out["run"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=["smoke"], choices=["smoke", "cpu", "paper"])
    ap.add_argument("--keep", action="store_true", help="reuse an earlier run's store and caches")
    a = ap.parse_args()
    results = [run_preset(p, a.keep) for p in a.preset]
    info = machine_info()
    print(machine_line(info), "\n")
    print("| preset | wall s | prepare-data s | train s | export s | publish s |\n|---|---:|---:|---:|---:|---:|")
    for r in results:
        s = r["stage_seconds"]
        publish = r["wall_seconds"] - sum(s.values())
        print(
            f"| {r['preset']} | {r['wall_seconds']:.0f} | {s['prepare_data']:.0f} | {s['train']:.0f} | "
            f"{s['export']:.0f} | {publish:.0f} |"
        )
    for r in results:
        print(f"\n### Leaderboard, preset {r['preset']}\n\n{r['leaderboard_markdown']}")
        print(f"Champion: {r['champion']['reason'] if r['champion'] else 'none'}")
    write_json({"machine": info, "results": results}, OUT_DIR / "retrain.json")
    print(json.dumps({r["preset"]: r["wall_seconds"] for r in results}))


if __name__ == "__main__":
    main()
