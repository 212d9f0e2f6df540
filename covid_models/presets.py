"""Named settings for the retraining flow.

* ``smoke``: three small models (so the top-three conversion runs), tiny images, a small
  sample, one epoch: the whole flow in about a minute on 2 cores (tests, first runs);
* ``cpu``: all nine models at a size this 2-core machine trains in about an hour on the
  shared sample, with ImageNet weights wherever a local file exists;
* ``paper``: the study's settings for accelerators: 299 px, 30 epochs, batch 16 per replica,
  ImageNet weights (downloaded by Keras where absent), and the study's 80% training share with a
  held-out test set (80/10/10), so a paper run can be gated and promoted. ``split=(0.8, 0.2, 0)``
  reproduces the study's 80/20 exactly (and then cannot promote: nothing is left to judge on).

:func:`model_configs` turns a preset into one resolved training config per model; each config's
``out`` is the model's slot, keyed by covid_models.train_config.slot_key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from covid_models.builders import MODEL_NAMES, is_transfer


@dataclass(frozen=True)
class Preset:
    name: str
    models: tuple[str, ...]
    input_size: int
    epochs: int
    weights: str  # "imagenet" | "none" | "local-imagenet" (ImageNet where a local file exists, else none)
    learning_rate: float = 1e-3
    head_learning_rate: float = 1e-4  # transfer heads (the flatten->dense head overfits at 1e-3)
    patience: int = 5
    batch_size: int | None = None  # None: 16 per replica (the paper's rule)
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)
    max_per_class: int | None = None  # cap per class and split, for quick runs
    max_parallel: int = 1  # models trained at once on the embedded default
    int8: bool = True  # also publish 8-bit-weight Core ML packages
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # per model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        models=("custom_cnn", "mobilenet_v2", "vgg16"),
        input_size=64,
        epochs=1,
        weights="local-imagenet",
        max_per_class=40,
        max_parallel=2,
        int8=False,
    ),
    "cpu": Preset(
        name="cpu",
        models=MODEL_NAMES,
        input_size=128,
        epochs=30,
        weights="local-imagenet",
        max_parallel=1,
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
        max_parallel=1,  # one model per accelerator worker: fan out with the train-model deployment
    ),
}


def get_preset(name: str, **changes: Any) -> Preset:
    try:
        preset = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
    return replace(preset, **changes) if changes else preset


def model_configs(
    preset: Preset,
    split_uri: str,
    split_hash: str,
    store: str,
    models: list[str],
    overrides: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One resolved TrainConfig (as a dict) per model, its ``out`` the model's slot in ``store``:
    ``models/<split hash>/<model>-<key>``, the key hashing everything that decides the result."""
    from covid_data.store import open_store
    from covid_models.train_config import TrainConfig, slot_key
    from covid_models.weights import has_local_imagenet

    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(models))
    if unknown:
        raise ValueError(f"overrides name models that are not selected: {unknown}")
    out = []
    for name in models:
        weights = preset.weights
        if weights == "local-imagenet":
            weights = "imagenet" if has_local_imagenet(name, preset.input_size) else "none"
        cfg = TrainConfig.from_dict(
            {
                "model": name,
                "split": split_uri,
                "out": "",
                "input_size": preset.input_size,
                "epochs": preset.epochs,
                "learning_rate": preset.head_learning_rate if is_transfer(name) else preset.learning_rate,
                "batch_size": preset.batch_size,
                "patience": preset.patience,
                "weights": weights,
                "max_per_class": preset.max_per_class,
                **preset.overrides.get(name, {}),
                **overrides.get(name, {}),
            }
        )
        cfg.out = open_store(store).uri_for(f"models/{split_hash}/{name}-{slot_key(cfg)}")
        out.append(asdict(cfg))
    return out
