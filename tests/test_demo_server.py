"""Real-socket tests of the whole-file-only legacy server (shim.demo_server)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from shim.demo_server import WholeFileServer
from tests.harness import REPO_ROOT, PayloadFactory, sha256_of, subprocess_env

TIMEOUT = 10.0


def connect(server: WholeFileServer) -> http.client.HTTPConnection:
    """An HTTP/1.1 connection to ``server``."""
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)


def request(
    server: WholeFileServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, bytes, http.client.HTTPResponse]:
    """Send one request on a fresh connection; return status, body and response."""
    conn = connect(server)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, response.read(), response
    finally:
        conn.close()


def raw_exchange(server: WholeFileServer, data: bytes) -> bytes:
    """Send raw bytes on a socket, half-close it and return everything the server answered."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while piece := sock.recv(65536):
            chunks.append(piece)
    return b"".join(chunks)


def stored_files(directory: Path) -> list[Path]:
    """All regular files below ``directory``."""
    return sorted(p for p in directory.rglob("*") if p.is_file())


def test_put_stores_file_byte_exact(legacy: WholeFileServer, payload: PayloadFactory) -> None:
    """A whole PUT of a multi-MiB file is stored byte-exact and described in the answer."""
    source = payload(3 * 1024 * 1024 + 123)
    conn = connect(legacy)
    with source.open("rb") as body:
        size = str(source.stat().st_size)
        conn.request("PUT", "/files/big.bin", body=body, headers={"Content-Length": size})
        response = conn.getresponse()
        info = json.loads(response.read())
    conn.close()

    digest = sha256_of(source)
    assert response.status == 201
    assert response.getheader("Location") == "/files/big.bin"
    assert info == {"path": "/files/big.bin", "size": source.stat().st_size, "sha256": digest}
    assert sha256_of(legacy.directory / "files" / "big.bin") == digest
    [received] = legacy.wait_for(1, TIMEOUT)
    assert (received.method, received.path, received.status) == ("PUT", "/files/big.bin", 201)
    assert (received.size, received.sha256, received.complete) == (int(size), digest, True)
    assert received.header("content-length") == size


def test_chunked_post_is_decoded(legacy: WholeFileServer) -> None:
    """A POST with Transfer-Encoding: chunked is decoded (extensions and trailers too)."""
    data = (
        b"POST /up/chunked.txt?x=1 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
        b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: yes\r\n\r\n"
    )
    answer = raw_exchange(legacy, data)

    assert answer.startswith(b"HTTP/1.1 201 ")
    assert (legacy.directory / "up" / "chunked.txt").read_bytes() == b"hello, world"
    [received] = legacy.wait_for(1, TIMEOUT)
    assert received.path == "/up/chunked.txt?x=1"
    assert received.size == len(b"hello, world")


def test_chunked_post_with_http_client(legacy: WholeFileServer) -> None:
    """http.client's own chunked encoding of an iterable body is understood."""
    pieces = [os.urandom(1000), os.urandom(70000), b"tail"]
    conn = connect(legacy)
    conn.request("POST", "/iter.bin", body=iter(pieces), encode_chunked=True)
    response = conn.getresponse()
    response.read()
    conn.close()

    assert response.status == 201
    assert (legacy.directory / "iter.bin").read_bytes() == b"".join(pieces)


@pytest.mark.parametrize(
    ("method", "headers", "named"),
    [
        ("PATCH", {"Content-Type": "application/offset+octet-stream"}, "PATCH"),
        ("PUT", {"Content-Range": "bytes 0-4/10"}, "Content-Range"),
        ("POST", {"Upload-Length": "5"}, "Upload-Length"),
        ("PUT", {"Tus-Resumable": "1.0.0"}, "Tus-Resumable"),
        ("PUT", {"x-upload-content-length": "5"}, "x-upload-content-length"),
        ("GET", {"upload-offset": "0"}, "upload-offset"),
    ],
)
def test_resumable_requests_are_rejected(
    legacy: WholeFileServer, method: str, headers: dict[str, str], named: str
) -> None:
    """Anything resumable gets a 400 naming the culprit, is recorded, and stores nothing."""
    body = None if method == "GET" else b"hello"
    status, text, _ = request(legacy, method, "/files/x", body, headers)

    assert status == 400
    assert named in text.decode()
    [received] = legacy.wait_for(1, TIMEOUT)
    assert (received.method, received.status) == (method, 400)
    assert stored_files(legacy.directory) == []


def test_rejected_request_keeps_connection_usable(legacy: WholeFileServer) -> None:
    """After a 400 for a PATCH with a body, the same connection serves the next request."""
    conn = connect(legacy)
    conn.request("PATCH", "/files/x", body=b"0123456789", headers={"Upload-Offset": "0"})
    first = conn.getresponse()
    first.read()
    conn.request("PUT", "/files/y", body=b"whole")
    second = conn.getresponse()
    second.read()
    conn.close()

    assert (first.status, second.status) == (400, 201)
    assert [r.size for r in legacy.wait_for(2, TIMEOUT)] == [10, 5]


def test_fail_status_reads_body_and_stores_nothing(
    legacy: WholeFileServer, payload: PayloadFactory
) -> None:
    """With fail_status set, uploads are read in full, answered with it, and not stored."""
    legacy.fail_status = 503
    source = payload(2 * 1024 * 1024)
    status, text, _ = request(legacy, "PUT", "/f.bin", source.read_bytes())

    assert status == 503
    assert text
    [received] = legacy.wait_for(1, TIMEOUT)
    assert (received.status, received.size) == (503, source.stat().st_size)
    assert received.sha256 == sha256_of(source)
    assert stored_files(legacy.directory) == []


def test_get_and_head_return_stored_file(legacy: WholeFileServer) -> None:
    """GET returns a stored file, HEAD its length, unknown paths 404."""
    request(legacy, "PUT", "/a/b/c.txt", b"content")

    get_status, get_body, _ = request(legacy, "GET", "/a/b/c.txt")
    head_status, head_body, head = request(legacy, "HEAD", "/a/b/c.txt")
    missing_status, _, _ = request(legacy, "GET", "/a/b/nothing")

    assert (get_status, get_body) == (200, b"content")
    assert (head_status, head_body, head.getheader("Content-Length")) == (200, b"", "7")
    assert missing_status == 404
    methods = [(r.method, r.status) for r in legacy.wait_for(4, TIMEOUT)]
    assert methods == [("PUT", 201), ("GET", 200), ("HEAD", 200), ("GET", 404)]


def test_other_methods_are_405_and_recorded(legacy: WholeFileServer) -> None:
    """DELETE, OPTIONS and unknown methods are answered 405 and recorded."""
    statuses = [request(legacy, m, "/x")[0] for m in ("DELETE", "OPTIONS", "FROB")]

    assert statuses == [405, 405, 405]
    assert [r.method for r in legacy.wait_for(3, TIMEOUT)] == ["DELETE", "OPTIONS", "FROB"]


@pytest.mark.parametrize(
    "target", ["/../escape.txt", "/a/../../escape.txt", "/%2e%2e/escape.txt", "/a%2f..%2f..%2fe"]
)
def test_path_traversal_stays_inside(legacy: WholeFileServer, target: str) -> None:
    """A request target that tries to leave the directory is refused and writes nothing."""
    data = (
        f"PUT {target} HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
        "Connection: close\r\n\r\nevil"
    ).encode()
    answer = raw_exchange(legacy, data)

    assert answer.startswith(b"HTTP/1.1 400 ")
    assert stored_files(legacy.directory.parent) == []


def test_keep_alive_two_requests_on_one_connection(legacy: WholeFileServer) -> None:
    """Two PUTs on one http.client connection both succeed on the same socket."""
    conn = connect(legacy)
    conn.request("PUT", "/one", body=b"1" * 10)
    first = conn.getresponse()
    first.read()
    sock = conn.sock
    conn.request("PUT", "/two", body=b"2" * 20)
    second = conn.getresponse()
    second.read()

    assert conn.sock is sock
    conn.close()
    assert (first.status, second.status) == (201, 201)
    assert (legacy.directory / "two").read_bytes() == b"2" * 20


def test_put_without_length_is_411(legacy: WholeFileServer) -> None:
    """A PUT with neither Content-Length nor chunked encoding is refused."""
    answer = raw_exchange(legacy, b"PUT /nolen HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")

    assert answer.startswith(b"HTTP/1.1 411 ")
    assert legacy.wait_for(1, TIMEOUT)[0].status == 411


def test_broken_body_is_recorded_incomplete_and_not_stored(legacy: WholeFileServer) -> None:
    """A body that breaks off leaves no file and is recorded with complete=False."""
    answer = raw_exchange(legacy, b"PUT /cut HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n12345")

    assert answer == b""
    [received] = legacy.wait_for(1, TIMEOUT)
    assert (received.status, received.size, received.complete) == (0, 5, False)
    assert stored_files(legacy.directory) == []


def test_wait_for_times_out(legacy: WholeFileServer) -> None:
    """wait_for raises TimeoutError when too few requests arrive."""
    with pytest.raises(TimeoutError):
        legacy.wait_for(1, 0.05)


@pytest.fixture
def demo_process(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """``python -m shim.demo_server`` as a child process; terminated at teardown."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shim.demo_server", "--dir", str(tmp_path / "store")],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()


def test_main_prints_url_and_stops_on_sigterm(
    demo_process: subprocess.Popen[str], tmp_path: Path
) -> None:
    """The command line prints one line with its URL, serves, and exits 0 on SIGTERM."""
    assert demo_process.stdout is not None
    line = demo_process.stdout.readline()
    prefix = "demo server listening at http://127.0.0.1:"
    assert line.startswith(prefix)
    port = int(line.strip().removeprefix(prefix))

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    conn.request("PUT", "/hello.txt", body=b"hi")
    assert conn.getresponse().status == 201
    conn.close()

    demo_process.terminate()
    assert demo_process.wait(TIMEOUT) == 0
    assert (tmp_path / "store" / "hello.txt").read_bytes() == b"hi"
