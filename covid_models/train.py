"""Train and evaluate one model on a split, without Prefect (CLI: covid_models.cli).

A model's slot (``cfg.out``) is a stored unit: ``model.keras``, ``history.json`` /
``history.csv``, ``curves.png`` and ``confusion_<split>.png``, completed by ``metrics.json``,
written last. A slot with ``metrics.json`` is never trained again or rewritten; a slot without
it is replaced by the next attempt (Keras files are not byte-for-byte reproducible, so a rerun
after a kill must be able to replace them).

A frozen transfer backbone without augmentation trains through a feature cache
(covid_models.feature_cache). Everything else (the custom CNN, fine-tuning, augmentation) trains
on images. Training is checkpointed every epoch (covid_models.checkpoints), so a run killed
mid-epoch resumes where it stopped when started again.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from covid_data.dataset import default_cache_dir
from covid_data.labels import CLASSES
from covid_data.store import Unit, open_store
from covid_models import lung_fields
from covid_models.augment import build_augmenter
from covid_models.builders import build_model, features_input, is_transfer, set_trainable
from covid_models.checkpoints import HISTORY_KEYS, Checkpoints
from covid_models.cli import parser
from covid_models.data import global_batch_size, image_dataset, load_split_data
from covid_models.feature_cache import compute_features
from covid_models.metrics import plot_confusion, plot_history, split_metrics
from covid_models.segmenter import load_segmenter
from covid_models.stored import MARKER, model_slot
from covid_models.strategy import check_device, select_strategy
from covid_models.train_config import TrainConfig, library_versions, resolve_weights, training_identity

__all__ = ["MARKER", "TrainConfig", "TrainResult", "cached_result", "model_slot", "train_model"]

log = logging.getLogger(__name__)


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


# -- training ------------------------------------------------------------------------------
def _optimizer(name: str, lr: float):
    import keras

    table = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}
    if name not in table:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(table)}")
    return table[name](learning_rate=lr)


def _fit_callbacks(cfg: TrainConfig, backup: Checkpoints) -> list:
    import keras

    cbs = backup.callbacks()
    if cfg.patience > 0:
        cbs.insert(
            0, keras.callbacks.EarlyStopping(monitor=cfg.monitor, patience=cfg.patience, restore_best_weights=True)
        )
    return cbs


def _train_head_on_features(model, cfg, data, cache, batch, backup) -> tuple[dict[str, np.ndarray], float]:
    import keras

    backbone = model.get_layer("backbone")
    extractor = keras.Model(model.input, backbone(model.get_layer("preprocess")(features_input(model))))
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
        sample_weight=data.balanced_weights("train"),  # extra sources: each source weighs the same
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
    train = image_dataset(
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
        val = image_dataset(data, "val", size=cfg.input_size, channels=cfg.channels, batch_size=batch, cache_dir=cache)
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
        ds = image_dataset(data, s, size=cfg.input_size, channels=cfg.channels, batch_size=batch, cache_dir=cache)
        out[s] = model.predict(ds, verbose=0)
    return out


def cached_result(cfg: TrainConfig) -> TrainResult | None:
    """The stored result when ``cfg.out`` already holds a completed model, else None."""
    return _cached_result(model_slot(cfg.out), cfg)


def _cached_result(slot: Unit, cfg: TrainConfig) -> TrainResult | None:
    stored = slot.intact_record()  # a slot whose files changed after completion is trained again
    if stored is None:
        return None
    log.info("%s is already trained at %s: nothing to do", cfg.model, slot.uri)
    # Where the slot is now (a store can be moved or mirrored), not where it was trained.
    return TrainResult(**{**stored["result"], "status": "cached", "out": slot.uri})


def train_model(cfg: TrainConfig) -> TrainResult:
    """Train and evaluate one model; write its artefacts under ``cfg.out``."""
    import keras

    out = open_store(cfg.out)
    slot = model_slot(cfg.out)
    cached = _cached_result(slot, cfg)
    if cached is not None:
        return cached
    if slot.store.list():
        log.info("%s: the slot %s holds an interrupted attempt; resuming and replacing it", cfg.model, slot.uri)

    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    keras.utils.set_random_seed(cfg.seed)
    if cfg.op_determinism:
        # Process-wide: what it costs and what it repeats is in BENCHMARKS.md ("Op determinism").
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    choice = select_strategy()
    # Before anything is written: a slot keyed for one device is never trained on another. A config
    # left at "auto" (the CLI with an explicit --out) is recorded as the device it trained on.
    cfg = replace(cfg, device=check_device(cfg.device, choice))
    batch = cfg.batch_size or global_batch_size(choice.replicas)
    runtime = {
        "device": choice.device,
        "kind": choice.kind,
        "replicas": choice.replicas,
        "global_batch_size": batch,
        "mixed_precision": choice.mixed_precision,
        **library_versions(),
    }
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

    segmenter = None
    if cfg.lung_fields:
        segmenter, seg_key, _ = load_segmenter(cfg.lung_fields, cache)
        log.info("%s classifies on the lung fields of segmenter %s (%s)", cfg.model, seg_key, cfg.lung_fields)
    with choice.strategy.scope():
        scratch_start = cfg.weights == "scratch"  # from random initialisation: every layer trains
        model = build_model(
            cfg.model,
            input_size=cfg.input_size,
            channels=cfg.channels,
            weights="none" if scratch_start else cfg.weights,
            trainable="all" if scratch_start else "frozen",
            head=cfg.head,
            **_input_blocks(segmenter, cfg),
        )
    use_features = (
        is_transfer(cfg.model) and not scratch_start and cfg.feature_cache and not cfg.augment and choice.kind != "tpu"
    )
    augment = None
    if cfg.augment or cfg.fine_tune_augment:
        augment = build_augmenter(cfg.seed, cfg.augment_recipe)

    t0 = time.perf_counter()
    backup = Checkpoints(out, "main", cache)
    scratch = [backup]
    feature_seconds = 0.0
    probs = None
    if backup.finished():
        with choice.strategy.scope():
            backup.restore_finished(model)
    elif use_features:
        probs, feature_seconds = _train_head_on_features(model, cfg, data, cache, batch, backup)
        backup.mark_finished(model)
    else:
        with choice.strategy.scope():
            _train_on_images(
                model,
                cfg,
                data,
                cache,
                batch,
                backup,
                epochs=cfg.epochs,
                lr=cfg.learning_rate,
                augment=augment if cfg.augment else None,
            )
        backup.mark_finished(model)
    history = backup.history
    if is_transfer(cfg.model) and cfg.fine_tune_layers > 0 and cfg.fine_tune_epochs > 0:
        ft_backup = Checkpoints(out, "fine-tune", cache)
        with choice.strategy.scope():
            set_trainable(model.get_layer("backbone"), cfg.fine_tune_layers)
            if ft_backup.finished():
                ft_backup.restore_finished(model)
            else:
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
                ft_backup.mark_finished(model)
        history += [{**h, "epoch": h["epoch"] + len(history), "phase": "fine-tune"} for h in ft_backup.history]
        probs = None
        scratch.append(ft_backup)
    train_seconds = time.perf_counter() - t0
    if probs is None:
        probs = _predict_images(model, cfg, data, cache, batch)

    # With extra sources, each source's figures beside the pooled ones.
    metrics = {s: split_metrics(p, data.files(s)[1], data.sources(s)) for s, p in probs.items()}
    return _publish(slot, cfg, model, history, metrics, train_seconds, feature_seconds, runtime, scratch, segmenter)


def _input_blocks(segmenter, cfg: TrainConfig) -> dict:
    """build_model's arguments for the frozen blocks in front of the network (lung fields, blur,
    equalisation): the trained model and its inference copy must be built alike."""
    return {"lung_fields": _lung_block(segmenter, cfg), "equalize": cfg.equalize, "blur_sigma": cfg.blur_sigma}


def _lung_block(segmenter, cfg: TrainConfig):
    """A fresh lung-field block around (a copy of) ``segmenter``, or None without one."""
    if segmenter is None:
        return None
    import keras

    copy = keras.models.clone_model(segmenter)
    copy.set_weights(segmenter.get_weights())
    return lung_fields.build_lung_fields(copy, cfg.input_size)


def _publish(
    slot: Unit,
    cfg,
    model,
    history,
    metrics,
    train_seconds,
    feature_seconds,
    runtime,
    scratch: list[Checkpoints],
    segmenter=None,
) -> TrainResult:
    """Write the slot's artefacts (replacing an interrupted attempt's), drop the checkpoints,
    then the completion marker. ``runtime`` is where it trained: device, replicas, global batch,
    mixed precision, TensorFlow and Keras versions (for the cards)."""
    with tempfile.TemporaryDirectory(prefix="covid-train-") as tmp:
        tmp = Path(tmp)
        model_path = tmp / "model.keras"
        _inference_copy(model, cfg, segmenter).save(model_path)
        slot.put_file("model.keras", model_path)
        curves = {k: [h[k] for h in history if k in h] for k in HISTORY_KEYS}
        plot_history(curves, f"{cfg.model} ({cfg.input_size}px)", tmp / "curves.png")
        slot.put_file("curves.png", tmp / "curves.png")
        for split, m in metrics.items():
            plot_confusion(m["confusion_matrix"], f"{cfg.model}: {split}", tmp / f"confusion_{split}.png")
            slot.put_file(f"confusion_{split}.png", tmp / f"confusion_{split}.png")
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["epoch", "phase", "seconds", *HISTORY_KEYS], extrasaction="ignore")
        w.writeheader()
        w.writerows(history)
        slot.put_text("history.csv", buf.getvalue())
        slot.put_text("history.json", json.dumps(history, indent=2))
        val, test = metrics.get("val", {}), metrics.get("test")
        result = TrainResult(
            model=cfg.model,
            out=slot.uri,
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
            extra={"feature_seconds": round(feature_seconds, 2), "device": runtime["kind"], "runtime": runtime},
        )
    for ckpt in scratch:  # before the marker: a complete slot holds only its artefacts
        ckpt.clear()
    doc = {
        "result": result.to_dict(),
        "config": asdict(cfg),
        "identity": training_identity(cfg),
        "weights": resolve_weights(cfg),
        "runtime": runtime,
        "classes": list(CLASSES),
        "metrics": json.loads(json.dumps(metrics, default=float)),
    }
    if not slot.complete(doc):
        log.warning("%s: another attempt completed %s first; its model stays", cfg.model, slot.uri)
        return TrainResult(**{**slot.record()["result"], "status": "cached"})
    log.info(
        "%s: val accuracy %.4f, test accuracy %s, %d epochs in %.0fs",
        cfg.model,
        result.val_accuracy,
        f"{result.test_accuracy:.4f}" if result.test_accuracy is not None else "-",
        result.epochs,
        result.train_seconds,
    )
    return result


def _inference_copy(model, cfg: TrainConfig, segmenter=None):
    """The trained weights in a fresh, uncompiled model: a .keras file would otherwise carry
    the optimizer's state (twice the head's size) that no one loading it for inference needs."""
    fresh = build_model(
        cfg.model,
        input_size=cfg.input_size,
        channels=cfg.channels,
        weights="none",
        head=cfg.head,
        **_input_blocks(segmenter, cfg),
    )
    fresh.set_weights(model.get_weights())
    return fresh


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = vars(p.parse_args(argv))
    config, result_file = args.pop("config"), args.pop("result_file")
    if config:
        args = json.loads(Path(config).read_text())
    elif not (args["model"] and args["split"] and args["out"]):
        p.error("--model, --split and --out are required (or --config)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = train_model(TrainConfig.from_dict(args))
    text = json.dumps(result.to_dict(), indent=2)
    if result_file:
        Path(result_file).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
