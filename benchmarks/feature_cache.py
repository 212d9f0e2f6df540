"""Feature-cache benchmark: a frozen MobileNetV2's head trained on cached backbone features vs a plain fit.

Both paths train the same model (MobileNetV2, real ImageNet weights, frozen backbone, the paper's
flatten -> 256 -> 256 -> softmax head) for the same number of epochs at the same learning rate, batch size and
seed, with early stopping off, through the project's own CLI (``python -m covid_models.train``):

* feature cache (the default): the backbone runs once over every image (train, val, test), then the head
  trains on those features for every epoch (its ``train_seconds`` includes the feature extraction);
* plain fit (``--no-feature-cache``): ``model.fit`` on images, the frozen backbone running forward every epoch.

Every run starts from an empty cache folder (no decoded-image or feature cache from an earlier run) and a fresh
output folder. When a plain fit of all epochs would take too long, ``--plain-epochs`` trains fewer and the
table extrapolates its training time linearly (first epoch as measured, the rest at the median time of the
later epochs), marked as such.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/feature_cache.py [--split URI] [--epochs 30]
       [--batch-sizes 16 128] [--plain-epochs 30 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    MOBILENET_V2_WEIGHTS,
    OUT_DIR,
    machine_info,
    machine_line,
    prepare_split,
    quiet_tensorflow,
    run_training,
    train_command,
    write_json,
)

OUT_JSON = OUT_DIR / "feature_cache.json"
WORK = OUT_DIR / "feature_cache"
GOAL = 10.0  # plain fit / feature cache, wall time of training


def one_run(
    split: str, weights: Path, size: int, lr: float, batch: int, epochs: int, cached: bool, target_epochs: int
) -> dict[str, Any]:
    name = f"{'cached' if cached else 'plain'}-b{batch}-e{epochs}"
    run_dir = WORK / name
    shutil.rmtree(run_dir, ignore_errors=True)
    flags = ["--input-size", str(size), "--epochs", str(epochs), "--learning-rate", str(lr)]
    flags += ["--batch-size", str(batch), "--patience", "0", "--weights", str(weights)]
    flags += ["--cache-dir", str(run_dir / "cache")]
    if not cached:
        flags.append("--no-feature-cache")
    doc = run_training(
        train_command("mobilenet_v2", split, run_dir / "model", flags), run_dir / "model", run_dir / "log.txt"
    )
    res, test, val = doc["result"], doc["metrics"]["test"], doc["metrics"]["val"]
    epoch_s = [h["seconds"] for h in doc["history"]]
    later = epoch_s[1:] or epoch_s
    train_s = res["train_seconds"]
    estimate = train_s + (target_epochs - len(epoch_s)) * statistics.median(later)
    row = {
        "path": "feature cache" if cached else "plain fit",
        "batch_size": batch,
        "epochs_run": len(epoch_s),
        "target_epochs": target_epochs,
        "extrapolated": len(epoch_s) != target_epochs,
        "feature_seconds": res["extra"]["feature_seconds"],
        "fit_seconds": train_s - res["extra"]["feature_seconds"],
        "train_seconds": train_s,
        "train_seconds_for_target": estimate,
        "first_epoch_s": epoch_s[0],
        "median_later_epoch_s": statistics.median(later),
        "epoch_seconds": epoch_s,
        "wall_s": doc["wall_s"],
        "val_accuracy": val["accuracy"],
        "test_accuracy": test["accuracy"],
        "test_covid_sensitivity": test["covid_sensitivity"],
        "test_loss": test["loss"],
        "command": doc["command"],
    }
    print(
        f"{row['path']} batch {batch}: {len(epoch_s)} epochs, train {train_s:.1f}s (features "
        f"{row['feature_seconds']:.1f}s), {target_epochs}-epoch estimate {estimate:.1f}s, "
        f"test accuracy {row['test_accuracy']:.4f}",
        file=sys.stderr,
        flush=True,
    )
    shutil.rmtree(run_dir / "cache", ignore_errors=True)
    return row


def run(split: str, weights: Path, size: int, epochs: int, lr: float, batches: list[int], plain_epochs: list[int]):
    quiet_tensorflow()
    rows = []
    for batch, plain_n in zip(batches, plain_epochs, strict=True):
        cached = one_run(split, weights, size, lr, batch, epochs, True, epochs)
        plain = one_run(split, weights, size, lr, batch, plain_n, False, epochs)
        plain["speedup_vs_cached"] = plain["train_seconds_for_target"] / cached["train_seconds"]
        rows += [cached, plain]
    return {
        "split": split,
        "model": "mobilenet_v2",
        "weights": str(weights),
        "input_size": size,
        "epochs": epochs,
        "learning_rate": lr,
        "patience": 0,
        "goal": GOAL,
        "machine": machine_info(),
        "runs": rows,
    }


def markdown(res: dict[str, Any]) -> str:
    lines = [
        machine_line(res["machine"]),
        "",
        f"MobileNetV2, ImageNet weights, frozen backbone, {res['input_size']}px grayscale, {res['epochs']} epochs, "
        f"Adam lr {res['learning_rate']:g}, no early stopping, empty caches at the start of every run. "
        "train s = the run's `train_seconds` (feature cache: includes extracting the features of all 3 splits); "
        "wall s = the whole CLI process (imports, training, evaluation, saving).",
        "",
        "| batch | path | epochs run | features s | s/epoch (later) | train s | "
        f"train s for {res['epochs']} epochs | wall s | val acc | test acc | test COVID sens | cached is faster by |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["runs"]:
        target = f"{r['train_seconds_for_target']:.0f}" + (" (extrapolated)" if r["extrapolated"] else "")
        speed = f"**{r['speedup_vs_cached']:.1f}x**" if "speedup_vs_cached" in r else ""
        feats = f"{r['feature_seconds']:.0f}" if r["path"] == "feature cache" else ""
        lines.append(
            f"| {r['batch_size']} | {r['path']} | {r['epochs_run']} | {feats} | {r['median_later_epoch_s']:.2f} | "
            f"{r['train_seconds']:.0f} | {target} | {r['wall_s']:.0f} | {r['val_accuracy']:.4f} | "
            f"{r['test_accuracy']:.4f} | {r['test_covid_sensitivity']:.4f} | {speed} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default=None, help="split.parquet URI (default: the shared sample's, prepared once)")
    ap.add_argument("--weights", type=Path, default=MOBILENET_V2_WEIGHTS, help="MobileNetV2 no-top weights file")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16])
    ap.add_argument(
        "--plain-epochs",
        type=int,
        nargs="+",
        default=None,
        help="epochs of the plain fit, one per batch size (default: --epochs; fewer are extrapolated)",
    )
    ap.add_argument("--out", type=Path, default=OUT_JSON, help="JSON results (default: %(default)s)")
    args = ap.parse_args(argv)
    plain = args.plain_epochs or [args.epochs] * len(args.batch_sizes)
    if len(plain) != len(args.batch_sizes):
        ap.error("--plain-epochs needs one value per --batch-sizes value")
    res = run(
        args.split or prepare_split(),
        args.weights,
        args.input_size,
        args.epochs,
        args.learning_rate,
        args.batch_sizes,
        plain,
    )
    write_json(res, args.out)
    print(markdown(res))


if __name__ == "__main__":
    main()
