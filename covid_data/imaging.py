"""Per-image inspection, kept free of heavy imports: it runs in the manifest's worker processes."""

from __future__ import annotations

import functools
import hashlib
import io
from pathlib import Path


def inspect_image(data: bytes) -> dict:
    """Hash and fully decode one image's bytes. Never raises: failures go to ``error``."""
    from PIL import Image, UnidentifiedImageError

    out: dict = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "width": None,
        "height": None,
        "mode": None,
        "phash": None,
        "error": None,
    }
    if not data:
        out["error"] = "empty file (0 bytes)"
        return out
    try:
        with Image.open(io.BytesIO(data)) as im:
            out.update(width=im.width, height=im.height, mode=im.mode)
            if im.format not in ("PNG", "JPEG"):
                out["error"] = f"unsupported image format {im.format}"
                return out
            im.load()  # full decode: a truncated or corrupt stream fails here
            out["phash"] = _phash(im)
    except UnidentifiedImageError:
        out["error"] = "not an image (no known image format)"
    except Exception as e:  # PIL raises many types for damaged streams
        out["error"] = f"does not decode: {type(e).__name__}: {e}"
    return out


@functools.cache
def _dct_basis(n: int = 32):
    """Rows of the (unnormalised) DCT-II: ``basis @ x`` is scipy's ``dct(x, axis=0)``."""
    import numpy as np

    k = np.arange(n)[:, None]
    return 2.0 * np.cos(np.pi * k * (2 * np.arange(n)[None, :] + 1) / (2 * n))


def _phash(im) -> str:
    """imagehash's pHash (DCT of a 32x32 thumbnail, low 8x8 coefficients against their median)
    with two changes that only make it cheaper: a box pre-reduction before the LANCZOS
    thumbnail, and a matrix DCT that spares the workers importing scipy. Values can differ
    from ``imagehash.phash`` by a few bits; the pipeline only compares its own hashes."""
    import numpy as np
    from PIL import Image

    small = im.convert("L").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=2.0)
    basis = _dct_basis()
    coeffs = (basis @ np.asarray(small, dtype=np.float64) @ basis.T)[:8, :8]
    bits = (coeffs > np.median(coeffs)).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


# A lung mask is usable when it is binary (almost every pixel black or white) and its lung share
# is plausible; anything else (an X-ray dropped into masks/, an empty mask) is reported, not used.
MASK_BINARY_SHARE = 0.98
MASK_LUNG_SHARE = (0.05, 0.8)


def inspect_mask(data: bytes) -> dict:
    """Hash and check one lung mask's bytes: ``{mask_sha256, mask_error}``. Never raises."""
    from PIL import Image

    out: dict = {"mask_sha256": hashlib.sha256(data).hexdigest(), "mask_error": None}
    try:
        import numpy as np

        with Image.open(io.BytesIO(data)) as im:
            im.load()
            px = np.asarray(im.convert("L"))
    except Exception as e:  # PIL raises many types for damaged streams
        out["mask_error"] = f"mask does not decode: {type(e).__name__}: {e}"
        return out
    binary = float(np.mean((px < 32) | (px > 223)))
    lungs = float(np.mean(px > 127))
    if binary < MASK_BINARY_SHARE:
        out["mask_error"] = f"mask is not binary ({binary:.0%} of pixels black or white)"
    elif not MASK_LUNG_SHARE[0] <= lungs <= MASK_LUNG_SHARE[1]:
        out["mask_error"] = f"mask covers {lungs:.0%} of the image (lungs cover 5-80%)"
    return out


def _unreadable(e: OSError) -> dict:
    return {
        "sha256": None,
        "bytes": None,
        "width": None,
        "height": None,
        "mode": None,
        "phash": None,
        "error": f"unreadable: {e}",
    }


def inspect_path(args: tuple) -> dict:
    """One manifest row: ``(source, source_path, label, path)``, optionally followed by the lung
    mask's ``(mask source, mask source_path, mask path)``."""
    source, source_path, label, path = args[:4]
    try:
        row = {"path": path, "label": label, "source_path": source_path, **inspect_image(Path(source).read_bytes())}
    except OSError as e:
        row = {"path": path, "label": label, "source_path": source_path, **_unreadable(e)}
    if len(args) > 4 and args[4]:
        mask_source, mask_source_path, mask_path = args[4:7]
        try:
            checked = inspect_mask(Path(mask_source).read_bytes())
        except OSError as e:
            checked = {"mask_sha256": None, "mask_error": f"mask unreadable: {e}"}
        usable = checked["mask_error"] is None
        row.update(
            mask_path=mask_path if usable else None,
            mask_source_path=mask_source_path,
            mask_sha256=checked["mask_sha256"] if usable else None,
            mask_error=checked["mask_error"],
        )
    return row
