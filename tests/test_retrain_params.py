"""The retrain flow's parameter groups: the schema Prefect builds from them, what they refuse,
their defaults (the flat parameters' of before), and the CLI building the same models."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import yaml
from prefect.exceptions import ParameterTypeError, SignatureMismatchError
from prefect.utilities.schema_tools.validation import validate

from covid_data.split import SplitConfig
from covid_models.builders import MODEL_NAMES
from covid_models.presets import get_preset
from flows.prepare_data import DEFAULT_SOURCE, DEFAULT_STORE
from flows.retrain import retrain
from flows.retrain_params import (
    GROUPS,
    DataParams,
    PromotionParams,
    PublishingParams,
    TrainingParams,
    cli_parameters,
    run_preset,
)
from tasks.credentials import DEFAULT_SECRET_BLOCK
from tasks.publishing import bless_challenger

# The 27 flat parameters of retrain before they were grouped, with their defaults (and what changed
# since: promotion needs a significant win and COVID sensitivity non-inferior to the champion's).
FLAT_DEFAULTS = {
    "source": DEFAULT_SOURCE,
    "store": DEFAULT_STORE,
    "preset": "cpu",
    "models": None,
    "overrides": None,
    "profile": None,
    "rank_by": "val_accuracy",
    "max_parallel": None,
    "train_deployment": None,
    "dask_address": None,
    "int8": None,
    "app": True,
    "champion_margin": 0.0,
    "covid_sensitivity_floor": 0.85,
    "require_significance": True,
    "covid_noninferiority_margin": 0.05,
    "split": None,
    "seed": 42,
    "image_size": 299,
    "size_mismatch": "fail",
    "unreadable": "exclude",
    "near_dup_distance": 4,
    "max_group_share": SplitConfig.max_group_share,
    "kaggle_secret_block": DEFAULT_SECRET_BLOCK,
    "model_timeout_s": None,
    "pickup_timeout_s": 600,
    "external_sources": None,
    "external_floor": None,
    "external_false_alarm_ceiling": None,
    "ensemble": None,
    # issue 16 §3: the shortcut audit, off unless a lung-mask source is named
    "lung_masks": None,
    "segmenter": None,
    "extra_sources": None,
    # issue 16 §2: models on the lung fields, none unless named
    "lung_fields": None,
}


def _schema() -> dict:
    return retrain.parameters.model_dump_for_openapi()


def test_the_schema_has_one_nested_model_per_group():
    schema = _schema()
    assert list(schema["properties"]) == ["store", *GROUPS]
    for group, model in GROUPS.items():
        prop = schema["properties"][group]
        assert prop["$ref"] == f"#/definitions/{model.__name__}" and prop["description"]
        assert prop["default"] == model().model_dump(mode="json")
        assert set(schema["definitions"][model.__name__]["properties"]) == set(model.model_fields)
    training = schema["definitions"]["TrainingParams"]["properties"]
    assert training["preset"]["enum"] == ["cpu", "paper", "smoke"]
    assert training["models"]["anyOf"][0]["items"]["enum"] == list(MODEL_NAMES)
    assert all(p.get("description") for d in schema["definitions"].values() for p in d["properties"].values())


def test_defaults_are_the_flat_parameters_of_before():
    defaults = {k: p.default for k, p in inspect.signature(retrain.fn).parameters.items()}
    flat = {"store": defaults.pop("store")}
    for group, model in GROUPS.items():
        assert defaults[group] == model()
        flat.update(defaults[group].model_dump())
    assert flat == FLAT_DEFAULTS


def test_prefect_casts_nested_json_and_refuses_bad_values():
    cast = retrain.validate_parameters({"training": {"preset": "smoke", "models": ["vgg16"]}, "data": {"seed": 7}})
    assert cast["training"] == TrainingParams(preset="smoke", models=["vgg16"]) and cast["data"] == DataParams(seed=7)
    refused = {
        "training.models.0: Input should be 'custom_cnn'": {"training": {"models": ["vgg17"]}},
        "data.split: Value error, split ratios must be non-negative and sum to 1": {"data": {"split": [0.5, 0.2, 0.2]}},
        "training.presett: Extra inputs are not permitted": {"training": {"presett": "smoke"}},
        "training.overrides.vgg17.[key]: Input should be": {"training": {"overrides": {"vgg17": {}}}},
        "data.near_dup_distance: Input should be less than or equal to 64": {"data": {"near_dup_distance": 65}},
    }
    for message, params in refused.items():
        with pytest.raises(ParameterTypeError, match=message.replace("[", r"\[").replace(".", r"\.")):
            retrain.validate_parameters(params)
    with pytest.raises(SignatureMismatchError, match=r"provided with parameters \['preset'\]"):
        retrain.validate_parameters({"preset": "smoke"})  # the flat shape of before


def test_the_deployments_parameters_match_the_schema():
    """What the server checks a deployment's run against (enforce_parameter_schema)."""
    spec = yaml.safe_load((Path(__file__).parents[1] / "prefect.yaml").read_text())
    retrains = [d for d in spec["deployments"] if d["entrypoint"] == "flows/retrain.py:retrain"]
    assert len(retrains) == 2
    for d in retrains:
        assert not validate(d["parameters"], _schema(), raise_on_error=False)
        assert retrain.validate_parameters(d["parameters"])["training"].preset == "cpu"
    assert not validate({**retrains[0]["parameters"], "training": {"preset": "smoke"}}, _schema())
    assert validate({"training": {"preset": "fast"}}, _schema(), raise_on_error=False)
    assert validate({"data": {"profile": "none"}}, _schema(), raise_on_error=False)


def test_the_cli_builds_the_same_models_as_the_keyword_form():
    assert cli_parameters([]) == retrain.validate_parameters({})
    argv = ["--preset", "smoke", "--source", "/data/x", "--store", "gs://b/p", "--profile", "shared-sample"]
    argv += ["--models", "vgg16", "custom_cnn", "--max-parallel", "3", "--split", "0.8,0.2,0", "--image-size", "0"]
    argv += ["--int8", "--external-source", "/a", "--external-source", "/b", "--champion-margin", "0.01"]
    keywords = {
        "store": "gs://b/p",
        "data": {"source": "/data/x", "profile": "shared-sample", "split": [0.8, 0.2, 0], "image_size": None},
        "training": {"preset": "smoke", "models": ["vgg16", "custom_cnn"], "max_parallel": 3},
        "promotion": {"external_sources": ["/a", "/b"], "champion_margin": 0.01},
        "publishing": {"int8": True},
    }
    assert cli_parameters(argv) == retrain.validate_parameters(keywords)


def test_none_takes_the_presets_value():
    data, training, publishing = DataParams(source="kaggle:owner/slug"), TrainingParams(), PublishingParams()
    p = run_preset(data, training)
    assert p == get_preset("cpu")
    assert training.selected(p) == list(MODEL_NAMES) and training.ensemble_size(p) == 3
    assert training.fanout(p)["max_parallel"] == 1 and publishing.int8_for(p)
    kw = data.prepare_kwargs(p)
    assert kw["profile"] == "kaggle" and (kw["train"], kw["val"], kw["test"]) == (0.7, 0.1, 0.2)
    data, training = DataParams(source="/x", split=(0.8, 0.2, 0)), TrainingParams(preset="smoke", ensemble=2)
    p = run_preset(data, training)
    assert p.split == (0.8, 0.2, 0) and data.prepare_kwargs(p)["profile"] == "any"
    assert training.ensemble_size(p) == 2 and not PublishingParams().int8_for(p)
    assert PromotionParams(champion_margin=0.02).rules()["margin"] == 0.02


def test_lung_fields_put_the_runs_segmenter_into_the_named_models_settings():
    """training.lung_fields becomes each named model's ``lung_fields`` override (beside its other overrides);
    without a mask source, or naming a model the run does not train, the run is refused before anything runs;
    a segmenter that failed to train refuses the models too, instead of training them on the whole picture."""
    from flows.retrain_params import refuse_lung_fields_without_masks

    training = TrainingParams(
        preset="smoke",
        models=["custom_cnn", "vgg16"],
        lung_fields=["custom_cnn"],
        overrides={"custom_cnn": {"epochs": 2}},
    )
    p = run_preset(DataParams(), training)
    assert training.model_overrides(p, "/s/segmenters/abc") == {
        "custom_cnn": {"epochs": 2, "lung_fields": "/s/segmenters/abc"}
    }
    assert TrainingParams(overrides={"vgg16": {"epochs": 1}}).model_overrides(p, None) == {"vgg16": {"epochs": 1}}
    with pytest.raises(ValueError, match="needs the run's lung segmenter: give data.lung_masks"):
        refuse_lung_fields_without_masks(DataParams(), training, p)
    refuse_lung_fields_without_masks(DataParams(lung_masks="/m"), training, p)  # masks named: the run may start
    with pytest.raises(ValueError, match="needs the run's lung segmenter"):
        training.model_overrides(p, None)  # the masks were named and the segmenter failed
    other = TrainingParams(preset="smoke", models=["vgg16"], lung_fields=["custom_cnn"])
    with pytest.raises(ValueError, match=r"does not train: \['custom_cnn'\]"):
        refuse_lung_fields_without_masks(DataParams(lung_masks="/m"), other, run_preset(DataParams(), other))
    cli = cli_parameters(["--lung-masks", "/m", "--lung-fields", "custom_cnn"])
    assert cli["training"].lung_fields == ["custom_cnn"] and cli["data"].lung_masks == "/m"


def test_external_sets_are_declared_labelled_or_negative():
    shenzhen = '{"uri": "/s/shenzhen-cxr", "kind": "negative", "about": "pre-pandemic X-rays, none COVID"}'
    argv = ["--external-source", "/data/site-b", "--external-source", "negative:/data/old", "--external-source"]
    argv += [shenzhen, "--external-false-alarm-ceiling", "0.1"]
    promotion = cli_parameters(argv)["promotion"]
    assert (
        promotion
        == retrain.validate_parameters(
            {
                "promotion": {
                    "external_sources": ["/data/site-b", "negative:/data/old", json.loads(shenzhen)],
                    "external_false_alarm_ceiling": 0.1,
                }
            }
        )["promotion"]
    )
    sets = promotion.external_sets()
    assert [(s["uri"], s["kind"], s["name"]) for s in sets] == [
        ("/data/site-b", "labelled", "site-b"),
        ("/data/old", "negative", "old"),
        ("/s/shenzhen-cxr", "negative", "shenzhen-cxr"),
    ]
    assert sets[2]["about"] == "pre-pandemic X-rays, none COVID"
    with pytest.raises(ParameterTypeError, match="external_sources"):
        retrain.validate_parameters({"promotion": {"external_sources": [{"uri": "/x", "kind": "positive"}]}})
    # Every rule the promotion group names is a parameter of the bless task (a misspelt one fails the run).
    assert set(promotion.rules()) <= set(inspect.signature(bless_challenger.fn).parameters)
    assert promotion.rules()["external_false_alarm_ceiling"] == 0.1
