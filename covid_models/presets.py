"""Named settings for the retraining flow.

* ``smoke``: three small models (so the top-three conversion runs), tiny images, a small
  sample, one epoch: the whole flow in about a minute on 2 cores (tests, first runs);
* ``cpu``: all nine models at a size this 2-core machine trains in about an hour on the
  shared sample, with ImageNet weights wherever a local file exists;
* ``paper``: the study's settings for accelerators: 299 px, 30 epochs, batch 16 per replica,
  ImageNet weights (downloaded by Keras where absent), and the study's 80% training share with a
  held-out test set (80/10/10), so a paper run can be gated and promoted. ``split=(0.8, 0.2, 0)``
  reproduces the study's 80/20 exactly (and then cannot promote: nothing is left to judge on).

:func:`plan_models` turns a preset into one resolved training config per model that can train (and
a skip record, with the reason, per transfer model without its ImageNet file); each config's
``out`` is the model's slot, keyed by covid_models.train_config.slot_key. Its ``device`` is the one
this process would train on (covid_models.strategy.probe_device: ``COVID_DEVICE``, else what it
finds); :func:`for_device` re-keys a planned config for trainings sent elsewhere (a deployment on
a TPU host).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from covid_data.store import open_store
from covid_models.builders import MODEL_NAMES, is_transfer
from covid_models.strategy import AUTO, probe_device
from covid_models.train_config import TrainConfig, slot_key
from covid_models.weights import MissingWeightsError, local_imagenet


@dataclass(frozen=True)
class Preset:
    name: str
    models: tuple[str, ...]
    input_size: int
    epochs: int
    weights: str  # "imagenet" | "scratch": what the transfer models start from
    # A transfer model whose ImageNet file is neither local nor downloadable: "skip" it (with the
    # reason, naming the file), train it from "scratch" (every layer), or "fail" the run.
    missing_weights: str = "skip"
    learning_rate: float = 1e-3
    head_learning_rate: float = 1e-4  # transfer heads (the flatten->dense head overfits at 1e-3)
    patience: int = 5
    batch_size: int | None = None  # None: 16 per replica (the paper's rule)
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    max_per_class: int | None = None  # cap per class and split, for quick runs
    max_parallel: int = 1  # models trained at once on the embedded default
    int8: bool = True  # also publish 8-bit-weight Core ML packages
    ensemble: int = 0  # average the best N trained models into one more leaderboard row (0: none)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # per model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        models=("custom_cnn", "mobilenet_v2", "vgg16"),
        input_size=64,
        epochs=1,
        weights="imagenet",
        missing_weights="scratch",  # three models whatever files exist, so the top-three conversion runs
        max_per_class=40,
        max_parallel=2,
        int8=False,
    ),
    "cpu": Preset(
        name="cpu",
        models=MODEL_NAMES,
        input_size=128,
        epochs=30,
        weights="imagenet",
        missing_weights="skip",
        max_parallel=1,
        ensemble=3,
        # The recipes the accuracy benchmark chose on validation (BENCHMARKS.md, "Accuracy"):
        overrides={
            # 3 head epochs on cached 224 px features, then every layer fine-tuned at 1e-5 on images with
            # the acquisition augmentation (chosen on validation for accuracy over clean and shifted images)
            "mobilenet_v2": {
                "input_size": 224,
                "epochs": 3,
                "patience": 3,
                "fine_tune_layers": 1000,
                "fine_tune_epochs": 8,
                "fine_tune_learning_rate": 1e-5,
                "fine_tune_augment": True,
                "augment_recipe": "acquisition",
                # Two runs then fine-tune alike (unlike the stateful augmentation in a parallel map without it),
                # at no measurable cost on 2 cores (BENCHMARKS.md, "Op determinism")
                "op_determinism": True,
            },
            # 128 px, not 160: as good on validation and the external set over three seeds, and a third
            # smaller (6.5 MB at int8), which the phone downloads first (BENCHMARKS.md, "A smaller custom CNN")
            "custom_cnn": {"input_size": 128, "patience": 6},
        },
    ),
    "paper": Preset(
        name="paper",
        models=MODEL_NAMES,
        input_size=299,
        epochs=30,
        weights="imagenet",
        learning_rate=1e-3,
        head_learning_rate=1e-4,
        split=(0.8, 0.1, 0.1),
        ensemble=3,
        max_parallel=1,  # one model per accelerator worker: fan out with the train-model deployment
    ),
}


def get_preset(name: str, **changes: Any) -> Preset:
    try:
        preset = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
    return replace(preset, **changes) if changes else preset


MISSING_WEIGHTS = ("skip", "scratch", "fail")


def _starting_weights(preset: Preset, name: str, size: int, chosen: str | None) -> tuple[str | None, str | None]:
    """(weights, skip reason) of one model under the preset's weights policy."""

    weights = chosen or preset.weights
    if not is_transfer(name):
        return "none", None
    if weights != "imagenet":
        return weights, None
    try:
        local_imagenet(name, size)
        return "imagenet", None
    except MissingWeightsError as e:
        if preset.missing_weights == "scratch":
            return "scratch", None
        if preset.missing_weights == "fail":
            raise
        return None, f"skipped: {e}"


def plan_models(
    preset: Preset,
    split_uri: str,
    split_hash: str,
    store: str,
    models: list[str],
    overrides: dict[str, dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(configs, skipped): one resolved TrainConfig (as a dict) per model that can train, its ``out``
    the model's slot in ``store`` (``models/<split hash>/<model>-<key>``, the key hashing everything
    that decides the result); and a ``{"model", "status": "skipped", "error"}`` record per transfer
    model whose ImageNet weights are missing under ``missing_weights="skip"``."""

    if preset.missing_weights not in MISSING_WEIGHTS:
        raise ValueError(f"missing_weights must be one of {MISSING_WEIGHTS}, not {preset.missing_weights!r}")
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(models))
    if unknown:
        raise ValueError(f"overrides name models that are not selected: {unknown}")
    out, skipped = [], []
    device = probe_device() if models else AUTO  # once per plan: it may import TensorFlow
    for name in models:
        chosen = {**preset.overrides.get(name, {}), **overrides.get(name, {})}
        size = chosen.get("input_size", preset.input_size)
        weights, reason = _starting_weights(preset, name, size, chosen.get("weights"))
        if reason:
            skipped.append({"model": name, "status": "skipped", "error": reason, "out": None})
            continue
        from_scratch = weights == "scratch"
        cfg = TrainConfig.from_dict(
            {
                "model": name,
                "split": split_uri,
                "out": "",
                "input_size": preset.input_size,
                "epochs": preset.epochs,
                # heads on a pretrained backbone learn slower; whole networks at the preset's rate
                "learning_rate": preset.head_learning_rate
                if is_transfer(name) and not from_scratch
                else preset.learning_rate,
                "batch_size": preset.batch_size,
                "patience": preset.patience,
                "max_per_class": preset.max_per_class,
                "device": device,  # an override may name another (where the model trains)
                **chosen,
                "weights": weights,  # as resolved by the policy
            }
        )
        cfg.out = open_store(store).uri_for(f"models/{split_hash}/{name}-{slot_key(cfg)}")
        out.append(asdict(cfg))
    return out, skipped


def for_device(config: dict[str, Any], device: str) -> dict[str, Any]:
    """A planned config (a TrainConfig dict) for training on ``device`` (``cpu``, ``gpu``,
    ``multi-gpu:N``, ``tpu:N``): the device set and the slot re-keyed next to the planned one
    (``<model>-<key>`` in the same folder). Unchanged when it is already for that device."""
    cfg = TrainConfig.from_dict({**config, "device": device})
    if cfg.device == TrainConfig.from_dict(config).device:
        return config
    if cfg.device == AUTO:
        raise ValueError(f"{cfg.model}: a planned config needs a device, not {AUTO!r}")
    folder = str(config["out"]).rstrip("/").rsplit("/", 1)[0]
    cfg.out = f"{folder}/{cfg.model}-{slot_key(cfg)}"
    return asdict(cfg)


def model_configs(
    preset: Preset,
    split_uri: str,
    split_hash: str,
    store: str,
    models: list[str],
    overrides: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The configs of :func:`plan_models` (the models that can train)."""
    return plan_models(preset, split_uri, split_hash, store, models, overrides)[0]
