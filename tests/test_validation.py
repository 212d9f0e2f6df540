"""The Great Expectations suite over manifests of real X-rays, good and broken."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from covid_data.manifest import manifest_for_folder
from covid_data.validation import ValidationConfig, get_profile, validate_manifest
from tests.conftest import make_kaggle_folder


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> pd.DataFrame:
    folder = make_kaggle_folder(tmp_path_factory.mktemp("val"), n_per_class=10, seed=7)
    return manifest_for_folder(folder, workers=2)


def _bounds(lo: int, hi: int) -> ValidationConfig:
    labels = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
    return ValidationConfig(class_bounds={c: (lo, hi) for c in labels})


def _failed(report) -> dict[str, list[str]]:
    return {f.description: f.examples for f in report.failures}


def test_good_sample_passes(manifest):
    report = validate_manifest(manifest, _bounds(5, 20))
    assert report.success, report.failure_message("sample")
    assert report.class_counts == {"COVID": 10, "Lung_Opacity": 10, "Normal": 10, "Viral Pneumonia": 10}
    assert len(report.findings) == 9
    assert "PASSED" in report.summary_markdown("sample")


def test_counts_outside_bounds_fail_per_class(manifest):
    report = validate_manifest(manifest, get_profile("kaggle"))  # expects thousands per class
    assert not report.success
    assert {f.description for f in report.failures} == {
        "COVID images between 3254 and 3978",
        "Lung_Opacity images between 5410 and 6614",
        "Normal images between 9172 and 11212",
        "Viral Pneumonia images between 1210 and 1480",
    }
    assert "COVID images between 3254 and 3978: observed 10" in report.failure_message("x")


def test_missing_and_unknown_classes(manifest):
    m = manifest[manifest["label"] != "Viral Pneumonia"].copy()
    m.loc[m.index[0], "label"] = "Tuberculosis"
    report = validate_manifest(m, _bounds(0, 20))
    (f,) = [f for f in report.failures if f.description.startswith("exactly the four")]
    assert "missing ['Viral Pneumonia']" in str(f.observed) and "unexpected ['Tuberculosis']" in str(f.observed)
    assert f.examples == [m.iloc[0]["path"]]


def test_unreadable_files_are_excluded_or_fail_by_policy(manifest):
    m = manifest.copy()
    m.loc[m.index[3], ["error", "width", "height"]] = ["does not decode: truncated", None, None]
    bad_path = m.iloc[3]["path"]
    lenient = validate_manifest(m, ValidationConfig(**{**_bounds(5, 20).__dict__, "max_unreadable_fraction": 0.05}))
    assert lenient.success
    assert lenient.excluded == [{"path": bad_path, "error": "does not decode: truncated"}]
    assert bad_path in lenient.summary_markdown("x")
    strict = validate_manifest(m, ValidationConfig(**{**_bounds(5, 20).__dict__, "unreadable": "fail"}))
    assert _failed(strict) == {"every file decodes as an image": [bad_path]}
    too_many = validate_manifest(m, _bounds(5, 20))  # 1 of 40 is over the default 1%
    assert not too_many.success


def test_size_mismatch_warns_or_fails(manifest):
    m = manifest.copy()
    m.loc[m.index[5], "width"] = 512
    odd = m.iloc[5]["path"]
    warn = validate_manifest(m, ValidationConfig(**{**_bounds(5, 20).__dict__, "size_mismatch": "warn"}))
    assert warn.success and [w.description for w in warn.warnings] == ["width 299"]
    fail = validate_manifest(m, _bounds(5, 20))
    assert _failed(fail) == {"width 299": [odd]}


def test_same_image_under_two_labels_fails_naming_both(manifest):
    m = manifest.copy()
    covid = m.index[m["label"] == "COVID"][0]
    normal = m.index[m["label"] == "Normal"][0]
    m.loc[normal, "sha256"] = m.loc[covid, "sha256"]
    report = validate_manifest(m, _bounds(5, 20))
    assert sorted(_failed(report)["no image (same sha256) under two labels"]) == sorted(
        [m.loc[covid, "path"], m.loc[normal, "path"]]
    )


def test_real_duplicate_file_across_class_folders(tmp_path: Path):
    folder = make_kaggle_folder(tmp_path / "dup", n_per_class=6, seed=8)
    top = folder / "COVID-19_Radiography_Dataset"
    src = next((top / "COVID" / "images").glob("*.png"))
    shutil.copyfile(src, top / "Normal" / "images" / "copied-from-covid.png")
    report = validate_manifest(manifest_for_folder(folder, workers=1), _bounds(1, 20))
    assert "images/Normal/copied-from-covid.png" in _failed(report)["no image (same sha256) under two labels"]
