"""Train and evaluate one model on a split, without Prefect.

    python -m covid_models.train --model mobilenet_v2 --split <split.parquet URI> --out <store URI> \
        [--input-size 224] [--epochs 30] [--weights imagenet|none|PATH] ...

Artefacts under ``--out``: ``model.keras``, ``history.json`` / ``history.csv``, ``metrics.json``
(written last: a model with a ``metrics.json`` is complete and is never trained again or
replaced), ``curves.png`` and ``confusion_<split>.png``.

A frozen transfer backbone without augmentation trains through a feature cache: the backbone
runs once over the images, the head trains on its outputs for every epoch, and the trained head
is joined back onto the backbone into one ordinary Keras model. Everything else (the custom CNN,
fine-tuning, augmentation) trains on images. Training is checkpointed every epoch with Keras'
``BackupAndRestore``, so a run killed mid-epoch resumes where it stopped when started again.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covid_data.dataset import default_cache_dir
from covid_data.labels import CLASSES
from covid_data.store import Store, open_store
from covid_models.builders import MODEL_NAMES, build_model, is_transfer, set_trainable
from covid_models.data import SplitData, global_batch_size, load_split_data, split_dataset
from covid_models.evaluate import classification_metrics, plot_confusion, plot_history

log = logging.getLogger(__name__)

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


@dataclass
class TrainConfig:
    model: str
    split: str  # URI of a split.parquet
    out: str  # store URI for this model's artefacts
    input_size: int = 299
    channels: int = 1
    epochs: int = 30
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    batch_size: int | None = None  # default: 16 per replica (the paper)
    patience: int = 5  # early stopping on `monitor`, best weights restored; 0 = off
    monitor: str = "val_loss"
    weights: str = "imagenet"  # "imagenet" | "none" | a weights file
    fine_tune_layers: int = 0  # after the head converges, train the top N backbone layers ...
    fine_tune_epochs: int = 0  # ... for this many epochs ...
    fine_tune_learning_rate: float = 1e-5  # ... at this rate
    augment: bool = False
    feature_cache: bool = True  # frozen backbone, no augmentation: train the head on cached features
    max_per_class: int | None = None  # at most this many images per class and split (quick runs)
    cache_dir: str | None = None
    seed: int = 42
    verbose: int = 2  # Keras progress: 2 = one line per epoch (readable in Prefect logs)

    def __post_init__(self):
        if self.model not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.model!r}; choose from {', '.join(MODEL_NAMES)}")


@dataclass
class TrainResult:
    model: str
    out: str
    status: str  # "trained" | "cached"
    val_accuracy: float
    val_loss: float
    test_accuracy: float | None
    test_macro_f1: float | None
    test_covid_sensitivity: float | None
    params: int
    file_bytes: int
    train_seconds: float
    epochs: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- callbacks -----------------------------------------------------------------------------
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


def _read_history(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    rows: dict[int, dict[str, float]] = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            # An epoch logged just before a kill is run again on resume: keep the last.
            rows[int(r["epoch"])] = {k: float(v) for k, v in r.items() if v not in ("", None)}
    return [rows[e] for e in sorted(rows)]


class _Backup:
    """Where BackupAndRestore keeps its files: in the store when it is local, else in a local
    folder mirrored to the store after every epoch (so another machine can resume)."""

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

        # BackupAndRestore removes its folder when training ends; the epoch log lives beside it.
        # Its weights file is not written atomically: double_checkpoint keeps the previous
        # epoch's to fall back on when a kill lands mid-write.
        restore = keras.callbacks.BackupAndRestore(str(self.dir / "keras"), double_checkpoint=True)
        cbs = [_epoch_logger(self.dir / "history.csv"), restore]
        if self.mirrored:
            backup = self

            class Mirror(keras.callbacks.Callback):
                def on_epoch_end(self, epoch, logs=None):
                    for p in backup.dir.rglob("*"):
                        if p.is_file():
                            key = f"{backup.prefix}/{p.relative_to(backup.dir).as_posix()}"
                            backup.out.put_file(key, p, overwrite=True)

            cbs.append(Mirror())
        return cbs

    @property
    def history(self) -> list[dict[str, float]]:
        return _read_history(self.dir / "history.csv")

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.dir.parent.rmdir()  # the shared backup/ folder, once empty
        if self.mirrored:
            for key in self.out.list(self.prefix):
                self.out.delete(key)


# -- training ------------------------------------------------------------------------------
def _optimizer(name: str, lr: float):
    import keras

    table = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}
    if name not in table:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(table)}")
    return table[name](learning_rate=lr)


def _fit_callbacks(cfg: TrainConfig, backup: _Backup) -> list:
    import keras

    cbs = backup.callbacks()
    if cfg.patience > 0:
        cbs.insert(
            0, keras.callbacks.EarlyStopping(monitor=cfg.monitor, patience=cfg.patience, restore_best_weights=True)
        )
    return cbs


def _weights_fingerprint(cfg: TrainConfig) -> str:
    if cfg.weights in ("none", "imagenet"):
        return cfg.weights if cfg.weights == "imagenet" else f"none-seed{cfg.seed}"
    h = hashlib.md5(Path(cfg.weights).read_bytes(), usedforsecurity=False).hexdigest()[:12]
    return f"file-{h}"


def compute_features(extractor, data: SplitData, split: str, cfg: TrainConfig, cache: Path, batch: int) -> np.ndarray:
    """Backbone outputs for every image of a split, cached on disk."""
    key = f"{data.split_hash}-{cfg.model}-{cfg.input_size}px-{cfg.channels}ch-{_weights_fingerprint(cfg)}"
    path = cache / "features" / key / f"{split}.npy"
    if path.exists():
        log.info("features of %s/%s from cache %s", cfg.model, split, path)
        return np.load(path)
    ds = split_dataset(
        data, split, size=cfg.input_size, channels=cfg.channels, batch_size=batch, cache_dir=cache, repeat=False
    )
    feats = extractor.predict(ds, verbose=cfg.verbose)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.npy")
    np.save(tmp, feats)
    os.replace(tmp, path)
    return feats


def _train_head_on_features(model, cfg, data, cache, batch, backup) -> tuple[dict[str, np.ndarray], float]:
    import keras

    backbone = model.get_layer("backbone")
    extractor = keras.Model(model.input, backbone(model.get_layer("preprocess")(model.input)))
    t0 = time.perf_counter()
    feats = {s: compute_features(extractor, data, s, cfg, cache, batch) for s in data.frames}
    feature_seconds = time.perf_counter() - t0
    labels = {s: data.files(s)[1] for s in data.frames}
    head = model.get_layer("head")
    # XLA halves the step time of the large flatten->dense head on a CPU.
    head.compile(
        optimizer=_optimizer(cfg.optimizer, cfg.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
    )
    val = (feats["val"], labels["val"]) if "val" in feats else None
    head.fit(
        feats["train"],
        labels["train"],
        batch_size=batch,
        epochs=cfg.epochs,
        validation_data=val,
        callbacks=_fit_callbacks(cfg, backup),
        verbose=cfg.verbose,
        shuffle=True,
    )
    probs = {s: head.predict(f, batch_size=256, verbose=0) for s, f in feats.items() if s != "train"}
    return probs, feature_seconds


def _train_on_images(model, cfg, data, cache, batch, backup, *, epochs: int, lr: float, augment) -> None:
    model.compile(optimizer=_optimizer(cfg.optimizer, lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    train = split_dataset(
        data,
        "train",
        size=cfg.input_size,
        channels=cfg.channels,
        batch_size=batch,
        training=True,
        cache_dir=cache,
        seed=cfg.seed,
        augment=augment,
    )
    val = None
    if data.size("val"):
        val = split_dataset(data, "val", size=cfg.input_size, channels=cfg.channels, batch_size=batch, cache_dir=cache)
    steps = math.ceil(data.size("train") / batch)
    model.fit(
        train,
        epochs=epochs,
        steps_per_epoch=steps,
        validation_data=val,
        callbacks=_fit_callbacks(cfg, backup),
        verbose=cfg.verbose,
    )


def _predict_images(model, cfg, data, cache, batch) -> dict[str, np.ndarray]:
    out = {}
    for s in data.frames:
        if s == "train":
            continue
        ds = split_dataset(data, s, size=cfg.input_size, channels=cfg.channels, batch_size=batch, cache_dir=cache)
        out[s] = model.predict(ds, verbose=0)
    return out


def cached_result(cfg: TrainConfig) -> TrainResult | None:
    """The stored result when ``cfg.out`` already holds a completed model, else None."""
    return _cached_result(open_store(cfg.out), cfg)


def _cached_result(out: Store, cfg: TrainConfig) -> TrainResult | None:
    if not (out.exists("metrics.json") and out.exists("model.keras")):
        return None
    stored = json.loads(out.read_text("metrics.json"))
    log.info("%s is already trained at %s: nothing to do", cfg.model, out.uri)
    return TrainResult(**{**stored["result"], "status": "cached"})


def train_model(cfg: TrainConfig) -> TrainResult:
    """Train and evaluate one model; write its artefacts under ``cfg.out``."""
    import keras

    out = open_store(cfg.out)
    cached = _cached_result(out, cfg)
    if cached is not None:
        return cached
    from covid_models.strategy import select_strategy

    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    keras.utils.set_random_seed(cfg.seed)
    choice = select_strategy()
    batch = cfg.batch_size or global_batch_size(choice.replicas)
    data = load_split_data(cfg.split, cache, cfg.max_per_class)
    log.info(
        "training %s at %dpx on %s images (batch %d, %s)",
        cfg.model,
        cfg.input_size,
        {s: data.size(s) for s in data.frames},
        batch,
        choice.kind,
    )
    if "train" not in data.frames:
        raise ValueError(f"split {cfg.split} has no train rows")

    with choice.strategy.scope():
        model = build_model(
            cfg.model, input_size=cfg.input_size, channels=cfg.channels, weights=cfg.weights, trainable="frozen"
        )
    use_features = is_transfer(cfg.model) and cfg.feature_cache and not cfg.augment and choice.kind != "tpu"
    augment = None
    if cfg.augment:
        from covid_models.augment import build_augmenter

        augment = build_augmenter(cfg.seed)

    t0 = time.perf_counter()
    backup = _Backup(out, "main", cache)
    feature_seconds = 0.0
    if use_features:
        probs, feature_seconds = _train_head_on_features(model, cfg, data, cache, batch, backup)
    else:
        with choice.strategy.scope():
            _train_on_images(
                model, cfg, data, cache, batch, backup, epochs=cfg.epochs, lr=cfg.learning_rate, augment=augment
            )
        probs = None
    history = backup.history
    if is_transfer(cfg.model) and cfg.fine_tune_layers > 0 and cfg.fine_tune_epochs > 0:
        ft_backup = _Backup(out, "fine-tune", cache)
        with choice.strategy.scope():
            set_trainable(model.get_layer("backbone"), cfg.fine_tune_layers)
            _train_on_images(
                model,
                cfg,
                data,
                cache,
                batch,
                ft_backup,
                epochs=cfg.fine_tune_epochs,
                lr=cfg.fine_tune_learning_rate,
                augment=augment,
            )
        history += [{**h, "epoch": h["epoch"] + len(history), "phase": "fine-tune"} for h in ft_backup.history]
        ft_backup.clear()
        probs = None
    train_seconds = time.perf_counter() - t0
    if probs is None:
        probs = _predict_images(model, cfg, data, cache, batch)
    backup.clear()

    metrics = {s: classification_metrics(p, data.files(s)[1]) for s, p in probs.items()}
    return _publish(out, cfg, model, history, metrics, train_seconds, feature_seconds, choice.kind)


def _publish(out, cfg, model, history, metrics, train_seconds, feature_seconds, device) -> TrainResult:
    with tempfile.TemporaryDirectory(prefix="covid-train-") as tmp:
        tmp = Path(tmp)
        model_path = tmp / "model.keras"
        _inference_copy(model, cfg).save(model_path)
        out.put_file("model.keras", model_path)
        curves = {k: [h[k] for h in history if k in h] for k in HISTORY_KEYS}
        plot_history(curves, f"{cfg.model} ({cfg.input_size}px)", tmp / "curves.png")
        out.put_file("curves.png", tmp / "curves.png")
        for split, m in metrics.items():
            plot_confusion(m["confusion_matrix"], f"{cfg.model}: {split}", tmp / f"confusion_{split}.png")
            out.put_file(f"confusion_{split}.png", tmp / f"confusion_{split}.png")
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["epoch", "phase", "seconds", *HISTORY_KEYS], extrasaction="ignore")
        w.writeheader()
        w.writerows(history)
        out.put_text("history.csv", buf.getvalue())
        out.put_text("history.json", json.dumps(history, indent=2))
        val, test = metrics.get("val", {}), metrics.get("test")
        result = TrainResult(
            model=cfg.model,
            out=out.uri,
            status="trained",
            val_accuracy=val.get("accuracy", float("nan")),
            val_loss=val.get("loss", float("nan")),
            test_accuracy=test["accuracy"] if test else None,
            test_macro_f1=test["macro_f1"] if test else None,
            test_covid_sensitivity=test["covid_sensitivity"] if test else None,
            params=int(model.count_params()),
            file_bytes=model_path.stat().st_size,
            train_seconds=round(train_seconds, 2),
            epochs=len(history),
            extra={"feature_seconds": round(feature_seconds, 2), "device": device},
        )
        doc = {"result": result.to_dict(), "config": asdict(cfg), "classes": list(CLASSES), "metrics": metrics}
        out.put_text("metrics.json", json.dumps(doc, indent=2, default=float))  # the completion marker
    log.info(
        "%s: val accuracy %.4f, test accuracy %s, %d epochs in %.0fs",
        cfg.model,
        result.val_accuracy,
        f"{result.test_accuracy:.4f}" if result.test_accuracy is not None else "-",
        result.epochs,
        result.train_seconds,
    )
    return result


def _inference_copy(model, cfg: TrainConfig):
    """The trained weights in a fresh, uncompiled model: a .keras file would otherwise carry
    the optimizer's state (twice the head's size) that no one loading it for inference needs."""
    fresh = build_model(cfg.model, input_size=cfg.input_size, channels=cfg.channels, weights="none")
    fresh.set_weights(model.get_weights())
    return fresh


def load_trained_model(uri: str):
    """Load a ``model.keras`` from the store with Keras' safe mode on."""
    import keras

    from covid_data.store import split_object_uri

    store, key = split_object_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = store.get_file(key, Path(tmp) / "model.keras")
        return keras.saving.load_model(path, safe_mode=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m covid_models.train", description="Train and evaluate one model.")
    p.add_argument("--config", help="a JSON file of TrainConfig fields (then the flags below are ignored)")
    p.add_argument("--result-file", help="also write the result as JSON to this file")
    p.add_argument("--model", choices=MODEL_NAMES)
    p.add_argument("--split", help="URI of a split.parquet written by the prepare-data flow")
    p.add_argument("--out", help="store URI for this model's artefacts")
    defaults = TrainConfig(model="custom_cnn", split="", out="")
    for name, f in TrainConfig.__dataclass_fields__.items():
        if name in ("model", "split", "out"):
            continue
        default = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).replace(" | None", ""), str)
            p.add_argument(flag, type=kind, default=default)
    args = vars(p.parse_args(argv))
    config, result_file = args.pop("config"), args.pop("result_file")
    if config:
        args = json.loads(Path(config).read_text())
    elif not (args["model"] and args["split"] and args["out"]):
        p.error("--model, --split and --out are required (or --config)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = train_model(TrainConfig(**args))
    text = json.dumps(result.to_dict(), indent=2)
    if result_file:
        Path(result_file).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
