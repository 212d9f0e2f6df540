"""The device a training is for: its spellings, what this process would select (without touching a
TPU), what a deployment declares, and what a trained slot records about where it trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from covid_models.strategy import Device, canonical_device, probe_device
from tasks.fanout import deployment_env_device
from tests.conftest import REPO


def test_device_spellings():
    assert [canonical_device(s) for s in ("auto", "cpu", "CPU:1", "gpu", "gpu:1", "gpu:4", "multi-gpu:2", "tpu:8")] == [
        "auto",
        "cpu:1",
        "cpu:1",
        "gpu:1",
        "gpu:1",
        "multi-gpu:4",
        "multi-gpu:2",
        "tpu:8",
    ]
    assert Device.parse("tpu:4") == Device("tpu", 4)
    for bad, why in [
        ("tpu", "needs its replica count"),
        ("multi-gpu", "needs its replica count"),
        ("cpu:2", "one replica"),
        ("tpu:0", "at least one replica"),
        ("tpu:x", "whole number"),
        ("quantum", "unknown device"),
    ]:
        with pytest.raises(ValueError, match=why):
            Device.parse(bad)


def test_probe_reads_the_environment_before_the_hardware(monkeypatch):
    import tensorflow as tf

    for name in ("COVID_DEVICE", "TPU_NAME", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE"):
        monkeypatch.delenv(name, raising=False)
    gpus = len(tf.config.list_physical_devices("GPU"))
    assert probe_device() == ("cpu:1" if gpus == 0 else "gpu:1" if gpus == 1 else f"multi-gpu:{gpus}")
    monkeypatch.setenv("COVID_DEVICE", "auto")
    assert probe_device() == ("cpu:1" if gpus == 0 else "gpu:1" if gpus == 1 else f"multi-gpu:{gpus}")
    # A TPU is never initialised to count its replicas: its environment must say them.
    monkeypatch.setenv("TPU_NAME", "my-tpu")
    with pytest.raises(ValueError, match=r"TPU_NAME is set.*COVID_DEVICE=tpu:<replicas>"):
        probe_device()
    monkeypatch.setenv("COVID_DEVICE", "tpu:8")
    assert probe_device() == "tpu:8"
    monkeypatch.setenv("COVID_DEVICE", "tpu")
    with pytest.raises(ValueError, match="COVID_DEVICE='tpu': .*replica count"):
        probe_device()


def test_a_deployment_declares_its_device_in_its_environment():
    pool = json.loads((REPO / "deployments" / "vertex-tpu-pool.json").read_text())
    # ct5lp-hightpu-4t: 4 TPU v5e chips, one replica each.
    assert pool["variables"]["properties"]["machine_type"]["default"] == "ct5lp-hightpu-4t"
    assert deployment_env_device(pool, {"image": "x"}) == "tpu:4"
    assert deployment_env_device(pool, {"env": {"COVID_DEVICE": "tpu:8"}}) == "tpu:8"  # the deployment's wins
    local = json.loads((REPO / "deployments" / "local-process-pool.json").read_text())
    assert deployment_env_device(local, None) is None  # trains where the flow plans: its own device
    assert deployment_env_device(None, {"env": {"COVID_DEVICE": " gpu:1 "}}) == "gpu:1"


def test_a_trained_slot_records_where_it_trained(small_split, tmp_path, monkeypatch):
    import keras
    import tensorflow as tf

    from covid_models.stored import model_slot
    from covid_models.train import TrainConfig, train_model
    from covid_models.train_config import training_identity

    cfg = TrainConfig(
        model="custom_cnn",
        split=small_split,
        out=str(tmp_path / "slot"),
        input_size=32,
        epochs=1,
        weights="none",
        max_per_class=4,
        cache_dir=str(tmp_path / "cache"),
        verbose=0,
    )  # device "auto", as `python -m covid_models.train` with an explicit --out
    monkeypatch.delenv("COVID_DEVICE", raising=False)
    try:
        result = train_model(cfg)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    doc = model_slot(cfg.out).record()
    runtime = doc["runtime"]
    kind, replicas = runtime["kind"], runtime["replicas"]
    assert runtime == {
        "device": probe_device(),
        "kind": kind,
        "replicas": replicas,
        "global_batch_size": 16 * replicas,
        "mixed_precision": kind == "gpu",
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }
    assert runtime["device"] == f"{kind}:{replicas}" and result.extra["runtime"] == runtime
    assert doc["config"]["device"] == runtime["device"]  # recorded as the device it trained on
    assert training_identity(TrainConfig(**doc["config"]))["settings"]["device"] == runtime["device"]
    assert Path(cfg.out, "metrics.json").is_file()
