"""The model slot key cannot go stale, and the training CLI explains every flag."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from covid_models import train_config
from covid_models.cli import parser
from covid_models.presets import get_preset, model_configs
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

    own = hashlib.sha256(Path(data.__file__).read_bytes()).hexdigest()[:10]
    assert data.pipeline_version() == own
    assert Path(data.cache_path(tmp_path, "h", "train", 224, 1)).parent.name == f"h-224px-1ch-{own}"
    split = data.SplitData("h", "v", tmp_path, {})
    cfg = TrainConfig(model="custom_cnn", split="s", out="o", weights="none")
    first = feature_cache.feature_path(tmp_path, split, cfg, "train")
    monkeypatch.setattr(feature_cache, "code_version", lambda: "changed-code")
    assert feature_cache.feature_path(tmp_path, split, cfg, "train") != first
