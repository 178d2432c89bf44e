"""End to end: tus through a real mitmdump shim to the real whole-file legacy server.

Clients are tuspy (in process, and as a subprocess in tests/clients/tuspy_upload.py so that a
test can SIGKILL it mid-upload) and raw HTTP: requests, and plain sockets where a request
must be cut off, streamed slowly or use ``Expect: 100-continue``.  Everything runs on
127.0.0.1 with ports chosen by the kernel; waits poll a condition against a deadline.

Every test that delivers checks what the legacy server saw: exactly one PUT per finished
file, with the exact size and sha256, and never a PATCH or a protocol header.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from tusclient import client as tus_client

from shim.demo_server import ReceivedRequest, WholeFileServer
from tests.harness import (
    REPO_ROOT,
    OutputLog,
    PayloadFactory,
    ShimLauncher,
    ShimProcess,
    sha256_of,
    subprocess_env,
    wait_until,
)

MIB = 1024 * 1024
TIMEOUT = 15.0
"""Seconds any single request or wait may take before the test fails."""
TUS = {"Tus-Resumable": "1.0.0"}
CHUNK_TYPE = "application/offset+octet-stream"
CLIENT_SCRIPT = REPO_ROOT / "tests" / "clients" / "tuspy_upload.py"
PROTOCOL_PREFIXES = ("upload-", "tus-", "x-upload-")
UPLOAD_PATH = re.compile(r"/files/[A-Za-z0-9_-]{22,}")
"""A tus upload's Location: the endpoint plus >= 128 random bits, URL-safe (22+ base64 chars)."""

Headers = Mapping[str, str | None]


# --- plain HTTP helpers -----------------------------------------------------------------------


def show(response: requests.Response) -> str:
    """A response in one line, for assertion messages."""
    return f"{response.status_code} {dict(response.headers)} {response.text[:300]!r}"


def sha256(data: bytes) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def tus_headers(headers: Headers | None) -> dict[str, str | None]:
    """``Tus-Resumable`` plus ``headers``; a None value drops the header (requests' rule)."""
    return {**TUS, **(headers or {})}


def post(shim: ShimProcess, headers: Headers, body: bytes = b"") -> requests.Response:
    """A tus creation request to the endpoint."""
    if body:
        headers = {"Content-Type": CHUNK_TYPE, **headers}
    return requests.post(
        shim.url + "/files/", data=body, headers=tus_headers(headers), timeout=TIMEOUT
    )


def create(shim: ShimProcess, length: int, headers: Headers | None = None) -> str:
    """Create an upload of ``length`` bytes; return its path (``/files/<id>``)."""
    response = post(shim, {"Upload-Length": str(length), **(headers or {})})
    assert response.status_code == 201, show(response)
    location = response.headers["Location"]
    assert UPLOAD_PATH.fullmatch(location), location
    return location


def patch(
    shim: ShimProcess, path: str, offset: int, data: bytes | Iterable[bytes],
    headers: Headers | None = None,
) -> requests.Response:
    """A tus PATCH of ``data`` at ``offset`` (an iterable body is sent chunked)."""
    fields = {"Upload-Offset": str(offset), "Content-Type": CHUNK_TYPE, **(headers or {})}
    return requests.patch(shim.url + path, data=data, headers=tus_headers(fields), timeout=TIMEOUT)


def head(shim: ShimProcess, path: str, headers: Headers | None = None) -> requests.Response:
    """A tus HEAD of an upload."""
    return requests.head(shim.url + path, headers=tus_headers(headers), timeout=TIMEOUT)


def offset_of(shim: ShimProcess, path: str, headers: Headers | None = None) -> int:
    """The Upload-Offset a HEAD reports (the HEAD must succeed)."""
    response = head(shim, path, headers)
    assert response.status_code == 200, show(response)
    assert response.headers["Cache-Control"] == "no-store"
    return int(response.headers["Upload-Offset"])


def wait_for_offset(
    shim: ShimProcess, path: str, ready: Callable[[int], bool], what: str,
    headers: Headers | None = None, timeout: float = TIMEOUT,
) -> int:
    """Poll HEAD until ``ready(offset)``; return that offset (TimeoutError names the last)."""
    seen: list[int] = []

    def check() -> bool:
        seen.append(offset_of(shim, path, headers))
        return ready(seen[-1])

    try:
        wait_until(check, timeout, what)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; last offset seen: {seen[-1:]}") from None
    return seen[-1]


def patch_when_idle(
    shim: ShimProcess, path: str, offset: int, data: bytes, headers: Headers | None = None
) -> requests.Response:
    """PATCH, retrying while the shim still holds the lock of a request whose client left.

    Noticing that a client went away takes the shim a moment; until then a new PATCH is
    rightly answered 423 Locked.  Real tus clients retry; so does this helper.
    """
    answers: list[requests.Response] = []

    def attempt() -> bool:
        answers.append(patch(shim, path, offset, data, headers))
        return answers[-1].status_code != 423

    wait_until(attempt, TIMEOUT, "the upload to be unlocked", interval=0.05)
    return answers[-1]


def above(threshold: int) -> Callable[[int], bool]:
    """A predicate: more than ``threshold``."""
    return lambda value: value > threshold


def upload_id(path: str) -> str:
    """The id in an upload path or URL."""
    return urlsplit(path).path.rsplit("/", 1)[1]


# --- what the legacy server saw ----------------------------------------------------------


def puts(server: WholeFileServer) -> list[ReceivedRequest]:
    """Every PUT the legacy server received, whatever it answered."""
    return [r for r in list(server.received) if r.method == "PUT"]


def assert_clean(*servers: WholeFileServer) -> None:
    """No PATCH and no resumable-upload header ever reached the legacy server."""
    for server in servers:
        for request in list(server.received):
            assert request.method != "PATCH", request
            leaked = [
                name for name in request.header_names()
                if name == "content-range" or name.startswith(PROTOCOL_PREFIXES)
            ]
            assert not leaked, f"protocol headers {leaked} reached the legacy server: {request}"


def assert_delivered_once(
    server: WholeFileServer, path: str, data: bytes | Path, *others: WholeFileServer,
    refused: int = 0,
) -> ReceivedRequest:
    """The upload at ``path`` reached ``server`` as ONE accepted, byte-exact PUT.

    ``refused``: how many attempts the legacy server refused (fail_status) before it
    accepted; they must be byte-exact too.  ``others`` are earlier incarnations of the legacy
    server (same port), which must not have accepted it.  Returns the accepted PUT.
    """
    size, digest = (
        (len(data), sha256(data)) if isinstance(data, bytes)
        else (data.stat().st_size, sha256_of(data))
    )
    target = f"/uploads/{upload_id(path)}"
    mine = [r for r in puts(server) if r.path == target]
    assert len(mine) == refused + 1, f"expected {refused + 1} PUT {target}, got {mine}"
    assert [r.status >= 300 for r in mine] == [True] * refused + [False], mine
    put = mine[-1]
    assert (put.status, put.complete) == (201, True), put
    assert all((r.size, r.sha256) == (size, digest) for r in mine), mine
    stored = server.directory / "uploads" / upload_id(path)
    assert sha256_of(stored) == digest
    for other in others:
        assert not [r for r in puts(other) if r.path == target and r.status == 201]
    assert_clean(server, *others)
    return put


def assert_accepted(response: requests.Response, path: str, status: int = 204) -> None:
    """The shim's answer to the request that delivered: the legacy server's 201 and Location."""
    assert response.status_code == status, show(response)
    assert response.headers["Shim-Upstream-Status"] == "201", show(response)
    assert response.headers["Shim-Upstream-Location"] == f"/uploads/{upload_id(path)}"


# --- raw sockets --------------------------------------------------------------------------


def connect(shim: ShimProcess) -> socket.socket:
    """A fresh TCP connection to the shim."""
    return socket.create_connection(("127.0.0.1", shim.port), timeout=TIMEOUT)


def request_head(method: str, path: str, headers: Mapping[str, str]) -> bytes:
    """An HTTP/1.1 request head."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def patch_head(path: str, offset: int, length: int, extra: Mapping[str, str] | None = None) -> bytes:
    """The head of a tus PATCH declaring a body of ``length`` bytes."""
    fields = {
        **TUS, "Upload-Offset": str(offset), "Content-Type": CHUNK_TYPE,
        "Content-Length": str(length), **(extra or {}),
    }
    return request_head("PATCH", path, fields)


def read_head(sock: socket.socket, buffer: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Read one response head: status, lower-cased fields, and the bytes read past it."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"connection closed after {buffer!r}")
        buffer += data
    head_bytes, _, rest = buffer.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), fields, rest


# --- the tuspy subprocess -----------------------------------------------------------------


class TuspyClient:
    """tests/clients/tuspy_upload.py running as a child process, its output collected."""

    def __init__(self, *args: str) -> None:
        """Start the client with command-line ``args``."""
        self.proc = subprocess.Popen(
            [sys.executable, str(CLIENT_SCRIPT), *args],
            cwd=REPO_ROOT,
            env=subprocess_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        self.log = OutputLog()
        self.log.drain(self.proc.stdout)

    def event(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Wait for the first JSON event of type ``kind`` and return it."""
        match = self.log.wait_for(re.compile(rf'^\{{"event": "{kind}"'), 0, timeout)
        if match is None:
            raise AssertionError(f"no {kind!r} event from tuspy; output:\n{self.log.text()}")
        event: dict[str, Any] = json.loads(match.string)
        return event

    def finish(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the client to exit 0 and return its success event."""
        code = self.proc.wait(timeout)
        assert code == 0, f"tuspy exited with {code}; output:\n{self.log.text()}"
        return self.event("success", 0)

    def kill(self) -> None:
        """SIGKILL the client (if still running) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)


@pytest.fixture
def tuspy() -> Iterator[Callable[..., TuspyClient]]:
    """Factory ``tuspy(*args) -> TuspyClient``; every client is killed at teardown."""
    started: list[TuspyClient] = []

    def start(*args: str) -> TuspyClient:
        started.append(TuspyClient(*args))
        return started[-1]

    try:
        yield start
    finally:
        for client in started:
            client.kill()


def last_answer(uploader: Any) -> dict[str, str]:
    """The (lower-cased) response headers of an in-process tuspy uploader's last PATCH."""
    headers: dict[str, str] = uploader.request.response_headers
    return headers


# --- 1, 2: tuspy --------------------------------------------------------------------------


def test_tuspy_client_killed_twice_resumes_and_delivers_once(
    shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory,
    tuspy: Callable[..., TuspyClient],
) -> None:
    """50 MiB in 1 MiB chunks; the client process is SIGKILLed at ~1/3 and ~2/3 and resumed
    with the upload URL each time; the legacy server gets the file once, byte-exact."""
    source = payload(50 * MIB)
    size = source.stat().st_size
    proc = shim()
    owner = {"Authorization": "Bearer tuspy"}
    common = (
        "--file", str(source), "--chunk-size", str(MIB), "--retries", "5",
        "--header", "Authorization: Bearer tuspy", "--metadata", "filename=big.bin",
    )

    client = tuspy(*common, "--endpoint", proc.url + "/files/")
    url = client.event("url")["url"]
    path = urlsplit(url).path
    assert UPLOAD_PATH.fullmatch(path), url
    for fraction in (1 / 3, 2 / 3):
        threshold = int(fraction * size)
        wait_for_offset(proc, path, above(threshold), f"offset past {threshold}", owner)
        client.kill()
        kept = offset_of(proc, path, owner)
        assert threshold < kept < size, f"the client was not killed mid-upload: {kept}"
        assert not puts(legacy)
        client = tuspy(*common, "--url", url)
        resumed = client.event("url")
        assert resumed["url"] == url
        assert kept <= resumed["offset"] < size, (kept, resumed)

    done = client.finish()
    assert done["upstreamStatus"] == "201"
    assert done["upstreamLocation"] == f"/uploads/{upload_id(url)}"
    put = assert_delivered_once(legacy, path, source)
    assert put.header("Authorization") == "Bearer tuspy"
    assert len(puts(legacy)) == 1


def test_tuspy_with_upload_checksum_delivers_byte_exact(
    shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory
) -> None:
    """tuspy with upload_checksum=True sends Upload-Checksum (sha1) with every chunk."""
    source = payload(3 * MIB + 12_345)
    proc = shim()
    uploader = tus_client.TusClient(proc.url + "/files/").uploader(
        str(source), chunk_size=MIB, upload_checksum=True, metadata={"filename": "c.bin"}
    )
    uploader.upload()

    assert last_answer(uploader)["shim-upstream-status"] == "201"
    path = urlsplit(str(uploader.url)).path
    assert offset_of(proc, path) == source.stat().st_size
    assert_delivered_once(legacy, path, source)
    assert len(puts(legacy)) == 1


# --- 3, 4: protocol errors ----------------------------------------------------------------


def checksum(algorithm: str, data: bytes) -> str:
    """An Upload-Checksum value."""
    return f"{algorithm} {base64.b64encode(hashlib.new(algorithm, data).digest()).decode()}"


def test_checksum_mismatch_is_460_and_discards_the_chunk(
    shim: ShimLauncher, legacy: WholeFileServer
) -> None:
    """For each algorithm: a wrong checksum gets 460 and keeps the offset; the right one 204."""
    data = os.urandom(4 * 300_007)
    proc = shim()
    path = create(proc, len(data))
    offset = 0
    for algorithm in ("sha1", "md5", "sha256", "sha512"):
        piece = data[offset : offset + 300_007]
        wrong = patch(proc, path, offset, piece, {"Upload-Checksum": checksum(algorithm, piece[1:])})
        assert wrong.status_code == 460, show(wrong)
        assert offset_of(proc, path) == offset
        right = patch(proc, path, offset, piece, {"Upload-Checksum": checksum(algorithm, piece)})
        assert right.status_code == 204, show(right)
        offset += len(piece)
        assert int(right.headers["Upload-Offset"]) == offset == offset_of(proc, path)

    assert_accepted(right, path)
    assert_delivered_once(legacy, path, data)
    assert len(puts(legacy)) == 1


def test_protocol_errors_change_nothing(shim: ShimLauncher, legacy: WholeFileServer) -> None:
    """409, 415, 412, 400, 404, 413, 410: each refused request leaves the upload as it was."""
    proc = shim()
    path = create(proc, 1000)
    data = os.urandom(1000)

    wrong_offset = patch(proc, path, 10, data[10:20])
    assert wrong_offset.status_code == 409, show(wrong_offset)
    wrong_type = patch(proc, path, 0, data[:10], {"Content-Type": "application/octet-stream"})
    assert wrong_type.status_code == 415, show(wrong_type)
    no_version = patch(proc, path, 0, data[:10], {"Tus-Resumable": None})
    assert no_version.status_code == 412, show(no_version)
    assert no_version.headers["Tus-Version"] == "1.0.0"
    old_version = head(proc, path, {"Tus-Resumable": "0.2.2"})
    assert old_version.status_code == 412, show(old_version)
    assert "Upload-Offset" not in old_version.headers
    too_long = patch(proc, path, 0, data + b"!")
    assert too_long.status_code == 413, show(too_long)
    assert offset_of(proc, path) == 0

    assert patch(proc, path, 0, data[:600]).status_code == 204
    past_end = patch(proc, path, 600, data[600:] + b"!")
    assert past_end.status_code == 413, show(past_end)
    chunked_past_end = patch(proc, path, 600, iter([data[600:900], data[900:] + b"!!"]))
    assert chunked_past_end.status_code == 413, show(chunked_past_end)
    assert offset_of(proc, path) == 600

    for bad_length in ("12abc", "-1", "", "1e3"):
        malformed = post(proc, {"Upload-Length": bad_length})
        assert malformed.status_code == 400, (bad_length, show(malformed))
    bad_metadata = post(proc, {"Upload-Length": "5", "Upload-Metadata": "name not-base64!"})
    assert bad_metadata.status_code == 400, show(bad_metadata)
    unknown = head(proc, "/files/" + "A" * 24)
    assert unknown.status_code == 404, show(unknown)
    assert "Upload-Offset" not in unknown.headers
    assert patch(proc, "/files/" + "A" * 24, 0, b"x").status_code == 404

    assert offset_of(proc, path) == 600
    deleted = requests.delete(proc.url + path, headers=TUS, timeout=TIMEOUT)
    assert deleted.status_code == 204, show(deleted)
    assert head(proc, path).status_code == 410
    assert patch(proc, path, 600, data[600:]).status_code == 410
    assert legacy.received == []


def assert_closed_without_answer(sock: socket.socket) -> None:
    """The shim ended this request's connection without answering it."""
    try:
        rest = sock.recv(65536)
    except ConnectionResetError:
        rest = b""
    assert rest == b"", f"the interrupted request got an answer: {rest[:200]!r}"


def test_new_patch_takes_over_from_a_running_one(
    shim: ShimLauncher, legacy: WholeFileServer
) -> None:
    """A client that lost its connection comes back before the shim noticed: its new PATCH
    ends the earlier request (its bytes are kept) instead of waiting for it.  A PATCH at the
    stale offset then gets 409; one at the kept offset completes the file, delivered once."""
    data = os.urandom(2 * MIB)
    proc = shim()
    path = create(proc, len(data))
    with connect(proc) as sock:
        sock.sendall(patch_head(path, 0, len(data)) + data[:MIB])
        wait_for_offset(proc, path, lambda n: n == MIB, "the first half to arrive")
        stale = patch(proc, path, 0, data)
        assert stale.status_code == 409, show(stale)
        assert_closed_without_answer(sock)

    assert offset_of(proc, path) == MIB
    rest = patch(proc, path, MIB, data[MIB:])
    assert_accepted(rest, path)
    assert_delivered_once(legacy, path, data)
    assert len(puts(legacy)) == 1


def test_non_owner_cannot_interrupt_a_running_patch(
    shim: ShimLauncher, legacy: WholeFileServer
) -> None:
    """While alice's PATCH streams, mallory's PATCH (and DELETE) on the upload get 404 and
    leave alice's request alone: it completes and delivers."""
    data = os.urandom(2 * MIB)
    alice = {"Authorization": "Bearer alice"}
    mallory = {"Authorization": "Bearer mallory"}
    proc = shim()
    path = create(proc, len(data), alice)
    with connect(proc) as sock:
        sock.sendall(patch_head(path, 0, len(data), alice) + data[:MIB])
        wait_for_offset(proc, path, lambda n: n == MIB, "the first half to arrive", alice)
        refused = patch(proc, path, MIB, data[MIB:], mallory)
        assert refused.status_code == 404, show(refused)  # as if there were no such upload
        gone = requests.delete(proc.url + path, headers=tus_headers(mallory), timeout=TIMEOUT)
        assert gone.status_code == 404, show(gone)
        sock.sendall(data[MIB:])
        status, fields, _ = read_head(sock)

    assert (status, fields["upload-offset"], fields["shim-upstream-status"]) == (
        204, str(len(data)), "201"
    ), fields
    put = assert_delivered_once(legacy, path, data)
    assert put.header("Authorization") == "Bearer alice"


# --- 5, 6: cut-offs and crashes ------------------------------------------------------------


def test_cut_off_patch_keeps_every_byte_that_arrived(
    shim: ShimLauncher, legacy: WholeFileServer
) -> None:
    """A PATCH announcing 4 MiB breaks off after ~1.5 MiB: HEAD shows exactly the bytes sent,
    and continuing from there completes the file byte-exact.  A cut-off chunk that carries
    Upload-Checksum is kept whole or not at all: nothing of it."""
    data = os.urandom(4 * MIB)
    sent = 3 * MIB // 2 + 12_345
    proc = shim()
    path = create(proc, len(data))
    with connect(proc) as sock:
        verified = {"Upload-Checksum": checksum("sha256", data)}
        sock.sendall(patch_head(path, 0, len(data), verified) + data[:sent])
    nothing_kept = patch_when_idle(proc, path, 0, b"")  # 409 if any of it had been kept
    assert (nothing_kept.status_code, nothing_kept.headers.get("Upload-Offset")) == (204, "0"), (
        show(nothing_kept)
    )

    with connect(proc) as sock:
        sock.sendall(patch_head(path, 0, len(data)) + data[:sent])
    assert wait_for_offset(proc, path, lambda n: n >= sent, "the sent bytes to show") == sent

    rest = patch_when_idle(proc, path, sent, data[sent:])
    assert_accepted(rest, path)
    assert int(rest.headers["Upload-Offset"]) == len(data)
    assert_delivered_once(legacy, path, data)
    assert len(puts(legacy)) == 1


def test_patch_cut_off_at_once_keeps_its_bytes(shim: ShimLauncher, legacy: WholeFileServer) -> None:
    """A PATCH cut off right after its head and a small piece of body keeps that piece.

    The connection first carries one complete chunk, as a real client's has by then (the
    shim's sink connection is opened when the client connects; a loopback client that
    blasts head, body and FIN within a millisecond of connecting can beat it, see README).
    Three cut-offs, so that a lucky race cannot make it pass."""
    proc = shim()
    for sent in (1000, 64 * 1024, 64 * 1024):
        data = os.urandom(MIB)
        path = create(proc, len(data))
        first = 10
        with connect(proc) as sock:
            sock.sendall(patch_head(path, 0, first) + data[:first])
            assert sock.recv(65536).startswith(b"HTTP/1.1 204")
            sock.sendall(patch_head(path, first, len(data) - first) + data[first:first + sent])
        expected = first + sent
        kept = wait_for_offset(proc, path, above(expected - 1), f"{expected} bytes to show",
                               timeout=5.0)
        assert kept == expected
        rest = patch_when_idle(proc, path, expected, data[expected:])
        assert_accepted(rest, path)
        assert_delivered_once(legacy, path, data)


def test_shim_killed_mid_upload_keeps_bytes_on_disk(
    shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory
) -> None:
    """SIGKILL the shim while a PATCH streams; after a restart HEAD (new URL) shows the bytes
    kept, and tuspy finishes the upload from there; the legacy server gets it once."""
    source = payload(8 * MIB + 7)
    data = source.read_bytes()
    sent = 4 * MIB
    proc = shim()
    path = create(proc, len(data))
    with connect(proc) as sock:
        sock.sendall(patch_head(path, 0, len(data)) + data[:sent])
        wait_for_offset(proc, path, lambda n: n == sent, "the streamed bytes to arrive")
        proc.kill()

    proc.restart()
    kept = offset_of(proc, path)
    assert 0 < kept <= sent, kept
    assert not puts(legacy)

    uploader = tus_client.TusClient(proc.url + "/files/").uploader(
        str(source), url=proc.url + path, chunk_size=MIB
    )
    assert uploader.offset == kept
    uploader.upload()
    assert last_answer(uploader)["shim-upstream-status"] == "201"
    assert_delivered_once(legacy, path, data)
    assert len(puts(legacy)) == 1


# --- 7, 8, 9: delivery failures and delivery once ------------------------------------------


def start_final_patch(proc: ShimProcess, data: bytes) -> tuple[str, int]:
    """Create an upload and send all but its last 1000 bytes; return path and offset."""
    path = create(proc, len(data), {"X-Trace": "7"})
    offset = len(data) - 1000
    assert patch(proc, path, 0, data[:offset]).status_code == 204
    return path, offset


def retry_delivery(proc: ShimProcess, path: str, size: int, how: str) -> requests.Response:
    """Ask the shim to deliver again: a HEAD, or an empty PATCH at the final offset."""
    if how == "head":
        return head(proc, path)
    return patch(proc, path, size, b"")


def retry_until_delivered(proc: ShimProcess, path: str, size: int, how: str) -> requests.Response:
    """Ask again (HEAD or an empty final PATCH) until the shim's outbox has delivered: it
    retries in the background with backoff, and says 503 + Retry-After meanwhile."""
    answers: list[requests.Response] = []

    def delivered() -> bool:
        answers.append(retry_delivery(proc, path, size, how))
        assert answers[-1].status_code in (200, 204, 503), show(answers[-1])
        return answers[-1].status_code != 503

    wait_until(delivered, TIMEOUT, "the background delivery")
    return answers[-1]


@pytest.mark.parametrize("how", ["head", "empty-patch"])
def test_legacy_down_then_back_delivers_once(
    shim: ShimLauncher, legacy: WholeFileServer, how: str
) -> None:
    """The legacy server is down when the last chunk arrives: 503 with Retry-After, the
    upload stays complete and a HEAD still shows the full offset; once the server is back,
    the outbox delivers it (a HEAD or an empty final PATCH gets the answer), once."""
    data = os.urandom(2 * MIB + 5)
    proc = shim()
    path, offset = start_final_patch(proc, data)
    legacy.stop()

    final = patch(proc, path, offset, data[offset:])
    assert final.status_code == 503, show(final)
    assert int(final.headers["Retry-After"]) >= 1
    assert "Shim-Upstream-Status" not in final.headers
    stale = patch(proc, path, offset, data[offset:])  # the last chunk again: already stored
    assert stale.status_code == 409, show(stale)

    revived = WholeFileServer(legacy.directory, port=legacy.port)
    revived.start()
    try:
        retry = retry_until_delivered(proc, path, len(data), how)
        assert_accepted(retry, path, 200 if how == "head" else 204)
        assert retry.headers["Upload-Offset"] == str(len(data))
        again = retry_delivery(proc, path, len(data), how)
        assert_accepted(again, path, 200 if how == "head" else 204)
        put = assert_delivered_once(revived, path, data, legacy)
        assert put.header("X-Trace") == "7"
        assert put.header("Idempotency-Key") == f'"{path.rsplit("/", 1)[1]}"'
        assert puts(legacy) == [] and len(puts(revived)) == 1
    finally:
        revived.stop()


@pytest.mark.parametrize("failure", ["down", "500"])
def test_head_shows_full_offset_while_delivery_fails(
    shim: ShimLauncher, legacy: WholeFileServer, failure: str
) -> None:
    """While the legacy server is down (or answers 500), a HEAD of the complete upload still
    reports Upload-Offset == Upload-Length (whatever its status): tus clients resume with a
    HEAD, and tuspy cannot resume without the offset."""
    data = os.urandom(MIB + 5)
    proc = shim()
    path, offset = start_final_patch(proc, data)
    if failure == "down":
        legacy.stop()
    else:
        legacy.fail_status = 500

    final = patch(proc, path, offset, data[offset:])
    assert final.status_code == (503 if failure == "down" else 502), show(final)
    status = head(proc, path)
    assert status.headers.get("Upload-Offset") == str(len(data)), show(status)
    assert status.headers.get("Upload-Length") == str(len(data)), show(status)
    assert not [r for r in puts(legacy) if r.status == 201]


def test_tuspy_retries_until_legacy_is_back(
    shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory,
    tuspy: Callable[..., TuspyClient],
) -> None:
    """tuspy with retries: its last PATCH gets 502 while the legacy server is down; it keeps
    retrying (HEAD, then an empty PATCH at the final offset) and succeeds once the server is
    back; the file is delivered once."""
    source = payload(3 * MIB + 1)
    size = source.stat().st_size
    proc = shim()
    legacy.stop()
    client = tuspy(
        "--file", str(source), "--chunk-size", str(MIB), "--endpoint", proc.url + "/files/",
        "--retries", "200", "--retry-delay", "0.05",
    )
    path = urlsplit(client.event("url")["url"]).path
    wait_until(
        lambda: head(proc, path).headers.get("Upload-Offset") == str(size), TIMEOUT,
        "all bytes stored",
    )
    assert client.proc.poll() is None, client.log.text()

    revived = WholeFileServer(legacy.directory, port=legacy.port)
    revived.start()
    try:
        done = client.finish(TIMEOUT)
        assert done["upstreamStatus"] == "201", done
        assert_delivered_once(revived, path, source, legacy)
        assert len(puts(revived)) == 1
    finally:
        revived.stop()


@pytest.mark.parametrize(("fail_status", "answer"), [(500, 502), (403, 403)], ids=["500", "403"])
def test_legacy_refusal_is_final_and_replayed(
    shim: ShimLauncher, legacy: WholeFileServer, fail_status: int, answer: int
) -> None:
    """The legacy server refuses the finished file (a 4xx passed on, another status as 502):
    the answer is recorded, and a retried final PATCH or a HEAD gets it again without a
    second request to the legacy server, even once it would accept."""
    data = os.urandom(MIB + 3)
    proc = shim()
    path, offset = start_final_patch(proc, data)
    legacy.fail_status = fail_status

    final = patch(proc, path, offset, data[offset:])
    assert final.status_code == answer, show(final)
    assert final.headers.get("Shim-Upstream-Status") == str(fail_status), show(final)
    [refused] = puts(legacy)
    assert (refused.status, refused.size, refused.sha256) == (fail_status, len(data), sha256(data))

    legacy.fail_status = None
    retry = retry_delivery(proc, path, len(data), "empty-patch")
    assert retry.status_code == answer, show(retry)
    assert head(proc, path).headers.get("Shim-Upstream-Status") == str(fail_status)
    assert [r.status for r in puts(legacy)] == [fail_status]


def test_legacy_503_is_retried_in_the_background_once_it_accepts(
    shim: ShimLauncher, legacy: WholeFileServer
) -> None:
    """A 503 from the legacy server is not its last word: the client gets 503 with
    Retry-After, the outbox tries again with backoff, and the file is accepted once."""
    data = os.urandom(MIB + 3)
    proc = shim()
    path, offset = start_final_patch(proc, data)
    legacy.fail_status = 503

    final = patch(proc, path, offset, data[offset:])
    assert final.status_code == 503 and final.headers.get("Retry-After"), show(final)
    legacy.fail_status = None
    assert_accepted(retry_until_delivered(proc, path, len(data), "empty-patch"), path)
    assert_accepted(head(proc, path), path, 200)
    assert [r.status for r in puts(legacy)][-1] == 201
    assert_delivered_once(legacy, path, data, refused=len(puts(legacy)) - 1)


def test_delivered_upload_is_never_delivered_twice(
    shim: ShimLauncher, legacy: WholeFileServer
) -> None:
    """After a successful delivery, a retried final PATCH and a HEAD get the recorded answer,
    also after the shim crashed and restarted; the legacy server still has one PUT."""
    data = os.urandom(MIB + 11)
    proc = shim()
    path = create(proc, len(data))
    final = patch(proc, path, 0, data)
    assert_accepted(final, path)

    for restarted in (False, True):
        if restarted:
            proc.kill()
            proc.restart()
        assert_accepted(retry_delivery(proc, path, len(data), "empty-patch"), path)
        status = head(proc, path)
        assert_accepted(status, path, 200)
        assert status.headers["Upload-Offset"] == status.headers["Upload-Length"] == str(len(data))

    assert_delivered_once(legacy, path, data)
    assert len(puts(legacy)) == 1


# --- 10, 11: owner and pass-through --------------------------------------------------------


def test_only_the_owner_continues_and_its_headers_are_delivered(
    shim: ShimLauncher, legacy: WholeFileServer
) -> None:
    """Created with Bearer alice: requests with Bearer mallory (or none) get 404 (as a missing one) and change
    nothing; the delivery carries alice's Authorization and X-Trace from the creation."""
    data = os.urandom(500_000)
    alice = {"Authorization": "Bearer alice"}
    mallory = {"Authorization": "Bearer mallory"}
    proc = shim()
    path = create(proc, len(data), {**alice, "X-Trace": "42"})
    assert patch(proc, path, 0, data[:200_000], alice).status_code == 204

    for who in (mallory, {}):
        for refused in (
            patch(proc, path, 200_000, data[200_000:], who),
            patch(proc, path, 200_000, b"", who),
            head(proc, path, who),
            requests.delete(proc.url + path, headers=tus_headers(who), timeout=TIMEOUT),
        ):
            assert refused.status_code == 404, show(refused)  # as if there were no such upload
            assert "Upload-Offset" not in refused.headers
    assert offset_of(proc, path, alice) == 200_000
    assert not puts(legacy)

    final = patch(proc, path, 200_000, data[200_000:], alice)
    assert_accepted(final, path)
    put = assert_delivered_once(legacy, path, data)
    assert put.header("Authorization") == "Bearer alice"
    assert put.header("X-Trace") == "42"
    assert "mallory" not in repr(legacy.received)


def test_non_tus_requests_pass_through_unchanged(
    shim: ShimLauncher, legacy: WholeFileServer
) -> None:
    """GET/PUT/POST/DELETE outside the endpoint, and a plain PUT/GET/DELETE under it, reach
    the legacy server as they were sent, and the client gets the legacy server's answer."""
    proc = shim()
    bodies = {"/elsewhere/doc.bin": os.urandom(300_000), "/files/x.txt": b"hello\n"}
    cases: list[tuple[str, str, bytes]] = [
        ("PUT", "/elsewhere/doc.bin", bodies["/elsewhere/doc.bin"]),
        ("POST", "/other/form.bin", os.urandom(70_000)),
        ("PUT", "/files/x.txt", bodies["/files/x.txt"]),
        ("GET", "/elsewhere/doc.bin", b""),
        ("GET", "/files/x.txt", b""),
        ("GET", "/files/missing.txt", b""),
        ("HEAD", "/files/x.txt", b""),
        ("DELETE", "/files/x.txt", b""),
        ("DELETE", "/elsewhere/doc.bin", b""),
        ("OPTIONS", "/files/x.txt", b""),
        ("OPTIONS", "/elsewhere/doc.bin", b""),
    ]
    for number, (method, target, body) in enumerate(cases):
        trace = f"pass-{number}"
        response = requests.request(
            method, proc.url + target, data=body or None, headers={"X-Custom": trace},
            timeout=TIMEOUT,
        )
        [seen] = [r for r in legacy.received if r.header("X-Custom") == trace]
        assert (seen.method, seen.path, seen.size, seen.sha256) == (
            method, target, len(body), sha256(body)
        ), seen
        assert response.status_code == seen.status, (method, target, show(response))
        if method in ("PUT", "POST"):
            assert response.status_code == 201
            assert response.json() == {"path": target, "size": len(body), "sha256": sha256(body)}
        elif method in ("GET", "HEAD") and target in bodies:
            assert response.status_code == 200
            assert response.headers["Content-Length"] == str(len(bodies[target]))
            assert response.content == (bodies[target] if method == "GET" else b"")
        elif method == "GET":
            assert (response.status_code, response.text) == (404, "not found\n")
        else:
            assert response.status_code == 405
            assert response.text == f"method {method} not allowed\n"
        assert "Tus-Resumable" not in response.headers
    assert len(legacy.received) == len(cases)
    assert_clean(legacy)


# --- 12, 13, 14: creation with upload, Expect, size limit ----------------------------------


def test_creation_with_upload(shim: ShimLauncher, legacy: WholeFileServer) -> None:
    """A POST with a body starts the upload (201 + Upload-Offset); one with the whole file
    delivers at once."""
    proc = shim()
    partial = os.urandom(700_000)
    started = post(proc, {"Upload-Length": str(len(partial))}, partial[:300_000])
    assert started.status_code == 201, show(started)
    assert started.headers["Upload-Offset"] == "300000"
    assert "Shim-Upstream-Status" not in started.headers
    partial_path = started.headers["Location"]
    assert offset_of(proc, partial_path) == 300_000
    assert_accepted(patch(proc, partial_path, 300_000, partial[300_000:]), partial_path)

    whole = os.urandom(400_000)
    at_once = post(proc, {"Upload-Length": str(len(whole))}, whole)
    assert at_once.headers.get("Upload-Offset") == str(len(whole)), show(at_once)
    whole_path = at_once.headers["Location"]
    assert_accepted(at_once, whole_path, 201)

    for path, data in ((partial_path, partial), (whole_path, whole)):
        assert_delivered_once(legacy, path, data)
    assert len(puts(legacy)) == 2


def test_empty_upload_is_delivered_on_creation(shim: ShimLauncher, legacy: WholeFileServer) -> None:
    """Upload-Length: 0 is complete at creation: 201 with Location and the legacy server's
    answer, one empty PUT; a HEAD afterwards replays the answer and delivers nothing more."""
    proc = shim()
    empty = post(proc, {"Upload-Length": "0", "Upload-Metadata": "filename ZW1wdHk="})
    assert empty.status_code == 201, show(empty)
    path = empty.headers["Location"]
    assert_accepted(empty, path, 201)
    status = head(proc, path)
    assert_accepted(status, path, 200)
    assert status.headers["Upload-Offset"] == status.headers["Upload-Length"] == "0"
    assert_delivered_once(legacy, path, b"")
    assert len(puts(legacy)) == 1


def test_expect_100_continue_on_patch(shim: ShimLauncher, legacy: WholeFileServer) -> None:
    """A PATCH with Expect: 100-continue gets 100 before its body and 204 after it; a
    refused one (wrong offset) ends with 409 and changes nothing."""
    data = os.urandom(MIB + 99)
    proc = shim()
    path = create(proc, len(data))
    half = len(data) // 2
    assert patch(proc, path, 0, data[:half]).status_code == 204

    with connect(proc) as sock:
        sock.sendall(patch_head(path, 0, 10, {"Expect": "100-continue"}))
        status, _, rest = read_head(sock)
        if status == 100:
            sock.sendall(data[:10])
            status, _, rest = read_head(sock, rest)
        assert status == 409
    assert offset_of(proc, path) == half

    with connect(proc) as sock:
        sock.sendall(patch_head(path, half, len(data) - half, {"Expect": "100-continue"}))
        status, _, rest = read_head(sock)
        assert status == 100
        sock.sendall(data[half:])
        status, fields, _ = read_head(sock, rest)
    assert (status, fields["upload-offset"], fields["shim-upstream-status"]) == (
        204, str(len(data)), "201"
    ), fields
    assert_delivered_once(legacy, path, data)


def test_max_size_is_advertised_and_enforced(shim: ShimLauncher, legacy: WholeFileServer) -> None:
    """tus.max_size 1000: OPTIONS says Tus-Max-Size 1000, creating 1001 bytes is 413, a
    deferred-length upload cannot grow past it, and 1000 bytes are delivered."""
    proc = shim({"tus": {"max_size": 1000}})
    options = requests.options(proc.url + "/files/", timeout=TIMEOUT)
    assert options.status_code in (200, 204), show(options)
    assert options.headers["Tus-Max-Size"] == "1000"
    assert options.headers["Tus-Version"] == "1.0.0"
    assert "creation" in options.headers["Tus-Extension"].split(",")

    too_big = post(proc, {"Upload-Length": "1001"})
    assert too_big.status_code == 413, show(too_big)
    assert "Location" not in too_big.headers

    deferred = post(proc, {"Upload-Defer-Length": "1"})
    assert deferred.status_code == 201, show(deferred)
    deferred_path = deferred.headers["Location"]
    overflow = patch(proc, deferred_path, 0, os.urandom(1001))
    assert overflow.status_code == 413, show(overflow)
    assert offset_of(proc, deferred_path) == 0

    data = os.urandom(1000)
    path = create(proc, 1000)
    assert_accepted(patch(proc, path, 0, data), path)
    assert_delivered_once(legacy, path, data)
    assert len(puts(legacy)) == 1


# --- 15: concatenation ----------------------------------------------------------------------


def test_concatenation_final_before_partials_finish(
    shim: ShimLauncher, legacy: WholeFileServer
) -> None:
    """Two partial uploads; the final one is created while both are unfinished; the file is
    delivered, once and in order, when the last partial (the first part) completes."""
    first, second = os.urandom(600_001), os.urandom(400_003)
    proc = shim()
    a = create(proc, len(first), {"Upload-Concat": "partial"})
    b = create(proc, len(second), {"Upload-Concat": "partial"})
    assert patch(proc, a, 0, first[:100_000]).status_code == 204

    final = post(proc, {"Upload-Concat": f"final;{a} {b}"})
    assert final.status_code == 201, show(final)
    whole = final.headers["Location"]
    assert UPLOAD_PATH.fullmatch(whole) and whole not in (a, b)
    unfinished = head(proc, whole)
    assert unfinished.status_code == 200, show(unfinished)
    assert "Upload-Offset" not in unfinished.headers
    assert unfinished.headers["Upload-Concat"].startswith("final;")

    second_done = patch(proc, b, 0, second)
    assert second_done.status_code == 204, show(second_done)
    assert "Shim-Upstream-Status" not in second_done.headers
    assert not puts(legacy)

    last = patch(proc, a, 100_000, first[100_000:])
    assert_accepted(last, whole)
    status = head(proc, whole)
    assert_accepted(status, whole, 200)
    assert status.headers["Upload-Offset"] == str(len(first) + len(second))
    assert_delivered_once(legacy, whole, first + second)
    assert len(puts(legacy)) == 1
