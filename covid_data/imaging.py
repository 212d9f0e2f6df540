"""Per-image inspection, kept free of heavy imports: it runs in the manifest's worker processes."""

from __future__ import annotations

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


def _phash(im) -> str:
    """imagehash's pHash (DCT of a 32x32 thumbnail), with a box pre-reduction that makes
    the thumbnail ~5x cheaper to compute; the hash is ours, so it only needs consistency."""
    import imagehash
    import numpy as np
    from PIL import Image
    from scipy.fft import dct

    small = im.convert("L").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=2.0)
    coeffs = dct(dct(np.asarray(small, dtype=np.float64), axis=0), axis=1)[:8, :8]
    return str(imagehash.ImageHash(coeffs > np.median(coeffs)))


def inspect_path(args: tuple[str, str, str, str]) -> dict:
    source, source_path, label, path = args
    try:
        data = Path(source).read_bytes()
    except OSError as e:
        return {
            "path": path, "label": label, "source_path": source_path, "sha256": None, "bytes": None,
            "width": None, "height": None, "mode": None, "phash": None, "error": f"unreadable: {e}",
        }  # fmt: skip
    return {"path": path, "label": label, "source_path": source_path, **inspect_image(data)}
