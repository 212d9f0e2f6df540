"""Shared fixtures: seeded samples of the real data, a GCS emulator, a Kaggle API stub, Prefect."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# The kaggle client reads its endpoint when first imported: point it at the loopback stub
# (http://localhost, port 80) and away from any real credentials on this machine.
os.environ["KAGGLE_API_ENVIRONMENT"] = "LOCALHOST"
os.environ["KAGGLE_CONFIG_DIR"] = tempfile.mkdtemp(prefix="kaggle-config-")
for _var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
    os.environ.pop(_var, None)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Subprocess runs that start a temporary server in a fresh Prefect home migrate its database first.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# Two test workers share two cores: one TensorFlow thread per pool in each test process and everything it
# starts (TensorFlow's default is a pool the size of the machine in every process; with two workers the
# pools fight over the cores: 7% more CPU time on two end-to-end files here).
for _var in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from tests.kaggle_stub import KaggleStub  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLE = SHARED / "data" / "covid19-radiography-sample"
SAMPLE_ROOT = SAMPLE / "COVID-19_Radiography_Dataset"
SHENZHEN_CXR = SHARED / "data" / "shenzhen-cxr"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_224_no_top.weights.h5"
CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")

# The longest test files first (measured with `--durations`): `make test` hands whole files to two
# workers in collection order (`--dist loadfile --no-loadscope-reorder`), and a long file handed out
# last would leave the other worker idle while it runs.
SLOWEST_FIRST = (
    "test_app_browser.py", "test_crash_safety.py", "test_e2e_retrain.py", "test_retrain_flow.py",
    "test_e2e_fanout.py", "test_concurrent_runs.py", "test_dask.py", "test_training.py", "test_app_size.py",
    "test_fanout.py", "test_lock_after_kill.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def skip_or_fail(reason: str) -> None:
    """Skip a test whose shared data or tool is absent, except under ``CI=true``, where it fails:
    CI has ../shared and installs its tools, so a skip there would hide a broken setup."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"under CI=true this cannot be skipped: {reason}")
    pytest.skip(reason)


def run_page_code(helper: Path, items: list[dict], tmp: Path, what: str) -> list:
    """The page's code under node: the helper script (app/test/*.mjs) reads ``items`` (written to a JSON
    file in ``tmp``) and prints its answer as JSON. Skips (fails under ``CI=true``) without node."""
    import json

    node = shutil.which("node")
    if node is None:
        skip_or_fail(f"{what} runs the page's code under node (apt-get install nodejs)")
    (tmp / "items.json").write_text(json.dumps(items))
    out = subprocess.run([node, str(helper), str(tmp / "items.json")], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def require_shared(*paths: Path) -> None:
    """Skip (fail under ``CI=true``) unless every path of ../shared is there."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        skip_or_fail(f"needs {', '.join(missing)} (../shared beside the checkout)")


def _require_sample() -> None:
    require_shared(SAMPLE_ROOT)


def sample_files(n_per_class: int, seed: int = 0) -> dict[str, list[Path]]:
    """A seeded choice of real images per class from the shared sample."""
    _require_sample()
    rng = random.Random(seed)
    out = {}
    for c in CLASSES:
        files = sorted((SAMPLE_ROOT / c / "images").glob("*.png"))
        out[c] = rng.sample(files, n_per_class)
    return out


@pytest.fixture(scope="module")
def shenzhen_few(tmp_path_factory) -> Path:
    """A seeded dozen of the Shenzhen X-rays with their masks, in the set's own layout (a mask source the
    segmenter trains on in seconds)."""
    require_shared(SHENZHEN_CXR / "masks")
    root = tmp_path_factory.mktemp("shenzhen-few")
    (root / "masks").mkdir()
    for m in random.Random(16).sample(sorted((SHENZHEN_CXR / "masks").glob("*.png")), 12):
        finding = "Normal" if m.stem.endswith("_0") else "Tuberculosis"
        (root / finding).mkdir(exist_ok=True)
        shutil.copyfile(SHENZHEN_CXR / finding / m.name, root / finding / m.name)
        shutil.copyfile(m, root / "masks" / m.name)
    return root


@contextlib.contextmanager
def store_writes_logged(base: Path) -> Iterator[Callable[[], list[str]]]:
    """The store's fault hook set to log every write's key and never to kill: yields a function that
    returns the keys written so far in the block (for "the marker is written last", "not one write")."""
    log, counter = base / "writes.log", base / "count"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COVID_FAULT_KILL_AFTER", str(10**9))
        mp.setenv("COVID_FAULT_COUNTER", str(counter))
        mp.setenv("COVID_FAULT_LOG", str(log))
        yield lambda: [line.split("\t")[1] for line in log.read_text().splitlines()] if log.exists() else []


def lung_mask_png(path: Path, size: int = 256) -> Path:
    """A binary lung mask like the Kaggle release's (256 px, two white lung fields on black)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    lungs = np.zeros((size, size), bool)
    for cx in (0.3, 0.7):
        lungs |= ((x - cx) / 0.15) ** 2 + ((y - 0.5) / 0.32) ** 2 <= 1
    Image.fromarray(np.where(lungs, 255, 0).astype("uint8")).save(path)
    return path


def make_kaggle_folder(
    dest: Path, n_per_class: int = 12, seed: int = 0, extras: bool = True, masks: str = "some"
) -> Path:
    """Copy a seeded sample into ``dest`` in the Kaggle layout, with the xlsx/README extras and
    ``masks/``: ``"some"`` gives the first image of each class a lung mask and the second an X-ray
    misfiled as its mask (not usable); ``"all"`` gives every image a lung mask; ``"none"`` no masks."""
    top = dest / "COVID-19_Radiography_Dataset"
    for c, files in sample_files(n_per_class, seed).items():
        (top / c / "images").mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, top / c / "images" / f.name)
        if extras:
            (top / c / "masks").mkdir(exist_ok=True)
            for f in {"all": files, "some": files[:1]}.get(masks, []):
                lung_mask_png(top / c / "masks" / f.name)
            if masks == "some":
                shutil.copyfile(files[1], top / c / "masks" / files[1].name)
            (top / f"{c}.metadata.xlsx").write_bytes(b"PK\x03\x04 not really a spreadsheet")
    if extras:
        (top / "README.md.txt").write_text("COVID-19 Radiography Database\n")
    return dest


@pytest.fixture
def kaggle_folder(tmp_path: Path) -> Path:
    return make_kaggle_folder(tmp_path / "src")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


GCS_BUCKET = "covid-test"


@pytest.fixture(scope="session")
def gcs_emulator():
    """A real gcp-storage-emulator on loopback; yields its endpoint URL."""
    port = _free_port()
    # The emulator, with GCS' upload preconditions (ifGenerationMatch) enforced: tests/gcs_emulator.py.
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("gcs_emulator.py")),
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--in-memory",
            "--default-bucket",
            GCS_BUCKET,
            "-q",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        old = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = endpoint
        yield endpoint
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(params=["local", "gcs"])
def store_uri(request, tmp_path: Path) -> str:
    """A fresh, empty store of each backend."""
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("gcs_emulator")
    return f"gs://{GCS_BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def kaggle_stub():
    stub = KaggleStub()
    try:
        stub.start()
    except OSError as e:
        skip_or_fail(f"the Kaggle API stub needs port 80 on loopback (the client's LOCALHOST endpoint): {e}")
    yield stub
    stub.stop()


@pytest.fixture(scope="session")
def prefect_server():
    """A real temporary Prefect server (SQLite) for flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


class PrefectCLI:
    """A real `prefect server start` (SQLite) on loopback, and the CLI pointed at it."""

    def __init__(self, home: Path):
        self.home = home
        self.port = _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.settings = {
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
        }
        self.procs: list[subprocess.Popen] = []
        self.exe = str(Path(sys.executable).parent / "prefect")

    @property
    def env(self) -> dict[str, str]:
        # Read os.environ at each start, so fixtures set before (the GCS emulator) reach workers.
        return {**os.environ, **self.settings}

    def _spawn(self, cmd: list[str], log_name: str) -> None:
        with open(self.home / log_name, "ab") as log:  # the child keeps its own copy of the fd
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))

    def start_server(self) -> None:
        self._spawn([self.exe, "server", "start"], "server.log")
        import urllib.request

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.api}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"Prefect server did not start; log: {(self.home / 'server.log').read_text()[-2000:]}")

    def run(self, *args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        res = subprocess.run(
            [self.exe, *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw
        )
        if res.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def create_local_pool(self) -> None:
        """The `local-process` pool the deployments in prefect.yaml use, from its template."""
        self.run(
            "work-pool",
            "create",
            "local-process",
            "--type",
            "process",
            "--overwrite",
            "--base-job-template",
            "deployments/local-process-pool.json",
        )

    def start_worker(self, pool: str, *extra: str) -> None:
        self._spawn([self.exe, "worker", "start", "--pool", pool, *extra], f"worker-{pool}.log")

    def log(self, name: str) -> str:
        p = self.home / name
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def prefect_cli(tmp_path_factory):
    """A fresh server per test: workers and deployments of one test never serve another."""
    cli = PrefectCLI(tmp_path_factory.mktemp("prefect-home"))
    cli.start_server()
    yield cli
    cli.stop()


@pytest.fixture(scope="session")
def small_split(tmp_path_factory) -> str:
    """A published dataset of 15 real X-rays per class with a 60/20/20 split: the split's URI."""
    from covid_data.dataset import fetch_dataset, load_manifest
    from covid_data.split import SplitConfig, write_split
    from covid_data.store import open_store

    base = tmp_path_factory.mktemp("small-split")
    ref = fetch_dataset(str(make_kaggle_folder(base / "src", n_per_class=15, seed=41)), str(base / "store"))
    store = open_store(ref.store)
    split = write_split(store, ref.version, load_manifest(store, ref.version), SplitConfig(0.6, 0.2, 0.2))
    return split.uri


@pytest.fixture(scope="session")
def world(small_split, tmp_path_factory):
    """Tiny trained models on three splits of ``small_split``, for the champion tests."""
    from tests.champion_world import build_world

    return build_world(small_split, tmp_path_factory)


@pytest.fixture(autouse=True)
def _no_weight_downloads(monkeypatch):
    """Tests never download weights: an absent file is an error naming it."""
    monkeypatch.setenv("COVID_WEIGHTS_DOWNLOAD", "0")
