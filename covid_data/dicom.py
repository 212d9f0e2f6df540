"""DICOM radiographs to 8-bit grey pixels, step for step as the phone app does it (``app/src/dicom.js``).

Stored values (masked to Bits Stored, sign-extended when signed) -> Modality LUT (the Modality LUT
Sequence, else Rescale Slope/Intercept) -> VOI (the VOI LUT Sequence, else the first Window
Center/Width with the VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID, else the frame's own
minimum-maximum range) -> 0..255 (float64, rounded half to even) -> MONOCHROME1 inverted (255 - v).
The first frame of a multi-frame image is read. Every step is float64 arithmetic in the same order as
the page's, so both sides give the same bytes for the same decoded stored values.

Compressed pixel data is decoded by pydicom's plugins: JPEG 2000 with ``pylibjpeg-openjpeg``
(OpenJPEG, as the page), JPEG Lossless and JPEG-LS with ``python-gdcm``. Nothing here reads or
returns patient data: only the pixel module's attributes are used.
"""

from __future__ import annotations

import io
import json
from importlib import resources

import numpy as np

# Transfer syntaxes by UID: what the error messages call them. One table for the pipeline and the
# page (app/src/dicom.js imports the same JSON file at build time).
TRANSFER_SYNTAXES: dict[str, str] = json.loads(
    resources.files("covid_data").joinpath("transfer_syntaxes.json").read_text()
)
_J2K = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"}


class DicomError(ValueError):
    """A DICOM file that cannot be turned into grey pixels; the message says what and why."""


def is_dicom(data: bytes) -> bool:
    """A Part 10 file (``DICM`` after the 128-byte preamble), or a bare dataset without the file meta
    header that starts with an Identifying group (0008) element, as old CR files do."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    return len(data) >= 8 and data[0:2] == b"\x08\x00" and data[3] == 0 and data[2] in (0x00, 0x05, 0x08, 0x16)


def transfer_syntax_name(uid: str) -> str:
    return f"{TRANSFER_SYNTAXES.get(uid, 'an unknown transfer syntax')} ({uid})"


def _lut(item, what: str) -> tuple[int, int, int, np.ndarray]:
    """(entries, first input value, bits, data) of a Modality or VOI LUT Sequence item."""
    desc = item.get("LUTDescriptor")
    data = item.get("LUTData")
    if desc is None or data is None or len(desc) != 3:
        raise DicomError(f"its {what} LUT has no LUT Descriptor or LUT Data")
    n, first, bits = (int(v) for v in desc)
    n = n or 65536
    if isinstance(data, bytes | bytearray):
        # OW: 16-bit words in the dataset's byte order (pydicom hands little-endian bytes for LE files).
        values = np.frombuffer(bytes(data), dtype="<u2").astype(np.float64)
    else:
        values = np.asarray(data if isinstance(data, list | tuple | np.ndarray) else [data], dtype=np.float64)
    if len(values) < n:
        raise DicomError(f"its {what} LUT has {len(values)} entries, its descriptor says {n}")
    if not 8 <= bits <= 16:
        raise DicomError(f"its {what} LUT has {bits} bits per entry (8 to 16 expected)")
    return n, first, bits, values[:n]


def _apply_lut(x: np.ndarray, n: int, first: int, values: np.ndarray) -> np.ndarray:
    idx = np.clip(np.round(x) - first, 0, n - 1).astype(np.int64)
    return values[idx]


def stored_values(ds, where: str) -> np.ndarray:
    """The first frame's stored values as float64: masked to Bits Stored and sign-extended (native
    data), as the codec gives them (compressed data)."""
    uid = str(ds.file_meta.TransferSyntaxUID)
    if "PixelData" not in ds:
        raise DicomError(f"{where}: this DICOM file has no image (no Pixel Data)")
    samples = int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(
            f"{where}: this DICOM image is {photometric or 'of unknown photometric interpretation'} with "
            f"{samples} samples per pixel; only grayscale (MONOCHROME1/MONOCHROME2) radiographs are read"
        )
    allocated, stored = int(ds.get("BitsAllocated", 0)), int(ds.get("BitsStored", ds.get("BitsAllocated", 0)))
    if allocated not in (8, 16) or not 1 <= stored <= allocated:
        raise DicomError(f"{where}: {stored} bits stored in {allocated} allocated are not read (8 or 16 allocated)")
    opts: dict = {"index": 0}
    if uid in _J2K:
        opts["decoding_plugin"] = "pylibjpeg"  # OpenJPEG, as the page
    try:
        from pydicom.pixels import pixel_array

        px = pixel_array(ds, **opts)
    except Exception as e:  # pydicom raises many types for unsupported or damaged data
        raise DicomError(f"{where}: the pixel data ({transfer_syntax_name(uid)}) does not decode: {e}") from e
    px = np.asarray(px)
    if px.ndim != 2:
        raise DicomError(f"{where}: decoded pixel data has shape {px.shape}, one grayscale frame expected")
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if uid in _NATIVE or uid == "1.2.840.10008.1.2.5":  # uncompressed or RLE: the stored bits as they are
        v = px.astype(np.int64) & ((1 << stored) - 1)  # bits above High Bit may hold overlays
        if signed:
            v = np.where(v >= 1 << (stored - 1), v - (1 << stored), v)
        return v.astype(np.float64)
    return px.astype(np.float64)


def modality(ds, x: np.ndarray) -> np.ndarray:
    """The Modality LUT: its sequence, else Rescale Slope and Intercept, else the stored values."""
    seq = ds.get("ModalityLUTSequence")
    if seq:
        n, first, _bits, values = _lut(seq[0], "Modality")
        return _apply_lut(x, n, first, values)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None or intercept is not None:
        s = float(slope) if slope is not None else 1.0
        b = float(intercept) if intercept is not None else 0.0
        return x * s + b
    return x


def _first(value) -> float | None:
    if value is None:
        return None
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def voi(ds, x: np.ndarray) -> np.ndarray:
    """The VOI transform to 0..255 (float64, not rounded)."""
    seq = ds.get("VOILUTSequence")
    if seq:
        n, first, bits, values = _lut(seq[0], "VOI")
        return _apply_lut(x, n, first, values) / ((1 << bits) - 1) * 255.0
    c, w = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
    if c is not None and w is not None:
        if function == "SIGMOID" and w > 0:
            return 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
        if function == "LINEAR_EXACT" and w > 0:
            lo, hi = c - w / 2, c + w / 2
            return np.where(x <= lo, 0.0, np.where(x > hi, 255.0, ((x - c) / w + 0.5) * 255.0))
        if function == "LINEAR" and w >= 1:
            lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
            return np.where(x <= lo, 0.0, np.where(x > hi, 255.0, ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0))
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo) * 255.0


def to_grey(ds, where: str = "DICOM file") -> np.ndarray:
    """An uint8 (H, W) image from a dataset read by pydicom."""
    x = voi(ds, modality(ds, stored_values(ds, where)))
    v = np.clip(np.round(x), 0, 255).astype(np.uint8)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        v = 255 - v
    return v


def read_dataset(data: bytes, where: str = "DICOM file"):
    """pydicom's dataset of ``data`` with a transfer syntax (a file without file meta is read as the
    encoding pydicom found)."""
    try:
        import pydicom
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import UID
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise DicomError(f"{where}: DICOM needs pydicom ({e})") from e
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as e:
        raise DicomError(f"{where}: not a readable DICOM file ({type(e).__name__}: {e})") from e
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        uid = "1.2.840.10008.1.2" if implicit else ("1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2")
        ds.file_meta = meta if meta is not None else FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = UID(uid)
    return ds


def dicom_grey(data: bytes, where: str = "DICOM file") -> np.ndarray:
    """The bytes of a DICOM radiograph as uint8 (H, W) grey pixels."""
    return to_grey(read_dataset(data, where), where)
