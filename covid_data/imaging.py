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


def inspect_path(args: tuple[str, str, str, str]) -> dict:
    source, source_path, label, path = args
    try:
        data = Path(source).read_bytes()
    except OSError as e:
        return {
            "path": path,
            "label": label,
            "source_path": source_path,
            "sha256": None,
            "bytes": None,
            "width": None,
            "height": None,
            "mode": None,
            "phash": None,
            "error": f"unreadable: {e}",
        }
    return {"path": path, "label": label, "source_path": source_path, **inspect_image(data)}
