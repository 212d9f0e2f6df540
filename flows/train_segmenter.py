"""The ``train-segmenter`` flow: a lung segmenter trained on a mask source, stored as its own unit.

    python -m flows.train_segmenter --masks ../shared/data/shenzhen-cxr --store .store

The unit (``segmenters/<key>/`` in the store, see ``covid_eval.segmenter_unit``) is trained once
per mask source and recipe: a second run with the same masks and settings reuses it, and a run
killed mid-training resumes from its last epoch. The flow returns the unit's record: held-out
Dice and IoU with 95% intervals, the TFLite file's size and URI, where the card is.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields
from typing import Any

from prefect import flow

from covid_eval.segmenter_unit import SegmenterConfig
from tasks.segmenter import train_segmenter

DEFAULT_STORE = os.environ.get("COVID_STORE", ".store")


@flow(name="train-segmenter")
def train_segmenter_flow(
    masks: str, store: str = DEFAULT_STORE, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train (or reuse) the lung segmenter of the mask source ``masks`` (a folder: the Kaggle
    release's ``<CLASS>/masks`` beside ``<CLASS>/images``, ``masks/`` beside the image folders, or a
    dataset version published in a local store)."""
    return train_segmenter(masks, store, config)


def main(argv: list[str] | None = None) -> None:
    d = SegmenterConfig()
    p = argparse.ArgumentParser(
        prog="python -m flows.train_segmenter",
        description=train_segmenter_flow.description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--masks",
        required=True,
        help="mask source folder: ../shared/data/shenzhen-cxr, an unpacked Kaggle release, or a published version "
        "in a local store (.store/datasets/<version>)",
    )
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI: a path, file://... or gs://bucket/prefix")
    p.add_argument("--size", type=int, default=d.size, help="input size in pixels (divisible by 16)")
    p.add_argument("--steps", type=int, default=d.steps, help="training batches (rounded up to whole epochs)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument(
        "--no-augment",
        action="store_true",
        help="train without augmentation (for comparison: augmentation is meant to carry it to other hospitals)",
    )
    p.add_argument("--heldout", type=float, default=d.heldout, help="share of each folder's masks held out")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the held-out split and the training")
    a = p.parse_args(argv)
    names = {f.name for f in fields(SegmenterConfig)}
    config = {k: v for k, v in vars(a).items() if k in names}
    config["augment"] = not a.no_augment
    result = train_segmenter_flow(masks=a.masks, store=a.store, config=config)
    print(json.dumps({k: v for k, v in result.items() if k != "runtime"}, indent=2))


if __name__ == "__main__":
    main()
