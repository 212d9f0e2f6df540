"""Wall time of the retrain flow end to end, per stage, and the leaderboard it produced.

    python benchmarks/retrain.py --preset smoke
    python benchmarks/retrain.py --preset cpu      # about 20 minutes on 2 cores
    python benchmarks/retrain.py --preset cpu --stand-in-weights   # all nine models, timed

Each preset runs in a fresh store and cache under benchmarks/out/retrain-<preset>/ (so nothing is
reused from an earlier run), on the shared sample, with the shared MobileNetV2 ImageNet weights
as the local weights folder. The flow runs on a temporary local Prefect server.

``--stand-in-weights`` times what a user who can download every ImageNet file runs (all nine
models): each missing file is replaced by a *randomly initialised* file of the same architecture,
written under benchmarks/out/ (speed does not depend on the weights' values). Its accuracies mean
nothing and its store is a throwaway.
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


def stand_in_weights(folder: Path, real: Path) -> list[str]:
    """A weights folder holding the real files of ``real`` plus a randomly initialised no-top file
    for every transfer model without one; the names of the stand-ins."""
    import keras

    from covid_models.builders import ARCHITECTURES, MODEL_NAMES, is_transfer
    from covid_models.weights import keras_file_names

    folder.mkdir(parents=True, exist_ok=True)
    for f in real.glob("*.h5"):
        if not (folder / f.name).exists():
            (folder / f.name).symlink_to(f.resolve())
    made = []
    for name in MODEL_NAMES:
        if not is_transfer(name):
            continue
        names = keras_file_names(name, 224)
        if any((folder / n).exists() for n in names):
            continue
        app = getattr(keras.applications, ARCHITECTURES[name].application)
        backbone = app(include_top=False, weights=None, input_shape=(224, 224, 3))
        target = next(n for n in names if n.endswith(".weights.h5"))
        backbone.save_weights(str(folder / target))
        keras.backend.clear_session()
        made.append(name)
    return made


def run_preset(preset: str, keep: bool, stand_in: bool = False) -> dict:
    base = OUT_DIR / (f"retrain-{preset}" + ("-stand-in" if stand_in else ""))
    if base.exists() and not keep:
        shutil.rmtree(base)
    os.environ["COVID_CACHE_DIR"] = str(base / "cache")
    os.environ.setdefault("COVID_WEIGHTS_DIR", str(SHARED / "weights"))
    stand_ins: list[str] = []
    if stand_in:
        os.environ["COVID_WEIGHTS_DOWNLOAD"] = "0"
        folder = base / "stand-in-weights"
        stand_ins = stand_in_weights(folder, Path(os.environ["COVID_WEIGHTS_DIR"]))
        os.environ["COVID_WEIGHTS_DIR"] = str(folder)
    from covid_eval.leaderboard import to_markdown
    from flows.retrain import retrain
    from flows.retrain_params import DataParams, TrainingParams

    t0 = time.perf_counter()
    data = DataParams(source=str(SHARED_SAMPLE), profile="shared-sample")
    out = retrain(store=str(base / "store"), data=data, training=TrainingParams(preset=preset))
    wall = time.perf_counter() - t0
    import pandas as pd

    board = pd.DataFrame(out["leaderboard"])
    return {
        "preset": preset + (" (stand-in weights)" if stand_in else ""),
        "stand_in_weights": stand_ins,
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
    ap.add_argument(
        "--stand-in-weights",
        action="store_true",
        help="random files of the right architecture for every missing ImageNet file (timing all nine only)",
    )
    a = ap.parse_args()
    results = [run_preset(p, a.keep, a.stand_in_weights) for p in a.preset]
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
    name = "retrain-stand-in.json" if a.stand_in_weights else "retrain.json"
    write_json({"machine": info, "results": results}, OUT_DIR / name)
    print(json.dumps({r["preset"]: r["wall_seconds"] for r in results}))


if __name__ == "__main__":
    main()
