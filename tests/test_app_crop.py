"""The crop-and-rotate step before classifying (issue 17 §2): the built app (``app/dist``) with a tiny
real TFLite model, served on the loopback; a sideways camera JPEG made from a real X-ray is classified
upright, then rotated, cropped by dragging on the preview and the edit undone. After each edit the
probabilities shown are Python's TFLite on the same edit of the pipeline's pixels (rotation by numpy,
crop by slicing): the edited pixels are the ones classified.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import numpy as np

from tests import test_app_decode as decode

# The decoding tests' fixtures: the camera-like JPEGs, and Chromium (its harness page).
jpegs, page = decode.jpegs, decode.page


def _tiny_tflite(path: Path, size: int) -> Path:
    """A small real classifier whose output depends on where things are (flatten -> dense)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(3)
    inp = keras.Input((size, size, 1), batch_size=1)
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(4, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(0, 0.3))(x)
    model = keras.Model(inp, out)
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return path


def _tflite_probs(path: Path, grey: np.ndarray, size: int) -> np.ndarray:
    import tensorflow as tf

    from covid_models.data import resize_pixels

    x = resize_pixels(grey[..., None], size).numpy().astype("float32")[None]
    it = tf.lite.Interpreter(model_path=str(path))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])[0]


def test_crop_and_rotate_classify_the_edited_pixels(page, jpegs, tmp_path):
    """The app with a real (tiny) TFLite model: a sideways camera JPEG is classified upright, then
    rotated, cropped by dragging on the preview, and the edit undone; each time the probabilities are
    the pipeline's on the same edit of the pixels (rotation by numpy, crop by slicing)."""
    from covid_app import bundle
    from covid_data.labels import CLASSES
    from covid_models.data import decode_file

    size = 32
    site = tmp_path / "site"
    shutil.copytree(bundle.dist_dir(), site)
    model = _tiny_tflite(site / "tiny.tflite", size)
    entry = {"name": "tiny", "rank": 1, "champion": True, "file": "tiny.tflite", "input_size": size, "channels": 1}
    (site / "data").mkdir()
    (site / "data" / "app.json").write_text(json.dumps({"classes": list(CLASSES), "models": [entry], "guard": None}))
    handler = functools.partial(decode.QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    context = page.context.browser.new_context(viewport={"width": 390, "height": 844}, service_workers="block")
    app = context.new_page()
    try:
        app.goto(f"http://127.0.0.1:{server.server_address[1]}/index.html")
        app.wait_for_selector("body[data-ready='true']", timeout=60_000)

        def shown() -> np.ndarray:
            app.wait_for_selector("#ood-warning:not([hidden])", timeout=60_000)  # no guard: fails closed
            app.click("#classify-anyway")
            app.wait_for_selector("#results[data-state='done']", timeout=60_000)
            return np.array([float(app.get_attribute(f"#results [data-class='{c}']", "data-prob")) for c in CLASSES])

        path = jpegs["grey-exif-6"]
        upright = decode_file(str(path), path.read_bytes(), 1)[..., 0]
        app.set_input_files("#file-input", str(path))
        assert np.abs(shown() - _tflite_probs(model, upright, size)).max() < 1e-4

        app.click("#rotate-right")
        app.wait_for_selector("#edit-bar[data-edits='1']")
        rotated = np.rot90(upright, k=-1)
        assert app.get_attribute("#edit-bar", "data-size") == f"{rotated.shape[1]}x{rotated.shape[0]}"
        p_rotated = shown()
        assert np.abs(p_rotated - _tflite_probs(model, rotated, size)).max() < 1e-4

        app.click("#crop-start")
        box = app.locator("#preview").bounding_box()
        app.mouse.move(box["x"] + 0.2 * box["width"], box["y"] + 0.1 * box["height"])
        app.mouse.down()
        app.mouse.move(box["x"] + 0.8 * box["width"], box["y"] + 0.7 * box["height"], steps=5)
        app.mouse.up()
        app.click("#crop-apply")
        app.wait_for_selector("#edit-bar[data-edits='2']")
        c = json.loads(app.get_attribute("#edit-bar", "data-crop"))
        assert 0.5 * rotated.shape[1] < c["w"] < 0.7 * rotated.shape[1], c  # about 60% of each side
        cropped = rotated[c["y"] : c["y"] + c["h"], c["x"] : c["x"] + c["w"]]
        assert np.abs(shown() - _tflite_probs(model, cropped, size)).max() < 1e-4

        app.click("#edit-undo")
        app.wait_for_selector("#edit-bar[data-edits='1']")
        assert np.abs(shown() - p_rotated).max() < 1e-6
    finally:
        context.close()
        server.shutdown()
