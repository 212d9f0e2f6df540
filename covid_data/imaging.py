"""Per-image inspection and decoding, kept free of heavy imports: it runs in the manifest's worker
processes and inside the tf.data pipeline.

:func:`read_pixels` and :func:`to_channels` are how the pipeline, ``flows.evaluate`` and the phone app
(``app/src/image.js``, ``app/src/preprocess.js``) turn a file into the pixels a model sees:

* PNG and JPEG: decoded by Pillow (libpng; libjpeg-turbo with the accurate integer IDCT, as browsers),
  then turned upright by the EXIF Orientation tag of a JPEG, as browsers show a camera photo
  (``createImageBitmap``'s ``imageOrientation: "from-image"``). 16-bit PNGs keep their high byte.
* DICOM: :mod:`covid_data.dicom` (Modality LUT, VOI LUT or window, MONOCHROME1 inverted, 8 bits).
* To one channel: a pixel whose R, G and B are equal keeps that value, any other is
  ``round_half_even(0.299 R + 0.587 G + 0.114 B)`` in float64 (the page's formula, not libjpeg's Y
  channel or libpng's own weights, so colour PNGs and JPEGs give the same grey on both sides).
"""

from __future__ import annotations

import functools
import hashlib
import io
from pathlib import Path

from covid_data.dicom import DicomError, dicom_grey, is_dicom


class ImageError(ValueError):
    """A file that is not a readable PNG, JPEG or DICOM image; the message names the file."""


def read_pixels(data: bytes, where: str = "image"):
    """Decode an image's bytes to uint8 pixels, (H, W) grey or (H, W, 3) RGB, upright (see above)."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageError(f"{where}: empty file (0 bytes)")
    if is_dicom(data):
        try:
            return dicom_grey(data, where)
        except DicomError as e:
            raise ImageError(str(e)) from e
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in ("PNG", "JPEG"):
                raise ImageError(f"{where}: unsupported image format {im.format} (PNG, JPEG or DICOM expected)")
            im.load()
            if im.format == "JPEG":
                im = ImageOps.exif_transpose(im)
            return _pixels(im, np)
    except UnidentifiedImageError as e:
        raise ImageError(f"{where}: not an image (PNG, JPEG or DICOM expected)") from e
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for damaged streams
        raise ImageError(f"{where}: does not decode: {type(e).__name__}: {e}") from e


def _pixels(im, np):
    mode = im.mode
    if mode == "L":
        return np.asarray(im, dtype=np.uint8)
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey PNG: its high byte, as libpng's strip_16
        return (np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
    if mode == "LA":
        return np.asarray(im, dtype=np.uint8)[..., 0]
    if mode == "RGBA":
        return np.asarray(im, dtype=np.uint8)[..., :3]
    if mode == "1":
        return np.asarray(im.convert("L"), dtype=np.uint8)
    return np.asarray(im.convert("RGBA"), dtype=np.uint8)[..., :3]  # palette, CMYK, ...


def to_channels(px, channels: int):
    """uint8 (H, W, channels) from :func:`read_pixels`' output, grey computed as the page does."""
    import numpy as np

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    if px.ndim == 2:
        return px[..., None] if channels == 1 else np.repeat(px[..., None], 3, axis=2)
    if channels == 3:
        return px
    r, g, b = (px[..., i].astype(np.float64) for i in range(3))
    grey = np.clip(np.round(0.299 * r + 0.587 * g + 0.114 * b), 0, 255).astype(np.uint8)
    same = (px[..., 0] == px[..., 1]) & (px[..., 1] == px[..., 2])
    return np.where(same, px[..., 0], grey)[..., None]


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
    if is_dicom(data):
        try:
            grey = dicom_grey(data, "DICOM file")
        except DicomError as e:
            out["error"] = str(e)
            return out
        out.update(height=int(grey.shape[0]), width=int(grey.shape[1]), mode="L")
        out["phash"] = _phash(Image.fromarray(grey))
        return out
    try:
        with Image.open(io.BytesIO(data)) as im:
            out.update(width=im.width, height=im.height, mode=im.mode)
            if im.format not in ("PNG", "JPEG"):
                out["error"] = f"unsupported image format {im.format}"
                return out
            im.load()  # full decode: a truncated or corrupt stream fails here
            if im.format == "JPEG":
                from PIL import ImageOps

                upright = ImageOps.exif_transpose(im)  # the size and pixels the models see
                out.update(width=upright.width, height=upright.height)
                out["phash"] = _phash(upright)
            else:
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
