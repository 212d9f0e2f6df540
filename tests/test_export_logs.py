"""Exports keep the converters' chatter out of the run log, and still say what went wrong."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from covid_models.builders import build_model
from covid_registry.convert import (
    CONVERTER_LOGGERS,
    TFLITE_MAX_PROB_DIFF,
    convert_coreml,
    converter_output,
    export_tflite,
    tflite_parity,
)


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("custom_cnn", input_size=32, weights="none")


def test_tflite_export_prints_no_tensorspec_lines_and_still_works(tiny_model, tmp_path: Path, capfd):
    capfd.readouterr()
    rec = export_tflite(tiny_model, tmp_path / "m.tflite")
    out, err = capfd.readouterr()
    assert "TensorSpec" not in out + err, (out + err)[-2000:]
    assert "tf_tfl_flatbuffer_helpers" not in err  # the C++ converter's absl lines
    log = (tmp_path / "m.tflite.log").read_text()
    assert log.count("TensorSpec(") >= 10, "the converter's output should be kept beside the export"
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 1)).astype("float32")
    assert rec.bytes > 0 and tflite_parity(Path(rec.path), tiny_model, images) <= TFLITE_MAX_PROB_DIFF


def test_coreml_export_draws_no_progress_bars(tiny_model, tmp_path: Path, capfd):
    capfd.readouterr()
    rec = convert_coreml(tiny_model, tmp_path / "m.mlpackage", model_name="custom_cnn", version="t", metrics={})
    out, err = capfd.readouterr()
    assert "Running MIL" not in out + err and "TensorSpec" not in out + err, (out + err)[-2000:]
    assert "Running MIL" in (tmp_path / "m.mlpackage.log").read_text()
    assert rec.checks["read_back"] == "ok"


def test_a_failing_conversion_still_says_why(tmp_path: Path, capfd):
    capfd.readouterr()
    loggers = [logging.getLogger(n) for n in CONVERTER_LOGGERS]
    before = [(lg.handlers[:], lg.propagate) for lg in loggers]
    log = tmp_path / "x.log"
    with pytest.raises(RuntimeError, match="conversion failed") as info, converter_output(log, "test converter"):
        os.write(2, b"E0000 00:00:1.0 converter.cc:1] native failure: op FooBar is not supported\n")
        print("  12345: TensorSpec(shape=(), dtype=tf.resource, name=None)")
        sys.stderr.write("python-level noise\n")
        logging.getLogger("absl").error("absl logger says boom")
        raise RuntimeError("conversion failed")
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "native failure: op FooBar is not supported" in notes and "absl logger says boom" in notes, notes
    assert "TensorSpec" not in notes and str(log) in notes
    # The fds and streams are back: what is printed now reaches the terminal again.
    os.write(1, b"fd one restored\n")
    print("stdout restored")
    out, _ = capfd.readouterr()
    assert "fd one restored" in out and "stdout restored" in out
    assert [(lg.handlers, lg.propagate) for lg in loggers] == before
