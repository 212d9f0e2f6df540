"""Helpers shared by the model benchmarks: the shared-sample split, machine info, JSON output.

Not a benchmark itself. The benchmarks import it as ``benchmarks.common`` (they put the repository root on
``sys.path`` first, so ``python benchmarks/<name>.py`` works without ``PYTHONPATH``).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "benchmarks/out"
SHARED = REPO.parent / "shared"
SHARED_SAMPLE = SHARED / "data/covid19-radiography-sample"
MOBILENET_V2_WEIGHTS = SHARED / "weights/mobilenet_v2_1.0_224_no_top.weights.h5"
DEFAULT_STORE = OUT_DIR / "store"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.ingest import cpu_model  # noqa: E402


def prepare_split(store: Path = DEFAULT_STORE, source: Path = SHARED_SAMPLE, profile: str = "shared-sample") -> str:
    """The split.parquet URI of ``source`` in ``store``, running the prepare-data flow when it is not there yet.

    The flow is deterministic (same files, same split hash), so a second call finds the first one's split.
    """
    found = sorted(store.glob("datasets/*/splits/*/split.parquet")) if store.exists() else []
    if len(found) == 1:
        return str(found[0])
    cmd = [sys.executable, "-m", "flows.prepare_data", "--source", str(source), "--store", str(store)]
    cmd += ["--profile", profile]
    print(f"preparing the split: {' '.join(cmd)}", file=sys.stderr)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    start = out.index("{")  # the flow prints its result as one JSON object, after any log lines
    return str(json.loads(out[start : out.rindex("}") + 1])["split"])


def machine_info() -> dict[str, Any]:
    import keras
    import numpy as np
    import tensorflow as tf

    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "gpus": len(tf.config.list_physical_devices("GPU")),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "loadavg_1m_5m_15m": list(os.getloadavg()),  # > nproc while measuring: something else was running
    }


def machine_line(m: dict[str, Any]) -> str:
    gpu = f"{m['gpus']} GPU(s)" if m["gpus"] else "no GPU"
    return (
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), {gpu}, Python {m['python']}, "
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']}"
    )


def write_json(res: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2, default=float) + "\n")
    print(f"results written to {path}", file=sys.stderr)


def quiet_tensorflow() -> None:
    """Fewer C++ log lines from TensorFlow (set before it is imported)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def train_command(model: str, split: str, out: Path, flags: list[str]) -> list[str]:
    """The ``python -m covid_models.train`` command line for one run."""
    return [sys.executable, "-m", "covid_models.train", "--model", model, "--split", split, "--out", str(out), *flags]


def shell_command(cmd: list[str]) -> str:
    """``cmd`` as someone would type it from the repository root."""
    shown = [".venv/bin/python" if c == sys.executable else c for c in cmd]
    shown = [str(Path(c).relative_to(REPO)) if c.startswith(str(REPO) + "/") else c for c in shown]
    return "PYTHONPATH=. " + " ".join(shlex.quote(c) for c in shown)


def run_training(cmd: list[str], out: Path, log: Path) -> dict[str, Any]:
    """Run one training command (a fresh ``out``: a trained ``out`` is never retrained) and collect its results.

    Returns the ``metrics.json`` document plus ``wall_s`` (the whole process: imports, training, evaluation,
    saving) and ``history`` (one row per epoch, with its seconds).
    """
    if (out / "metrics.json").exists():
        raise SystemExit(f"{out} already holds a trained model; pick a fresh --out")
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(f"running: {shell_command(cmd)}  (log: {log})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(log.read_text().splitlines(True)[-20:])
        raise RuntimeError(f"training failed (exit {rc}); see {log}:\n{tail}")
    doc = json.loads((out / "metrics.json").read_text())
    doc["wall_s"] = wall
    doc["history"] = json.loads((out / "history.json").read_text())
    doc["command"] = shell_command(cmd)
    return doc


def bundle_with_current_page(store: str, run: str, dest: Path) -> Path:
    """A copy of ``run``'s app bundle under ``dest/runs/<run>/app`` with the page as it is built now (a stored
    bundle keeps the page of its day; its service worker and list stay as published): what the browser
    benchmarks serve. Returns the copy's folder."""
    from covid_app.bundle import ensure_dist

    app = dest / "runs" / run / "app"
    shutil.copytree(Path(store) / "runs" / run / "app", app)
    shutil.copytree(ensure_dist(), app, dirs_exist_ok=True, ignore=shutil.ignore_patterns("sw.js", "*.map"))
    return app
