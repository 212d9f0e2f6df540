"""What op determinism costs and what it repeats (issue 16 §5).

    PYTHONPATH=. COVID_WEIGHTS_DIR=../shared/weights .venv/bin/python benchmarks/determinism.py

MobileNetV2 as the cpu preset trains it (head on cached 224 px features, then every layer fine-tuned at
1e-5 on images with the acquisition augmentation: the phase that differed between two `make run`s), on a
seeded subset (``--max-per-class`` images per class and split), ``--repeats`` times with
``op_determinism`` off and on, each run in its own process with a fresh model slot and one shared
cache (a warm-up run fills it first, so no timed run decodes or extracts features). Reported per mode:
the fine-tuning epochs' seconds and whether the runs' histories and validation figures are identical.
Figures go to ``benchmarks/out/determinism.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import OUT_DIR, REPO, machine_info, machine_line, prepare_split, write_json

_TRAIN = """
import json, sys
from covid_models.train import TrainConfig, train_model
cfg = TrainConfig(**json.loads(sys.argv[1]))
r = train_model(cfg)
"""


def _config(split: str, out: Path, cache: Path, a: argparse.Namespace) -> dict:
    from covid_models.presets import get_preset

    recipe = dict(get_preset("cpu").overrides["mobilenet_v2"])
    recipe.update(epochs=a.head_epochs, fine_tune_epochs=a.fine_tune_epochs, patience=0)
    return {
        "model": "mobilenet_v2",
        "split": split,
        "out": str(out),
        "cache_dir": str(cache),
        "max_per_class": a.max_per_class,
        "verbose": 0,
        **recipe,
    }


def _run(cfg: dict, deterministic: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cfg = {**cfg, "op_determinism": deterministic}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _TRAIN, json.dumps(cfg)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"training failed ({'on' if deterministic else 'off'}):\n{done.stderr[-3000:]}")
    out = Path(cfg["out"])
    history = json.loads((out / "history.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    fine = [h for h in history if h.get("phase") == "fine-tune"]
    return {
        "wall_s": round(wall, 1),
        "fine_tune_epoch_s": [h.get("seconds") for h in fine],
        "history": [{k: h[k] for k in ("loss", "accuracy", "val_loss", "val_accuracy") if k in h} for h in history],
        "val_accuracy": metrics["val"]["accuracy"],
        "val_loss": metrics["val"]["loss"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-per-class", type=int, default=40)
    p.add_argument("--head-epochs", type=int, default=1)
    p.add_argument("--fine-tune-epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--split", default=None, help="a split.parquet URI (default: the shared sample's, prepared)")
    p.add_argument("--out", type=Path, default=OUT_DIR / "determinism.json")
    a = p.parse_args(argv)
    split = a.split or prepare_split()
    base = Path(tempfile.mkdtemp(prefix="determinism-", dir=OUT_DIR))
    cache = base / "cache"
    _run(_config(split, base / "warm-up", cache, a), deterministic=False)  # fills the pixel and feature caches
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for i in range(a.repeats):  # alternated, so drift in the machine's load falls on both modes alike
        for mode in ("off", "on"):
            runs[mode].append(_run(_config(split, base / f"{mode}-{i}", cache, a), deterministic=mode == "on"))
            print(mode, i, runs[mode][-1]["fine_tune_epoch_s"], runs[mode][-1]["val_accuracy"], file=sys.stderr)
    summary = {}
    for mode, rs in runs.items():
        epochs = [s for r in rs for s in r["fine_tune_epoch_s"] if s is not None]
        summary[mode] = {
            "fine_tune_epoch_s_mean": sum(epochs) / len(epochs) if epochs else None,
            "identical_histories": all(r["history"] == rs[0]["history"] for r in rs),
            "val_accuracy": [r["val_accuracy"] for r in rs],
        }
    res = {"machine": machine_info(), "settings": vars(a) | {"out": str(a.out)}, "split": split, "runs": runs,
           "summary": summary}  # fmt: skip
    write_json(res, a.out)
    print(machine_line(res["machine"]))
    for mode, s in summary.items():
        print(f"determinism {mode}: {s}")


if __name__ == "__main__":
    main()
