"""Training a model in its own process.

The retraining flow trains several models at once; each in its own Python process keeps
TensorFlow's global state (seeds, precision policy, thread pools, memory) apart, shares the
CPU cores out explicitly, and gives memory back when the model is done.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from covid_models.train import TrainConfig, TrainResult

log = logging.getLogger(__name__)


_NOISE = ("W0000", "I0000", "E0000", "WARNING: All log messages")


class TrainingFailed(RuntimeError):
    """The training process exited with an error."""


def train_in_subprocess(
    cfg: TrainConfig,
    *,
    threads: int | None = None,
    on_line: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> TrainResult:
    """Run ``python -m covid_models.train`` for ``cfg``; stream its output lines to ``on_line``.

    ``threads`` caps TensorFlow's and BLAS's thread pools (cores / models trained at once).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    if threads:
        for var in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
        env["TF_NUM_INTEROP_THREADS"] = "1" if threads == 1 else "2"
    with tempfile.TemporaryDirectory(prefix=f"train-{cfg.model}-") as tmp:
        config, result = Path(tmp) / "config.json", Path(tmp) / "result.json"
        config.write_text(json.dumps(asdict(cfg)))
        cmd = [sys.executable, "-m", "covid_models.train", "--config", str(config), "--result-file", str(result)]
        tail: list[str] = []
        with subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                tail = (tail + [line])[-40:]
                if on_line:
                    on_line(line)
            code = proc.wait(timeout)
        if code != 0 or not result.exists():
            useful = [t for t in tail if not t.startswith(_NOISE)]
            raise TrainingFailed(
                f"training {cfg.model} failed (exit code {code}): {useful[-1] if useful else ''}\n"
                + "\n".join(useful[-20:])
            )
        return TrainResult(**json.loads(result.read_text()))
