"""The ``prepare-data`` flow: fetch -> manifest -> publish -> validate -> split.

    python -m flows.prepare_data --source kaggle --store gs://bucket/covid
    python -m flows.prepare_data --source ../shared/data/covid19-radiography-sample \
        --store .store --profile shared-sample
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_table_artifact

from covid_data.sources import extra_sources as parse_extra_sources
from covid_data.split import SplitConfig
from tasks.credentials import DEFAULT_SECRET_BLOCK
from tasks.data import build_manifest, fetch_source, publish_dataset, split_dataset, validate_dataset

DEFAULT_SOURCE = os.environ.get("COVID_DATA_SOURCE", "kaggle")
DEFAULT_STORE = os.environ.get("COVID_STORE", ".store")


@flow(name="prepare-data")
def prepare_data(
    source: str = DEFAULT_SOURCE,
    store: str = DEFAULT_STORE,
    profile: str = "kaggle",
    image_size: int | None = 299,
    size_mismatch: Literal["warn", "fail"] = "fail",
    unreadable: Literal["exclude", "fail"] = "exclude",
    train: float = 0.7,
    val: float = 0.1,
    test: float = 0.2,
    seed: int = 42,
    near_dup_distance: int = 4,
    max_group_share: float = SplitConfig.max_group_share,
    cache_dir: str | None = None,
    kaggle_secret_block: str | None = DEFAULT_SECRET_BLOCK,
    extra_sources: list[str | dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Bring the dataset into the store, validate it and split it.

    ``extra_sources``: more labelled folders (location, or ``{"uri", "name"}``) whose images join the
    version under ``sources/<name>/``, validated each as a labelled set of its own (covid_data.sources).

    Returns the store URIs of the dataset version, its manifest, the validation result and
    the split, with the split's hash (the cache key of later steps).
    """
    extras = parse_extra_sources(extra_sources)
    staged = fetch_source(source, cache_dir, kaggle_secret_block)
    manifest_path = build_manifest(staged)
    more = []
    for extra in extras:
        extra_staged = fetch_source.with_options(name=f"fetch-source-{extra['name']}")(
            extra["uri"], cache_dir, kaggle_secret_block
        )
        more.append({**extra, "staged": extra_staged, "manifest": build_manifest(extra_staged)})
    dataset = publish_dataset(manifest_path, staged, store, more)
    validation = validate_dataset(
        dataset,
        profile,
        image_size=(image_size, image_size) if image_size else None,
        size_mismatch=size_mismatch,
        unreadable=unreadable,
    )
    split = split_dataset(
        dataset,
        {
            "train": train,
            "val": val,
            "test": test,
            "seed": seed,
            "near_dup_distance": near_dup_distance,
            "max_group_share": max_group_share,
        },
        wait_for=[validation],
    )
    create_table_artifact(
        [{"split": s, **counts} for s, counts in split["counts"].items()],
        key="split-counts",
        description=f"images per split and class, split {split['split_hash']}",
    )
    return {
        "dataset": dataset["uri"],
        "dataset_version": dataset["version"],
        "manifest": dataset["manifest_uri"],
        "validation": validation["result_uri"],
        "split": split["uri"],
        "split_hash": split["split_hash"],
        "split_counts": split["counts"],
        **({"sources": [e["name"] for e in extras]} if extras else {}),
    }


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The data settings as CLI options (shared with ``python -m flows.retrain``)."""
    d = SplitConfig()
    p.add_argument("--image-size", type=int, default=299, help="expected width and height in pixels (0: don't check)")
    p.add_argument(
        "--size-mismatch", choices=["warn", "fail"], default="fail", help="what an image of another size does"
    )
    p.add_argument(
        "--unreadable",
        choices=["exclude", "fail"],
        default="exclude",
        help="undecodable files: leave them out (up to 1%%) or fail validation",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the split")
    p.add_argument(
        "--near-dup-distance",
        type=int,
        default=d.near_dup_distance,
        help="images whose 64-bit pHashes differ in at most this many bits share a group (0: exact copies only)",
    )
    p.add_argument(
        "--max-group-share",
        type=float,
        default=d.max_group_share,
        help="a near-duplicate group larger than this share of the images (and over 20 images) is a pHash chain "
        "and is regrouped at tighter distances (1: no bound)",
    )
    p.add_argument(
        "--extra-source",
        dest="extra_sources",
        action="append",
        default=None,
        metavar="URI|JSON",
        help="another labelled folder to train on, in the same class layout (repeatable): a location or "
        '{"uri": ..., "name": ...}; its images join the version under sources/<name>/ and batches are source-balanced',
    )
    p.add_argument(
        "--kaggle-secret-block",
        default=DEFAULT_SECRET_BLOCK,
        help="Prefect Secret block with Kaggle credentials, used when the client finds none ('': never)",
    )


def data_settings(a: argparse.Namespace) -> dict[str, Any]:
    """The parsed data options of :func:`add_data_arguments`, as flow parameters."""
    return {
        "image_size": a.image_size or None,
        "size_mismatch": a.size_mismatch,
        "unreadable": a.unreadable,
        "seed": a.seed,
        "near_dup_distance": a.near_dup_distance,
        "max_group_share": a.max_group_share,
        "kaggle_secret_block": a.kaggle_secret_block or None,
        "extra_sources": [json.loads(x) if x.lstrip().startswith("{") else x for x in a.extra_sources or []] or None,
    }


def main(argv: list[str] | None = None) -> None:
    d = SplitConfig()
    p = argparse.ArgumentParser(
        prog="python -m flows.prepare_data",
        description=prepare_data.description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--source", default=DEFAULT_SOURCE, help="kaggle[:owner/slug], a folder, a .zip or a store prefix")
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI: a path, file://... or gs://bucket/prefix")
    p.add_argument("--profile", default="kaggle", help="validation profile: kaggle, shared-sample or any")
    p.add_argument(
        "--split",
        default=f"{d.train},{d.val},{d.test}",
        help="train,val,test ratios, summing to 1 (the paper: 0.8,0.2,0)",
    )
    p.add_argument(
        "--cache-dir", default=None, help="download/unpack cache (unset: $COVID_CACHE_DIR or ~/.cache/covid-xray)"
    )
    add_data_arguments(p)
    a = p.parse_args(argv)
    train, val, test = (float(x) for x in a.split.split(","))
    result = prepare_data(
        source=a.source,
        store=a.store,
        profile=a.profile,
        train=train,
        val=val,
        test=test,
        cache_dir=a.cache_dir,
        **data_settings(a),
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
