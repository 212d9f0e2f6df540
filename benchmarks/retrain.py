"""Wall time of the retrain flow end to end, per stage, and the leaderboard it produced.

    python benchmarks/retrain.py --preset smoke
    python benchmarks/retrain.py --preset cpu      # about 20 minutes on 2 cores
    python benchmarks/retrain.py --preset cpu --stand-in-weights   # all nine models, timed
    python benchmarks/retrain.py --preset cpu --repeats 3          # each figure as mean ± sd of 3 runs

Each preset runs in a fresh store and cache under benchmarks/out/retrain-<preset>/ (so nothing is
reused from an earlier run), on the shared sample, with the shared MobileNetV2 ImageNet weights
as the local weights folder, and with ``../shared/data/shenzhen-cxr`` as a negative external set
where it exists (as ``make run`` does). The flow runs on a temporary local Prefect server.

``--repeats N`` runs each preset N times, each in its own fresh store and cache
(``retrain-<preset>-r<i>``), and reports every figure of each run's rank-1 model and of each model as mean ±
sample sd over the runs, with the range: one run's figures are one draw, and two runs of the same
recipe have differed by several points.

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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import OUT_DIR, SHARED, SHARED_SAMPLE, machine_info, machine_line, write_json  # noqa: E402

SHENZHEN = SHARED / "data" / "shenzhen-cxr"
# The leaderboard's figures a repeat summary aggregates: test metrics and the external columns.
FIGURES = ("val_accuracy", "test_accuracy", "test_covid_sensitivity", "test_macro_f1")


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


def _is_figure(column: str) -> bool:
    return column in FIGURES or (column.startswith("ext") and column.endswith(("_false_alarm", "_accuracy")))


def _stats(values: list[float]) -> dict[str, Any]:
    import statistics

    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def summarise_repeats(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Each figure over repeated runs of one preset: ``{"rank1": {figure: stats}, <model>: {...}}``.

    ``runs`` are :func:`run_preset` results. "rank1" is each run's rank-1 model (its challenger), whichever it was
    (its name per run is under ``models``); a model that failed or was absent in a run is left out of
    that run's figures, and ``n`` says how many runs each figure has."""
    per: dict[str, dict[str, list[float]]] = {}
    names: list[str] = []
    for r in runs:
        rows = [row for row in r["leaderboard"] if row.get("status") in ("trained", "cached")]
        top = min(rows, key=lambda row: row.get("rank") or 10**9) if rows else None
        if top:
            names.append(top["model"])
        for row in rows:
            for key in [row["model"]] + (["rank1"] if row is top else []):
                for col, v in row.items():
                    if _is_figure(col) and isinstance(v, int | float) and not isinstance(v, bool) and v == v:  # not NaN
                        per.setdefault(key, {}).setdefault(col, []).append(float(v))
    out = {key: {col: _stats(vals) for col, vals in figs.items()} for key, figs in per.items()}
    if "rank1" in out:
        out["rank1"]["models"] = names  # type: ignore[assignment]
    return out


def repeat_table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A markdown table: one row per model (each run's rank 1 first), mean ± sd [min, max] per figure."""
    cols = sorted(
        {c for figs in summary.values() for c in figs if c != "models"}, key=lambda c: (c.startswith("ext"), c)
    )
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for key in ["rank1"] + sorted(k for k in summary if k != "rank1"):
        if key not in summary:
            continue
        cells = []
        for c in cols:
            st = summary[key].get(c)
            if not st:
                cells.append("")
                continue
            sd = f" ± {st['sd']:.3f}" if st["sd"] is not None else ""
            cells.append(f"{st['mean']:.3f}{sd} [{st['min']:.3f}, {st['max']:.3f}] (n={st['n']})")
        label = f"rank 1 ({', '.join(summary['rank1']['models'])})" if key == "rank1" else key
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_preset(preset: str, keep: bool, stand_in: bool = False, repeat: int | None = None) -> dict:
    base = OUT_DIR / (f"retrain-{preset}" + ("-stand-in" if stand_in else "") + (f"-r{repeat}" if repeat else ""))
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
    from flows.retrain_params import DataParams, PromotionParams, TrainingParams

    t0 = time.perf_counter()
    data = DataParams(source=str(SHARED_SAMPLE), profile="shared-sample")
    about = "pre-pandemic X-rays from another hospital, none COVID"
    external = [{"uri": str(SHENZHEN), "kind": "negative", "about": about}] if SHENZHEN.is_dir() else None
    promotion = PromotionParams(external_sources=external)
    out = retrain(store=str(base / "store"), data=data, training=TrainingParams(preset=preset), promotion=promotion)
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
        "repeat": repeat,
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
    ap.add_argument("--repeats", type=int, default=1, help="fresh runs of each preset; figures as mean ± sd")
    a = ap.parse_args()
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    repeats = range(1, a.repeats + 1) if a.repeats > 1 else [None]
    results = [run_preset(p, a.keep, a.stand_in_weights, repeat=i) for p in a.preset for i in repeats]
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
    summaries = {}
    if a.repeats > 1:
        for p in a.preset:
            summaries[p] = summarise_repeats([r for r in results if r["preset"].split(" ")[0] == p])
            print(f"\n### {a.repeats} runs of preset {p}: mean ± sd [min, max]\n\n{repeat_table(summaries[p])}")
    name = "retrain-stand-in.json" if a.stand_in_weights else "retrain.json"
    if a.repeats > 1:
        name = name.replace(".json", f"-repeats{a.repeats}.json")
    write_json({"machine": info, "results": results, "repeat_summaries": summaries}, OUT_DIR / name)
    print(json.dumps({r["preset"]: r["wall_seconds"] for r in results}))


if __name__ == "__main__":
    main()
