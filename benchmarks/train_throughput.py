"""Training-throughput benchmark: images/s of ``train_on_batch`` for every model at several input sizes.

Each model is built with ``build_model(name, input_size=N, weights="none")`` (random initialisation: the
timing does not depend on the weights' values), as the paper trains it: the custom CNN fully trainable, the
transfer models with their backbone frozen (only the flatten -> 256 -> 256 -> softmax head trains). It is
compiled with Adam and sparse categorical cross-entropy (Keras' default ``jit_compile="auto"``: no XLA on a
CPU), warmed up with one ``train_on_batch`` (graph tracing), then ``--steps`` further ``train_on_batch`` calls
on a batch of 16 grayscale images (random 0-255 pixels, in memory: no input pipeline) are timed. Every
measurement runs in its own Python process.
``--full-size`` adds one column at that size with every backbone layer trainable (``trainable="all"``).

Usage: PYTHONPATH=. .venv/bin/python benchmarks/train_throughput.py [--sizes 128 224 299] [--steps 3]
       [--models NAME ...] [--full-size 224 | 0] [--resume]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import OUT_DIR, machine_info, machine_line, quiet_tensorflow, write_json  # noqa: E402

OUT_JSON = OUT_DIR / "train_throughput.json"


def measure(name: str, size: int, trainable: str, batch: int, steps: int, seed: int) -> dict[str, Any]:
    import keras
    import numpy as np

    from covid_models.builders import build_model

    keras.backend.clear_session()
    gc.collect()
    t0 = time.perf_counter()
    model = build_model(name, input_size=size, channels=1, weights="none", trainable=trainable)
    build_s = time.perf_counter() - t0
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(batch, size, size, 1)).astype("float32")
    y = rng.integers(0, 4, size=(batch,)).astype("int32")
    t0 = time.perf_counter()
    model.train_on_batch(x, y)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - t0)
    row = {
        "model": name,
        "size": size,
        "trainable": trainable,
        "params": int(model.count_params()),
        "trainable_params": int(sum(int(np.prod(w.shape)) for w in model.trainable_weights)),
        "build_s": build_s,
        "warmup_s": warmup_s,
        "step_s": times,
        "images_per_s": batch * steps / sum(times),
    }
    del model
    keras.backend.clear_session()
    gc.collect()
    return row


def measure_in_child(name: str, size: int, trainable: str, batch: int, steps: int, seed: int) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter: ``clear_session`` gives little memory back, and 35 models built
    in one process grew it past 18 GiB."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, str(size), trainable]
    cmd += ["--batch-size", str(batch), "--steps", str(steps), "--seed", str(seed)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"model": name, "size": size, "trainable": trainable, "error": tail[0]}
    return json.loads(lines[-1])


def run(
    models: list[str], sizes: list[int], full_size: int, batch: int, steps: int, seed: int, out: Path, resume: bool
) -> dict[str, Any]:
    quiet_tensorflow()
    rows: list[dict[str, Any]] = []
    if resume and out.exists():
        old = json.loads(out.read_text())
        if (old.get("batch_size"), old.get("steps")) == (batch, steps):
            rows = [r for r in old["rows"] if "images_per_s" in r]
    res: dict[str, Any] = {
        "batch_size": batch,
        "steps": steps,
        "sizes": sizes,
        "full_size": full_size,
        "machine": machine_info(),
        "rows": rows,
    }
    plan = [(m, s, "all" if m == "custom_cnn" else "frozen") for m in models for s in sizes]
    if full_size:
        plan += [(m, full_size, "all") for m in models if m != "custom_cnn"]
    done = {(r["model"], r["size"], r["trainable"]) for r in rows}
    t_start = time.perf_counter()
    for i, (name, size, trainable) in enumerate(plan, 1):
        if (name, size, trainable) in done:
            continue
        row = measure_in_child(name, size, trainable, batch, steps, seed)
        rows.append(row)
        write_json(res, out)
        rate = f"{row['images_per_s']:.1f} images/s" if "images_per_s" in row else row["error"]
        print(
            f"[{i}/{len(plan)} {time.perf_counter() - t_start:.0f}s] {name} {size}px {trainable}: {rate}",
            file=sys.stderr,
            flush=True,
        )
    order = {key: i for i, key in enumerate(plan)}
    rows.sort(key=lambda r: order.get((r["model"], r["size"], r["trainable"]), len(order)))
    res["machine_after"] = machine_info()
    return res


def markdown(res: dict[str, Any]) -> str:
    sizes, full = res["sizes"], res["full_size"]
    cells = {(r["model"], r["size"], r["trainable"]): r for r in res["rows"]}
    models = list(dict.fromkeys(r["model"] for r in res["rows"]))
    head = "| model | trains | params (224px) | trainable params (224px) | " + " | ".join(f"img/s {s}px" for s in sizes)
    head += f" | img/s {full}px, all layers trainable |" if full else " |"
    lines = [
        machine_line(res["machine"]),
        "",
        f"Batch {res['batch_size']}; images/s = images / time of {res['steps']} timed `train_on_batch` steps "
        'after one warm-up step; random init (`weights="none"`), Adam, sparse CE, in-memory data.',
        "",
        head,
        "|---|---|---:|---:|" + "---:|" * (len(sizes) + (1 if full else 0)),
    ]

    def rate(r: dict[str, Any] | None) -> str:
        if r is None:
            return ""
        return f"{r['images_per_s']:.1f}" if "images_per_s" in r else "error"

    for m in models:
        policy = "all" if m == "custom_cnn" else "frozen"
        ref = cells.get((m, 224, policy)) or next((r for r in res["rows"] if r["model"] == m), {})
        what = "whole network" if m == "custom_cnn" else "head only (backbone frozen)"
        row = (
            f"| {m} | {what} | {ref.get('params', 0) / 1e6:.1f}M | {ref.get('trainable_params', 0) / 1e6:.2f}M | "
            + " | ".join(rate(cells.get((m, s, policy))) for s in sizes)
        )
        if full:
            row += " | " + (rate(cells.get((m, full, "all"))) if m != "custom_cnn" else "(same)")
        lines.append(row + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from covid_models.builders import MODEL_NAMES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 224, 299])
    ap.add_argument("--full-size", type=int, default=224, help="size of the all-layers-trainable column (0: none)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, default=OUT_JSON, help="JSON results (default: %(default)s)")
    ap.add_argument("--resume", action="store_true", help="keep the measurements already in --out, run the rest")
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "SIZE", "TRAINABLE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:  # the child process of measure_in_child: one measurement, printed as JSON
        quiet_tensorflow()
        name, size, trainable = args.one
        print(json.dumps(measure(name, int(size), trainable, args.batch_size, args.steps, args.seed)))
        return
    res = run(args.models, args.sizes, args.full_size, args.batch_size, args.steps, args.seed, args.out, args.resume)
    write_json(res, args.out)
    print(markdown(res))


if __name__ == "__main__":
    main()
