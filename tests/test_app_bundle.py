"""The app bundle's build step without a browser: what happens without Node.js, how the server
types files, and which run ``make app`` serves."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from covid_app import bundle, serve
from covid_data.store import open_store
from covid_registry.convert import DISCLAIMER
from tests.conftest import skip_or_fail

REPO = Path(__file__).resolve().parents[1]


def test_without_node_the_bundle_is_skipped_naming_what_to_install(tmp_path, monkeypatch):
    src = tmp_path / "app"
    shutil.copytree(REPO / "app", src, ignore=shutil.ignore_patterns("node_modules", "dist"))
    bin_dir = tmp_path / "bin"  # a PATH with no node and no npm on it
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("COVID_APP_SOURCE", str(src))
    with pytest.raises(bundle.AppBuildUnavailable, match=r"Node\.js .*npm.*apt-get install nodejs npm"):
        bundle.ensure_dist()
    with pytest.raises(bundle.AppBuildUnavailable, match="skipped"):
        bundle.build_app_bundle(str(tmp_path / "store"), "r1", dataset={}, exports=[], guard=None)
    assert not (tmp_path / "store" / "runs").exists()  # nothing half-written


def test_a_built_page_is_used_without_node(tmp_path, monkeypatch):
    src = tmp_path / "app"
    shutil.copytree(REPO / "app", src, ignore=shutil.ignore_patterns("node_modules", "dist"))
    (src / "dist").mkdir()
    for name in ("app.js", "sw.js"):
        (src / "dist" / name).write_text("// built\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("COVID_APP_SOURCE", str(src))
    assert bundle.ensure_dist() == src / "dist"


def test_two_processes_needing_the_page_at_once_build_it_once(tmp_path):
    """Two runs (or test workers) that find the page unbuilt at the same moment: one builds it while the
    other waits on the lock and then uses it (before the lock, both ran npm into one dist/ and one
    failed with EEXIST)."""
    if not (shutil.which("npm") and shutil.which("node") and (REPO / "app" / "node_modules").is_dir()):
        skip_or_fail("needs Node.js, npm and app/node_modules (make app-build)")
    src = tmp_path / "app"
    shutil.copytree(REPO / "app", src, ignore=shutil.ignore_patterns("node_modules", "dist", bundle.LOCK))
    (src / "node_modules").symlink_to(REPO / "app" / "node_modules")
    (tmp_path / "covid_data").mkdir()  # the page imports the pipeline's table of DICOM transfer syntaxes
    shutil.copyfile(REPO / "covid_data" / "transfer_syntaxes.json", tmp_path / "covid_data" / "transfer_syntaxes.json")
    code = "import logging; logging.basicConfig(level=logging.INFO); from covid_app import bundle; bundle.ensure_dist()"
    env = {**os.environ, "COVID_APP_SOURCE": str(src), "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("building the app's page" in o for o in outs) == 1, outs
    assert (src / "dist" / "app.js").is_file() and (src / "dist" / "sw.js").is_file()


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("wasm/litert_wasm_internal.wasm", "application/wasm"),
        ("app.js", "text/javascript"),
        ("manifest.webmanifest", "application/manifest+json"),
        ("data/app.json", "application/json"),
        ("models/custom_cnn.tflite", "application/octet-stream"),
        ("index.html", "text/html"),
        ("icons/icon-192.png", "image/png"),
    ],
)
def test_content_types(path, expected):
    assert serve.content_type(path) == expected


def test_make_app_on_an_empty_store_says_to_run_first(tmp_path):
    with pytest.raises(serve.NoBundleError, match="make run"):
        serve.resolve_run(open_store(str(tmp_path)), None)


def test_an_incomplete_run_is_not_served(tmp_path):
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    with pytest.raises(serve.NoBundleError, match="not complete"):
        serve.ensure_bundle(str(tmp_path), "r1")


def test_serves_the_newest_complete_run_without_a_champion(tmp_path):
    for run, complete in (("20260101T000000Z-a", True), ("20260102T000000Z-b", True), ("20260103T000000Z-c", False)):
        (tmp_path / "runs" / run).mkdir(parents=True)
        if complete:
            (tmp_path / "runs" / run / "run.json").write_text("{}")
    assert serve.resolve_run(open_store(str(tmp_path)), None) == "20260102T000000Z-b"


def test_the_page_shows_the_pipelines_disclaimer_before_app_json_arrives():
    """index.html carries the disclaimer from the first paint (no layout shift when app.json sets it): it
    must be the pipeline's own words, which app.json and the model cards carry."""
    html = (bundle.app_source() / "index.html").read_text()
    assert f'<p id="disclaimer" class="disclaimer">{DISCLAIMER}</p>' in html
