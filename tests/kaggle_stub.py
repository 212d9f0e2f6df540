"""A loopback HTTP server that answers like Kaggle's dataset download API.

The kaggle client POSTs ``/api/v1/datasets.DatasetApiService/DownloadDataset`` with a JSON
body (``ownerSlug``, ``datasetSlug``) and basic auth (username, key), gets a redirect to a
signed storage URL and streams the archive from there, honouring ``Last-Modified``,
``Content-Length`` and ``Range``.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import zipfile
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def zip_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, p.relative_to(folder).as_posix())
    return buf.getvalue()


class KaggleStub:
    def __init__(self, host: str = "127.0.0.1", port: int = 80):
        self.host, self.port = host, port
        self.datasets: dict[str, bytes] = {}  # "owner/slug" -> archive
        self.modified: dict[str, float] = {}
        self.credentials: tuple[str, str] | None = None  # required basic auth, None: public
        self.mode = "ok"  # "ok" | "truncate_once" | "truncated"
        self.body_bytes_sent = 0
        self.api_calls = 0
        self.auth_seen: list[str | None] = []
        self._server: ThreadingHTTPServer | None = None

    def add(self, ref: str, archive: bytes, modified: float = 1_700_000_000.0) -> None:
        self.datasets[ref] = archive
        self.modified[ref] = modified

    # -- server -------------------------------------------------------------------------
    def start(self) -> None:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _json(self, code: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                req = json.loads(self.rfile.read(length) or b"{}")
                if self.path != "/api/v1/datasets.DatasetApiService/DownloadDataset":
                    return self._json(404, {"code": 404, "message": f"no such method {self.path}"})
                stub.api_calls += 1
                auth = self.headers.get("Authorization")
                stub.auth_seen.append(auth)
                if stub.credentials is not None:
                    want = "Basic " + base64.b64encode(":".join(stub.credentials).encode()).decode()
                    if auth != want:
                        return self._json(401, {"code": 401, "message": "Unauthenticated"})
                ref = f"{req.get('ownerSlug')}/{req.get('datasetSlug')}"
                if ref not in stub.datasets:
                    return self._json(404, {"code": 404, "message": f"dataset {ref} not found"})
                self.send_response(302)
                self.send_header("Location", f"http://{stub.host}:{stub.port}/storage/{ref}.zip")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                ref = self.path.removeprefix("/storage/").removesuffix(".zip")
                if ref not in stub.datasets:
                    return self._json(404, {"code": 404, "message": "no such object"})
                data = stub.datasets[ref]
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                full_len = len(data)
                if stub.mode == "truncated":  # a consistently short file, no way to notice by size
                    data = data[: full_len // 2]
                    full_len = len(data)
                body = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Last-Modified", formatdate(stub.modified[ref], usegmt=True))
                self.send_header("ETag", f'"{hash(data) & 0xFFFFFFFF:x}"')
                self.send_header("Accept-Ranges", "bytes")
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{full_len - 1}/{full_len}")
                self.end_headers()
                if stub.mode == "truncate_once" and not start:
                    stub.mode = "ok"
                    half = body[: len(body) // 2]
                    self.wfile.write(half)
                    stub.body_bytes_sent += len(half)
                    self.close_connection = True
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)
                stub.body_bytes_sent += len(body)

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
