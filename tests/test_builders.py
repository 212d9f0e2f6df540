"""The nine model builders: architecture, in-graph preprocessing, weights and trainable policy."""

from __future__ import annotations

import os

import numpy as np
import pytest

from covid_models.builders import (
    ARCHITECTURES,
    MODEL_NAMES,
    application_preprocess,
    build_model,
    preprocess_layer,
    set_trainable,
)
from covid_models.weights import MissingWeightsError
from tests.conftest import MOBILENET_WEIGHTS, require_shared

SMALL = {"inception_v3": 75, "inception_resnet_v2": 75}


def _size(name: str) -> int:
    return SMALL.get(name, 48)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_builder_builds_and_takes_a_training_step(name):
    import keras

    keras.utils.set_random_seed(0)
    model = build_model(name, input_size=_size(name), weights="none", trainable="all")
    assert model.input_shape == (None, _size(name), _size(name), 1)
    assert model.output_shape == (None, 4)
    x = np.random.default_rng(0).uniform(0, 255, (4, _size(name), _size(name), 1)).astype("float32")
    y = np.array([0, 1, 2, 3])
    # Eager: tracing and XLA-compiling DenseNet201's train step took 50 s of this test's 60 (eager: 4 s);
    # graph-mode training is what the training tests run.
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy", run_eagerly=True)
    before = [w.copy() for w in model.get_weights()]
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)
    after = model.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    probs = model.predict(x, verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    pre = model.get_layer("preprocess")
    assert type(pre).__name__ == "Conv2D" and pre.name == "preprocess"
    assert not pre.trainable and np.array_equal(pre.get_weights()[0], before[0])  # preprocessing never trains


def test_custom_cnn_is_the_papers_network():
    model = build_model("custom_cnn", input_size=64)
    body = model.get_layer("custom_cnn")
    described = []
    for layer in body.layers:
        kind = type(layer).__name__
        if kind == "Conv2D":
            described.append(
                f"Conv2D {layer.filters} {layer.kernel_size[0]}x{layer.kernel_size[1]} {layer.activation.__name__}"
            )
        elif kind == "Dense":
            described.append(f"Dense {layer.units} {layer.activation.__name__}")
        elif kind == "Dropout":
            described.append(f"Dropout {layer.rate}")
        else:
            described.append(kind)
    assert described == [
        "BatchNormalization",
        "Conv2D 32 3x3 relu",
        "MaxPooling2D",
        "Conv2D 64 3x3 relu",
        "MaxPooling2D",
        "Conv2D 128 3x3 relu",
        "MaxPooling2D",
        "Flatten",
        "Dropout 0.3",
        "Dropout 0.2",
        "Dense 256 relu",
        "Dropout 0.15",
        "Dense 4 softmax",
    ]


def test_transfer_head_is_the_papers():
    head = build_model("vgg16", input_size=48, weights="none").get_layer("head")
    assert [(type(layer).__name__, getattr(layer, "units", None)) for layer in head.layers] == [
        ("Flatten", None),
        ("Dense", 256),
        ("Dense", 256),
        ("Dense", 4),
    ]


def test_the_pooled_head_keeps_the_dense_layers_on_pooled_features():
    flat = build_model("mobilenet_v2", input_size=224, weights="none")
    pooled = build_model("mobilenet_v2", input_size=224, weights="none", head="pooled")
    head = pooled.get_layer("head")
    assert [(type(layer).__name__, getattr(layer, "units", None)) for layer in head.layers] == [
        ("GlobalAveragePooling2D", None),
        ("Dense", 256),
        ("Dense", 256),
        ("Dense", 4),
    ]
    backbone = pooled.get_layer("backbone").count_params()
    assert backbone == flat.get_layer("backbone").count_params()
    # The phone's download: 1280 pooled inputs to Dense 256 against 7x7x1280 flattened ones.
    assert head.count_params() == 1280 * 256 + 256 + 256 * 256 + 256 + 256 * 4 + 4
    assert flat.get_layer("head").count_params() == 7 * 7 * 1280 * 256 + 256 + 256 * 256 + 256 + 256 * 4 + 4


def test_a_head_that_is_not_an_option_is_refused():
    from covid_models.train_config import TrainConfig

    with pytest.raises(ValueError, match="unknown head 'gap'"):
        build_model("vgg16", input_size=48, weights="none", head="gap")
    with pytest.raises(ValueError, match="the paper's own network"):
        build_model("custom_cnn", input_size=48, head="pooled")
    with pytest.raises(ValueError, match="the paper's own network"):
        TrainConfig(model="custom_cnn", split="s", out="o", head="pooled")
    with pytest.raises(ValueError, match="unknown head"):
        TrainConfig(model="mobilenet_v2", split="s", out="o", head="Pooled")


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("channels", [1, 3])
def test_in_graph_preprocessing_matches_the_application(name, channels):
    layer = preprocess_layer(ARCHITECTURES[name].mode, channels)  # the layer build_model puts first
    x = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, channels)).astype("float32")
    ours = layer(x).numpy()
    rgb = np.repeat(x, 3, axis=-1) if channels == 1 and name != "custom_cnn" else x
    ref = np.asarray(application_preprocess(name)(rgb.copy()))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)


def test_real_imagenet_weights_by_path_and_from_the_local_folder(tmp_path, monkeypatch):
    require_shared(MOBILENET_WEIGHTS)
    by_path = build_model("mobilenet_v2", input_size=96, weights=str(MOBILENET_WEIGHTS))
    folder = tmp_path / "keras-models"
    folder.mkdir()
    os.symlink(MOBILENET_WEIGHTS, folder / "mobilenet_v2_1.0_96_no_top.weights.h5")  # read-only use, no copy
    monkeypatch.setenv("COVID_WEIGHTS_DIR", str(folder))
    from_folder = build_model("mobilenet_v2", input_size=96, weights="imagenet")
    a, b = by_path.get_layer("backbone").get_weights(), from_folder.get_layer("backbone").get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    random = build_model("mobilenet_v2", input_size=96, weights="none").get_layer("backbone").get_weights()
    assert not np.array_equal(random[0], a[0])


def test_missing_imagenet_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("COVID_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(MissingWeightsError) as err:
        build_model("densenet169", input_size=64, weights="imagenet")
    msg = str(err.value)
    assert "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg and str(tmp_path) in msg
    assert "weights=<path" in msg
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        build_model("vgg16", input_size=48, weights=str(tmp_path / "nope.h5"))


def test_trainable_policies():
    model = build_model("mobilenet_v2", input_size=48, weights="none")
    backbone = model.get_layer("backbone")
    assert not backbone.trainable and not backbone.trainable_weights
    set_trainable(backbone, 10)
    trainable = [layer.name for layer in backbone.layers if layer.trainable and layer.weights]
    top = {layer.name for layer in backbone.layers[-10:]}
    assert trainable and set(trainable) <= top
    assert not any("bn" in n.lower() or "batchnorm" in n.lower() for n in trainable)
    set_trainable(backbone, "all")
    assert len(backbone.trainable_weights) > len(trainable)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model 'alexnet'"):
        build_model("alexnet")
    with pytest.raises(ValueError, match="at least 75px"):
        build_model("inception_v3", input_size=64, weights="none")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        build_model("vgg16", input_size=48, channels=2, weights="none")
