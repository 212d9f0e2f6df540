"""Transfer learning that is what it says: a transfer model starts from its ImageNet weights, or is
trained from scratch with every layer trainable (an explicit choice), or is skipped with a reason
that names the file to supply. A head on a frozen random backbone is never trained."""

from __future__ import annotations

import shutil

import pytest

from covid_eval.leaderboard import leaderboard
from covid_models.describe import describe_weights
from covid_models.presets import get_preset, plan_models
from covid_models.stored import load_trained_model
from covid_models.train import TrainConfig, train_model
from tests.conftest import MOBILENET_WEIGHTS, require_shared


@pytest.mark.parametrize("model", ["vgg16", "mobilenet_v2", "resnet50"])
def test_a_frozen_random_backbone_cannot_be_configured(model):
    with pytest.raises(ValueError, match="frozen random backbone.*scratch"):
        TrainConfig(model=model, split="s", out="o", weights="none")
    TrainConfig(model="custom_cnn", split="s", out="o", weights="none")  # no backbone: fine


@pytest.fixture
def weights_folder(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setenv("COVID_WEIGHTS_DIR", str(folder))
    monkeypatch.setenv("COVID_WEIGHTS_DOWNLOAD", "0")
    return folder


def test_missing_imagenet_file_skips_the_model_naming_the_file(weights_folder, tmp_path):
    require_shared(MOBILENET_WEIGHTS)
    shutil.copy(MOBILENET_WEIGHTS, weights_folder / MOBILENET_WEIGHTS.name)
    models = ["custom_cnn", "mobilenet_v2", "vgg16", "densenet169"]
    configs, skipped = plan_models(get_preset("cpu"), "split-uri", "abc", str(tmp_path / "store"), models)
    by_model = {c["model"]: c for c in configs}
    assert sorted(by_model) == ["custom_cnn", "mobilenet_v2"]
    assert by_model["mobilenet_v2"]["weights"] == "imagenet"
    assert {s["model"] for s in skipped} == {"vgg16", "densenet169"}
    vgg = next(s for s in skipped if s["model"] == "vgg16")
    assert vgg["status"] == "skipped"
    # what to supply and where to put it
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in vgg["error"] and str(weights_folder) in vgg["error"]


def test_scratch_policy_trains_every_layer_at_the_whole_network_rate(weights_folder, tmp_path):
    p = get_preset("smoke")
    assert p.missing_weights == "scratch"
    configs, skipped = plan_models(p, "split-uri", "abc", str(tmp_path / "store"), ["vgg16"])
    assert not skipped and configs[0]["weights"] == "scratch"
    assert configs[0]["learning_rate"] == p.learning_rate  # not the head's rate
    assert describe_weights("vgg16", configs[0], {"kind": "scratch"}).startswith("trained from scratch")


def test_fail_policy_stops_with_the_file_name(weights_folder, tmp_path):
    from covid_models.weights import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"):
        plan_models(get_preset("cpu", missing_weights="fail"), "s", "abc", str(tmp_path), ["resnet50"])


def test_skipped_models_are_on_the_leaderboard_with_the_reason_after_the_trained():
    records = [
        {"model": "vgg16", "status": "skipped", "error": "skipped: ImageNet weights for vgg16 are not available"},
        {"model": "custom_cnn", "status": "trained", "val_accuracy": 0.8, "val_loss": 0.5, "weights_desc": "x"},
    ]
    board = leaderboard(records)
    assert list(board["model"]) == ["custom_cnn", "vgg16"]
    assert board.loc[1, "status"] == "skipped" and "not available" in board.loc[1, "error"]
    assert board.loc[0, "rank"] == 1 and board["rank"].isna().iloc[1]


def test_a_scratch_model_trains_its_backbone(small_split, tmp_path):
    cfg = TrainConfig(
        model="vgg16", split=small_split, out=str(tmp_path / "vgg16"), input_size=32, epochs=1,
        weights="scratch", patience=0, verbose=0,
    )  # fmt: skip
    res = train_model(cfg)
    import json

    import keras
    import numpy as np

    from covid_models.builders import build_model

    stored = json.loads((tmp_path / "vgg16" / "metrics.json").read_text())
    assert stored["weights"]["kind"] == "scratch"
    trained = load_trained_model(f"{res.out}/model.keras").get_layer("backbone")
    keras.utils.set_random_seed(cfg.seed)  # what train_model does before building: the same random start
    start = build_model("vgg16", input_size=32, weights="none").get_layer("backbone")
    kernels = [(a, b) for a, b in zip(start.get_weights(), trained.get_weights(), strict=True) if a.ndim == 4]
    assert len(kernels) == 13  # VGG16's convolutions
    # every convolution of the backbone moved from its random start: trained, not frozen
    assert all(not np.allclose(a, b) for a, b in kernels)
