"""Per-epoch checkpoints of a training, so a killed or preempted run resumes where it stopped.

Keras' ``BackupAndRestore`` keeps its files in the model's slot when the store is local, else in
a local folder mirrored to the store after every epoch (so another machine can resume). The
epoch log lives beside them. Keras removes its checkpoint when a phase's ``fit`` ends (a resumed
phase would otherwise restart early stopping from the last, not the best, weights), so each phase
keeps its final weights (``finished.weights.h5``) once ``fit`` returns: a kill during fine-tuning
resumes fine-tuning, not the head phase. The epoch log, the finished weights and the mirror are
removed only after the model's completion marker is written.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import shutil
import time
from pathlib import Path

from covid_data.store import Store

log = logging.getLogger(__name__)

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


def _epoch_logger(path: Path):
    """Appends each finished epoch (with its duration) to a CSV that survives a restart."""
    import keras

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            row = {"epoch": epoch, "seconds": round(time.perf_counter() - self._t0, 3)}
            row.update({k: float(logs[k]) for k in HISTORY_KEYS if k in logs})
            log.info(
                "epoch %d/%d done in %.1fs: %s",
                epoch + 1,
                self.params.get("epochs", 0),
                row["seconds"],
                ", ".join(f"{k} {row[k]:.4f}" for k in HISTORY_KEYS if k in row),
            )
            new = not path.exists()
            with open(path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["epoch", "seconds", *HISTORY_KEYS], extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow(row)

    return EpochLog()


def read_history(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    rows: dict[int, dict[str, float]] = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            # An epoch logged just before a kill is run again on resume: keep the last.
            rows[int(r["epoch"])] = {k: float(v) for k, v in r.items() if v not in ("", None)}
    return [rows[e] for e in sorted(rows)]


class Checkpoints:
    """Where one training phase (``main``, ``fine-tune``) keeps its BackupAndRestore files."""

    def __init__(self, out: Store, name: str, cache_dir: Path):
        self.out, self.prefix = out, f"backup/{name}"
        local = out.local_path(self.prefix)
        self.mirrored = local is None
        self.dir = local or cache_dir / "backups" / hashlib.sha256(out.uri_for(self.prefix).encode()).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.mirrored:
            for key in out.list(self.prefix):
                dest = self.dir / key.removeprefix(self.prefix + "/")
                if not dest.exists():
                    out.get_file(key, dest)

    def callbacks(self) -> list:
        import keras

        # Its weights file is not written atomically: double_checkpoint keeps the previous
        # epoch's to fall back on when a kill lands mid-write.
        restore = keras.callbacks.BackupAndRestore(str(self.dir / "keras"), double_checkpoint=True)
        cbs = [_epoch_logger(self.dir / "history.csv"), restore]
        if self.mirrored:
            ckpt = self

            class Mirror(keras.callbacks.Callback):
                def on_epoch_end(self, epoch, logs=None):
                    for p in ckpt.dir.rglob("*"):
                        if p.is_file():
                            key = f"{ckpt.prefix}/{p.relative_to(ckpt.dir).as_posix()}"
                            ckpt.out.put_file(key, p, overwrite=True)  # scratch, replaced every epoch

            cbs.append(Mirror())
        return cbs

    # -- a finished phase is kept: a kill in the next phase does not train this one again --------
    @property
    def _finished_file(self) -> Path:
        return self.dir / "finished.weights.h5"

    def finished(self) -> bool:
        return self._finished_file.is_file()

    def mark_finished(self, model) -> None:
        """Keep the phase's final weights (Keras' own backup is gone once ``fit`` returns)."""
        tmp = self.dir / "finishing.weights.h5"
        model.save_weights(tmp)
        tmp.replace(self._finished_file)  # atomic: a kill leaves the whole file or none
        if self.mirrored:
            key = f"{self.prefix}/{self._finished_file.name}"
            self.out.put_file(key, self._finished_file, overwrite=True)  # scratch, like the backups
        log.info("phase %s finished; its weights are kept until the model is complete", self.prefix)

    def restore_finished(self, model) -> None:
        model.load_weights(self._finished_file)
        log.info("phase %s had finished before a restart: its weights are restored, not trained again", self.prefix)

    @property
    def history(self) -> list[dict[str, float]]:
        return read_history(self.dir / "history.csv")

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.dir.parent.rmdir()  # the shared backup/ folder, once empty
        if self.mirrored:
            for key in self.out.list(self.prefix):
                self.out.delete(key)
