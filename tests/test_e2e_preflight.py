"""auth.preflight end to end: the legacy server authorizes a creation before the shim stores
a byte of it, through the real shim process and a real legacy server on 127.0.0.1.

The legacy server here is Python's http.server: it answers `Expect: 100-continue` itself
(`handle_expect_100`), which is where it decides, as a real API in front of its storage
would: 401 with WWW-Authenticate for bob, 100 Continue for alice. An auth URL answers 204
for alice and 403 for bob.
"""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.harness import ShimLauncher

ALICE = {"Authorization": "Bearer alice"}
BOB = {"Authorization": "Bearer bob"}
TUS = {"Tus-Resumable": "1.0.0"}
TIMEOUT = 30


class Seen:
    def __init__(self) -> None:
        self.heads: list[tuple[str, str, str | None, str | None]] = []
        """(method, path, Authorization, Expect) of every request head."""
        self.bodies: list[tuple[str, bytes]] = []
        """(path, body) of every request whose whole body arrived."""
        self.lock = threading.Lock()


def legacy_server(seen: Seen) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _note_head(self) -> None:
            with seen.lock:
                seen.heads.append((self.command, self.path, self.headers.get("Authorization"),
                                   self.headers.get("Expect")))

        def handle_expect_100(self) -> bool:
            self._note_head()
            if self.headers.get("Authorization") == "Bearer bob":
                body = b"bob may not upload here\n"
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Bearer realm="files"')
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True
                return False
            return super().handle_expect_100()

        def do_PUT(self) -> None:
            if self.headers.get("Expect") is None:
                self._note_head()
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if len(body) < length:
                return  # a head that never sent its body: a preflight, not a file
            with seen.lock:
                seen.bodies.append((self.path, body))
            self.send_response(201)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:  # the auth URL
            self._note_head()
            allowed = self.headers.get("Authorization") == "Bearer alice"
            self.send_response(204 if allowed else 403)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


@pytest.fixture
def legacy_auth() -> Iterator[tuple[str, Seen]]:
    seen = Seen()
    server = legacy_server(seen)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def tus_create(url: str, who: dict[str, str], data: bytes) -> requests.Response:
    name = base64.b64encode(b"report.pdf").decode()
    return requests.post(f"{url}/files/", data=data, timeout=TIMEOUT, headers={
        **TUS, **who, "Upload-Length": str(len(data)), "Upload-Metadata": f"filename {name}",
        "Content-Type": "application/offset+octet-stream"})


def stored_files(tmp_path: Path) -> list[Path]:
    return [p for p in tmp_path.rglob("data/*") if p.is_file()]


def test_expect_preflight_relays_a_refusal_and_lets_an_allowed_user_upload(
        shim: ShimLauncher, legacy_auth: tuple[str, Seen], tmp_path: Path) -> None:
    url, seen = legacy_auth
    proc = shim({"auth": {"preflight": "expect"}}, upstream_url=url)

    refused = tus_create(proc.url, BOB, b"x" * 1000)
    assert refused.status_code == 401, refused.text
    assert refused.headers.get("WWW-Authenticate") == 'Bearer realm="files"'
    assert "bob may not upload here" in refused.text
    assert "Location" not in refused.headers
    assert stored_files(tmp_path) == []  # nothing of bob's was stored

    data = b"alice's file" * 100
    created = tus_create(proc.url, ALICE, data)
    assert created.status_code == 201, created.text
    assert created.headers.get("Upload-Offset") == str(len(data))
    upload_id = created.headers["Location"].rsplit("/", 1)[1]

    # Every preflight was the head of the delivery to come, with the client's credentials.
    assert ("PUT", f"/uploads/{upload_id}", "Bearer alice", "100-continue") in seen.heads
    assert any(h[2] == "Bearer bob" and h[3] == "100-continue" for h in seen.heads)
    # The legacy server got alice's file once, whole, and never anything of bob's.
    assert seen.bodies == [(f"/uploads/{upload_id}", data)]


def test_url_preflight_asks_the_auth_url_with_the_clients_credentials(
        shim: ShimLauncher, legacy_auth: tuple[str, Seen], tmp_path: Path) -> None:
    url, seen = legacy_auth
    proc = shim({"auth": {"preflight": "url", "url": f"{url}/auth/check?scope=upload"}},
                upstream_url=url)

    refused = tus_create(proc.url, BOB, b"y" * 10)
    assert refused.status_code == 403, refused.text
    assert stored_files(tmp_path) == []

    created = tus_create(proc.url, ALICE, b"z" * 10)
    assert created.status_code == 201, created.text
    checks = [h for h in seen.heads if h[0] == "GET"]
    assert [(h[1], h[2]) for h in checks] == [("/auth/check?scope=upload", "Bearer bob"),
                                              ("/auth/check?scope=upload", "Bearer alice")]
    assert [len(body) for _, body in seen.bodies] == [10]


def test_an_unreachable_auth_url_is_503_and_nothing_is_stored(
        shim: ShimLauncher, legacy_auth: tuple[str, Seen], tmp_path: Path) -> None:
    url, seen = legacy_auth
    with socket.socket() as bound:  # a port that is bound but never listens: refused
        bound.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{bound.getsockname()[1]}/auth"
        proc = shim({"auth": {"preflight": "url", "url": dead, "timeout": 2}},
                    upstream_url=url)
        refused = tus_create(proc.url, ALICE, b"z" * 10)
    assert refused.status_code == 503, refused.text
    assert refused.headers.get("Retry-After")
    assert stored_files(tmp_path) == [] and seen.bodies == []
