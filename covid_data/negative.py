"""Negative sets: X-rays known NOT to be COVID (taken before the pandemic, say), published like any set.

A negative set is laid out in *finding folders* whose names are findings, not the four classes::

    <root>/Normal/*.png   <root>/Tuberculosis/*.png   (or <finding>/images/*.png)

Any folder name is a finding, except ``masks/`` (lung masks, such as the Shenzhen set's) and hidden
or ``__MACOSX`` folders; one or more wrapper folders above the findings are walked through. A folder
whose name is a COVID variant (``COVID``, ``covid-19``) is refused: it contradicts the set's kind.

Its manifest is the usual one (``covid_data.manifest``) with every row labelled
:data:`~covid_data.labels.NEGATIVE_LABEL` and the finding folder's name, as written, in a ``finding``
column; the image path is ``images/<finding>/<file>``. The label is hashed into the version, so the
same folder published as a labelled set and as a negative one are two versions that never collide.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from covid_data.dataset import (
    MANIFEST,
    DatasetRef,
    Progress,
    Staged,
    fetch_dataset,
)
from covid_data.kaggle_download import CredentialsProvider
from covid_data.labels import NEGATIVE_LABEL, canonical_label
from covid_data.manifest import LayoutError, SourceFile, build_manifest, with_mask_columns

log = logging.getLogger(__name__)

FINDING = "finding"
IGNORED_DIRS = {"masks", "__macosx"}  # lung masks (the Shenzhen set has them), archive debris
NOT_FINDINGS = IGNORED_DIRS | {"images"}  # and a finding folder's own image folder
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
CACHED_MANIFEST = ".negative-manifest.parquet"  # beside the labelled one in an unpacked archive


def _subdirs(folder: Path) -> list[Path]:
    return sorted(
        d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name.lower() not in NOT_FINDINGS
    )


def _has_images(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def _is_wrapper(folder: Path) -> bool:
    """A folder around the finding folders (an archive's top folder): no images, only folders."""
    return not _has_images(folder) and not (folder / "images").is_dir() and bool(_subdirs(folder))


def find_findings_root(root: Path, max_depth: int = 3) -> Path:
    """The folder whose subfolders are the finding folders."""
    here = Path(root)
    if not here.is_dir():
        raise LayoutError(f"source folder {root} does not exist or is not a folder")
    for _ in range(max_depth + 1):
        subdirs = _subdirs(here)
        if len(subdirs) == 1 and _is_wrapper(subdirs[0]):
            here = subdirs[0]
            continue
        if subdirs:
            return here
        break
    raise LayoutError(
        f"no finding folders under {root}: a negative set is <FINDING>/*.png (or <FINDING>/images/*.png), "
        "one folder per finding, e.g. Normal/ and Tuberculosis/ (masks/ is not a finding)"
    )


def discover_negative(root: Path) -> list[SourceFile]:
    """Every file of every finding folder, labelled :data:`NEGATIVE_LABEL`, its path naming the finding."""
    root = Path(root)
    data_root = find_findings_root(root)
    files: list[SourceFile] = []
    for finding_dir in _subdirs(data_root):
        if canonical_label(finding_dir.name) == "COVID":
            raise LayoutError(
                f"{finding_dir} is a COVID folder, in a set declared negative (known to hold no COVID): "
                "evaluate it as a labelled set instead"
            )
        image_dir = finding_dir / "images" if (finding_dir / "images").is_dir() else finding_dir
        for dirpath, dirnames, filenames in os.walk(image_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() not in IGNORED_DIRS)
            for name in sorted(f for f in filenames if not f.startswith(".")):
                src = Path(dirpath) / name
                inner = src.relative_to(image_dir).as_posix()
                files.append(
                    SourceFile(
                        source=src,
                        source_path=src.relative_to(root).as_posix(),
                        label=NEGATIVE_LABEL,
                        path=f"images/{finding_dir.name}/{inner}",
                    )
                )
    return files


def as_negative(manifest: pd.DataFrame) -> pd.DataFrame:
    """A manifest in the negative form: every row :data:`NEGATIVE_LABEL`, the finding from its path
    (``images/<finding>/…``). A published labelled version given as a negative source is read so."""
    finding = manifest["path"].astype(str).str.split("/").str[1]
    return manifest.assign(label=NEGATIVE_LABEL, **{FINDING: finding})


def negative_manifest_of(
    staged: Staged, *, workers: int | None = None, progress: Progress | None = None
) -> pd.DataFrame:
    """The negative manifest of a staged folder: a published version's, read back (and read as
    negative), a cached one of the same archive, or built by inspecting every file."""
    root = Path(staged.root)
    if (root / MANIFEST).is_file():
        manifest = as_negative(with_mask_columns(pd.read_parquet(root / MANIFEST)))
        return manifest.assign(source_path=manifest["path"], mask_source_path=manifest["mask_path"])
    cache = Path(staged.manifest_cache).with_name(CACHED_MANIFEST) if staged.manifest_cache else None
    if cache is not None and cache.is_file():
        log.info("reusing the negative manifest of the unchanged archive")
        return pd.read_parquet(cache)
    files = discover_negative(root)
    if not files:
        raise FileNotFoundError(f"no image files in the finding folders under {root}")
    log.info("inspecting %d files of a negative set under %s", len(files), root)
    manifest = as_negative(build_manifest(files, workers=workers, progress=progress))
    if cache is not None:
        tmp = cache.with_suffix(".partial")
        manifest.to_parquet(tmp, index=False)
        os.replace(tmp, cache)
    return manifest


def finding_counts(manifest: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in manifest[FINDING].value_counts().sort_index().items()}


def fetch_negative_dataset(
    source_spec: str,
    store_uri: str,
    *,
    cache_dir: Path | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    kaggle_credentials: CredentialsProvider | None = None,
) -> DatasetRef:
    """:func:`covid_data.dataset.fetch_dataset` for a negative set: staged the same way, published
    with the negative manifest."""
    return fetch_dataset(
        source_spec,
        store_uri,
        cache_dir=cache_dir,
        workers=workers,
        progress=progress,
        kaggle_credentials=kaggle_credentials,
        build_manifest=negative_manifest_of,
    )
