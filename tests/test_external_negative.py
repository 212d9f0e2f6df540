"""Negative external sets (X-rays known not to be COVID): discovery of finding folders, the COVID
false-alarm rate against a hand count of a model's calls, duplicates, and the unit's key.

The model is built by hand so that its calls are known in advance: it calls an image COVID exactly
when its mean grey level is above 128. The images are seeded noise, bright or dark, so the count
of COVID calls per folder is fixed by how many bright images each folder holds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covid_data.labels import NEGATIVE_LABEL
from covid_data.manifest import LayoutError
from covid_data.negative import discover_negative, find_findings_root
from covid_data.store import open_store
from covid_eval import external as ee
from covid_eval.negative import evaluate_negative
from covid_eval.negative_report import external_set, negative_metrics
from covid_models.metrics import wilson_interval
from tests.conftest import CLASSES

BRIGHT, DARK = 200, 50


def noise_png(path: Path, level: int, seed: int, size: int = 48) -> Path:
    """Seeded noise around a grey level: distinct pHashes, a known mean."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(level + rng.normal(0, 30, (size, size)), 0, 255).astype("uint8"), "L").save(path)
    return path


def negative_folder(dest: Path, layout: dict[str, list[int]], seed: int = 100) -> Path:
    """``{folder: [grey level per image]}`` under ``dest``."""
    for folder, levels in layout.items():
        for i, level in enumerate(levels):
            noise_png(dest / folder / f"{folder[:3].lower()}-{i}.png", level, seed + 97 * i + len(folder))
    return dest


def test_finding_folders_are_found_and_masks_ignored(tmp_path):
    src = negative_folder(
        tmp_path / "wrap" / "pre-pandemic",
        {"Normal": [DARK, DARK], "Tuberculosis": [DARK], "masks": [BRIGHT], "Effusion/images": [DARK]},
    )
    (src / "SOURCES.csv").write_text("file,finding\n")
    files = discover_negative(tmp_path / "wrap")  # a wrapper folder above the findings is walked through
    assert find_findings_root(tmp_path / "wrap") == src
    assert sorted(f.path for f in files) == [
        "images/Effusion/eff-0.png",
        "images/Normal/nor-0.png",
        "images/Normal/nor-1.png",
        "images/Tuberculosis/tub-0.png",
    ]
    assert {f.label for f in files} == {NEGATIVE_LABEL}
    negative_folder(tmp_path / "bad", {"Normal": [DARK], "covid-19": [DARK]})
    with pytest.raises(LayoutError, match="covid-19 is a COVID folder, in a set declared negative"):
        discover_negative(tmp_path / "bad")
    noise_png(tmp_path / "loose" / "x.png", DARK, 1)
    with pytest.raises(LayoutError, match="no finding folders under"):
        discover_negative(tmp_path / "loose")


def test_false_alarm_rate_per_finding_from_probabilities():
    p_covid, p_normal = [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]
    p_vp = [0.2, 0.1, 0.3, 0.4]
    probs = np.array([p_covid, p_normal, p_normal, p_covid, p_vp, p_covid, p_normal])
    findings = ["Normal", "Normal", "Normal", "TB", "TB", "TB", "TB"]
    m = negative_metrics(probs, findings)
    assert (m["n"], m["covid_predicted"]) == (7, 3) and m["false_alarm_rate"] == pytest.approx(3 / 7)
    assert m["false_alarm_ci95"] == pytest.approx(list(wilson_interval(3, 7)))
    assert m["predicted"] == {"COVID": 3, "Lung_Opacity": 0, "Normal": 3, "Viral Pneumonia": 1}
    tb = m["per_finding"]["TB"]
    assert (tb["n"], tb["covid_predicted"], tb["predicted"]["Viral Pneumonia"]) == (4, 2, 1)
    assert m["per_finding"]["Normal"]["false_alarm_ci95"] == pytest.approx(list(wilson_interval(1, 3)))


def test_an_external_set_is_declared_by_prefix_or_by_fields():
    assert external_set("negative:../shared/data/shenzhen-cxr") == {
        "uri": "../shared/data/shenzhen-cxr",
        "kind": "negative",
        "name": "shenzhen-cxr",
        "about": "X-rays known not to be COVID (e.g. taken before the pandemic)",
    }
    assert external_set("kaggle:owner/site-b")["kind"] == "labelled" and external_set("/x/b.zip")["name"] == "b"
    given = {"uri": "/d/x", "kind": "negative", "about": "pre-pandemic X-rays from another hospital, none COVID"}
    assert external_set(given)["about"] == given["about"]
    with pytest.raises(ValueError, match="kind must be one of"):
        external_set({"uri": "/d/x", "kind": "positive"})


@pytest.fixture(scope="module")
def threshold_model(tmp_path_factory) -> dict:
    """A published labelled set of seeded noise (5 per class) with a 60/20/20 split, and a hand-built
    model slot on that split: COVID exactly when the mean grey level is above 128."""
    import keras

    from covid_data.dataset import fetch_dataset, load_manifest
    from covid_data.split import SplitConfig, write_split

    base = tmp_path_factory.mktemp("negative")
    ref = fetch_dataset(
        str(negative_folder(base / "train-src", {c: [DARK] * 5 for c in CLASSES}, seed=7)), str(base / "s")
    )
    store = open_store(ref.store)
    split = write_split(store, ref.version, load_manifest(store, ref.version), SplitConfig(0.6, 0.2, 0.2))
    x = keras.Input((32, 32, 1))
    mean = keras.layers.GlobalAveragePooling2D()(x)
    logits = keras.layers.Dense(4, name="calls")(mean)
    model = keras.Model(x, keras.layers.Softmax()(logits))
    # logit(COVID) = (mean - 128) / 4, logit(Normal) = 0, the others far below: COVID iff mean > 128.
    model.get_layer("calls").set_weights([np.array([[0.25, 0.0, 0.0, 0.0]]), np.array([-32.0, -50.0, 0.0, -50.0])])
    slot = base / "s" / "models" / split.split_hash / "threshold-test"
    slot.mkdir(parents=True)
    model.save(slot / "model.keras")
    test_cm = [[2, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]  # 1 of 3 non-COVID test images called COVID
    cfg = {"model": "custom_cnn", "split": split.uri, "input_size": 32, "channels": 1}
    (slot / "metrics.json").write_text(json.dumps({"config": cfg, "metrics": {"test": {"confusion_matrix": test_cm}}}))
    table = pd.read_parquet(split.uri)
    return {"store": store.uri, "slot": str(slot), "table": table, "root": Path(store.uri) / f"datasets/{ref.version}"}


def test_a_negative_set_is_scored_in_every_finding_folder(threshold_model, tmp_path):
    src = negative_folder(
        tmp_path / "pre-pandemic",
        {
            "Normal": [BRIGHT, DARK, DARK, DARK],  # 1 of 4 called COVID
            "Tuberculosis": [BRIGHT, BRIGHT, DARK],  # 2 of 3: an unknown folder name, scored all the same
            "masks": [BRIGHT] * 5,  # lung masks: not a finding, never scored (they would add 5 COVID calls)
        },
    )
    (src / "Tuberculosis" / "broken.png").write_text("not an image")
    train = threshold_model["table"].query("split == 'train'").sort_values("path").iloc[0]
    shutil.copyfile(threshold_model["root"] / train["path"], src / "Normal" / "seen.png")  # seen in training

    out = evaluate_negative(threshold_model["slot"], str(src), threshold_model["store"], about="made up for a test")
    rec = json.loads(open_store(out["uri"]).read_text("evaluation.json"))

    assert rec["set_kind"] == "negative" and out["set_kind"] == "negative" and out["uri"].endswith("-negative")
    assert (out["name"], out["about"]) == ("pre-pandemic", "made up for a test")
    assert (out["n"], out["covid_predicted"]) == (7, 3)  # the hand count: 1 + 2 bright images
    assert out["false_alarm_rate"] == pytest.approx(3 / 7)
    assert out["false_alarm_ci95"] == pytest.approx(list(wilson_interval(3, 7)))
    normal, tb = out["per_finding"]["Normal"], out["per_finding"]["Tuberculosis"]
    assert (normal["n"], normal["covid_predicted"], normal["predicted"]["Normal"]) == (4, 1, 3)
    assert (tb["n"], tb["covid_predicted"]) == (3, 2) and set(out["per_finding"]) == {"Normal", "Tuberculosis"}
    assert out["test_false_alarm_rate"] == pytest.approx(1 / 3)
    assert out["false_alarm_delta"] == pytest.approx(3 / 7 - 1 / 3)
    assert rec["counts"] | {"scored_per_finding": None} == {
        "images": 9,
        "undecodable": 1,
        "duplicates_excluded": 1,
        "scored": 7,
        "scored_per_finding": None,
    }
    dups = pd.read_csv(Path(out["uri"]) / "duplicates.csv")
    assert list(dups["path"]) == ["images/Normal/seen.png"] and bool(dups["excluded"].iloc[0])
    pred = pd.read_csv(Path(out["uri"]) / "predictions.csv")
    assert not pred["path"].str.contains("masks|seen|broken").any()
    report = open_store(out["uri"]).read_text("report.md")
    assert "COVID false-alarm rate: 42.9%" in report and "| Tuberculosis | 3 | 2 | 66.7%" in report

    # The same folder as a labelled set: Normal alone is scored, in its own unit.
    labelled = ee.evaluate_external(threshold_model["slot"], str(src), threshold_model["store"])
    assert labelled["set_kind"] == "labelled" and labelled["uri"] != out["uri"] and labelled["n"] == 4
    assert open_store(out["uri"]).exists("evaluation.json") and open_store(labelled["uri"]).exists("evaluation.json")
    assert evaluate_negative(threshold_model["slot"], str(src), threshold_model["store"])["uri"] == out["uri"]


def test_two_slots_of_the_same_name_are_two_models_with_two_evaluations(threshold_model, tmp_path):
    """A hand-trained slot is often just ".../model": the evaluation of one is never reused for another."""
    import keras

    src = negative_folder(tmp_path / "pre-pandemic", {"Normal": [BRIGHT, DARK, DARK]})
    first = evaluate_negative(threshold_model["slot"], str(src), threshold_model["store"])
    other = tmp_path / "elsewhere" / "threshold-test"  # the same folder name, another model
    other.mkdir(parents=True)
    model = keras.saving.load_model(Path(threshold_model["slot"]) / "model.keras")
    w, b = model.get_layer("calls").get_weights()
    model.get_layer("calls").set_weights([-w, np.array([32.0, -50.0, 0.0, -50.0])])  # COVID iff mean < 128
    model.save(other / "model.keras")
    doc = json.loads((Path(threshold_model["slot"]) / "metrics.json").read_text())
    # Another model has figures of its own: here, every test image called COVID.
    other_metrics = {"test": {"confusion_matrix": [[2, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]}}
    (other / "metrics.json").write_text(json.dumps({**doc, "metrics": other_metrics}))
    second = evaluate_negative(str(other), str(src), threshold_model["store"])
    assert second["uri"] != first["uri"]
    assert (first["covid_predicted"], second["covid_predicted"]) == (1, 2)  # each model's own calls


def test_the_evaluate_flow_and_the_retrain_task_score_a_negative_set(prefect_server, threshold_model, tmp_path):
    """Prefect's tasks (build-manifest … write-evaluation) carry the finding folders through."""
    from flows.evaluate import evaluate
    from tasks.models import external_evaluations

    src = negative_folder(tmp_path / "old-xrays", {"Normal": [BRIGHT, DARK], "Fibrosis": [DARK, DARK, BRIGHT]}, seed=9)
    out = evaluate(source=str(src), model=threshold_model["slot"], store=threshold_model["store"], negative=True)
    assert out["set_kind"] == "negative" and (out["n"], out["covid_predicted"]) == (5, 2)
    assert {f: r["covid_predicted"] for f, r in out["per_finding"].items()} == {"Fibrosis": 1, "Normal": 1}
    assert out["name"] == "old-xrays" and out["uri"].endswith("-negative")

    records = [{"model": "threshold", "status": "trained", "out": threshold_model["slot"]}]
    spec = {"uri": str(src), "kind": "negative", "about": "old X-rays"}
    (again,) = external_evaluations(records, [spec], threshold_model["store"], None)["threshold"]
    assert again["uri"] == out["uri"] and again["about"] == "old X-rays"  # reused, as the caller names it
    assert again["false_alarm_rate"] == pytest.approx(2 / 5)
