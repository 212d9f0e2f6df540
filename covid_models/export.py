"""Phone-ready exports: Core ML ML Program packages and TensorFlow Lite files, each checked.

Core ML (coremltools 9): the model's own image input (grayscale, raw 0-255 pixels: the
preprocessing is in the graph) and a classifier output with the four labels and their
probabilities, fp16 weights by default and optional 8-bit weight quantisation. After
conversion the package is read back and its inputs, outputs, labels and metadata are checked.
Running it needs the Core ML runtime (macOS); elsewhere that check says it was skipped.

TensorFlow Lite runs here, so its outputs are compared with the Keras model on real images.
"""

from __future__ import annotations

import logging
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from covid_data.labels import CLASSES

log = logging.getLogger(__name__)

DISCLAIMER = "Research use only: not a medical device and not for diagnosis."
TFLITE_MAX_PROB_DIFF = 1e-3  # float32 TFLite against Keras on the same images
COREML_MAX_PROB_DIFF = 2e-2  # fp16 Core ML against float32 Keras


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
    """Convert to an ``.mlpackage`` (fp16, or int8 weights with ``quantize="int8"``)."""
    import coremltools as ct

    size = int(keras_model.input_shape[1])
    channels = int(keras_model.input_shape[-1])
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
    elif quantize is not None:
        raise ValueError(f"unknown quantisation {quantize!r}; use None or 'int8'")
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
        checks["runtime_parity"] = f"skipped: the Core ML runtime needs macOS (this is {platform.system()})"
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


def export_tflite(keras_model, out: Path) -> ExportRecord:
    """A float32 TFLite flatbuffer of the whole model (preprocessing included)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    out.write_bytes(converter.convert())
    return ExportRecord("tflite", str(out), out.stat().st_size, "float32")


def tflite_parity(tflite_path: Path, keras_model, images: np.ndarray) -> float:
    """Largest absolute probability difference between TFLite and Keras over ``images``."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(tflite_path))
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], [1, *images.shape[1:]])
    interpreter.allocate_tensors()
    ref = keras_model.predict(images, verbose=0)
    worst = 0.0
    for img, r in zip(images, ref, strict=True):
        interpreter.set_tensor(inp["index"], img[None].astype("float32"))
        interpreter.invoke()
        worst = max(worst, float(np.abs(interpreter.get_tensor(out["index"])[0] - r).max()))
    return worst
