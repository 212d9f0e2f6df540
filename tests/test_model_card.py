"""Model cards say what the model is, what the test set can resolve, and the data's known limits."""

from __future__ import annotations

from covid_registry.model_card import describe_weights, model_card


def _metrics(n: int, acc: float) -> dict:
    return {
        "n": n,
        "accuracy": acc,
        "macro_f1": acc,
        "covid_sensitivity": 0.95,
        "covid_sensitivity_ci95": [0.9, 0.97],
        "covid_specificity": 0.97,
        "covid_specificity_ci95": [0.95, 0.98],
        "ece": 0.03,
    }


def test_card_states_weights_test_resolution_and_data_limits():
    config = {"input_size": 224, "weights": "imagenet", "epochs": 3, "learning_rate": 1e-4, "fine_tune_layers": 0}
    weights = {"kind": "imagenet", "file": "/w/mnv2.h5", "sha256": "ab" * 32}
    card = model_card(
        "mobilenet_v2", {"val": _metrics(379, 0.93), "test": _metrics(758, 0.942)}, config, {"version": "v"}, weights
    )
    assert "ImageNet weights (sha256 abababababab); backbone frozen, head trained" in card
    assert "The test split has 758 images" in card and "92.3-95.6%" in card and "McNemar" in card
    assert "paediatric" in card and "no patient IDs" in card
    assert "not a medical device" in card


def test_weights_are_described_as_what_they_are():
    ft = {"weights": "none", "fine_tune_layers": 20, "fine_tune_epochs": 3}
    assert describe_weights("custom_cnn", {"weights": "imagenet"}) == "trained from scratch (all layers)"
    assert describe_weights("vgg16", ft, {"kind": "none"}).startswith("random initialisation; head trained, then")
    assert "top 20 backbone layers fine-tuned" in describe_weights("vgg16", ft, {"kind": "none"})
