"""Input pipeline benchmark: images/s of one full pass over the train split, ours against Keras' loader.

Measured side by side on the same train images (the shared sample's split, 2,660 X-rays), interleaved in each
repeat, each a full pass of exactly one epoch (``repeat=False``), grayscale, batch 16:

* ours, cached, fill pass: ``image_dataset(..., training=True, cache_dir=<empty folder>)``: decode + resize
  every image and write the on-disk cache (this happens while the dataset is built), then one pass over it;
* ours, cached: the same with the cache already filled (what every epoch after the first costs);
* ours, uncached: ``image_dataset(..., cache_dir=None)``: decode + resize every image every pass;
* Keras: ``keras.utils.image_dataset_from_directory`` on a folder of symlinks ``<label>/<file>`` to the same
  files (``color_mode="grayscale"``, ``image_size``, ``batch_size=16``, shuffled as in training).

Each timing covers building the dataset and iterating it to the end (Keras lists its folder while building).
The files are read once beforehand (page cache), so no method pays for the disk.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/input_pipeline.py [--split URI] [--size 224] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import OUT_DIR, machine_info, machine_line, prepare_split, quiet_tensorflow, write_json  # noqa: E402

OUT_JSON = OUT_DIR / "input_pipeline.json"


@dataclass
class Measurement:
    name: str
    description: str
    times_s: list[float] = field(default_factory=list)
    images: list[int] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


def drain(ds: Any) -> int:
    """Iterate a dataset to its end; the number of images seen."""
    n = 0
    for x, _ in ds:
        n += int(x.shape[0])
    return n


def timed_pass(build: Callable[[], Any]) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = drain(build())
    return time.perf_counter() - t0, n


def symlink_tree(files: list[str], labels: list[str], root: Path) -> None:
    """``root/<label>/<index>-<file name>`` -> the original file, for ``image_dataset_from_directory``."""
    for i, (f, label) in enumerate(zip(files, labels, strict=True)):
        d = root / label
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:05d}-{Path(f).name}").symlink_to(f)


def run(split_uri: str, size: int, batch: int, repeats: int, seed: int) -> dict[str, Any]:
    quiet_tensorflow()
    import keras

    from covid_data.labels import CLASSES
    from covid_models.data import image_dataset, load_split_data

    data = load_split_data(split_uri)
    files, y = data.files("train")
    n = len(files)
    print(f"{n} train images of {split_uri}; {size}px, batch {batch}, {repeats} repeats", file=sys.stderr)
    for f in files:  # page cache
        Path(f).read_bytes()

    work = Path(tempfile.mkdtemp(prefix="bench-input-", dir=OUT_DIR))
    try:
        links = work / "links"
        symlink_tree(files, [CLASSES[int(i)] for i in y], links)
        cache_filled = work / "cache-filled"

        def ours(cache_dir: Path | None) -> Callable[[], Any]:
            return lambda: image_dataset(
                data,
                "train",
                size=size,
                channels=1,
                batch_size=batch,
                training=True,
                cache_dir=cache_dir,
                seed=seed,
                repeat=False,
            )

        def keras_loader() -> Any:
            return keras.utils.image_dataset_from_directory(
                links,
                labels="inferred",
                label_mode="int",
                color_mode="grayscale",
                image_size=(size, size),
                batch_size=batch,
                shuffle=True,
                seed=seed,
                verbose=False,
            )

        fill = Measurement("ours, cached: fill pass", "decode + resize + write the disk cache, then one pass")
        cached = Measurement("ours, cached", "one pass over the filled disk cache (every later epoch)")
        uncached = Measurement("ours, uncached", "decode + resize every image (cache_dir=None)")
        kload = Measurement("keras image_dataset_from_directory", "list folder + decode + resize every image")

        # Warm-up (untimed): TensorFlow's first graph traces, the first cache, Keras' loader once.
        drain(ours(cache_filled)())
        timed_pass(keras_loader)
        for r in range(repeats):
            fresh = work / f"cache-fill-{r}"
            for m, build in (
                (fill, ours(fresh)),
                (cached, ours(cache_filled)),
                (uncached, ours(None)),
                (kload, keras_loader),
            ):
                t, seen = timed_pass(build)
                m.times_s.append(t)
                m.images.append(seen)
            shutil.rmtree(fresh, ignore_errors=True)
            print(
                f"repeat {r + 1}/{repeats}: fill {fill.times_s[-1]:.2f}s, cached {cached.times_s[-1]:.2f}s, "
                f"uncached {uncached.times_s[-1]:.2f}s, keras {kload.times_s[-1]:.2f}s",
                file=sys.stderr,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    measurements = [cached, fill, uncached, kload]
    for m in measurements:
        if set(m.images) != {n}:
            raise RuntimeError(f"{m.name} saw {m.images} images, expected {n} per pass")
    return {
        "split": split_uri,
        "images": n,
        "size": size,
        "channels": 1,
        "batch_size": batch,
        "repeats": repeats,
        "machine": machine_info(),
        "measurements": [{**asdict(m), "median_s": m.median_s, "images_per_s": n / m.median_s} for m in measurements],
    }


def markdown(res: dict[str, Any]) -> str:
    n = res["images"]
    by_name = {m["name"]: m for m in res["measurements"]}
    keras_s = by_name["keras image_dataset_from_directory"]["median_s"]
    lines = [
        machine_line(res["machine"]),
        "",
        f"{n} train images, {res['size']}x{res['size']} grayscale, batch {res['batch_size']}, one full pass "
        f"(build + iterate), median of {res['repeats']} repeats, files in page cache.",
        "",
        "| pipeline | what | median s | runs s | images/s | vs Keras loader |",
        "|---|---|---:|---|---:|---:|",
    ]
    for m in res["measurements"]:
        runs = ", ".join(f"{t:.2f}" for t in m["times_s"])
        name = f"**{m['name']}**" if m["name"] == "ours, cached" else m["name"]
        lines.append(
            f"| {name} | {m['description']} | {m['median_s']:.2f} | {runs} | {m['images_per_s']:.0f} | "
            f"{keras_s / m['median_s']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default=None, help="split.parquet URI (default: the shared sample's, prepared once)")
    ap.add_argument("--size", type=int, default=224, help="image size in pixels (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, default=OUT_JSON, help="JSON results (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    res = run(args.split or prepare_split(), args.size, args.batch_size, args.repeats, args.seed)
    write_json(res, args.out)
    print(markdown(res))


if __name__ == "__main__":
    main()
