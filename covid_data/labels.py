"""The four canonical classes and the folder-name variants that map to them."""

from __future__ import annotations

import re

CLASSES: tuple[str, ...] = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")

# Folder names seen across releases and mirrors, reduced to lowercase letters and digits.
_ALIASES = {
    "covid": "COVID",
    "covid19": "COVID",
    "lungopacity": "Lung_Opacity",
    "normal": "Normal",
    "viralpneumonia": "Viral Pneumonia",
}


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def canonical_label(folder_name: str) -> str | None:
    """Map a class folder's name to its canonical label, or None when it is not a class."""
    return _ALIASES.get(_squash(folder_name))


# The one label of a negative set's images (X-rays known not to be COVID): what is known of each is
# only that it is not COVID; its finding folder ("Normal", "Tuberculosis", …) is kept beside it.
NEGATIVE_LABEL = "not COVID"
