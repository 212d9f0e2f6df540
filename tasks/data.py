"""Tasks of the data half: fetch -> manifest -> publish -> validate -> split.

Between tasks only small records travel (local paths of staged files, store URIs, counts).
"""

from __future__ import annotations

import json
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from covid_data.dataset import (
    DatasetRef,
    Staged,
    default_cache_dir,
    manifest_of,
    parse_source,
    publish_version,
    stage_source,
)
from covid_data.manifest import read_parquet_bytes, to_parquet_bytes
from covid_data.negative import negative_manifest_of
from covid_data.sources import MAIN as MAIN_SOURCE
from covid_data.sources import prefixed, source_of
from covid_data.split import SplitConfig, write_split
from covid_data.store import open_store
from covid_data.validation import DataValidationError, get_profile, validate_manifest
from tasks.credentials import DEFAULT_SECRET_BLOCK, prefect_secret_credentials


def _progress_reporter(description: str):
    artifact_id = create_progress_artifact(0.0, description=description)

    def report(done: int, total: int) -> None:
        update_progress_artifact(artifact_id, 100.0 * done / max(total, 1))

    return report


@task(name="fetch-source", retries=2, retry_delay_seconds=[10, 60])
def fetch_source(
    source: str, cache_dir: str | None = None, secret_block: str | None = DEFAULT_SECRET_BLOCK
) -> dict[str, Any]:
    """Download (Kaggle), unpack (zip) or locate (folder, store prefix) the source images.

    Kaggle credentials the client does not find itself come from the Prefect Secret block
    ``secret_block`` (None: anonymous access only)."""
    staged = stage_source(
        parse_source(source),
        Path(cache_dir) if cache_dir else default_cache_dir(),
        kaggle_credentials=prefect_secret_credentials(secret_block),
    )
    get_run_logger().info("source %s staged at %s", staged.source, staged.root)
    return asdict(staged)


@task(name="build-manifest")
def build_manifest(staged: dict[str, Any], workers: int | None = None, negative: bool = False) -> str:
    """Inspect every file; returns the path of the manifest (a local Parquet scratch file).
    ``negative``: a set known to hold no COVID, in finding folders (``covid_data.negative``)."""
    s = Staged(**staged)
    read = negative_manifest_of if negative else manifest_of
    manifest = read(s, workers=workers, progress=_progress_reporter("inspecting images"))
    out = Path(tempfile.gettempdir()) / "covid-xray-manifests" / f"{uuid.uuid4().hex}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(to_parquet_bytes(manifest))
    get_run_logger().info(
        "manifest: %d files, %d undecodable; classes %s; lung masks: %d used, %d not usable",
        len(manifest),
        int(manifest["error"].notna().sum()),
        manifest["label"].value_counts().to_dict(),
        int(manifest["mask_path"].notna().sum()),
        int(manifest["mask_error"].notna().sum()),
    )
    return str(out)


@task(name="publish-dataset", retries=2, retry_delay_seconds=[10, 60])
def publish_dataset(
    manifest_path: str, staged: dict[str, Any], store: str, extras: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Upload the images and manifest as a content-addressed dataset version.

    ``extras``: ``{name, staged, manifest}`` of each extra source, whose rows join the version under
    ``sources/<name>/`` (``covid_data.sources``)."""
    manifest = read_parquet_bytes(Path(manifest_path).read_bytes())
    extras = extras or []
    if extras:
        parts = [prefixed(read_parquet_bytes(Path(e["manifest"]).read_bytes()), e["name"]) for e in extras]
        manifest = pd.concat([manifest, *parts], ignore_index=True).sort_values("path", kind="stable")
    ref = publish_version(
        open_store(store),
        manifest.reset_index(drop=True),
        Path(staged["root"]),
        source=staged["source"],
        extra={e["name"]: Staged(**e["staged"]) for e in extras},
    )
    return ref.to_dict()


@task(name="validate-dataset")
def validate_dataset(dataset: dict[str, Any], profile: str = "kaggle", **overrides: Any) -> dict[str, Any]:
    """Run the expectation suite; save the result and a summary; fail on a critical finding."""
    ref = DatasetRef(**{k: dataset[k] for k in DatasetRef.__dataclass_fields__})
    store = open_store(ref.store)
    cfg = get_profile(profile, **overrides)
    manifest = read_parquet_bytes(store.read_bytes(f"{ref.prefix}/manifest.parquet"))
    source = source_of(manifest["path"])
    # The profile's counts are the main source's; an extra source is someone else's labelled set (any
    # size, a class may be absent, no other class) and is checked as one.
    checks = [(MAIN_SOURCE, profile, cfg, f"{ref.prefix}/validation/{profile}-{cfg.fingerprint()}")]
    extra_cfg = get_profile("external", unreadable=cfg.unreadable)
    for name in sorted(set(source) - {MAIN_SOURCE}):
        where = f"{ref.prefix}/validation/sources/{name}/external-{extra_cfg.fingerprint()}"
        checks.append((name, "external", extra_cfg, where))
    logger = get_run_logger()
    failures, excluded, results = [], 0, {}
    for name, profile_name, check_cfg, prefix in checks:
        report = validate_manifest(manifest[source == name].reset_index(drop=True), check_cfg)
        where = ref.uri if name == MAIN_SOURCE else f"{ref.uri} (extra source {name!r})"
        summary = report.summary_markdown(where)
        # Reports are derived and re-derivable; replacing one never touches the dataset itself.
        store.put_text(f"{prefix}/result.json", report.to_json(), overwrite=True)
        store.put_text(f"{prefix}/summary.md", summary, overwrite=True)
        key = "data-validation" if name == MAIN_SOURCE else f"data-validation-{name.replace('_', '-')}"
        create_markdown_artifact(summary, key=key, description=f"validation of {ref.version} ({name}, {profile_name})")
        for w in report.warnings:
            logger.warning("validation warning (%s): %s (%s)", name, w.description, w.observed)
        if report.excluded:
            logger.warning("%d undecodable files of %s excluded from the split", len(report.excluded), name)
        excluded += len(report.excluded)
        results[name] = store.uri_for(f"{prefix}/result.json")
        if not report.success:
            failures.append(report.failure_message(where) + f"\nfull report: {store.uri_for(prefix)}")
    if failures:
        raise DataValidationError("\n\n".join(failures))
    out = {"success": True, "result_uri": results[MAIN_SOURCE], "excluded": excluded}
    return {**out, "sources": results} if len(results) > 1 else out


@task(name="split-dataset")
def split_dataset(dataset: dict[str, Any], split: dict[str, Any] | None = None) -> dict[str, Any]:
    """Stratified, leak-free train/val/test split, stored with its own hash; assignments of
    images an earlier split of the same settings placed are carried forward."""
    store = open_store(dataset["store"])
    manifest = read_parquet_bytes(store.read_bytes(f"datasets/{dataset['version']}/manifest.parquet"))
    ref = write_split(store, dataset["version"], manifest, SplitConfig(**(split or {})))
    get_run_logger().info(
        "split %s: %s (%d duplicate groups kept together, the largest of %d images; %d images carried from split %s)",
        ref.split_hash,
        json.dumps({k: sum(v.values()) for k, v in ref.counts.items()}),
        ref.duplicate_groups,
        ref.largest_group,
        ref.carried,
        ref.parent,
    )
    return ref.to_dict()
