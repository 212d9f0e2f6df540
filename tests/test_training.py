"""Training and evaluation: metrics, the feature cache, artefacts, and resuming after a kill."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from covid_models.metrics import classification_metrics, expected_calibration_error, wilson_interval
from covid_models.stored import load_trained_model
from covid_models.train import TrainConfig, train_model
from tests.conftest import MOBILENET_WEIGHTS, REPO, require_shared


def test_metrics_on_a_known_confusion():
    # 4 samples per class; COVID: 3 right, 1 called Normal; one Normal called COVID.
    y = np.repeat(np.arange(4), 4)
    pred = y.copy()
    pred[3] = 2
    pred[8] = 0
    probs = np.full((16, 4), 0.1)
    probs[np.arange(16), pred] = 0.7
    m = classification_metrics(probs, y)
    assert m["accuracy"] == pytest.approx(14 / 16)
    assert m["confusion_matrix"][0] == [3, 0, 1, 0] and m["confusion_matrix"][2] == [1, 0, 3, 0]
    assert m["covid_sensitivity"] == pytest.approx(3 / 4)
    assert m["covid_specificity"] == pytest.approx(11 / 12)
    assert m["per_class"]["COVID"]["precision"] == pytest.approx(3 / 4)
    assert m["macro_f1"] == pytest.approx(np.mean([0.75, 1.0, 0.75, 1.0]))
    assert m["balanced_accuracy"] == pytest.approx(14 / 16)
    assert m["loss"] == pytest.approx(-np.mean(np.log(np.where(pred == y, 0.7, 0.1))), rel=1e-6)
    lo, hi = m["covid_sensitivity_ci95"]
    assert lo < 0.75 < hi


def test_wilson_interval_and_calibration_error():
    lo, hi = wilson_interval(90, 100)
    assert lo == pytest.approx(0.8256, abs=1e-4) and hi == pytest.approx(0.9448, abs=1e-4)
    y = np.zeros(8, dtype=int)
    calibrated = np.tile([0.75, 0.25 / 3, 0.25 / 3, 0.25 / 3], (8, 1))
    calibrated[:2] = [0.25 / 3, 0.75, 0.25 / 3, 0.25 / 3]  # 6 of 8 right at confidence 0.75
    assert expected_calibration_error(calibrated, y) == pytest.approx(0.0, abs=1e-9)
    overconfident = np.tile([1.0, 0.0, 0.0, 0.0], (8, 1))
    overconfident[:4] = [0.0, 1.0, 0.0, 0.0]
    assert expected_calibration_error(overconfident, y) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def trained_mobilenet(small_split, tmp_path_factory):
    require_shared(MOBILENET_WEIGHTS)
    base = tmp_path_factory.mktemp("mobilenet")
    cfg = TrainConfig(
        model="mobilenet_v2",
        split=small_split,
        out=str(base / "out"),
        input_size=96,
        epochs=3,
        learning_rate=1e-4,
        weights=str(MOBILENET_WEIGHTS),
        cache_dir=str(base / "cache"),
        verbose=0,
    )
    return cfg, train_model(cfg)


def test_feature_cache_training_equals_the_joined_model(trained_mobilenet):
    from covid_models.data import image_dataset, load_split_data

    cfg, result = trained_mobilenet
    assert list((Path(cfg.cache_dir) / "features").glob("*/train.npy"))  # it did use the feature cache
    stored = json.loads((Path(cfg.out) / "metrics.json").read_text())
    model = load_trained_model(f"{cfg.out}/model.keras")  # the joined model, loaded in safe mode
    data = load_split_data(cfg.split)
    for split in ("val", "test"):
        probs = model.predict(image_dataset(data, split, size=96), verbose=0)
        again = classification_metrics(probs, data.files(split)[1])
        assert again["confusion_matrix"] == stored["metrics"][split]["confusion_matrix"]
        assert again["loss"] == pytest.approx(stored["metrics"][split]["loss"], abs=1e-4)
    assert result.val_accuracy == stored["metrics"]["val"]["accuracy"]
    assert result.test_accuracy > 0.4  # 3 epochs on 9 images a class beat chance (0.25) with ImageNet features


def test_artefacts_and_no_second_training(trained_mobilenet, caplog):
    cfg, result = trained_mobilenet
    out = Path(cfg.out)
    for name in (
        "model.keras",
        "metrics.json",
        "history.json",
        "history.csv",
        "curves.png",
        "confusion_val.png",
        "confusion_test.png",
    ):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "backup").exists()  # checkpoints are scratch, removed after success
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2] and all("val_accuracy" in h for h in history)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]["test"]
    for key in (
        "accuracy",
        "loss",
        "per_class",
        "macro_f1",
        "balanced_accuracy",
        "roc_auc_ovr",
        "confusion_matrix",
        "covid_sensitivity_ci95",
        "covid_specificity_ci95",
        "ece",
    ):
        assert key in metrics
    assert result.file_bytes == (out / "model.keras").stat().st_size
    before = (out / "model.keras").stat().st_mtime_ns
    again = train_model(cfg)
    assert again.status == "cached" and again.val_accuracy == result.val_accuracy
    assert (out / "model.keras").stat().st_mtime_ns == before


def test_a_pooled_head_trains_on_the_same_cached_features_in_a_fraction_of_the_bytes(trained_mobilenet, tmp_path):
    from dataclasses import replace

    from covid_models.data import image_dataset, load_split_data
    from covid_models.train_config import slot_key

    cfg, flat = trained_mobilenet
    # A pooled head fits slower than a flatten one (BENCHMARKS.md): more epochs at a higher rate, cheap on features.
    pooled_cfg = replace(cfg, head="pooled", out=str(tmp_path / "pooled"), epochs=8, learning_rate=1e-3)
    assert slot_key(pooled_cfg) != slot_key(cfg)  # a different model, never the flatten head's slot
    features = {p: p.stat().st_mtime_ns for p in (Path(cfg.cache_dir) / "features").glob("*/*.npy")}
    pooled = train_model(pooled_cfg)
    # The head reads the backbone's cached features: the same files, none extracted or written again.
    assert {p: p.stat().st_mtime_ns for p in (Path(cfg.cache_dir) / "features").glob("*/*.npy")} == features
    model = load_trained_model(f"{pooled_cfg.out}/model.keras")
    head = model.get_layer("head")
    assert [type(layer).__name__ for layer in head.layers] == ["GlobalAveragePooling2D", "Dense", "Dense", "Dense"]
    stored = json.loads((Path(pooled_cfg.out) / "metrics.json").read_text())
    data = load_split_data(cfg.split)
    probs = model.predict(image_dataset(data, "val", size=96), verbose=0)
    assert (
        classification_metrics(probs, data.files("val")[1])["confusion_matrix"]
        == (stored["metrics"]["val"]["confusion_matrix"])
    )
    # 96 px: a 3x3x1280 feature map, so the flatten head's first layer holds 8 x 1280 x 256 more float32
    # weights than the pooled head's (10.5 MB), and nothing else differs.
    saved = flat.file_bytes - pooled.file_bytes
    assert 0.95 * 8 * 1280 * 256 * 4 < saved < 1.05 * 8 * 1280 * 256 * 4
    assert pooled.test_accuracy > 0.4  # ImageNet features beat chance (0.25) with either head


def _train_cmd(split: str, out: Path, cache: Path, epochs: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "covid_models.train",
        "--model",
        "custom_cnn",
        "--split",
        split,
        "--out",
        str(out),
        "--input-size",
        "96",
        "--epochs",
        str(epochs),
        "--patience",
        "0",
        "--batch-size",
        "4",
        "--cache-dir",
        str(cache),
        "--verbose",
        "2",
    ]


@pytest.mark.slow  # a real SIGKILL mid-training and a second training process
def test_a_killed_training_resumes_where_it_stopped(small_split, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "first.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(_train_cmd(small_split, out, cache, 12), cwd=REPO, env=env, stdout=f, stderr=f)
    history = out / "backup" / "main" / "history.csv"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= 4:  # header + 3 epochs
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed:\n" + log.read_text()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(history.read_text().splitlines()) - 1
    assert not (out / "metrics.json").exists()

    second = subprocess.run(
        _train_cmd(small_split, out, cache, 12), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stderr[-3000:]
    first_epoch = int(re.search(r"Epoch (\d+)/12", second.stdout + second.stderr).group(1))
    assert first_epoch >= done_before  # resumed (Keras counts from 1), not from epoch 1
    assert first_epoch > 1
    epochs = [h["epoch"] for h in json.loads((out / "history.json").read_text())]
    assert epochs == list(range(12))


@pytest.mark.slow
def test_a_kill_during_fine_tuning_keeps_the_finished_head_phase(small_split, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [
        *_train_cmd(small_split, out, cache, 2)[:4],
        "mobilenet_v2",
        *_train_cmd(small_split, out, cache, 2)[5:],
        "--weights",
        "scratch",
        "--fine-tune-layers",
        "20",
        "--fine-tune-epochs",
        "5",
    ]
    cmd[cmd.index("--input-size") + 1] = "32"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "first.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=f)
    ft_history = out / "backup" / "fine-tune" / "history.csv"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if ft_history.exists() and len(ft_history.read_text().splitlines()) >= 3:  # header + 2 epochs
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed:\n" + log.read_text()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "backup" / "main" / "finished.weights.h5").is_file()

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    text = second.stdout + second.stderr
    assert second.returncode == 0, text[-3000:]
    assert "phase backup/main had finished before a restart" in text
    assert "Epoch 1/2" not in text  # the head phase is not trained again
    history = json.loads((out / "history.json").read_text())
    assert [h.get("phase", "main") for h in history] == ["main"] * 2 + ["fine-tune"] * 5
    assert not (out / "backup").exists()  # kept phases go once the model is complete
