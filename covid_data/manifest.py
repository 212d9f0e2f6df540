"""The manifest: one row per image file, with its label, content hash and decoded properties.

Accepted layouts (folder-name variants of the classes are mapped to the canonical labels):

* Kaggle: ``COVID-19_Radiography_Dataset/<CLASS>/images/*.png``, with the lung mask of each image,
  where there is one, at ``<CLASS>/masks/<same name>`` (the ``*.metadata.xlsx`` / README files
  beside the class folders are ignored);
* flat: ``<CLASS>/*.png``.

A lung mask is recorded in ``mask_path`` (``masks/<label>/<file>`` in the dataset version) when it
decodes and is binary with a plausible lung share; otherwise ``mask_error`` says why it was not used
and the image keeps no mask. Masks change the dataset version only where there are any: a source
without masks hashes exactly as before masks were read.

A file that does not decode is kept in the manifest with its ``error`` so that validation
can list it; an unknown class folder keeps its own name as label for the same reason.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from covid_data.imaging import inspect_path
from covid_data.labels import canonical_label

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "path",  # relative to the dataset version's root: images/<label>/<file>
    "label",
    "source_path",  # where it came from, relative to the source root
    "sha256",
    "width",
    "height",
    "mode",
    "bytes",
    "phash",  # 64-bit perceptual hash, hex; near-duplicate detection in the split
    "error",  # None when the file decodes as an image
    "mask_path",  # masks/<label>/<file> in the version, where a usable lung mask exists; else None
    "mask_source_path",  # the mask found beside the image (also when it was not usable)
    "mask_sha256",
    "mask_error",  # why a mask that exists was not used
]

_IGNORED_DIRS = {"masks", "__macosx"}


class LayoutError(ValueError):
    """The source folder is not laid out like the dataset."""


@dataclass(frozen=True)
class SourceFile:
    source: Path
    source_path: str
    label: str
    path: str
    # The Kaggle release's lung mask of this image: the file, its path relative to the source root,
    # and where it goes in the version.
    mask: Path | None = None
    mask_source_path: str | None = None
    mask_path: str | None = None

    @property
    def job(self) -> tuple:
        """The arguments of :func:`covid_data.imaging.inspect_path` for this file."""
        base = (str(self.source), self.source_path, self.label, self.path)
        return base if self.mask is None else (*base, str(self.mask), self.mask_source_path, self.mask_path)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def find_dataset_root(root: Path, max_depth: int = 3) -> Path:
    """The folder whose subfolders are the class folders."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"source folder {root} does not exist or is not a folder")
    here = root
    for _ in range(max_depth + 1):
        subdirs = [d for d in here.iterdir() if d.is_dir() and _visible(d) and d.name.lower() not in _IGNORED_DIRS]
        if any(canonical_label(d.name) for d in subdirs):
            return here
        if len(subdirs) != 1:
            break
        here = subdirs[0]
    raise LayoutError(
        f"no class folders found under {root}: expected "
        "COVID-19_Radiography_Dataset/<CLASS>/images/*.png (Kaggle) or <CLASS>/*.png, "
        "with CLASS one of COVID, Lung_Opacity, Normal, Viral Pneumonia"
    )


def discover(root: Path) -> list[SourceFile]:
    """List the image files of a dataset folder, with their labels and target paths."""
    root = Path(root)
    data_root = find_dataset_root(root)
    files: list[SourceFile] = []
    for class_dir in sorted(d for d in data_root.iterdir() if d.is_dir() and _visible(d)):
        if class_dir.name.lower() in _IGNORED_DIRS:
            continue
        label = canonical_label(class_dir.name)
        if label is None:
            log.warning("unknown class folder %s: kept under its own name for validation to report", class_dir)
            label = class_dir.name
        image_dir = class_dir / "images" if (class_dir / "images").is_dir() else class_dir
        mask_dir = class_dir / "masks" if image_dir != class_dir else None
        for dirpath, dirnames, filenames in os.walk(image_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() not in _IGNORED_DIRS)
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                src = Path(dirpath) / name
                inner = src.relative_to(image_dir).as_posix()
                mask = mask_dir / inner if mask_dir is not None and (mask_dir / inner).is_file() else None
                files.append(
                    SourceFile(
                        source=src,
                        source_path=src.relative_to(root).as_posix(),
                        label=label,
                        path=f"images/{label}/{inner}",
                        mask=mask,
                        mask_source_path=mask.relative_to(root).as_posix() if mask else None,
                        mask_path=f"masks/{label}/{inner}" if mask else None,
                    )
                )
    ignored = [p.name for p in data_root.iterdir() if p.is_file() and _visible(p)]
    if ignored:
        log.info("ignored %d non-class files beside the class folders: %s", len(ignored), ", ".join(ignored[:5]))
    return files


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def build_manifest(
    files: list[SourceFile],
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Inspect every file (in ``workers`` processes) and return the manifest table."""
    workers = workers or default_workers()
    jobs = [f.job for f in files]
    rows: list[dict] = []
    total = len(jobs)
    step = max(1, total // 20)
    if workers == 1 or total < 64:
        it = map(inspect_path, jobs)
        pool = None
    else:
        # forkserver: safe even when the caller has threads (Prefect, TensorFlow) running.
        ctx = multiprocessing.get_context("forkserver")
        # Preload only the light worker module, never the caller's __main__ script.
        ctx.set_forkserver_preload(["covid_data.imaging"])
        pool = ProcessPoolExecutor(workers, mp_context=ctx)
        it = pool.map(inspect_path, jobs, chunksize=max(8, min(256, total // (workers * 8) or 1)))
    try:
        for i, row in enumerate(it, 1):
            rows.append(row)
            if progress and (i % step == 0 or i == total):
                progress(i, total)
    finally:
        if pool:
            pool.shutdown()
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    for col in ("width", "height", "bytes"):
        df[col] = df[col].astype("Int64")
    for col in MANIFEST_COLUMNS[MANIFEST_COLUMNS.index("mask_path") :]:
        df[col] = df[col].astype("object").where(df[col].notna(), None)
    rejected = df["mask_error"].notna()
    if rejected.any():
        first = df[rejected].iloc[0]
        log.warning(
            "%d lung masks not used (e.g. %s: %s)", int(rejected.sum()), first["mask_source_path"], first["mask_error"]
        )
    return df.sort_values("path", kind="stable").reset_index(drop=True)


def with_mask_columns(manifest: pd.DataFrame) -> pd.DataFrame:
    """A manifest written before masks were read, given the (empty) mask columns."""
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    return manifest.assign(**{c: None for c in missing}) if missing else manifest


def has_masks(manifest: pd.DataFrame) -> bool:
    return "mask_path" in manifest.columns and bool(manifest["mask_path"].notna().any())


def manifest_for_folder(root: Path, **kwargs) -> pd.DataFrame:
    return build_manifest(discover(root), **kwargs)


def dataset_version(manifest: pd.DataFrame) -> str:
    """Content address of a dataset: a hash over (path, label, sha256) of every row, and over
    (mask path, mask sha256) of the rows that have a lung mask (so that a source without masks
    keeps the version it had before masks were read)."""
    masks = with_mask_columns(manifest)
    h = hashlib.sha256()
    for path, label, sha, mask, mask_sha in sorted(
        zip(
            manifest["path"],
            manifest["label"],
            manifest["sha256"].fillna(""),
            masks["mask_path"].fillna(""),
            masks["mask_sha256"].fillna(""),
            strict=True,
        )
    ):
        h.update(f"{path}\t{label}\t{sha}\n".encode())
        if mask:
            h.update(f"{mask}\t{mask_sha}\n".encode())
    return h.hexdigest()[:16]


def to_parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def read_parquet_bytes(data: bytes) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(data))
