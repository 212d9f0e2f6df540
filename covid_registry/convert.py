"""Phone-ready exports: Core ML ML Program packages and TensorFlow Lite files, each checked.

Core ML (coremltools 9): the model's own image input (grayscale, raw 0-255 pixels: the
preprocessing is in the graph) and a classifier output with the four labels and their
probabilities, fp16 weights by default and optional 8-bit weight quantisation. After
conversion the package is read back and its inputs, outputs, labels and metadata are checked.
Running it needs the Core ML runtime (macOS); elsewhere that check says it was skipped.

TensorFlow Lite runs here, so its outputs are compared with the Keras model on real images.

Both converters are chatty: Keras' SavedModel export prints one ``TensorSpec(...)`` line per
captured variable, TensorFlow's C++ converter logs through absl to stderr, and coremltools draws
progress bars. :func:`converter_output` keeps all of it out of the run log, in a file beside the
export (``<export>.log``) and a DEBUG record; a conversion error carries the log's tail.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covid_data.labels import CLASSES
from covid_registry.tflite_weights import int8_dense_weights

log = logging.getLogger(__name__)

DISCLAIMER = "Research use only: not a medical device and not for diagnosis."
TFLITE_MAX_PROB_DIFF = 1e-3  # float32 TFLite against Keras on the same images
# The phone app's smaller TFLite files, against the float32 Keras model on the same real test images:
# float16 weights (half the bytes) and dynamic-range int8 weights (a quarter). Each bounds the largest
# probability difference and the share of images whose top class changes (1 - top-1 agreement).
# ``int8-dense``: int8 weights in the dense layers only, computed in float32 (covid_registry.tflite_weights);
# like float16 it quantises no activation, and it is held to float16's bounds.
TFLITE_PRECISIONS = ("float32", "float16", "int8", "int8-dense")
TFLITE_COMPACT_MAX_PROB_DIFF = {"float16": 1e-2, "int8": 0.1, "int8-dense": 1e-2}
TFLITE_COMPACT_MIN_TOP1_AGREEMENT = {"float16": 1.0, "int8": 0.9, "int8-dense": 1.0}
COREML_MAX_PROB_DIFF = 2e-2  # fp16 Core ML against float32 Keras
# 8-bit weights move probabilities by a few points (checked where the Core ML runtime exists: macOS).
COREML_INT8_MAX_PROB_DIFF = 0.05


class ExportCheckError(RuntimeError):
    """An exported model does not read back as it should."""


@dataclass
class ExportRecord:
    format: str  # "coreml" | "tflite"
    path: str
    bytes: int
    precision: str
    checks: dict[str, Any] = field(default_factory=dict)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


# Python loggers the converters chatter on; their records go to the converter log, not the run log.
CONVERTER_LOGGERS = ("tensorflow", "absl", "keras", "coremltools", "h5py")


def _flush_c_stdio() -> None:
    """Flush C's stdio buffers (printf from native code) before the fds are switched."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def _loggers_to(stream) -> Iterator[None]:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in CONVERTER_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False
    try:
        yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate


def _error_tail(text: str, n: int = 40) -> str:
    """The converter log's lines that look like errors (else its last lines), at most ``n``."""
    lines = [ln for ln in text.splitlines() if ln.strip() and "TensorSpec(" not in ln]
    errors = [ln for ln in lines if "error" in ln.lower() or ln[:1] in ("E", "F") and ln[1:5].isdigit()]
    return "\n".join((errors or lines)[-n:])


@contextlib.contextmanager
def converter_output(log_path: Path, what: str = "converter") -> Iterator[Path]:
    """Send everything printed inside the block to ``log_path`` instead of the run log.

    Native code (TensorFlow's converter, absl logging) writes to file descriptors 1 and 2, so those
    are redirected; Python prints go to ``sys.stdout``/``sys.stderr``, which a runner or pytest may
    have replaced by objects that never reach those fds, so they are redirected too; and the
    tf/absl/keras/coremltools loggers write there as well. On an exception, the log's error lines
    are added to the exception's notes, so a real failure still says what went wrong. While the
    block runs, anything else the process prints (other threads) lands in the same file.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    _flush_c_stdio()
    log_path.write_bytes(b"")  # this conversion's output only
    # Both opened for appending: the fds and the Python stream then never overwrite each other.
    with open(log_path, "ab") as raw, open(log_path, "a", buffering=1, encoding="utf-8", errors="replace") as text:
        saved: list[tuple[int, int]] = []
        try:
            for fd in (1, 2):
                with contextlib.suppress(OSError):  # a closed fd (a daemon) has nothing to redirect
                    saved.append((fd, os.dup(fd)))
                    os.dup2(raw.fileno(), fd)
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text), _loggers_to(text):
                yield log_path
        except BaseException as e:
            text.flush()
            _flush_c_stdio()
            tail = _error_tail(log_path.read_text(errors="replace"))
            e.add_note(f"{what} output (full log: {log_path}):\n{tail}" if tail else f"{what} log: {log_path}")
            raise
        finally:
            text.flush()
            _flush_c_stdio()
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
    n = sum(1 for _ in log_path.open(errors="replace"))
    log.debug("%s printed %d lines, kept in %s", what, n, log_path)
    logging.getLogger(__name__ + ".converter").debug("%s output:\n%s", what, log_path.read_text(errors="replace"))


def log_beside(out: Path) -> Path:
    return out.with_name(out.name + ".log")


def coreml_metadata(model_name: str, input_size: int, version: str, metrics: dict[str, Any]) -> dict[str, str]:
    return {
        "model": model_name,
        "version": version,
        "input_size": f"{input_size}x{input_size} grayscale, raw pixels 0-255",
        "classes": ", ".join(CLASSES),
        **{f"metric.{k}": f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in metrics.items()},
        "note": DISCLAIMER,
    }


def convert_coreml(
    keras_model,
    out: Path,
    *,
    model_name: str,
    version: str,
    metrics: dict[str, Any],
    quantize: str | None = None,
    author: str = "covid-xray-retraining pipeline",
    license: str = "Model weights: research use only. Data: COVID-19 Radiography Database (Kaggle), see its terms.",
) -> ExportRecord:
    """Convert to an ``.mlpackage`` (fp16, or int8 weights with ``quantize="int8"``).

    What coremltools prints (its import warnings, progress bars, TensorFlow's logs) goes to
    ``<out>.log`` beside the package.
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"unknown quantisation {quantize!r}; use None or 'int8'")
    size = int(keras_model.input_shape[1])
    channels = int(keras_model.input_shape[-1])
    with converter_output(log_beside(out), "Core ML converter"):
        import coremltools as ct

        layout = ct.colorlayout.GRAYSCALE if channels == 1 else ct.colorlayout.RGB
        mlmodel = ct.convert(
            keras_model,
            inputs=[ct.ImageType(name="image", shape=(1, size, size, channels), color_layout=layout)],
            classifier_config=ct.ClassifierConfig(list(CLASSES)),
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=ct.target.iOS15,
        )
        precision = "float16"
        if quantize == "int8":
            from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

            config = OptimizationConfig(global_config=OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8"))
            mlmodel = linear_quantize_weights(mlmodel, config=config)
            precision = "int8 weights"
    mlmodel.short_description = f"{model_name}: chest X-ray classifier ({', '.join(CLASSES)}). {DISCLAIMER}"
    mlmodel.author = author
    mlmodel.license = license
    mlmodel.version = version
    meta = coreml_metadata(model_name, size, version, metrics)
    mlmodel.user_defined_metadata.update(meta)
    mlmodel.input_description["image"] = f"{size}x{size} chest X-ray, {'grayscale' if channels == 1 else 'RGB'}"
    mlmodel.output_description["classLabel"] = "most likely class"
    mlmodel.output_description["classLabel_probs"] = "probability of each class"
    if out.exists():
        shutil.rmtree(out)
    mlmodel.save(str(out))
    rec = ExportRecord("coreml", str(out), _dir_bytes(out), precision)
    rec.checks = check_coreml(out, size=size, channels=channels, metadata=meta)
    return rec


def _classify_labels(spec) -> list[str]:
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                if op.type == "classify":
                    arg = op.inputs["classes"].arguments[0].value.immediateValue.list.values
                    return [v.immediateValue.tensor.strings.values[0] for v in arg]
    return []


def check_coreml(package: Path, *, size: int, channels: int, metadata: dict[str, str]) -> dict[str, Any]:
    """Read the package back and check what the app relies on; raise on any mismatch."""
    import coremltools as ct

    ml = ct.models.MLModel(str(package), skip_model_load=True)
    spec = ml.get_spec()
    problems = []
    (inp,) = spec.description.input
    want_space = "GRAYSCALE" if channels == 1 else "RGB"
    space = ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(inp.type.imageType.colorSpace)
    if (inp.name, inp.type.imageType.width, inp.type.imageType.height, space) != ("image", size, size, want_space):
        problems.append(f"input is {inp.name} {inp.type.imageType.width}x{inp.type.imageType.height} {space}")
    outputs = sorted(o.name for o in spec.description.output)
    if outputs != ["classLabel", "classLabel_probs"]:
        problems.append(f"outputs are {outputs}")
    labels = _classify_labels(spec)
    if labels != list(CLASSES):
        problems.append(f"class labels are {labels}")
    stored = dict(ml.user_defined_metadata)
    missing = {k for k, v in metadata.items() if stored.get(k) != v}
    if missing:
        problems.append(f"metadata differs for {sorted(missing)}")
    if DISCLAIMER not in (ml.short_description or ""):
        problems.append("description lacks the research-use note")
    if problems:
        raise ExportCheckError(f"{package}: " + "; ".join(problems))
    checks: dict[str, Any] = {"read_back": "ok", "labels": labels, "input": f"{size}x{size} {want_space}"}
    if platform.system() == "Darwin":
        checks["runtime"] = "available: outputs compared with Keras on real test images after conversion"
    else:
        checks["runtime_parity"] = f"unchecked: the Core ML runtime needs macOS (this is {platform.system()})"
    return checks


def coreml_parity(package: Path, keras_model, images: np.ndarray) -> float:
    """Largest probability difference between Core ML and Keras (macOS only)."""
    import coremltools as ct
    from PIL import Image

    ml = ct.models.MLModel(str(package))
    keras_probs = keras_model.predict(images, verbose=0)
    worst = 0.0
    for img, ref in zip(images, keras_probs, strict=True):
        pil = Image.fromarray(img[..., 0].astype("uint8"), mode="L")
        probs = ml.predict({"image": pil})["classLabel_probs"]
        worst = max(worst, max(abs(probs[c] - float(r)) for c, r in zip(CLASSES, ref, strict=True)))
    return worst


def export_tflite(keras_model, out: Path, precision: str = "float32") -> ExportRecord:
    """A TFLite flatbuffer of the whole model (preprocessing included), input ``[1, H, W, C]``.

    ``precision``: ``float32``; ``float16`` (weights stored as float16, computed in float32);
    ``int8`` (dynamic-range quantisation: weights stored as int8 with a scale per channel, activations
    quantised on the fly); or ``int8-dense`` (the dense layers' weights alone as int8, computed in
    float32: covid_registry.tflite_weights). The batch dimension is fixed at 1: LiteRT.js (the phone
    app's runtime) refuses a ``[1, H, W, C]`` tensor for a model whose input is ``[-1, H, W, C]``. The
    converter's output (hundreds of ``TensorSpec`` lines, absl logs) goes to ``<out>.log``.
    """
    import keras
    import tensorflow as tf

    if precision not in TFLITE_PRECISIONS:
        raise ValueError(f"unknown TFLite precision {precision!r}; choose from {TFLITE_PRECISIONS}")
    inp = keras.Input(shape=tuple(keras_model.input_shape[1:]), batch_size=1, name="image")
    fixed = keras.Model(inp, keras_model(inp), name=keras_model.name)
    with converter_output(log_beside(out), "TFLite converter"):
        converter = tf.lite.TFLiteConverter.from_keras_model(fixed)
        if precision in ("float16", "int8"):
            converter.optimizations = [tf.lite.Optimize.DEFAULT]  # without a dataset: dynamic range
        if precision == "float16":
            converter.target_spec.supported_types = [tf.float16]
        flatbuffer = converter.convert()
    if precision == "int8-dense":
        flatbuffer = _int8_dense(flatbuffer, out)
    out.write_bytes(flatbuffer)
    return ExportRecord("tflite", str(out), out.stat().st_size, precision)


def int8_dense_from_float32(float32_file: Path, out: Path) -> ExportRecord:
    """The ``int8-dense`` file of a float32 TFLite file (no second conversion: the same graph, its
    dense weights rounded to int8)."""
    out.write_bytes(_int8_dense(Path(float32_file).read_bytes(), out))
    return ExportRecord("tflite", str(out), out.stat().st_size, "int8-dense")


def _int8_dense(flatbuffer: bytes, out: Path) -> bytes:
    flatbuffer, quantised = int8_dense_weights(flatbuffer)
    log.info("%s: %d dense weight tensors stored as int8", out.name, quantised)
    return flatbuffer


def tflite_probabilities(tflite_path: Path, images: np.ndarray) -> np.ndarray:
    """The TFLite model's output for each image (one at a time: the batch is fixed at 1)."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(tflite_path))
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    interpreter.allocate_tensors()
    probs = []
    for img in images:
        interpreter.set_tensor(inp["index"], img[None].astype("float32"))
        interpreter.invoke()
        probs.append(interpreter.get_tensor(out["index"])[0].copy())
    return np.stack(probs)


def agreement(probs: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """``max_prob_diff`` (largest |Δp| over images and classes) and ``top1_agreement`` (share of
    images with the same top class) of ``probs`` against ``reference``."""
    return {
        "max_prob_diff": float(np.abs(probs - reference).max()),
        "top1_agreement": float((probs.argmax(1) == reference.argmax(1)).mean()),
    }


def tflite_parity(tflite_path: Path, keras_model, images: np.ndarray) -> float:
    """Largest absolute probability difference between TFLite and Keras over ``images``."""
    return agreement(tflite_probabilities(tflite_path, images), keras_model.predict(images, verbose=0))["max_prob_diff"]
