"""The ``evaluate`` flow: score a published model on someone else's labelled X-rays, or, with
``--negative``, on X-rays known not to be COVID (its COVID false-alarm rate).

resolve-model -> fetch-source -> build-manifest -> publish-dataset -> validate-external
-> find-duplicates -> score-model -> write-evaluation

    python -m flows.evaluate --model champion --source ./their-xrays --store .store
    python -m flows.evaluate --model 20260101T030000Z-1a2b3c4d/mobilenet_v2 --source kaggle:owner/slug
    python -m flows.evaluate --model .store/models/<split hash>/<model>-<key> --source their-xrays.zip
    python -m flows.evaluate --model champion --source ../shared/data/shenzhen-cxr --negative

The result is stored under ``evaluations/<model key>/<dataset version>/`` (see
covid_eval.external; a negative set's under ``<dataset version>-negative/``, see covid_eval.negative)
and shown as the ``external-evaluation`` artifact.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from prefect import flow, get_run_logger

from covid_eval.external import DEFAULT_NEAR_DUP_DISTANCE, summary
from flows.prepare_data import DEFAULT_STORE
from tasks.credentials import DEFAULT_SECRET_BLOCK
from tasks.data import build_manifest, fetch_source, publish_dataset
from tasks.evaluation import (
    find_duplicates,
    find_evaluation,
    publish_report,
    resolve_model,
    score_model,
    validate_external,
    write_evaluation,
)


@flow(name="evaluate")
def evaluate(
    source: str,
    model: str = "champion",
    store: str = DEFAULT_STORE,
    include_duplicates: bool = False,
    near_dup_distance: int = DEFAULT_NEAR_DUP_DISTANCE,
    cache_dir: str | None = None,
    kaggle_secret_block: str | None = DEFAULT_SECRET_BLOCK,
    negative: bool = False,
) -> dict[str, Any]:
    """Score a published model (champion, <run id>/<model> or a model slot URI) on a labelled set
    (a folder, a .zip, kaggle:owner/slug or a store prefix) and store the metrics with intervals,
    the confusion matrix and the change against the model's own test metrics. Images that are exact
    or near copies of the model's training images are reported and left out unless
    include_duplicates. With negative, the set is known to hold no COVID (e.g. pre-pandemic X-rays,
    in finding folders of any name): every image is scored and the figure is the share called COVID
    (the COVID false-alarm rate), per finding folder and overall."""
    target = resolve_model(model, store)
    staged = fetch_source(source, cache_dir, kaggle_secret_block)
    dataset = publish_dataset(build_manifest(staged, negative=negative), staged, store)
    settings = {"include_duplicates": include_duplicates, "near_dup_distance": near_dup_distance}
    done = find_evaluation(store, target, dataset, **settings, negative=negative)
    if done is not None:
        get_run_logger().info("already evaluated: %s (nothing recomputed)", done["uri"])
        publish_report(done)
        return summary(done)
    validation = validate_external(dataset, negative=negative)
    duplicates = find_duplicates(store, target, dataset, **settings, negative=negative)
    scores = score_model(store, target, dataset, duplicates, cache_dir, negative=negative)
    return write_evaluation(store, target, dataset, validation, duplicates, scores, **settings, negative=negative)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m flows.evaluate",
        description=evaluate.description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", default="champion", help="champion, <run id>/<model> or a model slot URI (with metrics.json)"
    )
    p.add_argument(
        "--source",
        required=True,
        help="the labelled set: a folder or .zip (Kaggle layout or <CLASS>/*.png), kaggle:owner/slug or a store prefix",
    )
    p.add_argument(
        "--negative",
        action="store_true",
        help="the set is known to hold no COVID (e.g. pre-pandemic X-rays in <FINDING>/*.png folders of any name; "
        "masks/ is ignored): score every image and report the COVID false-alarm rate",
    )
    p.add_argument("--store", default=DEFAULT_STORE, help="store URI: a path, file://... or gs://bucket/prefix")
    p.add_argument(
        "--include-duplicates",
        action="store_true",
        help="also score images that are copies of the model's training images (they are listed either way)",
    )
    p.add_argument(
        "--near-dup-distance",
        type=int,
        default=DEFAULT_NEAR_DUP_DISTANCE,
        help="an image whose 64-bit pHash is within this many bits of a training image's is a near duplicate "
        "(0: exact copies only)",
    )
    p.add_argument(
        "--cache-dir", default=None, help="download/unpack cache (unset: $COVID_CACHE_DIR or ~/.cache/covid-xray)"
    )
    p.add_argument(
        "--kaggle-secret-block",
        default=DEFAULT_SECRET_BLOCK,
        help="Prefect Secret block with Kaggle credentials, used when the client finds none ('': never)",
    )
    a = p.parse_args(argv)
    out = evaluate(
        source=a.source,
        model=a.model,
        store=a.store,
        include_duplicates=a.include_duplicates,
        near_dup_distance=a.near_dup_distance,
        cache_dir=a.cache_dir,
        kaggle_secret_block=a.kaggle_secret_block or None,
        negative=a.negative,
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
