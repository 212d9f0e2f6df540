"""The command line of ``python -m covid_models.train`` (its flags; ``train.main`` runs it), without Prefect.

    python -m covid_models.train --model mobilenet_v2 --split <split.parquet URI> --out <store URI> \\
        [--input-size 224] [--epochs 30] [--weights imagenet|scratch|PATH] ...
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import fields

from covid_models.builders import MODEL_NAMES
from covid_models.train_config import HELP, TrainConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m covid_models.train",
        description="Train and evaluate one model on a split; artefacts go to --out, metrics.json last.",
    )
    p.add_argument("--config", help="a JSON file of training settings (then the flags below are ignored)")
    p.add_argument("--result-file", help="also write the result record as JSON to this file")
    p.add_argument("--model", choices=MODEL_NAMES, help="which of the nine architectures to train")
    p.add_argument("--split", help="URI of a split.parquet written by the prepare-data flow")
    p.add_argument("--out", help="store URI of this model's slot (a path, file://... or gs://...)")
    defaults = TrainConfig(model=MODEL_NAMES[0], split="", out="")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name in ("model", "split", "out"):
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        text = f"{HELP[f.name]} (default: {default})"
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
            continue
        base = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
        p.add_argument(flag, type=base[0], default=default, help=text)
    return p
