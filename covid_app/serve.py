"""Serve a run's app bundle on loopback: ``python -m covid_app.serve`` (what ``make app`` runs).

By default the champion's run; ``--run`` picks another. A complete run whose bundle was skipped
(no Node.js when it was published) gets its bundle built first. The files are read from the
store, so a ``gs://`` store works too; any static host can serve the folder instead (README).

Like a static host set up for a web app, it compresses text and WASM with gzip for clients that
accept it (LiteRT's 9.4 MB runtime travels as 2.8 MB) and answers a revalidation (``If-None-Match``
with the file's ETag, its md5, or ``If-Modified-Since`` its ``Last-Modified``) with 304 and no body, so
the service worker's install does not download again what the page has just downloaded.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import json
import logging
import mimetypes
import posixpath
import sys
from email.utils import formatdate, parsedate_to_datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from covid_app.budget import GZIP_SUFFIXES
from covid_app.bundle import AppBuildUnavailable, app_unit, build_run_app
from covid_data.store import Store, as_store, open_store
from covid_registry import champion as registry

log = logging.getLogger(__name__)

# LiteRT.js streams its runtime with WebAssembly.instantiateStreaming, which needs this type.
TYPES = {
    ".wasm": "application/wasm",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".tflite": "application/octet-stream",
    ".md": "text/markdown; charset=utf-8",
}


class NoBundleError(RuntimeError):
    pass


def content_type(path: str) -> str:
    ext = posixpath.splitext(path)[1].lower()
    return TYPES.get(ext) or mimetypes.guess_type(path)[0] or "application/octet-stream"


def resolve_run(store: Store, run_id: str | None) -> str:
    """The run to serve: ``run_id``, else the champion's, else the newest complete run."""
    if run_id:
        return run_id

    champ = registry.current(store)
    if champ and champ.get("run_id"):
        return champ["run_id"]
    runs = sorted({k.split("/")[1] for k in store.list("runs/") if k.endswith("/run.json") and k.count("/") == 2})
    if not runs:
        raise NoBundleError(f"{store.uri} has no champion and no complete run: run `make run` first")
    log.info("no champion yet: serving the newest run, %s", runs[-1])
    return runs[-1]


def ensure_bundle(store: Store | str, run_id: str) -> dict[str, Any]:
    """The run's app bundle record, building it from the complete run if it has none yet."""
    store = as_store(store)
    unit = app_unit(store, run_id)
    rec = unit.record()
    if rec is not None:
        return rec
    key = f"runs/{run_id}/run.json"
    if not store.exists(key):
        raise NoBundleError(f"run {run_id} in {store.uri} is not complete (no {key}): nothing to serve")
    run = json.loads(store.read_text(key))
    if not run.get("exports"):
        raise NoBundleError(f"run {run_id} exported no models: it has no app")
    log.info("run %s has no app bundle yet: building it", run_id)
    rec, _ = build_run_app(
        store,
        run_id,
        dataset=run["dataset"],
        exports=run["exports"],
        explain=run.get("explain"),
        externals=run.get("external"),
        lungs_uri=(run.get("shortcut_audit") or {}).get("segmenter_uri"),
    )
    return rec


@functools.lru_cache(maxsize=64)
def _gzipped(md5: str, data: bytes) -> bytes:
    """gzip level 6 (what budget.transfer_bytes counts), once per file content."""
    return gzip.compress(data, 6, mtime=0)


def _last_modified(store: Store, key: str) -> float | None:
    """The object's modification time where the store has a local file (a bundle's files are written once)."""
    local = store.local_path(key)
    return int(local.stat().st_mtime) if local is not None and local.is_file() else None


def _not_modified(headers: Any, etag: str, modified: float | None) -> bool:
    """A revalidation the client's copy answers: its ETag matches, or (without one) it is not older.
    Chromium revalidates a stored response with ``If-Modified-Since`` where it has ``Last-Modified``."""
    if headers.get("If-None-Match"):
        return etag in [t.strip() for t in headers["If-None-Match"].split(",")]
    since = headers.get("If-Modified-Since")
    if not since or modified is None:
        return False
    try:
        return parsedate_to_datetime(since).timestamp() >= modified
    except (TypeError, ValueError):
        return False


def handler_for(store: Store, prefix: str) -> type[BaseHTTPRequestHandler]:
    class BundleHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self._serve(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(body=False)

        def _serve(self, body: bool) -> None:
            path = posixpath.normpath(self.path.split("?", 1)[0].split("#", 1)[0]).lstrip("/")
            if path in ("", "."):
                path = "index.html"
            if path.startswith("..") or path == "bundle.json":
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            try:
                data = store.read_bytes(f"{prefix}/{path}")
            except FileNotFoundError:
                self.send_error(HTTPStatus.NOT_FOUND, f"{path} is not in the bundle")
                return
            md5 = hashlib.md5(data).hexdigest()
            gz = path.endswith(GZIP_SUFFIXES) and "gzip" in self.headers.get("Accept-Encoding", "")
            etag = f'"{md5}{"-gz" if gz else ""}"'
            modified = _last_modified(store, f"{prefix}/{path}")
            if _not_modified(self.headers, etag, modified):
                self.send_response(HTTPStatus.NOT_MODIFIED)
                self.send_header("ETag", etag)
                if modified is not None:
                    self.send_header("Last-Modified", formatdate(modified, usegmt=True))
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                return
            if gz:
                data = _gzipped(md5, data)
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type(path))
            self.send_header("Content-Length", str(len(data)))
            if gz:
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Vary", "Accept-Encoding")
            self.send_header("ETag", etag)
            if modified is not None:
                self.send_header("Last-Modified", formatdate(modified, usegmt=True))
            # Revalidated on every use (a 304 when unchanged); the service worker keeps the files.
            self.send_header("Cache-Control", "no-cache")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)

    return BundleHandler


def serve(store_uri: str, run_id: str | None, host: str, port: int) -> None:
    store = open_store(store_uri)
    run = resolve_run(store, run_id)
    rec = ensure_bundle(store, run)
    server = ThreadingHTTPServer((host, port), handler_for(store, f"runs/{run}/app"))
    models = ", ".join(f"{m['name']}{' (champion)' if m['champion'] else ''}" for m in rec["models"])
    print(f"Serving the app of run {run} ({models}) at http://{host}:{server.server_port}/", flush=True)
    print("Open it in a browser (on a phone: the same address through a tunnel or static host). Ctrl-C stops.")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m covid_app.serve", description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=".store", help="the store retrain published to (folder or gs://)")
    ap.add_argument("--run", default=None, help="a run id (default: the champion's run)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        serve(args.store, args.run, args.host, args.port)
    except (NoBundleError, AppBuildUnavailable) as e:
        print(f"make app: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
