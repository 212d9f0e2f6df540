"""The model slot key cannot go stale (settings, weights, code, libraries and the device it trains
on), a training refuses hardware other than its config's, and the training CLI explains every flag."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from covid_models import strategy, train_config
from covid_models.cli import parser
from covid_models.presets import for_device, get_preset, model_configs
from covid_models.train_config import TrainConfig, slot_key, training_identity


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"model": "mobilenet_v2", "split": "s", "out": "o", "weights": "scratch", **kw})


def test_key_hashes_resolved_settings_not_only_spelled_out_ones(monkeypatch):
    base = _cfg()
    assert slot_key(base) == slot_key(_cfg())  # deterministic
    assert slot_key(_cfg(out="elsewhere", verbose=0, cache_dir="/c")) == slot_key(base)  # where, not what
    # The key hashes every resolved value, defaults included: spelling a default out changes
    # nothing, and a changed default (here: patience 5 -> 7) is a different key.
    assert slot_key(_cfg(patience=5)) == slot_key(base)
    assert training_identity(base)["settings"]["patience"] == 5
    assert slot_key(_cfg(patience=7)) != slot_key(base)


def test_key_follows_the_weights_file_actually_loaded(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("COVID_WEIGHTS_DIR", str(folder))
    monkeypatch.setenv("COVID_WEIGHTS_DOWNLOAD", "0")
    f = folder / "mobilenet_v2_1.0_224_no_top.weights.h5"
    f.write_bytes(b"first weights")
    cfg = TrainConfig(model="mobilenet_v2", split="s", out="o", weights="imagenet", input_size=224)
    first = slot_key(cfg)
    assert training_identity(cfg)["weights"]["sha256"] == train_config.file_sha256(f)
    f.write_bytes(b"other weights")
    train_config._cached_sha256.cache_clear()
    assert slot_key(cfg) != first
    assert slot_key(_cfg()) != first  # random initialisation is its own key


def test_key_follows_the_training_code(monkeypatch):
    before = slot_key(_cfg())
    monkeypatch.setattr(train_config, "code_version", lambda: "another-version")
    assert slot_key(_cfg()) != before


def test_model_configs_put_each_model_in_its_keyed_slot(tmp_path):
    p = get_preset("smoke")
    configs = model_configs(p, "split-uri", "abc", str(tmp_path), ["custom_cnn"], {"custom_cnn": {"epochs": 3}})
    (cfg,) = configs
    assert cfg["epochs"] == 3 and cfg["out"].startswith(str(tmp_path / "models" / "abc" / "custom_cnn-"))
    with pytest.raises(ValueError, match="unknown training settings"):
        model_configs(p, "s", "abc", str(tmp_path), ["custom_cnn"], {"custom_cnn": {"epochz": 3}})
    with pytest.raises(ValueError, match="not selected"):
        model_configs(p, "s", "abc", str(tmp_path), ["custom_cnn"], {"vgg16": {"epochs": 3}})


def test_every_training_flag_has_help():
    actions = [a for a in parser()._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in actions} >= {f.name for f in dataclasses.fields(TrainConfig)}
    missing = [a.option_strings[0] for a in actions if not (a.help and len(a.help) > 10)]
    assert not missing, missing
    out = subprocess.run(
        [sys.executable, "-m", "covid_models.train", "--help"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        timeout=120,
    )
    text = " ".join(out.stdout.split())  # argparse wraps lines
    assert out.returncode == 0 and "--fine-tune-layers" in text and "top N backbone layers" in text


def test_key_follows_the_tensorflow_and_keras_versions(monkeypatch):
    import importlib.metadata

    cfg = TrainConfig(model="custom_cnn", split="s", out="o")
    assert training_identity(cfg)["runtime"] == {
        "tensorflow": importlib.metadata.version("tensorflow"),
        "keras": importlib.metadata.version("keras"),
    }
    before = slot_key(cfg)
    monkeypatch.setattr(train_config, "_version", lambda name: "0.0-other")
    assert slot_key(cfg) != before


def test_cached_pixels_and_features_are_keyed_on_the_code_that_made_them(tmp_path, monkeypatch):
    import hashlib

    from covid_models import data, feature_cache

    root = Path(data.__file__).resolve().parent.parent
    h = hashlib.sha256()
    for name in ("covid_models/data.py", "covid_data/imaging.py", "covid_data/dicom.py"):  # resize and decoders
        h.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    own = h.hexdigest()[:10]
    assert data.pipeline_version() == own
    assert Path(data.cache_path(tmp_path, "h", "train", 224, 1)).parent.name == f"h-224px-1ch-{own}"
    split = data.SplitData("h", "v", tmp_path, {})
    cfg = TrainConfig(model="custom_cnn", split="s", out="o", weights="none")
    first = feature_cache.feature_path(tmp_path, split, cfg, "train")
    monkeypatch.setattr(feature_cache, "code_version", lambda: "changed-code")
    assert feature_cache.feature_path(tmp_path, split, cfg, "train") != first


def test_key_differs_by_device_kind_and_replica_count():
    devices = ("cpu:1", "gpu:1", "multi-gpu:2", "multi-gpu:4", "tpu:4", "tpu:8")
    keys = {d: slot_key(_cfg(device=d)) for d in devices}
    assert len(set(keys.values())) == len(devices)  # a TPU model is never reused as a CPU one
    assert {d: slot_key(_cfg(device=d)) for d in devices} == keys  # the same device, the same slot
    # One spelling per device: the same hardware never splits into two slots.
    assert slot_key(_cfg(device="cpu")) == keys["cpu:1"] and slot_key(_cfg(device="GPU")) == keys["gpu:1"]
    assert slot_key(_cfg(device="gpu:2")) == keys["multi-gpu:2"]
    assert training_identity(_cfg(device="tpu:8"))["settings"]["device"] == "tpu:8"
    with pytest.raises(ValueError, match="needs its replica count, e.g. tpu:8"):
        _cfg(device="tpu")  # a TPU's replica count changes the batch: it must be said


def test_planned_configs_carry_the_device_and_re_key_for_another(monkeypatch, tmp_path):
    p, store = get_preset("smoke"), str(tmp_path)
    monkeypatch.setenv("COVID_DEVICE", "tpu:8")  # what a TPU worker's environment says
    (on_tpu,) = model_configs(p, "split-uri", "abc", store, ["custom_cnn"])
    assert on_tpu["device"] == "tpu:8" and on_tpu["out"].endswith(f"/custom_cnn-{slot_key(TrainConfig(**on_tpu))}")
    assert slot_key(_cfg()) == slot_key(_cfg(device="tpu:8"))  # "auto" is keyed on what this process selects
    monkeypatch.delenv("COVID_DEVICE")
    (here,) = model_configs(p, "split-uri", "abc", store, ["custom_cnn"])
    assert here["device"] == strategy.probe_device() != "tpu:8" and here["out"] != on_tpu["out"]
    # Sent to a deployment on a TPU host, the config moves to the slot a TPU plan gives it.
    assert for_device(here, "tpu:8") == on_tpu
    assert for_device(on_tpu, "tpu:8") is on_tpu
    (tpu_override,) = model_configs(p, "split-uri", "abc", store, ["custom_cnn"], {"custom_cnn": {"device": "tpu:8"}})
    assert tpu_override == on_tpu


def test_a_training_refuses_hardware_other_than_its_configs(monkeypatch, tmp_path):
    import keras
    import tensorflow as tf

    from covid_models import train

    monkeypatch.delenv("COVID_DEVICE", raising=False)  # what the hardware is, not what an environment says
    here = strategy.probe_device()
    out = tmp_path / "slot"
    # A config planned for a TPU, on this machine: the real strategy selection finds other hardware.
    cfg = TrainConfig(model="custom_cnn", split="never-read", out=str(out), weights="none", device="tpu:8")
    try:
        with pytest.raises(strategy.DeviceMismatchError, match=rf"for device tpu:8 .*selected {here}"):
            train.train_model(cfg)
    finally:
        keras.mixed_precision.set_global_policy("float32")  # one GPU: select_strategy sets mixed precision
    # The fault this machine cannot cause: a "cpu" slot on a TPU host.
    on_tpu = strategy.StrategyChoice(tf.distribute.get_strategy(), "tpu", 8, False)
    monkeypatch.setattr(train, "select_strategy", lambda: on_tpu)
    with pytest.raises(strategy.DeviceMismatchError, match=r"for device cpu:1 .*selected tpu:8 .*COVID_DEVICE=tpu:8"):
        train.train_model(dataclasses.replace(cfg, device="cpu"))
    assert not out.exists() or not any(out.rglob("*"))  # refused before anything was written
