"""Lung-mask sources for the segmenter: pairs of an X-ray and its lung mask, checked, hashed and split.

Two layouts are read, the two that exist:

* the Kaggle release: ``<CLASS>/masks/<name>`` beside ``<CLASS>/images/<name>``;
* the Shenzhen set (``../shared/data/shenzhen-cxr``): one ``masks/<name>`` folder beside the
  finding folders, the image at ``<finding>/<name>``;
* a dataset version published in a local store (``.store/datasets/<version>``): the masks that
  passed the manifest's checks at ``masks/<label>/<name>``, the images at ``images/<label>/<name>``.

Every ``masks`` folder under the root is taken, and each mask's image (the same path below the
folder's parent) is looked for in the parent's ``images/`` first, then in its other folders. A folder that is not a mask
source, a mask without its image, a file that does not decode, or a mask that is not a binary lung
mask stops the reading with an error that names the file: a segmenter trained on a silently
shrunken or mislabelled set would report a Dice that means nothing.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covid_data.imaging import inspect_mask

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class MaskSourceError(ValueError):
    """A mask folder that cannot train a segmenter; the message names the folder or file."""


@dataclass(frozen=True)
class MaskPair:
    """One X-ray and its lung mask. ``id`` is the mask's path under the root (unique, stable)."""

    id: str
    image: Path
    mask: Path
    group: str  # the image's folder (finding or class): the held-out split is drawn within each


def _image_for(mask: Path, folder: Path) -> Path | None:
    rel = mask.relative_to(folder).as_posix()
    beside = folder.parent / "images" / rel  # Kaggle <CLASS>/images/<name>; a version's images/<label>/<name>
    if beside.is_file():
        return beside
    found = sorted(p for p in folder.parent.glob(f"*/{rel}") if p.is_file() and not p.is_relative_to(folder))
    return found[0] if found else None


def find_mask_pairs(root: str | Path) -> list[MaskPair]:
    """Every (image, mask) pair under ``root``, sorted by id; :class:`MaskSourceError` naming the
    folder or the first mask whose image is missing."""
    root = Path(root)
    if not root.is_dir():
        raise MaskSourceError(f"{root}: no such folder (a mask source is a folder with a masks/ folder)")
    folders = sorted(p for p in root.rglob("masks") if p.is_dir())
    masks = [
        (f, m) for f in folders for m in sorted(f.rglob("*")) if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not masks:
        raise MaskSourceError(
            f"{root}: no lung masks found (expected masks/<name> beside the image folders, as in shenzhen-cxr, "
            "or <CLASS>/masks/<name> beside <CLASS>/images/<name>, as in the Kaggle release)"
        )
    pairs = []
    for folder, m in masks:
        image = _image_for(m, folder)
        if image is None:
            rel = m.relative_to(folder).as_posix()
            raise MaskSourceError(
                f"{m}: mask without its image (looked for {folder.parent / 'images' / rel} and {folder.parent}/*/{rel})"
            )
        pairs.append(MaskPair(m.relative_to(root).as_posix(), image, m, image.parent.relative_to(root).as_posix()))
    return pairs


def fingerprint(pairs: list[MaskPair]) -> str:
    """sha256 over every pair's id and both files' bytes: a segmenter unit is keyed on it, so other
    masks (or the same names with other content) never reuse a trained unit."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(p.id.encode())
        h.update(hashlib.sha256(p.image.read_bytes()).digest())
        h.update(hashlib.sha256(p.mask.read_bytes()).digest())
    return h.hexdigest()


def _decode(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(path.read_bytes())) as im:
            im.load()
            return np.asarray(im.convert("L"))
    except Exception as e:  # PIL raises many types for damaged files
        raise MaskSourceError(f"{path}: does not decode ({type(e).__name__}: {e})") from e


def read_pair(pair: MaskPair) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H, W], mask bool [h, w]) at the files' own sizes; :class:`MaskSourceError`
    naming the file that does not decode or is no binary lung mask."""
    image = _decode(pair.image)
    mask = _decode(pair.mask)
    problem = inspect_mask(pair.mask.read_bytes())["mask_error"]
    if problem:
        raise MaskSourceError(f"{pair.mask}: {problem}")
    return image, mask > 127


def heldout_split(pairs: list[MaskPair], share: float, seed: int) -> tuple[list[MaskPair], list[MaskPair]]:
    """(train, held out): ``share`` of each group (finding or class) drawn with ``seed``, so both
    halves see normals and findings alike and the same seed always holds out the same masks."""
    if not 0 < share < 1:
        raise ValueError(f"held-out share must be between 0 and 1, not {share}")
    rng = np.random.default_rng(seed)
    train, held = [], []
    for group in sorted({p.group for p in pairs}):
        members = [p for p in pairs if p.group == group]
        order = rng.permutation(len(members))
        n_held = max(1, round(share * len(members))) if len(members) > 1 else 0
        held += [members[i] for i in order[:n_held]]
        train += [members[i] for i in order[n_held:]]
    if not train or not held:
        raise MaskSourceError(f"{len(pairs)} masks are too few to hold some out (need at least 2)")
    return sorted(train, key=lambda p: p.id), sorted(held, key=lambda p: p.id)
