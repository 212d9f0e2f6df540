"""Ingest benchmark: manifest + validation throughput against plain single-process PIL loops.

Measured side by side, on the same files, interleaved in each repeat:

* ours: ``discover`` + ``build_manifest`` (process pool) + ``validate_manifest`` (Great Expectations);
* plain loop: one process, per file read bytes, sha256, ``Image.open`` + ``load()``, size/mode, ``imagehash.phash``;
* decode-only loop: the plain loop without the perceptual hash;
* reference: ``build_manifest(workers=1)``, i.e. our per-file code without the pool (manifest only).

Timings are warm: the files are read once beforehand (page cache), and one small warm-up manifest and
validation run first, so Great Expectations' import and the forkserver start are not in the timed runs.
Those one-time costs are reported separately.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/ingest.py [--data DIR] [--repeats N] [--limit N]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/ingest.py` without PYTHONPATH (make bench-ingest)
    sys.path.insert(0, str(REPO))

import imagehash  # noqa: E402
import PIL  # noqa: E402
from PIL import Image  # noqa: E402

from covid_data.manifest import SourceFile, build_manifest, default_workers, discover  # noqa: E402
from covid_data.validation import get_profile, validate_manifest  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/covid19-radiography-sample"
OUT_JSON = REPO / "benchmarks/out/ingest.json"
GOAL = 1.5  # ours / plain loop, on 2 cores


@dataclass
class Measurement:
    name: str
    description: str
    processes: int
    times_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def rate(self, n: int) -> float:
        return n / self.median_s


# -- the baselines ------------------------------------------------------------------------------


def plain_inspect(path: Path, *, phash: bool) -> tuple[str, int, int, str, str | None]:
    """The naive per-file work: read, sha256, full decode, size/mode and (optionally) imagehash's pHash."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        ph = str(imagehash.phash(im)) if phash else None
        return digest, im.width, im.height, im.mode, ph


def plain_loop(paths: list[Path], *, phash: bool) -> list[tuple[str, int, int, str, str | None]]:
    return [plain_inspect(p, phash=phash) for p in paths]


# -- helpers ------------------------------------------------------------------------------------


def select(files: list[SourceFile], limit: int | None) -> list[SourceFile]:
    """``limit`` files spread evenly over the (class-sorted) list, so every class stays present."""
    if not limit or limit >= len(files):
        return files
    return [files[i * len(files) // limit] for i in range(limit)]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    import great_expectations as gx
    import numpy as np
    import scipy

    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "imagehash": imagehash.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "great_expectations": gx.__version__,
        "platform": platform.platform(),
    }


def cold_ge_import_s(repeats: int) -> list[float]:
    """Time of ``import great_expectations`` in a fresh interpreter (the once-per-process cost)."""
    code = "import time; t = time.perf_counter(); import great_expectations; print(time.perf_counter() - t)"
    return [
        float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
        for _ in range(repeats)
    ]


# -- the benchmark ------------------------------------------------------------------------------


def run(data: Path, repeats: int, limit: int | None, profile: str) -> dict[str, Any]:
    files = select(discover(data), limit)
    n = len(files)
    paths = [f.source for f in files]
    if n == 0:
        raise SystemExit(f"no image files under {data}")
    print(f"{n} files under {data}; {repeats} repeats; validation profile {profile!r}", file=sys.stderr)

    # Warm-up (untimed): page cache, imports on both sides, forkserver start, Great Expectations' first suite.
    for p in paths:
        p.read_bytes()
    plain_loop(paths[:20], phash=True)
    warm_files = select(files, min(n, 128))
    warmup_s, warm_manifest = timed(lambda: build_manifest(warm_files))
    warmup_s += timed(lambda: validate_manifest(warm_manifest.head(50), get_profile("any")))[0]

    workers = default_workers()
    ours_discover = Measurement("discover", "list files and labels", 1)
    ours_manifest = Measurement("build_manifest", f"sha256 + decode + size/mode + pHash, {workers} processes", workers)
    ours_validate = Measurement("validate_manifest", "Great Expectations suite over the manifest", 1)
    ours_total = Measurement("ours (total)", "discover + build_manifest + validate_manifest", workers)
    plain = Measurement("plain PIL loop", "sha256 + decode + size/mode + imagehash.phash, 1 process", 1)
    decode_only = Measurement("decode-only loop", "sha256 + decode + size/mode, 1 process", 1)
    serial = Measurement("build_manifest(workers=1)", "our per-file code without the pool (manifest only)", 1)

    success: list[bool] = []
    manifest = None
    plain_rows: list[tuple[str, int, int, str, str | None]] = []
    for r in range(repeats):
        t_disc, listed = timed(lambda: select(discover(data), limit))
        t_man, manifest = timed(lambda listed=listed: build_manifest(listed))
        t_val, report = timed(lambda manifest=manifest: validate_manifest(manifest, get_profile(profile)))
        ours_discover.times_s.append(t_disc)
        ours_manifest.times_s.append(t_man)
        ours_validate.times_s.append(t_val)
        ours_total.times_s.append(t_disc + t_man + t_val)
        success.append(report.success)

        t_plain, plain_rows = timed(lambda: plain_loop(paths, phash=True))
        plain.times_s.append(t_plain)
        decode_only.times_s.append(timed(lambda: plain_loop(paths, phash=False))[0])
        serial.times_s.append(timed(lambda: build_manifest(files, workers=1))[0])
        print(
            f"repeat {r + 1}/{repeats}: ours {ours_total.times_s[-1]:.2f}s (manifest {t_man:.2f}s, "
            f"validation {t_val:.2f}s), plain {t_plain:.2f}s, decode-only {decode_only.times_s[-1]:.2f}s, "
            f"workers=1 {serial.times_s[-1]:.2f}s",
            file=sys.stderr,
        )

    # Same files, same answers? (pHash may differ: ours box-reduces before the 32x32 LANCZOS thumbnail.)
    assert manifest is not None
    ours_by_source = {
        row.source_path: (row.sha256, int(row.width), int(row.height), row.mode, row.phash)
        for row in manifest.itertuples()
    }
    agree = {"sha256": 0, "size_mode": 0, "phash": 0}
    for f, (digest, w, h, mode, ph) in zip(files, plain_rows, strict=True):
        o = ours_by_source[f.source_path]
        agree["sha256"] += o[0] == digest
        agree["size_mode"] += o[1:4] == (w, h, mode)
        agree["phash"] += o[4] == ph

    measurements = [ours_total, ours_discover, ours_manifest, ours_validate, plain, decode_only, serial]
    return {
        "data": str(data),
        "images": n,
        "repeats": repeats,
        "workers": workers,
        "validation_profile": profile,
        "validation_success": success,
        "warm": True,
        "warmup_s": warmup_s,
        "cold_ge_import_s": cold_ge_import_s(repeats),
        "machine": machine_info(),
        "agreement_with_plain_loop": agree,
        "measurements": [{**asdict(m), "median_s": m.median_s, "images_per_s": m.rate(n)} for m in measurements],
        "speedup": {
            "ours_vs_plain_loop": plain.median_s / ours_total.median_s,
            "ours_vs_decode_only_loop": decode_only.median_s / ours_total.median_s,
            "ours_manifest_vs_plain_loop": plain.median_s / ours_manifest.median_s,
            "pool_vs_workers_1": serial.median_s / ours_manifest.median_s,
        },
        "goal": GOAL,
    }


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    n = res["images"]
    sp = res["speedup"]
    by_name = {x["name"]: x for x in res["measurements"]}
    ours = by_name["ours (total)"]
    lines = [
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), Python {m['python']}, Pillow {m['pillow']}, "
        f"imagehash {m['imagehash']}, Great Expectations {m['great_expectations']}",
        "",
        f"{n} images, median of {res['repeats']} repeats, warm (files in page cache; Great Expectations "
        f"imported and forkserver started beforehand). Validation passed: {all(res['validation_success'])}.",
        "",
        "| method | what | processes | median s | runs s | images/s | ours is faster by |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for x in res["measurements"]:
        part = x["name"] in ("discover", "build_manifest", "validate_manifest")
        name = f"&nbsp;&nbsp;↳ {x['name']}" if part else f"**{x['name']}**" if x is ours else x["name"]
        rate = f"{x['images_per_s']:.0f}" if x["name"] != "discover" else ""
        baseline = x["name"] in ("plain PIL loop", "decode-only loop")
        ratio = f"{x['median_s'] / ours['median_s']:.2f}x" if baseline else ""
        runs = ", ".join(f"{t:.2f}" for t in x["times_s"])
        lines.append(
            f"| {name} | {x['description']} | {x['processes']} | {x['median_s']:.2f} | {runs} | {rate} | {ratio} |"
        )
    cold = statistics.median(res["cold_ge_import_s"])
    agree = res["agreement_with_plain_loop"]
    verdict = "met" if sp["ours_vs_plain_loop"] >= res["goal"] else "NOT met"
    verdict_dec = "met" if sp["ours_vs_decode_only_loop"] >= res["goal"] else "NOT met"
    lines += [
        "",
        f"- Speedup ours / plain loop: **{sp['ours_vs_plain_loop']:.2f}x** (goal {res['goal']}x: {verdict}); "
        f"ours / decode-only loop: **{sp['ours_vs_decode_only_loop']:.2f}x** ({verdict_dec}).",
        f"- Manifest alone / plain loop: {sp['ours_manifest_vs_plain_loop']:.2f}x; "
        f"pool ({res['workers']} processes) / workers=1: {sp['pool_vs_workers_1']:.2f}x.",
        f"- One-time costs, not in the table: `import great_expectations` cold {cold:.2f}s (median, fresh "
        f"interpreter); warm-up (forkserver start + 128-file manifest + first suite) {res['warmup_s']:.2f}s.",
        f"- Same answers: sha256 {agree['sha256']}/{n}, size+mode {agree['size_mode']}/{n}, "
        f"pHash {agree['phash']}/{n} (ours box-reduces before the 32x32 LANCZOS thumbnail).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    ap.add_argument("--limit", type=int, default=None, help="use only N files, spread over the classes")
    ap.add_argument(
        "--profile",
        default=None,
        help="validation profile (default: shared-sample for the full data, any with --limit)",
    )
    ap.add_argument("--out", type=Path, default=OUT_JSON, help="JSON results (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    profile = args.profile or ("any" if args.limit else "shared-sample")

    res = run(args.data.resolve(), args.repeats, args.limit, profile)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    print(f"results written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
