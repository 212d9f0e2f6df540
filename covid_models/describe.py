"""What a trained model started from and what trained, in words, wherever a model is shown."""

from __future__ import annotations

from typing import Any

from covid_models.builders import is_transfer
from covid_models.ensemble import describe_members, is_ensemble
from covid_models.lung_fields import MARGIN


def describe_weights(model: str, config: dict[str, Any], weights: dict[str, Any] | None = None) -> str:
    """Starting weights and what trained, in words (e.g. "ImageNet weights (sha256 1a2b...), backbone frozen"),
    and what the model sees when it classifies on the lung fields."""
    text = _weights(model, config, weights)
    if config.get("lung_fields"):
        key = str(config["lung_fields"]).rstrip("/").rsplit("/", 1)[-1]
        text += (  # covid_models.lung_fields: the block inside the model
            f"; classifies on the lung fields: the picture outside the lungs that segmenter {key} finds (grown by "
            f"{MARGIN} of its pixels, edge softened) is blacked out inside the model"
        )
    if config.get("blur_sigma"):
        text += f"; blurred inside the model: a fixed Gaussian of sigma {config['blur_sigma']:g} of its input pixels"
    if config.get("equalize"):
        text += "; histogram-equalised inside the model: each X-ray mapped through its own cumulative histogram"
    return text


def _weights(model: str, config: dict[str, Any], weights: dict[str, Any] | None) -> str:
    if is_ensemble(model):
        return describe_members(config)
    if not is_transfer(model):
        return "trained from scratch (all layers)"
    w = weights or {"kind": "imagenet" if config.get("weights") == "imagenet" else config.get("weights")}
    if w.get("kind") == "imagenet":
        start = "ImageNet weights" + (
            f" (sha256 {w['sha256'][:12]})" if w.get("sha256") not in (None, "download") else ""
        )
    elif w.get("kind") == "scratch" or config.get("weights") == "scratch":
        pooled = " (pooled head)" if config.get("head") == "pooled" else ""
        return f"trained from scratch: random initialisation, every layer trained{pooled}"
    elif w.get("kind") in ("none", None) or config.get("weights") == "none":
        start = "random initialisation"
    else:
        start = f"weights from `{w.get('file')}`" + (f" (sha256 {w['sha256'][:12]})" if w.get("sha256") else "")
    ft = int(config.get("fine_tune_layers") or 0) if config.get("fine_tune_epochs") else 0
    head = "pooled head" if config.get("head") == "pooled" else "head"
    trained = f"backbone frozen, {head} trained"
    if ft:
        trained = f"{head} trained, then the top {ft} backbone layers fine-tuned"
    return f"{start}; {trained}"
