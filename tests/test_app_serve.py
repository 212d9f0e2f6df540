"""``make app``'s server: only the bundle's files, whatever path a client sends (raw, not normalised)."""

from __future__ import annotations

import socket
import threading
from http.server import ThreadingHTTPServer

import pytest

from covid_app.serve import handler_for
from covid_data.store import open_store

SECRET = b'{"model_uri": "secret"}'


@pytest.fixture()
def server(tmp_path):
    store = open_store(tmp_path / "store")
    store.put_bytes("champion.json", SECRET)
    store.put_bytes("runs/r1/run.json", SECRET)
    store.put_bytes("runs/r1/app/index.html", b"<html>app</html>")
    store.put_bytes("runs/r1/app/bundle.json", SECRET)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(store, "runs/r1/app"))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address
    httpd.shutdown()
    httpd.server_close()


def raw_get(address: tuple[str, int], target: str) -> tuple[int, bytes]:
    """Send ``GET <target>`` byte for byte (HTTP clients normalise ``../`` away before sending)."""
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize(
    "target",
    [
        "/../../champion.json",
        "../../champion.json",
        "/../run.json",
        "/./../../champion.json",
        "/models/../../../champion.json",
        "//../../champion.json",
        "/%2e%2e/%2e%2e/champion.json",
        "/..%2f..%2fchampion.json",
        "/bundle.json",
        "/./bundle.json",
    ],
)
def test_paths_outside_the_bundle_are_refused(server, target):
    status, body = raw_get(server, target)
    assert status == 404 and SECRET not in body, (target, status)


def test_the_bundle_itself_is_served(server):
    assert raw_get(server, "/") == (200, b"<html>app</html>")
    assert raw_get(server, "/index.html?v=1") == (200, b"<html>app</html>")
