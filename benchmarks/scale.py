"""Scale benchmark: the data half (manifest + publish + validate + split) on a full-size release.

The Kaggle release has 21,165 images (COVID 3,616, Lung_Opacity 6,012, Normal 10,192, Viral
Pneumonia 1,345); the shared sample has 3,797. This script builds a synthetic release of the
full size in the Kaggle layout (``COVID-19_Radiography_Dataset/<CLASS>/images/*.png``, 299x299
PNG) from the shared sample: every real image once, as is, then real perturbations of them
(JPEG re-encoding at quality 60-95 decoded back to PNG, crops of a few pixels resized back,
shifts, brightness and contrast changes, one to three at a time), so the release holds the
exact and near duplicates the split must keep together. It is written outside the repository
(default ``/tmp/covid-scale``) and reused when complete.

Then, in a fresh child process (so its peak memory is its own), it times the plain functions
the ``prepare-data`` flow's tasks call, without Prefect: ``discover`` + ``build_manifest``
(process pool), ``publish_version`` into a fresh local store, ``validate_manifest`` (the
``kaggle`` profile) and ``write_split``. Peak memory: ``getrusage`` max RSS of the process and
of its largest child (the manifest workers).

Usage: PYTHONPATH=. .venv/bin/python benchmarks/scale.py [--out /tmp/covid-scale] [--workers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared/data/covid19-radiography-sample"
DEFAULT_OUT = Path("/tmp/covid-scale")
KAGGLE_COUNTS = {"COVID": 3616, "Lung_Opacity": 6012, "Normal": 10192, "Viral Pneumonia": 1345}
GOAL_S, GOAL_GB = 300.0, 4.0


# -- generation --------------------------------------------------------------------------------
def perturb(data: bytes, seed: int) -> bytes:
    """A new PNG of the same X-ray: 1-3 of re-encoding, crop, shift, brightness/contrast."""
    from PIL import Image, ImageChops, ImageEnhance

    rng = random.Random(seed)
    im = Image.open(io.BytesIO(data))
    im.load()
    size = im.size
    for op in rng.sample(["jpeg", "crop", "shift", "light"], rng.randint(1, 3)):
        if op == "jpeg":
            buf = io.BytesIO()
            im.convert("L").save(buf, "JPEG", quality=rng.randint(60, 95))
            im = Image.open(io.BytesIO(buf.getvalue()))
            im.load()
        elif op == "crop":
            left, top, right, bottom = (rng.randint(1, 8) for _ in range(4))
            im = im.crop((left, top, size[0] - right, size[1] - bottom)).resize(size, Image.Resampling.BILINEAR)
        elif op == "shift":
            im = ImageChops.offset(im, rng.randint(-6, 6), rng.randint(-6, 6))
        else:
            im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.85, 1.15))
            im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.9, 1.1))
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def _make_one(job: tuple[str, str, int]) -> None:
    src, dest, seed = job
    data = Path(src).read_bytes()
    Path(dest).write_bytes(data if seed < 0 else perturb(data, seed))


def generate(data: Path, out: Path, counts: dict[str, int], workers: int) -> dict[str, Any]:
    """Write the synthetic release under ``out`` (reused when a complete one with the same
    counts is there). Returns what was done."""
    marker = out / ".complete.json"
    spec = {"source": str(data.resolve()), "counts": counts, "format": 1}
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == spec:
        return {"reused": True, "seconds": 0.0, "images": sum(counts.values())}
    from multiprocessing import get_context

    shutil.rmtree(out, ignore_errors=True)
    top = out / "COVID-19_Radiography_Dataset"
    jobs: list[tuple[str, str, int]] = []
    for label, n in counts.items():
        originals = sorted((data / "COVID-19_Radiography_Dataset" / label / "images").glob("*.png"))
        (top / label / "images").mkdir(parents=True)
        for i in range(n):
            src = originals[i % len(originals)]
            # Seeds from the name, not hash(): the same release on every run.
            seed = -1 if i < len(originals) else int(hashlib.sha256(f"{label}:{i}".encode()).hexdigest()[:8], 16)
            jobs.append((str(src), str(top / label / "images" / f"{label}-{i + 1}.png"), seed))
    t = time.perf_counter()
    with get_context("forkserver").Pool(workers) as pool:
        for _ in pool.imap_unordered(_make_one, jobs, chunksize=64):
            pass
    seconds = time.perf_counter() - t
    marker.write_text(json.dumps({"spec": spec, "seconds": seconds}))
    return {"reused": False, "seconds": seconds, "images": len(jobs)}


# -- the timed prepare (child process) ---------------------------------------------------------
class TreeMemory:
    """Samples this process and its descendants (the forkserver's manifest workers are not
    children that getrusage(RUSAGE_CHILDREN) sees) every ``period`` s from /proc: the largest
    peak RSS (VmHWM) of any one process, and the largest total RSS of the tree at once."""

    def __init__(self, period: float = 0.1):
        import threading

        self.period, self.peak_one_kb, self.peak_total_kb = period, 0, 0
        self.cpu_ticks: dict[int, int] = {}  # pid -> last seen user+system clock ticks
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _tree() -> list[int]:
        parent: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    stat = Path(f"/proc/{d}/stat").read_text()
                    parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        tree, frontier = [os.getpid()], [os.getpid()]
        while frontier:
            frontier = [pid for pid, pp in parent.items() if pp in frontier]
            tree += frontier
        return tree

    @staticmethod
    def _status_kb(pid: int, field: str) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = self._tree()
            for pid in pids:
                try:
                    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    self.cpu_ticks[pid] = int(f[11]) + int(f[12])  # utime, stime
                except (OSError, IndexError, ValueError):
                    pass
            self.peak_one_kb = max([self.peak_one_kb] + [self._status_kb(p, "VmHWM") for p in pids])
            self.peak_total_kb = max(self.peak_total_kb, sum(self._status_kb(p, "VmRSS") for p in pids))
            self._stop.wait(self.period)

    @property
    def cpu_seconds(self) -> float:
        """CPU time of the whole tree: robust to other load on the machine, unlike wall time."""
        return sum(self.cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def prepare(source: Path, store_dir: Path, workers: int, profile: str) -> dict[str, Any]:
    from covid_data.dataset import publish_version
    from covid_data.manifest import build_manifest, discover
    from covid_data.split import SplitConfig, write_split
    from covid_data.store import open_store
    from covid_data.validation import get_profile, validate_manifest

    shutil.rmtree(store_dir, ignore_errors=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    files = discover(source)
    manifest = build_manifest(files, workers=workers)
    times["manifest"] = time.perf_counter() - t0
    t = time.perf_counter()
    store = open_store(store_dir)
    dataset = publish_version(store, manifest, source, source=str(source))
    times["publish"] = time.perf_counter() - t
    t = time.perf_counter()
    report = validate_manifest(manifest, get_profile(profile))
    times["validate"] = time.perf_counter() - t
    t = time.perf_counter()
    split = write_split(store, dataset.version, manifest, SplitConfig())
    times["split"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    # Grouping alone, without the assignment and store writes around it.
    from covid_data.near_duplicates import duplicate_groups
    from covid_data.split import usable_rows

    usable = usable_rows(manifest)
    t = time.perf_counter()
    groups = duplicate_groups(usable["sha256"], usable["phash"], SplitConfig().near_dup_distance)
    times["grouping_unbounded"] = time.perf_counter() - t
    import numpy as np
    import pandas as pd

    sizes = np.bincount(groups)
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "images": len(manifest),
        "validation_success": report.success,
        "dataset_version": dataset.version,
        "split_hash": split.split_hash,
        "split_counts": {s: sum(c.values()) for s, c in split.counts.items()},
        "groups": int(pd.read_parquet(split.uri)["group"].nunique()),
        "duplicate_groups": split.duplicate_groups,
        "largest_group": split.largest_group,
        "largest_group_unbounded": int(sizes.max()),
        "groups_over_bound_unbounded": int((sizes > SplitConfig().group_bound(len(usable))).sum()),
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "peak_rss_gb": {"self": round(self_kb / 2**20, 3), "largest_child": round(child_kb / 2**20, 3)},
    }


def run_child(source: Path, store_dir: Path, workers: int, profile: str) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    with TreeMemory() as mem:
        result = prepare(source, store_dir, workers, profile)
    result["cpu_seconds_process_tree"] = round(mem.cpu_seconds, 1)
    result["loadavg_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    result["peak_rss_gb"].update(
        largest_process_sampled=round(mem.peak_one_kb / 2**20, 3),
        process_tree_total_sampled=round(mem.peak_total_kb / 2**20, 3),
    )
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared sample (Kaggle layout)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the synthetic release goes (reused)")
    p.add_argument("--store", type=Path, default=None, help="fresh local store for the run (default OUT-store)")
    p.add_argument("--workers", type=int, default=2, help="processes for generation and the manifest")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the Kaggle release's size")
    p.add_argument("--profile", default=None, help="validation profile (default: kaggle at full scale, else any)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    store = a.store or a.out.with_name(a.out.name + "-store")
    if a.child:
        print(json.dumps(run_child(a.out, store, a.workers, a.profile)))
        return
    counts = {k: max(10, round(v * a.scale)) for k, v in KAGGLE_COUNTS.items()}
    gen = generate(a.data, a.out, counts, a.workers)
    print(
        f"release: {gen['images']} images under {a.out} ({'reused' if gen['reused'] else 'generated'}"
        f" in {gen['seconds']:.1f} s)",
        file=sys.stderr,
    )
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--out", str(a.out), "--store", str(store)]
    cmd += ["--workers", str(a.workers), "--profile", a.profile or ("kaggle" if a.scale == 1 else "any")]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.perf_counter()
    # Only stdout (the result) is captured; the child's log lines pass through on stderr.
    res = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    result = json.loads(res.stdout.strip().splitlines()[-1])
    result.update(generation=gen, child_wall_s=round(wall, 2), nproc=len(os.sched_getaffinity(0)))
    peak = result["peak_rss_gb"]["process_tree_total_sampled"]
    result["goal"] = {
        "seconds": GOAL_S,
        "gb": GOAL_GB,
        "met": result["seconds"]["total"] <= GOAL_S and peak <= GOAL_GB,
    }
    out_json = REPO / "benchmarks/out/scale.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    shutil.rmtree(store, ignore_errors=True)
    result["cleanup_s"] = round(time.perf_counter() - t, 2)
    out_json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
