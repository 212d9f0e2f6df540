"""Model cards say what the model is, what the test set can resolve, and the data's known limits."""

from __future__ import annotations

from covid_registry.model_card import describe_weights, export_lines, model_card


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


def test_card_exports_section_says_what_was_checked_and_what_was_not():
    lines = "\n".join(
        export_lines(
            {
                "coreml": {
                    "bytes": 4_200_000,
                    "checks": {"runtime_parity": "unchecked: the Core ML runtime needs macOS"},
                },
                "coreml-int8": {"bytes": 1_100_000, "checks": {"runtime_max_prob_diff": 0.031, "runtime_bound": 0.05}},
                "tflite": {"bytes": 8_400_000, "checks": {"max_prob_diff": 2.5e-6, "images": 32}},
            }
        )
    )
    assert "| Core ML (fp16) | 4.2 MB | unchecked: the Core ML runtime needs macOS |" in lines
    assert "| Core ML (8-bit weights) | 1.1 MB | max |Δp| 3.1e-02 (bound 0.05) |" in lines
    assert "| TFLite (float32) | 8.4 MB | max |Δp| 2.5e-06 on 32 test images, every class |" in lines
    assert export_lines(None) == []


def test_parity_sample_takes_every_class_in_turn_and_is_seeded():
    import pandas as pd

    from covid_registry.exports import parity_sample

    # path-sorted, as a split is: the first 32 rows are all COVID
    frame = pd.DataFrame({"label": ["COVID"] * 40 + ["Lung_Opacity"] * 5 + ["Normal"] * 40 + ["Viral Pneumonia"] * 3})
    rows = parity_sample(frame, 32)
    counts = frame.iloc[rows]["label"].value_counts().to_dict()
    assert len(rows) == len(set(rows)) == 32
    assert counts == {"COVID": 12, "Normal": 12, "Lung_Opacity": 5, "Viral Pneumonia": 3}
    assert parity_sample(frame, 32) == rows and parity_sample(frame, 32, seed=1) != rows
    assert sorted(parity_sample(frame, 500)) == list(range(len(frame)))  # more than there are: all of them


def test_a_model_of_several_sources_has_a_by_source_table_and_one_source_has_none():
    import numpy as np

    from covid_models.metrics import split_metrics

    # 6 main rows (5 right, 2 COVID of which 1 found) and 4 rows of "clinic-b" (all right, no COVID)
    y = np.array([0, 0, 1, 2, 3, 1, 1, 2, 3, 2])
    pred = np.array([0, 1, 1, 2, 3, 1, 1, 2, 3, 2])
    probs = np.eye(4)[pred] * 0.9 + 0.025
    sources = np.array(["main"] * 6 + ["clinic-b"] * 4)
    config = {"input_size": 64, "weights": "none", "epochs": 1, "learning_rate": 1e-3, "fine_tune_layers": 0}
    test = split_metrics(probs, y, sources)
    card = model_card("custom_cnn", {"test": test}, config, {"version": "v"})
    table = card.split("## By source", 1)[1].split("\n## ", 1)[0]
    assert "| test | main | 6 | 83.3% (43.6-97.0%) | 50.0% of 2 |" in table
    assert "| test | clinic-b | 4 | 100.0% (51.0-100.0%) | no COVID images |" in table
    one = model_card("custom_cnn", {"test": split_metrics(probs, y, None)}, config, {"version": "v"})
    assert "## By source" not in one
