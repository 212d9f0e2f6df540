"""The images people have: camera and gallery JPEGs and DICOM, read the same way by the phone app and
by the pipeline (issue 17 §2).

The browser half loads only the app's reading code (``app/src/image.js``, ``dicom.js``,
``preprocess.js``) in Chromium, bundled alone by esbuild from ``app/test/decode-harness.js`` and
served with the built app's JPEG 2000 decoder (``app/dist/codecs``): no published run is needed. Each
file goes through exactly what a pick runs (``inspectBytes`` -> ``readPicked`` -> ``preprocess``), and
its grey pixels and 224 px model input are compared with the pipeline's (``decode_file`` and
``decode_resize``, which training and ``flows.evaluate`` use).

JPEGs are made here from real X-rays of the shared sample: all eight EXIF orientations (on a
non-square crop, grey and colour), colour 4:2:0 and 4:4:4, progressive, a colour PNG and a 16-bit
grey PNG. DICOM: the
five shared files (JPEG 2000 lossy and lossless, JPEG Lossless with a Modality LUT, MONOCHROME1 without
file meta, MONOCHROME2) and variants made from them for the other paths (RLE, SIGMOID and
LINEAR_EXACT windows, a VOI LUT sequence, signed values without a window, transfer syntaxes and
photometric interpretations the page refuses). The crop-and-rotate step: ``tests/test_app_crop.py``.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import http.server
import io
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, SHARED, require_shared, sample_files, skip_or_fail

DICOM = SHARED / "data" / "dicom"
DICOM_FILES = (
    "CR-MONO1-10-chest.dcm",
    "CR-ModalitySequenceLUT.dcm",
    "RG1_J2KI.dcm",
    "RG3_J2KR.dcm",
    "nih_dx_chest.dcm",
)
SIZE = 224
# Largest grey-level difference allowed between the page and the pipeline: none. JPEGs are decoded by
# libjpeg-turbo on both sides (Pillow, Chromium: the accurate integer IDCT, the same upsampling), and
# even the lossy JPEG 2000 file (OpenJPEG natively in pylibjpeg-openjpeg, in WebAssembly in the page,
# an irreversible wavelet in floating point) measured 0 with the pinned versions.
EXACT = 0


# ------------------------------------------------------------------------------------------ fixtures
def _tinted(grey: np.ndarray) -> np.ndarray:
    """A warm tint, as a phone photo of a film or a monitor has."""
    g = grey.astype(np.float64)
    return np.stack([g, g * 0.92 + 6, g * 0.8 + 14], axis=-1).clip(0, 255).astype(np.uint8)


# PIL's transpose that, applied to the upright image, gives what a camera stores with each Orientation.
_STORED = dict(
    enumerate(
        (
            None,
            "FLIP_LEFT_RIGHT",
            "ROTATE_180",
            "FLIP_TOP_BOTTOM",
            "TRANSPOSE",
            "ROTATE_90",
            "TRANSVERSE",
            "ROTATE_270",
        ),
        1,
    )
)


def _jpeg(im, path: Path, orientation: int | None = None, **opts) -> Path:
    from PIL import Image

    if orientation and _STORED[orientation]:
        im = im.transpose(getattr(Image.Transpose, _STORED[orientation]))
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        opts["exif"] = exif.tobytes()
    im.save(path, "JPEG", **opts)
    return path


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> dict[str, Path]:
    """Camera- and gallery-like files made from real X-rays of the shared sample."""
    from PIL import Image

    d = tmp_path_factory.mktemp("jpegs")
    picks = [p for files in sample_files(1, seed=17).values() for p in files]
    out: dict[str, Path] = {}
    with Image.open(picks[0]) as im:
        upright = im.convert("L").crop((0, 20, 299, 271))  # 299 x 251: a transposition changes the size
    for k in range(1, 9):
        out[f"grey-exif-{k}"] = _jpeg(upright, d / f"grey-exif-{k}.jpg", k, quality=90)
    colour = Image.fromarray(_tinted(np.asarray(upright)))
    for k in (3, 6, 8):
        out[f"colour-exif-{k}"] = _jpeg(colour, d / f"colour-exif-{k}.jpg", k, quality=88)
    with Image.open(picks[1]) as im:
        grey = im.convert("L")
    rgb = Image.fromarray(_tinted(np.asarray(grey)))
    out["grey-progressive"] = _jpeg(grey, d / "grey-progressive.jpg", quality=85, progressive=True)
    out["colour-420"] = _jpeg(rgb, d / "colour-420.jpg", quality=90, subsampling=2)
    out["colour-444-progressive"] = _jpeg(rgb, d / "colour-444-prog.jpg", quality=75, subsampling=0, progressive=True)
    with Image.open(picks[2]) as im:
        phone = Image.fromarray(_tinted(np.asarray(im.convert("L").resize((640, 640), Image.Resampling.BICUBIC))))
    out["phone-photo-exif-6-progressive"] = _jpeg(phone, d / "phone.jpg", 6, quality=80, progressive=True)
    out["colour-png"] = d / "colour.png"
    rgb.save(out["colour-png"])
    # A 16-bit grey PNG (as some X-ray exports are): every low byte used, so truncation and rounding differ.
    deep = (np.asarray(grey).astype(np.int64) * 257 + np.arange(299)[None, :] % 257).clip(0, 65535)
    out["grey-16bit-png"] = d / "grey16.png"
    Image.fromarray(deep.astype(np.uint16)).save(out["grey-16bit-png"])
    return out


@pytest.fixture(scope="module")
def dicoms(tmp_path_factory) -> dict[str, Path]:
    """The shared DICOM files, and variants of them for the other decoding paths."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    from covid_data.dicom import read_dataset

    require_shared(*(DICOM / f for f in DICOM_FILES))
    d = tmp_path_factory.mktemp("dicom")
    out = {f: DICOM / f for f in DICOM_FILES}
    mono1 = (DICOM / "CR-MONO1-10-chest.dcm").read_bytes()

    def save(name: str, ds) -> None:
        ds.file_meta.TransferSyntaxUID = ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
        ds.save_as(d / name, enforce_file_format=True)
        out[name] = d / name

    ds = read_dataset(mono1)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.RescaleSlope, ds.RescaleIntercept = "1.5", "-20"
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = "800", "1400", "SIGMOID"
    save("sigmoid-rescale.dcm", ds)

    ds = read_dataset(mono1)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = "500.5", "700", "LINEAR_EXACT"
    save("linear-exact.dcm", ds)

    ds = read_dataset(mono1)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    item = Dataset()
    item.LUTDescriptor = [1024, 0, 12]
    item.add_new(0x00283006, "OW", (np.linspace(0, 1, 1024) ** 0.6 * 4095).round().astype("<u2").tobytes())
    ds.VOILUTSequence = Sequence([item])
    save("voi-lut-sequence.dcm", ds)

    ds = read_dataset(mono1)  # signed stored values, no window: the frame's own range
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    values = ds.pixel_array.astype(np.int16) - 512
    ds.PixelRepresentation = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = values.astype("<i2").tobytes()
    del ds.WindowCenter, ds.WindowWidth
    save("signed-no-window.dcm", ds)

    ds = pydicom.dcmread(DICOM / "nih_dx_chest.dcm")
    ds.compress(RLELossless)
    save("nih-rle.dcm", ds)

    ds = pydicom.dcmread(DICOM / "nih_dx_chest.dcm")
    ds.PixelData = encapsulate([ds.PixelData])  # a fragment that is not JPEG-LS: the page refuses by name first
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"
    ds.save_as(d / "refused-jpeg-ls.dcm", enforce_file_format=True)
    out["refused-jpeg-ls.dcm"] = d / "refused-jpeg-ls.dcm"

    ds = pydicom.dcmread(DICOM / "nih_dx_chest.dcm")
    ds.PhotometricInterpretation = "PALETTE COLOR"
    save("refused-palette.dcm", ds)
    return out


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static files on the loopback, ``.wasm`` as ``application/wasm``, no request log."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm"}

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """Chromium on a page that holds only the app's reading code."""
    from tests.app_browser import CHROMIUM, CHROMIUM_ARGS, _require_browser

    _require_browser()
    from covid_app import bundle

    # npm ci + build when needed (node_modules, dist/codecs), one worker at a time: the crop tests in
    # another pytest-xdist worker start with the same fixture, and two npm runs in app/ would collide.
    with open(Path(tempfile.gettempdir()) / "covid-app-dist.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            dist = bundle.ensure_dist()
        except bundle.AppBuildUnavailable as e:
            skip_or_fail(str(e))
    esbuild = REPO / "app" / "node_modules" / ".bin" / "esbuild"
    if not esbuild.exists() or not (dist / "codecs" / "openjpegwasm_decode.wasm").is_file():
        skip_or_fail(f"needs the app's npm packages ({esbuild}) and dist/codecs (cd app && npm ci && npm run build)")
    site = tmp_path_factory.mktemp("decode-site")
    subprocess.run(
        [str(esbuild), str(REPO / "app" / "test" / "decode-harness.js"), "--bundle", "--format=esm",
         "--platform=browser", "--external:fs", "--external:path", f"--outfile={site / 'harness.js'}"],
        check=True, capture_output=True, cwd=REPO / "app",
    )  # fmt: skip
    shutil.copytree(dist / "codecs", site / "codecs")
    page = '<!doctype html><meta charset="utf-8"><script type="module" src="harness.js"></script>'
    (site / "index.html").write_text(page)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pg = browser.new_page()
        pg.goto(f"http://127.0.0.1:{server.server_address[1]}/index.html")
        pg.wait_for_function("window.harnessReady === true", timeout=30_000)
        yield pg
        browser.close()
    server.shutdown()


def _in_page(page, path: Path) -> dict:
    r = page.evaluate("([b, s]) => window.decodeForTest(b, s)", [base64.b64encode(path.read_bytes()).decode(), SIZE])
    if "error" in r:
        return r
    r["grey"] = np.frombuffer(base64.b64decode(r["grey"]), np.uint8).reshape(r["height"], r["width"])
    r["input"] = np.frombuffer(base64.b64decode(r["input"]), np.uint8).reshape(SIZE, SIZE)
    return r


def _in_python(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's grey pixels and model input (``decode_resize`` is ``decode_file`` then
    ``resize_pixels``; one decode here instead of two)."""
    from covid_models.data import decode_file, resize_pixels

    grey = decode_file(str(path), path.read_bytes(), 1)
    return grey[..., 0], resize_pixels(grey, SIZE).numpy()[..., 0]


def _compare(page, path: Path, bound: int) -> tuple[int, int]:
    shown = _in_page(page, path)
    assert "error" not in shown, f"{path.name}: the page could not read it: {shown}"
    grey, model_input = _in_python(path)
    assert shown["grey"].shape == grey.shape, f"{path.name}: page {shown['grey'].shape}, pipeline {grey.shape}"
    d_grey = int(np.abs(shown["grey"].astype(int) - grey.astype(int)).max())
    d_input = int(np.abs(shown["input"].astype(int) - model_input.astype(int)).max())
    assert d_grey <= bound and d_input <= bound, f"{path.name}: max |Δ| grey {d_grey}, input {d_input} (bound {bound})"
    return d_grey, d_input


# ---------------------------------------------------------------------------------- the pipeline
def test_exif_orientation_turns_a_camera_jpeg_upright(jpegs):
    """Every Orientation value gives the upright picture: the same pixels as the plain JPEG of the
    stored picture, transposed back (one encoding, so the decoded pixels are comparable exactly)."""
    from PIL import Image

    from covid_models.data import decode_file

    with Image.open(jpegs["grey-exif-1"]) as im:
        size = im.size
    for k in range(2, 9):
        data = jpegs[f"grey-exif-{k}"].read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.getexif()[0x0112] == k
            stored = Image.fromarray(np.asarray(im))  # the pixels as stored, orientation ignored
        got = decode_file("f.jpg", data, 1)[..., 0]
        inverse = {6: "ROTATE_270", 8: "ROTATE_90"}.get(k, _STORED[k])  # the others undo themselves
        expected = np.asarray(stored.transpose(getattr(Image.Transpose, inverse)))
        assert got.shape == (size[1], size[0]), f"orientation {k}: {got.shape}"
        assert np.array_equal(got, expected), f"orientation {k}"


def test_colour_is_made_grey_as_the_page_does(jpegs):
    """A colour JPEG or PNG: grey = round_half_even(0.299 R + 0.587 G + 0.114 B) of the decoded RGB
    (not libjpeg's Y channel, not libpng's weights); equal R, G, B keep their value."""
    from PIL import Image

    from covid_models.data import decode_file

    for name in ("colour-420", "colour-png"):
        data = jpegs[name].read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB")).astype(np.float64)
        expected = np.round(0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]).astype(np.uint8)
        assert np.array_equal(decode_file(name, data, 1)[..., 0], expected), name
        assert np.array_equal(decode_file(name, data, 3), rgb.astype(np.uint8)), name


def test_dicom_in_the_pipeline_sources(dicoms, tmp_path):
    """A source folder with DICOM files: the manifest decodes them (size, grey mode, pHash), a file it
    cannot read keeps an error that says why, and training's reader gives upright 8-bit grey."""
    from covid_data.imaging import ImageError, inspect_image
    from covid_models.data import decode_resize

    row = inspect_image(dicoms["RG1_J2KI.dcm"].read_bytes())
    assert row["error"] is None and (row["width"], row["height"], row["mode"]) == (1841, 1955, "L") and row["phash"]
    bad = dicoms["nih_dx_chest.dcm"].read_bytes()[:4000]  # cut off inside the pixel data
    assert "nih" not in (inspect_image(bad)["error"] or "x") and inspect_image(bad)["error"]
    row = inspect_image(dicoms["refused-palette.dcm"].read_bytes())
    assert "PALETTE COLOR" in row["error"] and "grayscale" in row["error"]
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(bad)
    with pytest.raises(ImageError, match=r"cut\.dcm"):
        decode_resize(str(cut), 64, 1)
    x = decode_resize(str(dicoms["CR-MONO1-10-chest.dcm"]), 64, 1).numpy()
    # MONOCHROME1 inverted: the lungs (middle of each half) are darker than the mediastinum.
    assert x[20:40, 12:22].mean() < x[20:40, 29:35].mean()


# ------------------------------------------------------------------------------ page and pipeline
def test_camera_and_gallery_jpegs_match_the_pipeline(page, jpegs):
    figures = {name: _compare(page, path, EXACT) for name, path in jpegs.items()}
    print("\nJPEG/PNG parity, max |Δ| (grey, 224 px input):", figures)


def test_dicom_matches_the_pipeline(page, dicoms):
    figures = {}
    for name, path in dicoms.items():
        if name.startswith("refused"):
            continue
        figures[name] = _compare(page, path, EXACT)
    print("\nDICOM parity, max |Δ| (grey, 224 px input):", figures)


def test_the_page_names_what_it_cannot_decode(page, dicoms, tmp_path):
    r = _in_page(page, dicoms["refused-jpeg-ls.dcm"])
    assert r["kind"] == "decode" and "JPEG-LS Lossless (1.2.840.10008.1.2.4.80)" in r["error"], r
    r = _in_page(page, dicoms["refused-palette.dcm"])
    assert r["kind"] == "decode" and "PALETTE COLOR" in r["error"], r
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(dicoms["RG3_J2KR.dcm"].read_bytes()[:200_000])
    r = _in_page(page, cut)
    assert r["kind"] == "decode" and "error" in r, r
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert _in_page(page, text)["kind"] == "not-image"


def test_no_patient_data_in_what_the_page_keeps(page, dicoms):
    """What a pick keeps of a DICOM is its pixels: the preview is a PNG made from the grey pixels, with
    none of the file's attributes (the patient's name and ID appear nowhere in it)."""
    import pydicom
    from PIL import Image

    path = dicoms["CR-MONO1-10-chest.dcm"]
    ds = pydicom.dcmread(path, force=True)
    private = [str(ds.get(k, "")).encode() for k in ("PatientName", "PatientID") if str(ds.get(k, "")).strip()]
    assert private, "the test file should carry a patient name or ID"
    r = page.evaluate("b => window.pickedForTest(b)", base64.b64encode(path.read_bytes()).decode())
    assert r["keys"] == ["blob", "height", "rgba", "width"]
    preview = base64.b64decode(r["preview"])
    assert r["type"] == "image/png" and preview[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(p in preview for p in private)
    with Image.open(io.BytesIO(preview)) as im:
        assert np.array_equal(np.asarray(im.convert("L")), _in_python(path)[0])
