"""The manifest: one row per image file, with its label, content hash and decoded properties.

Accepted layouts (folder-name variants of the classes are mapped to the canonical labels):

* Kaggle: ``COVID-19_Radiography_Dataset/<CLASS>/images/*.png`` (``masks/`` and the
  ``*.metadata.xlsx`` / README files beside the class folders are ignored);
* flat: ``<CLASS>/*.png``.

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
        for dirpath, dirnames, filenames in os.walk(image_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() not in _IGNORED_DIRS)
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                src = Path(dirpath) / name
                inner = src.relative_to(image_dir).as_posix()
                files.append(
                    SourceFile(
                        source=src,
                        source_path=src.relative_to(root).as_posix(),
                        label=label,
                        path=f"images/{label}/{inner}",
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
    jobs = [(str(f.source), f.source_path, f.label, f.path) for f in files]
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
    return df.sort_values("path", kind="stable").reset_index(drop=True)


def manifest_for_folder(root: Path, **kwargs) -> pd.DataFrame:
    return build_manifest(discover(root), **kwargs)


def dataset_version(manifest: pd.DataFrame) -> str:
    """Content address of a dataset: a hash over (path, label, sha256) of every row."""
    h = hashlib.sha256()
    for path, label, sha in sorted(
        zip(manifest["path"], manifest["label"], manifest["sha256"].fillna(""), strict=True)
    ):
        h.update(f"{path}\t{label}\t{sha}\n".encode())
    return h.hexdigest()[:16]


def to_parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def read_parquet_bytes(data: bytes) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(data))
