"""Fetch a dataset from its source and publish it as a content-addressed version in the store.

Sources (``parse_source``):

* ``kaggle`` or ``kaggle:owner/slug[/version]``: downloaded with the kaggle client;
* a local folder in the Kaggle or flat layout, or a ``.zip`` of one;
* a store prefix (``gs://…``, ``file://…`` or a path) that already holds a dataset version
  (it has a ``manifest.parquet``), or raw images in one of the layouts.

Store layout of a version (``datasets/<version>/``): ``images/<label>/<file>`` (an extra source's
under ``sources/<name>/images/...``: ``covid_data.sources``), then
``dataset.json`` and, written last and create-only as the completion marker,
``manifest.parquet``. The version is a hash of the manifest, so two different datasets never
share a prefix. A version without its marker is an interrupted attempt whose objects the next
attempt replaces; nothing under a complete version is ever written again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from covid_data.archive import safe_extract_zip
from covid_data.kaggle_download import DEFAULT_DATASET, CredentialsProvider, download_dataset_archive
from covid_data.manifest import (
    build_manifest,
    dataset_version,
    discover,
    read_parquet_bytes,
    to_parquet_bytes,
    with_mask_columns,
)
from covid_data.sources import MAIN as MAIN_SOURCE
from covid_data.sources import source_counts, source_of
from covid_data.store import ObjectExistsError, Store, md5_file, open_store

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
Progress = Callable[[int, int], None]


def default_cache_dir() -> Path:
    return Path(os.environ.get("COVID_CACHE_DIR", Path.home() / ".cache" / "covid-xray")).expanduser()


@dataclass(frozen=True)
class Source:
    kind: str  # "kaggle" | "folder" | "zip" | "store"
    location: str

    def describe(self) -> str:
        return f"{self.kind}:{self.location}"


def parse_source(spec: str) -> Source:
    spec = str(spec).strip()
    if spec == "kaggle":
        return Source("kaggle", DEFAULT_DATASET)
    if spec.startswith("kaggle:"):
        return Source("kaggle", spec.removeprefix("kaggle:").strip("/"))
    if spec.startswith(("gs://", "file://")):
        return Source("store", spec)
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix.lower() == ".zip":
        return Source("zip", str(p.resolve()))
    if p.is_dir():
        if (p / MANIFEST).is_file():
            return Source("store", str(p.resolve()))
        return Source("folder", str(p.resolve()))
    raise FileNotFoundError(
        f"data source {spec!r} is neither 'kaggle[:owner/slug]', a gs:// or file:// prefix, "
        "an existing folder nor a .zip file"
    )


@dataclass(frozen=True)
class DatasetRef:
    """A published dataset version: what travels between pipeline steps."""

    store: str
    version: str
    n_images: int
    uploaded: int
    skipped: int
    source: str

    @property
    def prefix(self) -> str:
        return f"datasets/{self.version}"

    @property
    def uri(self) -> str:
        return open_store(self.store).uri_for(self.prefix)

    @property
    def manifest_uri(self) -> str:
        return open_store(self.store).uri_for(f"{self.prefix}/{MANIFEST}")

    def to_dict(self) -> dict:
        return {**asdict(self), "uri": self.uri, "manifest_uri": self.manifest_uri}


def load_manifest(store: Store, version: str) -> pd.DataFrame:
    return read_parquet_bytes(store.read_bytes(f"datasets/{version}/{MANIFEST}"))


# -- staging: bring any source to a local folder -------------------------------------------
@dataclass(frozen=True)
class Staged:
    """A source brought to a local folder."""

    root: str
    source: str
    # Where the manifest of this exact content is cached, when the folder is keyed by content.
    manifest_cache: str | None = None


def _extract_cached(archive: Path, cache: Path) -> Path:
    """Unpack once per archive content; a completed unpack is marked and reused."""
    digest = md5_file(archive)[:16]
    target = cache / "unpacked" / digest
    if (target / ".complete").exists():
        log.info("reusing unpacked archive %s", target)
        return target
    tmp = cache / "unpacked" / f".{digest}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    safe_extract_zip(archive, tmp)
    (tmp / ".complete").write_text(archive.name)
    shutil.rmtree(target, ignore_errors=True)  # only ever an incomplete leftover of ours
    os.replace(tmp, target)
    return target


def _stage_store_prefix(uri: str, cache: Path) -> Path:
    src = open_store(uri)
    target = cache / "store" / hashlib.sha256(src.uri.encode()).hexdigest()[:16]
    checksums = src.checksums()
    if not checksums:
        raise FileNotFoundError(f"store prefix {src.uri} holds no objects")
    for key, md5 in checksums.items():
        dest = target / key
        if not (dest.exists() and md5_file(dest) == md5):
            src.get_file(key, dest)
    return target


def stage_source(source: Source, cache_dir: Path, *, kaggle_credentials: CredentialsProvider | None = None) -> Staged:
    """Bring ``source`` to a local folder (downloading and unpacking where needed).

    ``kaggle_credentials`` is asked for credentials only when the kaggle client finds none of
    its own (environment, kaggle.json); the orchestrator passes its secret store here."""
    cache_dir = Path(cache_dir)
    desc = source.describe()
    if source.kind == "folder":
        return Staged(source.location, desc)
    if source.kind == "zip":
        root = _extract_cached(Path(source.location), cache_dir / "zip")
        return Staged(str(root), desc, str(root / ".manifest.parquet"))
    if source.kind == "kaggle":
        kdir = cache_dir / "kaggle" / source.location.replace("/", "__")
        dl = download_dataset_archive(source.location, kdir, credentials=kaggle_credentials)
        root = _extract_cached(dl.archive, kdir)
        return Staged(str(root), desc, str(root / ".manifest.parquet"))
    if source.kind == "store":
        local = open_store(source.location).local_path("")
        root = local if local is not None else _stage_store_prefix(source.location, cache_dir)
        return Staged(str(root), desc)
    raise ValueError(f"unknown source kind {source.kind!r}")


def manifest_of(staged: Staged, *, workers: int | None = None, progress: Progress | None = None) -> pd.DataFrame:
    """The manifest of a staged folder: read from a published version, from the content
    cache, or built by inspecting every file."""
    root = Path(staged.root)
    if (root / MANIFEST).is_file():  # a published version: its manifest is authoritative
        manifest = with_mask_columns(pd.read_parquet(root / MANIFEST))
        return manifest.assign(source_path=manifest["path"], mask_source_path=manifest["mask_path"])
    if staged.manifest_cache and Path(staged.manifest_cache).is_file():
        manifest = pd.read_parquet(staged.manifest_cache)
        if "mask_path" in manifest.columns:  # one cached before masks were read is built again
            log.info("reusing the manifest of the unchanged archive (%d images)", len(manifest))
            return manifest
    files = discover(root)
    if not files:
        raise FileNotFoundError(f"no image files under {root}")
    log.info("inspecting %d files under %s", len(files), root)
    manifest = build_manifest(files, workers=workers, progress=progress)
    if staged.manifest_cache:
        tmp = Path(staged.manifest_cache).with_suffix(".partial")
        manifest.to_parquet(tmp, index=False)
        os.replace(tmp, staged.manifest_cache)
    return manifest


# -- publishing ----------------------------------------------------------------------------
def publish_version(
    store: Store,
    manifest: pd.DataFrame,
    files_root: Path,
    *,
    source: str,
    progress: Progress | None = None,
    extra: Mapping[str, Staged] | None = None,
) -> DatasetRef:
    """Upload images, then ``dataset.json``, then the manifest (the commit marker).

    ``extra``: the staged extra sources by name, whose rows (under ``sources/<name>/``) are read
    from their own folders (``covid_data.sources``)."""
    extra = dict(extra or {})
    roots = {MAIN_SOURCE: Path(files_root), **{n: Path(s.root) for n, s in extra.items()}}

    def local_files(paths: pd.Series, source_paths: pd.Series) -> list[tuple[str, Path]]:
        return [(f"{prefix}/{p}", roots[n] / s) for p, s, n in zip(paths, source_paths, source_of(paths), strict=True)]

    version = dataset_version(manifest)
    prefix = f"datasets/{version}"
    if store.exists(f"{prefix}/{MANIFEST}"):
        log.info("dataset version %s is already in %s: nothing uploaded", version, store.uri)
        return DatasetRef(store.uri, version, len(manifest), 0, len(manifest), source)

    unknown = sorted(set(source_of(manifest["path"])) - set(roots))
    if unknown:
        raise ValueError(f"the manifest has rows of sources {unknown} whose folders were not given")
    items = local_files(manifest["path"], manifest["source_path"])
    # Images need no overwrite: the version hashes every path's sha256, so an image an interrupted
    # attempt left is byte-identical (and skipped) or a corruption worth an error.
    # One listing for the checksums of what is already there (extra sources lie beside images/).
    written, skipped = store.put_many(items, prefix=prefix if extra else f"{prefix}/images")
    masks = with_mask_columns(manifest)
    masks = masks[masks["mask_path"].notna()]
    if len(masks):
        mask_items = local_files(masks["mask_path"], masks["mask_source_path"])
        w, k = store.put_many(mask_items, prefix=prefix if extra else f"{prefix}/masks")
        written, skipped = written + w, skipped + k
    if progress:
        progress(len(items), len(items))
    meta = {
        "version": version,
        "source": source,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "n_images": len(manifest),
        "class_counts": {str(k): int(v) for k, v in manifest["label"].value_counts().sort_index().items()},
        "undecodable": int(manifest["error"].notna().sum()),
        "lung_masks": len(masks),
        "lung_masks_not_used": int(with_mask_columns(manifest)["mask_error"].notna().sum()),
    }
    if extra:  # where each source's images came from, and how many
        counts = source_counts(manifest)
        meta["sources"] = {
            MAIN_SOURCE: {"source": source, "n_images": counts.get(MAIN_SOURCE, 0)},
            **{n: {"source": s.source, "n_images": counts.get(n, 0)} for n, s in extra.items()},
        }
    # No marker yet: whatever an interrupted attempt left here is replaced, not trusted.
    store.put_text(f"{prefix}/dataset.json", json.dumps(meta, indent=2), overwrite=True)
    try:
        store.put_bytes(f"{prefix}/{MANIFEST}", to_parquet_bytes(manifest))  # create-only, last
    except ObjectExistsError:
        # A concurrent run completed this version first. Its manifest describes the same content
        # (the version is its hash); only the parquet bytes may differ between library versions.
        log.info("dataset version %s was completed concurrently in %s; keeping that one", version, store.uri)
    log.info(
        "published dataset version %s to %s: %d files uploaded, %d already there", version, store.uri, written, skipped
    )
    return DatasetRef(store.uri, version, len(manifest), written, skipped, source)


def fetch_dataset(
    source_spec: str,
    store_uri: str,
    *,
    cache_dir: Path | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    kaggle_credentials: CredentialsProvider | None = None,
    build_manifest: Callable[..., pd.DataFrame] | None = None,
) -> DatasetRef:
    """Bring the dataset from ``source_spec`` into the store as a content-addressed version
    (the three steps the ``prepare-data`` flow runs as separate tasks). ``build_manifest``
    replaces :func:`manifest_of` for sets of another layout (negative sets)."""
    staged = stage_source(
        parse_source(source_spec),
        Path(cache_dir) if cache_dir else default_cache_dir(),
        kaggle_credentials=kaggle_credentials,
    )
    manifest = (build_manifest or manifest_of)(staged, workers=workers, progress=progress)
    return publish_version(open_store(store_uri), manifest, Path(staged.root), source=staged.source)
