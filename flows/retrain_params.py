"""The ``retrain`` flow's parameters, grouped, and its command line.

``retrain(store, data, training, promotion, publishing)``: the store every stage reads and writes, and
four pydantic models. Prefect renders each model as a nested form in the UI's custom-run dialog and
validates it (an unknown model name, preset or profile, split ratios that do not sum to 1, a misspelt
field: the run is refused before anything runs). A field left at ``None`` takes the preset's value;
:func:`run_preset` and the models' methods resolve them, so the flow body holds no policy arithmetic.

From a deployment, each group is one JSON value, and a group given at run time replaces the
deployment's whole group (unnamed fields take their defaults)::

    prefect deployment run 'retrain/adhoc' -p training='{"preset": "smoke"}' \\
        -p data='{"source": "../shared/data/covid19-radiography-sample", "profile": "shared-sample"}'
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from covid_data.sources import extra_sources as parse_extra_sources
from covid_data.sources import refuse_external
from covid_data.split import SplitConfig
from covid_data.validation import PROFILES
from covid_eval.negative_report import external_set
from covid_eval.segmenter_unit import SegmenterConfig
from covid_models.builders import MODEL_NAMES
from covid_models.presets import PRESETS, Preset, get_preset
from flows.prepare_data import DEFAULT_SOURCE, DEFAULT_STORE, add_data_arguments, data_settings
from tasks.credentials import DEFAULT_SECRET_BLOCK

# Names as enums: the UI offers them as choices, and the server refuses a run that names another.
ModelName = Literal[MODEL_NAMES]
PresetName = Literal[tuple(sorted(PRESETS))]
ProfileName = Literal[tuple(PROFILES)]


class _Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class DataParams(_Params):
    """Where the images come from and how prepare-data checks and splits them."""

    source: str = DEFAULT_SOURCE
    """kaggle[:owner/slug], a folder, a .zip or a store prefix"""
    profile: ProfileName | None = None
    """validation profile: kaggle, shared-sample or any (default: kaggle for Kaggle sources, else any)"""
    split: tuple[float, float, float] | None = None
    """train, val, test ratios (default: the preset's; the paper's exact 80/20 is 0.8,0.2,0 and cannot promote)"""
    seed: int = SplitConfig.seed
    """seed of the split"""
    image_size: int | None = 299
    """expected width and height in pixels (none: don't check)"""
    size_mismatch: Literal["warn", "fail"] = "fail"
    """what an image of another size does"""
    unreadable: Literal["exclude", "fail"] = "exclude"
    """undecodable files: leave them out (up to 1%) or fail validation"""
    near_dup_distance: int = Field(SplitConfig.near_dup_distance, ge=0, le=64)
    """images whose 64-bit pHashes differ in at most this many bits share a split group (0: exact copies only)"""
    max_group_share: float = Field(SplitConfig.max_group_share, ge=0, le=1)
    """a near-duplicate group larger than this share of the images is regrouped at tighter distances (1: no bound)"""
    kaggle_secret_block: str | None = DEFAULT_SECRET_BLOCK
    """Prefect Secret block with Kaggle credentials, used when the client finds none (none: never)"""
    lung_masks: str | None = None
    """lung-mask source (e.g. ../shared/data/shenzhen-cxr): train or reuse a lung segmenter on it and audit the data
    for shortcuts, the lungs blacked out (none: no audit)"""
    segmenter: dict[str, Any] | None = None
    """with lung_masks: the segmenter's recipe, SegmenterConfig fields, e.g. {"steps": 300} (default: its defaults)"""
    extra_sources: list[str | dict[str, str]] | None = None
    """more labelled folders to train on, in the same class layout: a location or {"uri": ..., "name": ...}; their
    images join the dataset version under sources/<name>/, the split stratifies by source, batches are
    source-balanced (never an external set)"""

    @field_validator("extra_sources")
    @classmethod
    def _named_extra_sources(cls, specs: list[str | dict[str, str]] | None) -> list[str | dict[str, str]] | None:
        parse_extra_sources(specs)  # a bad or repeated name is refused before the run starts
        return specs

    @field_validator("segmenter")
    @classmethod
    def _a_segmenter_recipe(cls, recipe: dict[str, Any] | None) -> dict[str, Any] | None:
        try:
            SegmenterConfig.from_dict(recipe)  # a misspelt field is refused before the run starts
        except TypeError as e:
            raise ValueError(f"not a segmenter recipe: {e}") from e
        return recipe

    @field_validator("split")
    @classmethod
    def _ratios_sum_to_one(cls, split: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if split is not None:
            SplitConfig(*split)  # non-negative, summing to 1, a positive train share: as the split checks them
        return split

    def prepare_kwargs(self, preset: Preset) -> dict[str, Any]:
        """The prepare-data subflow's parameters: the split is the preset's (the run's ``split`` is
        already in it), the profile follows the source unless one is named."""
        train, val, test = preset.split
        kw = self.model_dump(exclude={"split", "profile", "lung_masks", "segmenter"})
        return {**kw, "profile": self.profile or default_profile(self.source), "train": train, "val": val, "test": test}


class TrainingParams(_Params):
    """Which models train, with which settings, where, and how they are ranked."""

    preset: PresetName = "cpu"
    """named settings: smoke, cpu or paper"""
    models: list[ModelName] | None = None
    """models to train (default: the preset's)"""
    overrides: dict[ModelName, dict[str, Any]] | None = None
    """per-model training settings, e.g. {"vgg16": {"epochs": 2}}"""
    rank_by: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    """validation metric the leaderboard ranks on (test metrics are refused)"""
    max_parallel: int | None = None
    """models trained at once (default: the preset's)"""
    train_deployment: str | None = None
    """train each model as a run of this deployment, e.g. train-model/vertex-tpu"""
    dask_address: str | None = None
    """train on this Dask scheduler (prefect-dask)"""
    model_timeout_s: float | None = None
    """deadline of each model's training, in seconds"""
    pickup_timeout_s: float | None = 600
    """with train_deployment: how long a child run may wait for a worker, in seconds"""
    ensemble: int | None = None
    """average the best N trained models into one more leaderboard row (default: the preset's; 0: none)"""
    lung_fields: list[ModelName] | None = None
    """models that classify on the lung fields: the run's lung segmenter (needs data.lung_masks) blacks out the
    picture outside the lungs inside their graphs (BENCHMARKS.md, "Classification on the lung fields")"""

    def selected(self, preset: Preset) -> list[str]:
        return list(self.models or preset.models)

    def model_overrides(self, preset: Preset, segmenter_uri: str | None) -> dict[str, dict[str, Any]]:
        """``overrides`` with ``lung_fields`` set to the segmenter unit for each model named in ``lung_fields``.

        Raises ValueError when lung fields are asked for and the run has no complete segmenter (no
        ``data.lung_masks``, or its training failed), or name a model this run does not train: a model
        trained on the whole picture in their place would be published as something it is not."""
        out = {k: dict(v) for k, v in (self.overrides or {}).items()}
        if not self.lung_fields:
            return out
        absent = sorted(set(self.lung_fields) - set(self.selected(preset)))
        if absent:
            raise ValueError(f"training.lung_fields names models this run does not train: {absent}")
        if not segmenter_uri:
            raise ValueError(
                f"training.lung_fields {list(self.lung_fields)} needs the run's lung segmenter: give data.lung_masks "
                "(e.g. ../shared/data/shenzhen-cxr); the segmenter stage's log says why it is missing otherwise"
            )
        for name in self.lung_fields:
            out[name] = {**out.get(name, {}), "lung_fields": segmenter_uri}
        return out

    def fanout(self, preset: Preset) -> dict[str, Any]:
        """The train-models subflow's settings."""
        return {
            "max_parallel": self.max_parallel or preset.max_parallel,
            "train_deployment": self.train_deployment,
            "model_timeout_s": self.model_timeout_s,
            "pickup_timeout_s": self.pickup_timeout_s,
        }

    def ensemble_size(self, preset: Preset) -> int:
        return preset.ensemble if self.ensemble is None else self.ensemble


class ExternalSource(_Params):
    """An external set each trained model is scored on, and what kind of set it is."""

    uri: str
    """the set: a folder, a .zip, kaggle:owner/slug or a store prefix"""
    kind: Literal["labelled", "negative"] = "labelled"
    """labelled: folders named by the four classes; negative: known to hold no COVID (e.g. pre-pandemic), any
    finding folders, scored for the COVID false-alarm rate"""
    name: str | None = None
    """a short name for the set (default: its folder's name)"""
    about: str | None = None
    """what the set is, in a few words, shown beside its figures"""


class PromotionParams(_Params):
    """What a challenger must show before it replaces the champion."""

    champion_margin: float = 0.0
    """test accuracy the challenger must beat the champion by, on the same images"""
    covid_sensitivity_floor: float = 0.85
    """lowest test COVID sensitivity a champion may have"""
    require_significance: bool = True
    """promotion also needs McNemar's exact test against the champion at p < 0.05 (on the same images)"""
    covid_noninferiority_margin: float | None = 0.05
    """the challenger's COVID sensitivity must be non-inferior to the champion's within this (None: no check)"""
    external_sources: list[str | ExternalSource] | None = None
    """sets from elsewhere each trained model is scored on (leaderboard columns): a labelled set (folder, .zip,
    kaggle:...), 'negative:<set>' for one known to hold no COVID, or {uri, kind, name, about}"""
    external_floor: float | None = None
    """promotion needs at least this accuracy on every labelled external set (default: no gate)"""
    external_false_alarm_ceiling: float | None = Field(None, ge=0, le=1)
    """promotion needs a COVID false-alarm rate at most this on every negative external set (default: no gate)"""

    def external_sets(self) -> list[dict[str, Any]]:
        """Every external set as ``{uri, kind, name, about}`` (what the evaluation tasks take)."""
        return [
            external_set(s.model_dump() if isinstance(s, ExternalSource) else s) for s in self.external_sources or []
        ]

    def rules(self) -> dict[str, Any]:
        """The bless task's rules."""
        return {
            "margin": self.champion_margin,
            "floor": self.covid_sensitivity_floor,
            "require_significance": self.require_significance,
            "covid_noninferiority_margin": self.covid_noninferiority_margin,
            "external_floor": self.external_floor,
            "external_false_alarm_ceiling": self.external_false_alarm_ceiling,
        }


class PublishingParams(_Params):
    """What is published for the top models."""

    int8: bool | None = None
    """also publish int8-weight Core ML packages (default: the preset's)"""

    app: bool = True
    """build the run's phone app bundle (its X-ray guard and on-device models) in the run; off: the
    run is published without one, and `make app` builds it when first asked to serve the run"""

    def int8_for(self, preset: Preset) -> bool:
        return preset.int8 if self.int8 is None else self.int8


def run_preset(data: DataParams, training: TrainingParams) -> Preset:
    """The named preset, with the run's split when one is given."""
    return get_preset(training.preset, **({"split": tuple(data.split)} if data.split else {}))


def refuse_external_training(data: DataParams, promotion: PromotionParams) -> None:
    """Raise before anything runs when an extra training source is (or overlaps) an external set."""
    refuse_external(parse_extra_sources(data.extra_sources), [e["uri"] for e in promotion.external_sets()])


def refuse_lung_fields_without_masks(data: DataParams, training: TrainingParams, preset: Preset) -> None:
    """Raise before anything runs when training.lung_fields cannot be met: no mask source to train the
    segmenter on, or a model this run does not train."""
    if training.lung_fields:  # without masks there will be no segmenter: model_overrides names what is missing
        training.model_overrides(preset, "to be trained" if data.lung_masks else None)


def default_profile(source: str) -> str:
    """The Kaggle release's class counts are checked for Kaggle sources; anything else gets the
    layout-only profile unless the caller names one."""
    return "kaggle" if source.startswith("kaggle") else "any"


# -- python -m flows.retrain ------------------------------------------------------------------------
GROUPS = {"data": DataParams, "training": TrainingParams, "promotion": PromotionParams, "publishing": PublishingParams}


def cli_parser(description: str | None = None) -> argparse.ArgumentParser:
    """One option per field of every group (the data settings shared with ``python -m flows.prepare_data``)."""
    first = (description or "").split("\n\n")[0]  # the flow's docstring, without its Args
    ap = argparse.ArgumentParser(prog="python -m flows.retrain", description=first or None)
    ap.add_argument("--store", default=DEFAULT_STORE, help="store URI: a path, file://... or gs://bucket/prefix")
    _option(ap, DataParams, "source")
    _option(ap, TrainingParams, "preset", choices=sorted(PRESETS))
    _option(ap, TrainingParams, "models", nargs="*", help_extra=f": {MODEL_NAMES}")
    _option(ap, TrainingParams, "overrides", type=json.loads, help_extra=" (JSON)")
    _option(ap, DataParams, "profile")
    _option(ap, TrainingParams, "rank_by", choices=["val_accuracy", "val_loss"])
    _option(ap, TrainingParams, "max_parallel", type=int)
    _option(ap, TrainingParams, "train_deployment")
    _option(ap, TrainingParams, "dask_address")
    _option(ap, PublishingParams, "int8", action=argparse.BooleanOptionalAction)
    _option(ap, PublishingParams, "app", action=argparse.BooleanOptionalAction)
    _option(ap, PromotionParams, "champion_margin", type=float)
    _option(ap, PromotionParams, "covid_sensitivity_floor", type=float)
    _option(ap, PromotionParams, "require_significance", action=argparse.BooleanOptionalAction)
    _option(ap, PromotionParams, "covid_noninferiority_margin", type=_optional_float)
    _option(ap, DataParams, "split", type=_ratios)
    add_data_arguments(ap)
    _option(ap, DataParams, "lung_masks")
    _option(ap, DataParams, "segmenter", type=json.loads, help_extra=" (JSON)")
    _option(ap, TrainingParams, "model_timeout_s", type=float)
    _option(ap, TrainingParams, "pickup_timeout_s", type=float)
    _option(
        ap,
        PromotionParams,
        "external_sources",
        flag="--external-source",
        action="append",
        type=_external_source,
        help_extra=" (repeat; JSON for the object)",
    )
    _option(ap, PromotionParams, "external_floor", type=float)
    _option(ap, PromotionParams, "external_false_alarm_ceiling", type=float)
    _option(ap, TrainingParams, "ensemble", type=int)
    _option(ap, TrainingParams, "lung_fields", nargs="*", help_extra=f": {MODEL_NAMES}")
    return ap


def cli_parameters(argv: list[str] | None = None, description: str | None = None) -> dict[str, Any]:
    """The flow's keyword arguments from a command line: ``store`` and the four groups."""
    ap = cli_parser(description)
    a = ap.parse_args(argv)
    given = {**vars(a), **data_settings(a)}  # "0" image size and "" secret block: none
    try:
        return {"store": a.store, **{g: m(**{k: given[k] for k in m.model_fields}) for g, m in GROUPS.items()}}
    except ValidationError as e:
        ap.error("; ".join(f"--{str(x['loc'][0]).replace('_', '-')}: {x['msg']}" for x in e.errors()))


def _ratios(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def _external_source(text: str) -> str | dict[str, Any]:
    """``--external-source``: a set (``negative:`` before it for a negative one), or its JSON object."""
    return json.loads(text) if text.lstrip().startswith("{") else text


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() in ("none", "off", "") else float(text)


def _option(ap, model: type[BaseModel], name: str, *, flag: str | None = None, help_extra: str = "", **kw) -> None:
    field = model.model_fields[name]
    doc = (field.description or "").replace("%", "%%")
    ap.add_argument(
        flag or "--" + name.replace("_", "-"), dest=name, default=field.default, help=doc + help_extra, **kw
    )
