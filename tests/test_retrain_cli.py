"""`python -m flows.retrain` exposes every flow parameter, and the flow's shape is the pipeline."""

from __future__ import annotations

import inspect

import pytest

import flows.retrain as module
from flows.retrain import retrain
from flows.retrain_params import GROUPS, cli_parser, default_profile


def test_every_retrain_parameter_is_a_cli_option(monkeypatch):
    seen = {}
    monkeypatch.setattr(module, "retrain", _Recorder(seen))
    module.main(
        ["--preset", "smoke", "--split", "0.8,0.2,0", "--overrides", '{"vgg16": {"epochs": 2}}', "--no-int8"]
        + ["--no-app", "--kaggle-secret-block", ""]
    )
    assert set(seen) == set(inspect.signature(retrain.fn).parameters)  # store and the four groups
    options = {a.dest for a in cli_parser()._actions}
    for group, model in GROUPS.items():
        assert set(model.model_fields) <= options, f"not on the CLI: {group} {set(model.model_fields) - options}"
    data, training = seen["data"], seen["training"]
    assert data.split == (0.8, 0.2, 0.0) and training.overrides == {"vgg16": {"epochs": 2}}
    assert seen["publishing"].int8 is False and seen["publishing"].app is False and data.kaggle_secret_block is None


def test_profile_defaults_follow_the_source():
    assert default_profile("kaggle") == "kaggle" and default_profile("kaggle:owner/slug") == "kaggle"
    assert default_profile("../some/folder") == "any" and default_profile("gs://bucket/x") == "any"


def test_retrain_refuses_ranking_on_test(capsys):
    with pytest.raises(SystemExit):
        module.main(["--rank-by", "test_accuracy"])
    assert "invalid choice: 'test_accuracy'" in capsys.readouterr().err


class _Recorder:
    description = retrain.description

    def __init__(self, seen: dict):
        self.seen = seen

    def __call__(self, **kw):
        self.seen.update(kw)
        return {"run_id": "", "run": "", "champion": None}
