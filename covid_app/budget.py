"""What the phone app downloads and keeps: the service worker's list and the bundle's byte budget.

The worker (app/src/sw.js) precaches what the first result needs: the page (``app/dist``: scripts,
styles, icons and LiteRT's WASM builds, of which a browser fetches one), ``data/app.json``, the
guard and the default model's files (the champion's, else rank 1's; an ensemble's members). Every
other file is listed with ``lazy``: fetched when the page asks for it (a model when the user picks
it, a plot when a model page shows it) and kept from then on. :func:`byte_budget` counts, from the
bundle's own files, the bytes from opening the app to the first result (gzip where
``covid_app.serve`` compresses) and the bytes the worker keeps once every file has been fetched.
"""

from __future__ import annotations

import gzip
from typing import Any

from covid_data.store import Unit

MARKER = "bundle.json"
FIRST_RESULT_BUDGET = 15_000_000  # bytes from opening the app to the first result (issue 17)
CACHED_BUDGET = 40_000_000  # bytes the service worker keeps with every file fetched
SHELL_DIRS = ("icons/", "wasm/", "codecs/")  # the page's own folders (app/dist)
# Compressed in transfer by covid_app.serve (and by any static host set up for a web app).
GZIP_SUFFIXES = (".html", ".js", ".css", ".json", ".webmanifest", ".wasm", ".md", ".svg")


def default_model(models: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The model the page selects first (app/src/main.js): the champion, else rank 1, else the first."""
    return next((m for m in models if m.get("champion") is True), None) or next(
        (m for m in models if m.get("rank") == 1), models[0] if models else None
    )


def model_files(m: dict[str, Any]) -> list[str]:
    """The TFLite files the page downloads to run ``m`` (an ensemble: its members')."""
    return [x["file"] for x in m["members"]] if m.get("members") else [m["file"]]


def first_result_files(unit: Unit, models: list[dict[str, Any]], guard: dict[str, Any] | None) -> set[str]:
    """Bundle paths the first result needs, which the service worker precaches: the page (every file of
    ``app/dist``: scripts, styles, icons, both WASM builds of which a browser fetches one), app.json,
    the guard and the default model's files."""
    keys = [k[len(unit.prefix) + 1 :] for k in unit.store.list(unit.prefix + "/")]
    shell = {k for k in keys if "/" not in k or k.startswith(SHELL_DIRS)} - {MARKER}
    champ = default_model(models)
    return shell | {"data/app.json"} | ({guard["file"]} if guard else set()) | set(model_files(champ) if champ else [])


def precache_list(unit: Unit, first: set[str]) -> list[dict[str, Any]]:
    """The service worker's list: every bundle file (but the worker and the marker) with its md5;
    files the first result does not need are marked ``lazy``: kept once fetched, never precached."""
    skip = {unit.key("sw.js"), unit.key(MARKER)}
    out: list[dict[str, Any]] = []
    for k, md5 in sorted(unit.store.checksums(unit.prefix + "/").items()):
        if k in skip:
            continue
        url = k[len(unit.prefix) + 1 :]
        out.append({"url": url, "revision": md5} | ({} if url in first else {"lazy": True}))
    return out


def transfer_bytes(path: str, data: bytes) -> int:
    """Bytes on the wire for one file: gzip (level 6) for text and WASM, as covid_app.serve sends them."""
    return len(gzip.compress(data, 6, mtime=0)) if path.endswith(GZIP_SUFFIXES) else len(data)


def byte_budget(unit: Unit, files: list[dict[str, Any]]) -> dict[str, Any]:
    """Bytes to the first result and bytes the service worker keeps, from the bundle's own files and
    list. The first result downloads the worker, the files it precaches and nothing else; of the two
    WASM builds a browser fetches one (the larger is counted). Kept: the precached files (with one
    WASM build), then every lazy file once fetched (every model picked, every model page viewed)."""
    wire: dict[str, int] = {}
    raw: dict[str, int] = {}
    for f in [*files, {"url": "sw.js"}]:
        data = unit.store.read_bytes(unit.key(f["url"]))
        raw[f["url"]], wire[f["url"]] = len(data), transfer_bytes(f["url"], data)
    wasm = [f["url"] for f in files if f["url"].startswith("wasm/") and f["url"].endswith(".wasm")]
    other_wasm = sorted(wasm, key=lambda u: raw[u])[:-1]  # the browser loads one build
    other = set(other_wasm) | {u.removesuffix(".wasm") + ".js" for u in other_wasm}
    first = [f["url"] for f in files if not f.get("lazy") and f["url"] not in other] + ["sw.js"]
    lazy = [f["url"] for f in files if f.get("lazy")]
    first_bytes = sum(wire[u] for u in first)
    cached = sum(raw[u] for u in first if u != "sw.js") + sum(raw[u] for u in lazy)
    return {
        "first_result_bytes": first_bytes,
        "first_result_files": len(first),
        "precached_bytes": sum(raw[u] for u in first if u != "sw.js"),
        "cached_bytes": cached,
        "first_result_budget": FIRST_RESULT_BUDGET,
        "cached_budget": CACHED_BUDGET,
        "largest_first_result_files": sorted(((wire[u], u) for u in first), reverse=True)[:5],
    }
