"""End to end: the IETF "Resumable Uploads for HTTP" draft (interop 3, 5, 6, 7, 8, 9) through
a real ``mitmdump`` shim to the real whole-file-only legacy server.

Clients are real: tus-js-client 4 in its ``ietf-draft-03`` (interop 5) and ``ietf-draft-05``
(interop 6) modes, and raw HTTP written by hand on real sockets (h11 for HTTP/1.1, plain and
over TLS, and the ``h2`` package for HTTP/2 over TLS), so the ``104 Upload Resumption
Supported`` interim response can be read off the wire before a single body byte is sent.

Every test that finishes a file asserts what a user would notice on the legacy side: exactly
one request for that file, byte-exact, with the method and URL the client used, and never an
``Upload-*``, ``Tus-*`` or ``Content-Range`` header.

No timing guesses: a request cut off mid-body is closed by the test, which then waits for the
shim's own log line saying it let go of the request (``client left mid-body; upload <id>
keeps N bytes``) before asking for the offset. Where a HEAD is meant to end a request that is
still open (the draft's "Concurrency"), the test asserts that the shim closed that connection.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import socket
import ssl
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import h11
import pytest

from shim.demo_server import ReceivedRequest, WholeFileServer
from tests.harness import (
    PayloadFactory,
    ShimLauncher,
    ShimProcess,
    run_tus_js,
    sha256_of,
    shared_shim,
    start_tus_js,
    tus_js_events,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

KIB = 1024
MIB = 1024 * KIB
TIMEOUT = 30.0
"""Deadline for anything the tests wait for (they normally wait well under a second)."""
IO_TIMEOUT = 10.0
CLIENT_TIMEOUT = 60.0

VERSION = "Upload-Draft-Interop-Version"
PREFIX = "/.well-known/resumable-uploads/"
PARTIAL_UPLOAD = "application/partial-upload"
PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPES = "https://iana.org/assignments/http-problem-types#"
LEAKED_PREFIXES = ("upload-", "tus-", "x-upload-")
LEAKED_NAMES = ("content-range", "content-digest", "repr-digest", "want-repr-digest")

VERSIONS = (3, 5, 6, 7, 8, 9)
APPEND_STATUS = {3: 201, 5: 201, 6: 201, 7: 204, 8: 204, 9: 204}
"""A non-final PATCH: 201 up to draft -05 (interop 6), a 204 (the drafts' example) from -06."""
LIMIT = {3: None, 5: None, 6: "max-size=10737418240, expires=86400",
         7: "max-size=10737418240, max-age=86400", 8: "max-size=10737418240, max-age=86400",
         9: "max-size=10737418240, max-age=86400"}
"""Upload-Limit with the default config (no max size, 1 day): from -04, key renamed in -06."""

LEFT_MID_BODY = r"client left mid-body; upload {id} keeps (\d+) bytes"
"""What the shim logs once it let go of a request cut off mid-body (shim/exchange.py)."""


# --- the protocol's fields, per interop version ------------------------------------------


def completeness(version: int, complete: bool) -> dict[str, str]:
    """``Upload-Complete`` (interop 5 on) or the inverted ``Upload-Incomplete`` (interop 3)."""
    if version == 3:
        return {"Upload-Incomplete": "?0" if complete else "?1"}
    return {"Upload-Complete": "?1" if complete else "?0"}


def creation(version: int, complete: bool, **extra: str) -> dict[str, str]:
    """The fields that upgrade a POST/PUT to a resumable upload."""
    return {VERSION: str(version), **completeness(version, complete), **extra}


def append(version: int, offset: int, complete: bool, **extra: str) -> dict[str, str]:
    """A PATCH's fields: offset, completeness, and application/partial-upload from interop 6."""
    fields = {VERSION: str(version), "Upload-Offset": str(offset), **completeness(version, complete)}
    if version >= 6:
        fields["Content-Type"] = PARTIAL_UPLOAD
    return {**fields, **extra}


def says_complete(response: Response, version: int) -> bool | None:
    """What the response's completeness field says (None when it has none)."""
    if version == 3:
        value = response.header("Upload-Incomplete")
        return None if value is None else {"?0": True, "?1": False}[value]
    value = response.header("Upload-Complete")
    return None if value is None else {"?1": True, "?0": False}[value]


def sf_binary(digest: bytes) -> str:
    """An RFC 8941 byte sequence."""
    return f":{base64.b64encode(digest).decode()}:"


def unique_path(name: str) -> str:
    """A legacy URL no other test uses (the shared legacy server records all of them)."""
    return f"/api/{name}-{uuid.uuid4().hex[:10]}"


# --- raw HTTP/1.1 on a socket (plain or TLS), parsed by h11 ------------------------------


@dataclass
class Response:
    """A final response and the interim (1xx) responses that came before it."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    interim: list[Response] = field(default_factory=list)
    http_version: str = "1.1"

    def header(self, name: str) -> str | None:
        """The field's value (several lines joined with ", ", as a client sees them)."""
        values = self.headers_named(name)
        return ", ".join(values) if values else None

    def headers_named(self, name: str) -> list[str]:
        """Every field line called ``name``."""
        wanted = name.lower()
        return [v for k, v in self.headers if k.lower() == wanted]

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)

    def __str__(self) -> str:
        """For assertion messages."""
        interim = "".join(f"[{r.status} {r.reason} {r.headers}] " for r in self.interim)
        return f"{interim}{self.status} {self.reason} {self.headers} {self.body[:400]!r}"


def _h11_response(event: h11.InformationalResponse | h11.Response) -> Response:
    fields = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
    return Response(event.status_code, event.reason.decode("latin-1"), fields)


def client_tls(alpn: list[str]) -> ssl.SSLContext:
    """A TLS client context that trusts anything: mitmproxy makes up the shim's certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(alpn)
    return context


class Http1:
    """One HTTP/1.1 connection to the shim, written and read step by step."""

    def __init__(self, proc: ShimProcess, tls: bool = False) -> None:
        """Connect (with TLS and ALPN http/1.1 if ``tls``)."""
        sock = socket.create_connection(("127.0.0.1", proc.port), timeout=IO_TIMEOUT)
        if tls:
            sock = client_tls(["http/1.1"]).wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.log_mark = len(proc.output())
        self.host = f"127.0.0.1:{proc.port}"
        self.conn = h11.Connection(h11.CLIENT)

    def send_head(self, method: str, target: str, headers: Mapping[str, str], length: int | None) -> None:
        """The request line and fields; ``Content-Length: length`` unless None."""
        fields = [("Host", self.host), *headers.items()]
        if length is not None:
            fields.append(("Content-Length", str(length)))
        self.sock.sendall(self.conn.send(h11.Request(method=method, target=target, headers=fields)) or b"")

    def send_body(self, data: bytes, end: bool = True) -> None:
        """Body bytes, and the end of the message if ``end``."""
        if data:
            self.sock.sendall(self.conn.send(h11.Data(data=data)) or b"")
        if end:
            self.sock.sendall(self.conn.send(h11.EndOfMessage()) or b"")

    def next_event(self) -> Any:
        """The next h11 event from the server (reads the socket as needed)."""
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(self.sock.recv(65536))

    def read_interim(self) -> Response:
        """The next message, which must be an interim (1xx) response."""
        event = self.next_event()
        assert isinstance(event, h11.InformationalResponse), f"expected a 1xx, got {event!r}"
        return _h11_response(event)

    def read_response(self) -> Response:
        """Every interim response, then the final one with its body."""
        interim: list[Response] = []
        while isinstance(event := self.next_event(), h11.InformationalResponse):
            interim.append(_h11_response(event))
        assert isinstance(event, h11.Response), f"expected a response, got {event!r}"
        response = _h11_response(event)
        response.interim = interim
        body = bytearray()
        while not isinstance(event := self.next_event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data), event
            body += event.data
        response.body = bytes(body)
        return response

    def closed_by_peer(self) -> bool:
        """Whether the server has closed this connection (blocks up to the socket timeout)."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def request(
    proc: ShimProcess,
    method: str,
    target: str,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    *,
    tls: bool = False,
) -> Response:
    """One request on a fresh connection; Content-Length unless it is a bodiless GET-like one."""
    conn = Http1(proc, tls)
    try:
        length = len(body) if body or method in ("POST", "PUT", "PATCH") else None
        conn.send_head(method, target, headers or {}, length)
        conn.send_body(body)
        return conn.read_response()
    finally:
        conn.close()


def head(proc: ShimProcess, location: str, version: int) -> Response:
    """HEAD of an upload resource (offset retrieval)."""
    return request(proc, "HEAD", location, {VERSION: str(version)})


def resumption(response: Response, version: int) -> str:
    """Check a 104 Upload Resumption Supported and return the path of its Location (an
    absolute URL, as the client named the shim), to send requests to."""
    assert response.status == 104, response
    if response.http_version == "1.1":  # HTTP/2 has no reason phrase
        assert response.reason == "Upload Resumption Supported", response
    assert response.header(VERSION) == str(version), response  # echoed (Appendix, feature detection)
    assert response.header("Upload-Limit") == LIMIT[version], response
    location = response.header("Location")
    absolute = r"https?://[^/]+" + re.escape(PREFIX) + r"[\w-]+"  # as the client named the shim
    assert location is not None and re.fullmatch(absolute, location), response
    return urlsplit(location).path


def upload_id_of(location: str) -> str:
    """The id at the end of an upload resource's URL."""
    return location.rsplit("/", 1)[-1]


def kept_after_cuts(proc: ShimProcess, location: str) -> list[int]:
    """What the shim kept of each request on this upload that was cut off (from its log)."""
    pattern = re.compile(LEFT_MID_BODY.format(id=re.escape(upload_id_of(location))))
    return [int(m.group(1)) for m in pattern.finditer(proc.output())]


def wait_until_streaming(proc: ShimProcess, sock: socket.socket, log_mark: int) -> None:
    """Wait until mitmproxy streams the body arriving on ``sock`` into the shim (a log line
    after ``log_mark``, the length of the shim's output when the connection was made).

    mitmproxy logs this once the request is connected to the shim's in-process sink, which
    happens after the 104 went out. Body bytes that came earlier are queued and fed first, but
    a client that goes away before this loses them (the shim bug test_e2e_content_range.py
    shows with test_bytes_of_a_chunk_cut_at_once_are_kept); a cut-off test waits for it so that
    it checks what it means to."""
    pattern = re.compile(rf"\[127\.0\.0\.1:{sock.getsockname()[1]}\] Streaming request to ")
    wait_until(lambda: pattern.search(proc.output()[log_mark:]) is not None, TIMEOUT, "streaming")


def wait_until_let_go(proc: ShimProcess, location: str, before: int = 0) -> int:
    """Wait until the shim logged that it let go of a request cut off mid-body on this upload
    (the ``before + 1``-th such line); return how many bytes it says the upload keeps."""
    wait_until(
        lambda: len(kept_after_cuts(proc, location)) > before,
        TIMEOUT,
        "the shim letting go of the cut-off request",
    )
    return kept_after_cuts(proc, location)[before]


def assert_offset(response: Response, version: int, offset: int, complete: bool, length: int | None) -> None:
    """A HEAD answer (offset retrieval) for an upload of ``offset`` bytes."""
    assert response.status == 204, response
    assert response.interim == [], response
    assert response.header("Upload-Offset") == str(offset), response
    assert says_complete(response, version) is complete, response
    assert response.header("Upload-Length") == (None if length is None else str(length)), response
    assert response.header("Cache-Control") == "no-store", response
    assert response.header("Upload-Limit") == LIMIT[version], response
    assert response.body == b"", response


def assert_problem(response: Response, status: int, kind: str | None = None) -> dict[str, Any]:
    """An RFC 9457 problem document with ``status`` (and the draft's problem type ``kind``)."""
    assert response.status == status, response
    assert response.header("Content-Type") == PROBLEM_JSON, response
    document = response.json()
    assert isinstance(document, dict), response
    assert document["status"] == status, response
    if kind is not None:
        assert document["type"] == PROBLEM_TYPES + kind, response
    return document


# --- the legacy server's side ------------------------------------------------------------


def assert_no_protocol_leak(legacy: WholeFileServer) -> None:
    """The legacy server never saw a PATCH or a resumable-upload field."""
    for received in legacy.received:
        assert received.method != "PATCH", received
        leaked = [n for n in received.header_names() if n in LEAKED_NAMES or n.startswith(LEAKED_PREFIXES)]
        assert not leaked, f"{received.method} {received.path} carried {leaked}"


def received_at(legacy: WholeFileServer, path: str) -> list[ReceivedRequest]:
    """What the legacy server received at ``path``."""
    return [r for r in legacy.received if r.path == path]


def delivered_once(
    legacy: WholeFileServer, path: str, data: bytes | Path, method: str = "POST"
) -> ReceivedRequest:
    """The one request the legacy server received for ``path``: all of ``data`` (bytes, or a
    file's), accepted; the legacy server stored exactly that."""
    assert_no_protocol_leak(legacy)
    received = received_at(legacy, path)
    assert [(r.method, r.status, r.complete) for r in received] == [(method, 201, True)], received
    [delivery] = received
    if isinstance(data, Path):
        expected = (data.stat().st_size, sha256_of(data))
    else:
        expected = (len(data), hashlib.sha256(data).hexdigest())
    assert (delivery.size, delivery.sha256) == expected
    assert sha256_of(legacy.directory / path.lstrip("/")) == expected[1]
    return delivery


def assert_legacy_answer(response: Response, path: str, data: bytes) -> None:
    """The legacy server's own 201 and its JSON body describing ``data`` stored at ``path``."""
    assert response.status == 201, response
    assert response.reason == ("Created" if response.http_version == "1.1" else ""), response
    assert response.json() == {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert path in response.headers_named("Location"), response
    assert response.header("Upload-Offset") == str(len(data)), response


def assert_final(response: Response, version: int, path: str, data: bytes) -> None:
    """The answer to the request that completed an upload: the legacy server's, plus
    Upload-Offset, and ``Upload-Complete: ?1`` from interop 7 (-06 on)."""
    assert_legacy_answer(response, path, data)
    assert response.interim == [] or response.interim[0].status == 104, response
    if version >= 7:
        assert response.header("Upload-Complete") == "?1", response
    assert says_complete(response, version) in (None, True), response  # never "more follows"


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ShimProcess, WholeFileServer]]:
    """One legacy server and one shim (default config) for the raw HTTP tests: each test uses
    its own legacy URL (:func:`unique_path`), so tests do not share uploads."""
    yield from shared_shim(tmp_path_factory, "ietf")


# --- 1. tus-js-client in its IETF modes -------------------------------------------------


Event = dict[str, Any]


class BackgroundClient:
    """The tus-js-client driver running in the background; events read as they come."""

    def __init__(self, args: Mapping[str, Any]) -> None:
        """Start the driver with response tracing."""
        self.proc = start_tus_js({"traceResponses": True, **args})
        self.lines: list[str] = []

    def wait_for_event(self, kind: str) -> Event:
        """Read stdout until an event of ``kind`` (fails if the driver ends first)."""
        assert self.proc.stdout is not None
        for event in tus_js_events("\n".join(self.lines)):
            if event.get("event") == kind:
                return event
        while line := self.proc.stdout.readline():
            self.lines.append(line)
            [event] = tus_js_events(line) or [{}]
            if event.get("event") == kind:
                return event
        raise AssertionError(f"no {kind!r} event; output:\n{self.output()}")

    def finish(self) -> tuple[int, list[Event]]:
        """Wait for the driver's end; its exit code and every event."""
        stdout, _ = self.proc.communicate(timeout=CLIENT_TIMEOUT)
        self.lines.append(stdout)
        return self.proc.returncode, tus_js_events("".join(self.lines))

    def output(self) -> str:
        """What the driver printed so far (stderr only once it ended)."""
        stderr = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
        return "".join(self.lines) + stderr

    def kill(self) -> None:
        """Kill the driver (like a crashed browser tab) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=IO_TIMEOUT)


@pytest.fixture
def background() -> Iterator[list[BackgroundClient]]:
    """Drivers started by a test; every one still running is killed at teardown."""
    started: list[BackgroundClient] = []
    yield started
    for client in started:
        if client.proc.poll() is None:
            client.kill()


def run_client(args: Mapping[str, Any], expect: int = 0) -> list[Event]:
    """Run the driver to its end with response tracing; check its exit code; return events."""
    result = run_tus_js({"traceResponses": True, **args}, timeout=CLIENT_TIMEOUT)
    output = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == expect, output
    return tus_js_events(result.stdout)


def traced(events: list[Event], method: str | None = None) -> list[Event]:
    """The traced responses (of requests with ``method``)."""
    return [e for e in events if e.get("event") == "response" and method in (None, e["method"])]


def head_until_ended(proc: ShimProcess, location: str, version: int, client: BackgroundClient) -> Response:
    """HEAD the upload until the client's held PATCH was ended by one of those HEADs (the
    driver exits once its connection is closed); return the last answer.

    More than one HEAD is needed only if the first came before the shim had even read the
    PATCH's head; every HEAD after the one that ended the PATCH reports the same offset."""
    answers: list[Response] = []

    def ended() -> bool:
        answers.append(head(proc, location, version))
        return client.proc.poll() is not None

    wait_until(ended, TIMEOUT, "a HEAD ending the held PATCH", interval=0.05)
    return answers[-1]


DEEP = 600 * KIB + 7
"""Where a cut falls inside a 1 MiB PATCH body: deep enough that the request head and most of
the body have left the client (node's stream back-pressure) when the driver says "holding"."""


@pytest.mark.parametrize(("protocol", "version"), [("ietf-draft-03", 5), ("ietf-draft-05", 6)])
def test_tus_js_client_cut_twice_arrives_once(
    node: None,
    shim: ShimLauncher,
    legacy: WholeFileServer,
    payload: PayloadFactory,
    background: list[BackgroundClient],
    protocol: str,
    version: int,
) -> None:
    """20 MiB in 1 MiB PATCHes to <shim>/api/files; cut twice mid-PATCH, resumed with
    uploadUrl each time: one byte-exact POST /api/files.

    First cut: the client is killed mid-body and the shim notices the closed connection.
    Second cut: a HEAD of the upload ends the PATCH that is still open ("Concurrency")."""
    proc = shim()
    source = payload(20 * MIB)
    size = source.stat().st_size
    common = {"file": source, "chunkSize": MIB, "protocol": protocol, "retryDelays": []}

    # 1. Created by POST /api/files (Upload-Complete: ?0), killed inside the 7th PATCH body.
    first_cut = 6 * MIB + DEEP
    first = BackgroundClient({**common, "endpoint": f"{proc.url}/api/files", "holdAfterBytes": first_cut})
    background.append(first)
    url = str(first.wait_for_event("url")["url"])
    assert url.startswith(f"{proc.url}{PREFIX}")
    location = url.removeprefix(proc.url)
    first.wait_for_event("holding")
    first.kill()
    kept = wait_until_let_go(proc, location)
    assert 6 * MIB <= kept <= first_cut  # six PATCHes were acknowledged, and part of the 7th
    assert_offset(head(proc, location, version), version, kept, False, size)

    # 2. Resumed, held inside the 7th PATCH body again; a HEAD ends that request.
    second_cut = kept + 6 * MIB + DEEP
    second = BackgroundClient({**common, "uploadUrl": url, "holdAfterBytes": second_cut})
    background.append(second)
    second.wait_for_event("holding")
    status = head_until_ended(proc, location, version, second)
    code, events = second.finish()
    assert code == 1, second.output()  # the shim closed its connection; retries are off
    assert int(traced(events, "PATCH")[0]["requestOffset"]) == kept  # resumed, not from 0
    resumed = int(status.header("Upload-Offset") or -1)
    assert kept + 6 * MIB <= resumed <= second_cut, status
    assert_offset(status, version, resumed, False, size)
    assert received_at(legacy, "/api/files") == []

    # 3. Resumed to the end.
    events = run_client({**common, "uploadUrl": url})
    patches = traced(events, "PATCH")
    assert int(patches[0]["requestOffset"]) == resumed
    assert {p["status"] for p in patches[:-1]} == {201}  # interop 5 and 6: 201 for an append
    assert (patches[-1]["status"], patches[-1]["responseOffset"]) == (201, str(size))  # legacy's 201

    delivered_once(legacy, "/api/files", source)

    # A HEAD afterwards shows it complete and delivers nothing again.
    assert_offset(head(proc, location, version), version, size, True, size)
    assert len(legacy.received) == 1


# --- 2. optimistic upload: the 104 before the body, cut, resumed with HEAD and PATCH ------


@pytest.mark.parametrize("version", VERSIONS)
def test_optimistic_upload_cut_off_is_resumed_with_head_and_patch(
    shared: tuple[ShimProcess, WholeFileServer], version: int
) -> None:
    """POST /api/opt with the completeness field and Content-Length N: the 104 arrives before
    any body byte; the connection breaks after part of the body; HEAD shows the part kept and
    the upload incomplete; a final PATCH with the rest gets the legacy server's 201."""
    proc, legacy = shared
    path = unique_path(f"opt{version}")
    data = os.urandom(256 * KIB + 7)
    part = 100 * KIB + 3

    conn = Http1(proc)
    conn.send_head("POST", path, creation(version, True, **{"X-Request-Tag": "opt"}), len(data))
    location = resumption(conn.read_interim(), version)  # before a single body byte went out
    conn.send_body(data[:part], end=False)
    wait_until_streaming(proc, conn.sock, conn.log_mark)
    conn.close()
    assert wait_until_let_go(proc, location) == part

    assert_offset(head(proc, location, version), version, part, False, len(data))
    assert received_at(legacy, path) == []

    final = request(proc, "PATCH", location, append(version, part, True), data[part:])
    assert final.interim == [], final
    assert_final(final, version, path, data)

    delivery = delivered_once(legacy, path, data)
    assert delivery.header("X-Request-Tag") == "opt"  # the creating request's own fields
    assert_offset(head(proc, location, version), version, len(data), True, len(data))
    assert len(received_at(legacy, path)) == 1  # a HEAD after delivery delivers nothing


@pytest.mark.parametrize("version", VERSIONS)
def test_optimistic_upload_in_one_go(shared: tuple[ShimProcess, WholeFileServer], version: int) -> None:
    """Nothing breaks: the 104, then the whole body, then the legacy server's own 201 with
    Upload-Offset; the upload resource then reports the upload complete."""
    proc, legacy = shared
    path = unique_path(f"whole{version}")
    data = os.urandom(300 * KIB + 1)

    conn = Http1(proc)
    try:
        conn.send_head("POST", path, creation(version, True), len(data))
        location = resumption(conn.read_interim(), version)
        conn.send_body(data)
        final = conn.read_response()
    finally:
        conn.close()
    assert final.interim == [], final  # one 104 only
    assert_final(final, version, path, data)
    delivered_once(legacy, path, data)
    assert_offset(head(proc, location, version), version, len(data), True, len(data))


@pytest.mark.parametrize("version", [7, 8])
def test_completing_creation_answer_has_one_location(
    shared: tuple[ShimProcess, WholeFileServer], version: int
) -> None:
    """Location is a singleton field (RFC 9110 sections 5.3 and 10.2.2), and from -06 the final
    answer to a request with ``Upload-Complete: ?1`` is the target resource's own response;
    -09..-11 ("Upload Creation") say its Location "does not necessarily represent the upload
    location". The legacy server's 201 names what it created: that must be the only Location
    (node keeps only the first of two, curl and requests join them with ", ")."""
    proc, _ = shared
    path = unique_path("one-location")
    final = request(proc, "POST", path, creation(version, True), b"x" * 10)
    assert final.status == 201, final
    assert final.headers_named("Location") == [path], final


def test_put_is_delivered_as_put(shared: tuple[ShimProcess, WholeFileServer]) -> None:
    """The original method is kept: a PUT upload reaches the legacy server as one PUT, with the
    creating request's Content-Type."""
    proc, legacy = shared
    path = unique_path("put")
    data = os.urandom(64 * KIB)
    final = request(proc, "PUT", path, creation(8, True, **{"Content-Type": "application/pdf"}), data)
    assert final.interim and final.interim[0].status == 104, final
    assert_final(final, 8, path, data)
    delivery = delivered_once(legacy, path, data, method="PUT")
    assert delivery.header("Content-Type") == "application/pdf"


def test_head_ends_a_request_still_writing(shared: tuple[ShimProcess, WholeFileServer]) -> None:
    """Draft "Concurrency": a HEAD ends an earlier request still writing to the upload. The
    open connection is closed by the shim; the bytes it had read are kept, and the upload is
    finished from the offset the HEAD reported."""
    proc, legacy = shared
    path = unique_path("concurrency")
    data = os.urandom(200 * KIB)

    conn = Http1(proc)
    conn.send_head("POST", path, creation(8, True), len(data))
    location = resumption(conn.read_interim(), 8)
    conn.send_body(data[: 50 * KIB], end=False)
    wait_until_streaming(proc, conn.sock, conn.log_mark)
    try:
        status = head(proc, location, 8)
        assert conn.closed_by_peer()  # the shim closed the connection of the earlier request
    finally:
        conn.close()
    offset = int(status.header("Upload-Offset") or -1)
    assert 0 <= offset <= 50 * KIB
    assert_offset(status, 8, offset, False, len(data))
    assert received_at(legacy, path) == []

    final = request(proc, "PATCH", location, append(8, offset, True), data[offset:])
    assert_final(final, 8, path, data)
    delivered_once(legacy, path, data)


# --- 3. creation with Upload-Complete: ?0, then three PATCHes --------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_creation_then_three_appends(shared: tuple[ShimProcess, WholeFileServer], version: int) -> None:
    """An empty creation request that says more follows: 104, then 201 with Location,
    Upload-Offset 0 and "incomplete"; two non-final PATCHes (201 up to interop 6, 204 from 7)
    and a final one answered with the legacy server's 201."""
    proc, legacy = shared
    path = unique_path(f"parts{version}")
    data = os.urandom(3 * 70 * KIB + 11)
    cuts = [0, 70 * KIB, 140 * KIB, len(data)]

    created = request(proc, "POST", path, creation(version, False))
    [interim] = created.interim
    location = resumption(interim, version)
    assert created.status == 201, created
    assert urlsplit(created.header("Location") or "").path == location, created
    assert created.header("Upload-Offset") == "0", created
    assert says_complete(created, version) is False, created
    assert created.header("Upload-Limit") == LIMIT[version], created
    assert_offset(head(proc, location, version), version, 0, False, None)

    for start, end in itertools.pairwise(cuts[:-1]):
        answer = request(proc, "PATCH", location, append(version, start, False), data[start:end])
        assert answer.status == APPEND_STATUS[version], answer
        assert answer.interim == [], answer
        assert answer.header("Upload-Offset") == str(end), answer
        assert says_complete(answer, version) is False, answer
        assert_offset(head(proc, location, version), version, end, False, None)
    assert received_at(legacy, path) == []

    final = request(proc, "PATCH", location, append(version, cuts[2], True), data[cuts[2] :])
    assert_final(final, version, path, data)
    delivered_once(legacy, path, data)
    assert_offset(head(proc, location, version), version, len(data), True, len(data))


@pytest.mark.parametrize("version", VERSIONS)
def test_after_delivery_a_retried_final_patch_gets_the_recorded_answer(
    shared: tuple[ShimProcess, WholeFileServer], version: int
) -> None:
    """An empty final PATCH at the final offset (a client that missed the answer, or
    tus-js-client after a HEAD without Upload-Length) gets the legacy server's answer again;
    a PATCH with more bytes is refused with 400. Nothing is delivered twice."""
    proc, legacy = shared
    path = unique_path(f"retry{version}")
    data = os.urandom(40 * KIB)
    final = request(proc, "POST", path, creation(version, True), data)
    location = resumption(final.interim[0], version)
    assert_final(final, version, path, data)

    again = request(proc, "PATCH", location, append(version, len(data), True))
    assert_final(again, version, path, data)

    more = request(proc, "PATCH", location, append(version, len(data), True), b"more")
    assert_problem(more, 400)  # -10: "an inconsistent length failure"
    delivered_once(legacy, path, data)


# --- 4. TLS, HTTP/1.1 and HTTP/2 -----------------------------------------------------------
#
# The shim needs no extra option for either. mitmproxy's reverse mode (`reverse:http://...`)
# looks at a client's first bytes and puts a TLS layer on a connection that starts with a TLS
# record (NextLayer._setup_reverse_proxy), with a certificate made from the CA mitmproxy keeps
# in the shim's confdir. The legacy server here speaks plain HTTP, so there is no server-side
# ALPN for mitmproxy to mirror (tlsconfig.alpn_select_callback): ALPN follows the client's
# offer, h2 whenever it offers it (mitmproxy's `http2` option is on by default). shim/mitm.py
# sends the 104 on HTTP/2 as a HEADERS frame without END_STREAM, which h2 reports as an
# interim response.


def test_104_over_tls_http1(shared: tuple[ShimProcess, WholeFileServer]) -> None:
    """mitmproxy in reverse mode takes TLS from a client on the same port (a certificate made
    from its CA in the confdir): the 104 arrives over TLS before the body, as over plain TCP."""
    proc, legacy = shared
    path = unique_path("tls-h1")
    data = os.urandom(150 * KIB)
    conn = Http1(proc, tls=True)
    try:
        assert isinstance(conn.sock, ssl.SSLSocket) and conn.sock.selected_alpn_protocol() == "http/1.1"
        conn.send_head("POST", path, creation(7, True), len(data))
        location = resumption(conn.read_interim(), 7)
        conn.send_body(data)
        final = conn.read_response()
    finally:
        conn.close()
    assert_final(final, 7, path, data)
    delivered_once(legacy, path, data)
    assert_offset(request(proc, "HEAD", location, {VERSION: "7"}, tls=True), 7, len(data), True, len(data))


class Http2:
    """One HTTP/2 connection over TLS (ALPN h2) to the shim, driven with the h2 package."""

    def __init__(self, proc: ShimProcess) -> None:
        """Connect, negotiate h2 and exchange the connection preface."""
        raw = socket.create_connection(("127.0.0.1", proc.port), timeout=IO_TIMEOUT)
        self.sock = client_tls(["h2"]).wrap_socket(raw, server_hostname="localhost")
        self.log_mark = len(proc.output())
        assert self.sock.selected_alpn_protocol() == "h2"
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.flush()
        self.events: dict[int, list[h2.events.Event]] = {}

    def flush(self) -> None:
        """Send whatever h2 has queued."""
        if data := self.conn.data_to_send():
            self.sock.sendall(data)

    def receive(self) -> None:
        """Read once from the socket and file the events by stream."""
        data = self.sock.recv(65536)
        assert data, "the shim closed the HTTP/2 connection"
        for event in self.conn.receive_data(data):
            stream_id = getattr(event, "stream_id", 0)
            self.events.setdefault(stream_id, []).append(event)
            if isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                raise AssertionError(f"HTTP/2 stream or connection ended: {event!r}")
        self.flush()

    def next_event(self, stream_id: int) -> h2.events.Event:
        """The next event on a stream."""
        while not self.events.get(stream_id):
            self.receive()
        return self.events[stream_id].pop(0)

    def send_headers(self, method: str, path: str, headers: Mapping[str, str], end: bool) -> int:
        """Open a stream with a request head; return its id."""
        stream_id = self.conn.get_next_available_stream_id()
        pseudo = [(":method", method), (":path", path), (":scheme", "https"), (":authority", "localhost")]
        fields = pseudo + [(k.lower(), v) for k, v in headers.items()]
        self.conn.send_headers(stream_id, fields, end_stream=end)
        self.flush()
        return stream_id

    def send_body(self, stream_id: int, data: bytes, end: bool = True) -> None:
        """Body bytes in DATA frames, within flow control; then the end of the stream if ``end``."""
        view = memoryview(data)
        while view:
            window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.receive()  # wait for a WINDOW_UPDATE
                continue
            self.conn.send_data(stream_id, bytes(view[:window]))
            view = view[window:]
            self.flush()
        if end:
            self.conn.end_stream(stream_id)
            self.flush()

    def read_interim(self, stream_id: int) -> Response:
        """The next event on the stream must be an interim (1xx) response."""
        event = self.next_event(stream_id)
        assert isinstance(event, h2.events.InformationalResponseReceived), event
        return _h2_response(event.headers)

    def read_response(self, stream_id: int) -> Response:
        """Interim responses, then the final one and its body up to the end of the stream."""
        interim: list[Response] = []
        while isinstance(event := self.next_event(stream_id), h2.events.InformationalResponseReceived):
            interim.append(_h2_response(event.headers))
        assert isinstance(event, h2.events.ResponseReceived), event
        response = _h2_response(event.headers)
        response.interim = interim
        body = bytearray()
        while not isinstance(event := self.next_event(stream_id), h2.events.StreamEnded):
            if isinstance(event, h2.events.DataReceived):
                body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                self.flush()
        response.body = bytes(body)
        return response

    def close(self) -> None:
        """Say goodbye and close the socket."""
        try:
            self.conn.close_connection()
            self.flush()
        except OSError:
            pass
        self.sock.close()


def _h2_response(headers: Iterable[tuple[str | bytes, str | bytes]]) -> Response:
    """A response from h2's header list (str with ``header_encoding``; bytes otherwise)."""
    text = [tuple(x.decode() if isinstance(x, bytes) else x for x in pair) for pair in headers]
    status = int(next(v for k, v in text if k == ":status"))
    return Response(status, "", [(k, v) for k, v in text if not k.startswith(":")], http_version="2")


@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "no-content-length"])
def test_104_over_http2(shared: tuple[ShimProcess, WholeFileServer], content_length: bool) -> None:
    """HTTP/2 over TLS: the 104 (with Location and the version) comes as an interim HEADERS
    frame before any DATA is sent; then the body, then the legacy server's 201. Without
    content-length (legal in HTTP/2) the upload's length is where the body ends."""
    proc, legacy = shared
    path = unique_path("h2")
    data = os.urandom(200 * KIB + 5)
    fields = creation(8, True)
    if content_length:
        fields["content-length"] = str(len(data))

    conn = Http2(proc)
    try:
        stream_id = conn.send_headers("POST", path, fields, end=False)
        location = resumption(conn.read_interim(stream_id), 8)
        conn.send_body(stream_id, data)
        final = conn.read_response(stream_id)
        assert final.interim == [], final
        assert_final(final, 8, path, data)

        # The upload resource, over the same connection.
        stream_id = conn.send_headers("HEAD", location, {VERSION: "8"}, end=True)
        assert_offset(conn.read_response(stream_id), 8, len(data), True, len(data))
    finally:
        conn.close()
    delivered_once(legacy, path, data)


def test_http2_creation_then_appends(shared: tuple[ShimProcess, WholeFileServer]) -> None:
    """HTTP/2: an empty creation request (END_STREAM on the HEADERS frame) gets the 104 and the
    201; two PATCHes on the same connection finish the upload."""
    proc, legacy = shared
    path = unique_path("h2-parts")
    data = os.urandom(100 * KIB + 3)
    conn = Http2(proc)
    try:
        stream_id = conn.send_headers("POST", path, creation(7, False), end=True)
        created = conn.read_response(stream_id)
        [interim] = created.interim
        location = resumption(interim, 7)
        assert (created.status, created.header("Upload-Offset")) == (201, "0"), created

        stream_id = conn.send_headers("PATCH", location, append(7, 0, False), end=False)
        conn.send_body(stream_id, data[: 40 * KIB])
        middle = conn.read_response(stream_id)
        assert (middle.status, middle.header("Upload-Offset")) == (204, str(40 * KIB)), middle

        stream_id = conn.send_headers("PATCH", location, append(7, 40 * KIB, True), end=False)
        conn.send_body(stream_id, data[40 * KIB :])
        assert_final(conn.read_response(stream_id), 7, path, data)
    finally:
        conn.close()
    delivered_once(legacy, path, data)


def test_http2_stream_reset_mid_body_keeps_the_bytes(shared: tuple[ShimProcess, WholeFileServer]) -> None:
    """HTTP/2: the client resets the upload's stream (RST_STREAM) after part of the body; the
    connection stays up. The shim keeps every byte that arrived, and the same connection
    resumes: HEAD shows the offset, a PATCH sends the rest, the legacy server gets one POST."""
    proc, legacy = shared
    path = unique_path("h2-reset")
    data = os.urandom(150 * KIB + 9)
    part = 60 * KIB + 1
    conn = Http2(proc)
    try:
        fields = {**creation(8, True), "content-length": str(len(data))}
        stream_id = conn.send_headers("POST", path, fields, end=False)
        location = resumption(conn.read_interim(stream_id), 8)
        conn.send_body(stream_id, data[:part], end=False)
        wait_until_streaming(proc, conn.sock, conn.log_mark)  # the first request on this connection
        conn.conn.reset_stream(stream_id)
        conn.flush()
        assert wait_until_let_go(proc, location) == part

        stream_id = conn.send_headers("HEAD", location, {VERSION: "8"}, end=True)
        assert_offset(conn.read_response(stream_id), 8, part, False, len(data))
        stream_id = conn.send_headers("PATCH", location, append(8, part, True), end=False)
        conn.send_body(stream_id, data[part:])
        assert_final(conn.read_response(stream_id), 8, path, data)
    finally:
        conn.close()
    delivered_once(legacy, path, data)


# --- 5. refusals ---------------------------------------------------------------------------


def create_incomplete(proc: ShimProcess, version: int, path: str, data: bytes = b"") -> str:
    """Create an upload of which ``data`` is the first part; return its Location."""
    created = request(proc, "POST", path, creation(version, False), data)
    assert created.status == 201, created
    return resumption(created.interim[0], version)


@pytest.mark.parametrize("version", VERSIONS)
def test_offset_mismatch_is_409_with_a_problem_document(
    shared: tuple[ShimProcess, WholeFileServer], version: int
) -> None:
    """A PATCH at the wrong offset: 409, Upload-Offset with the right one, and the draft's
    problem type with expected-offset and provided-offset; nothing of its body is kept."""
    proc, legacy = shared
    path = unique_path(f"mismatch{version}")
    location = create_incomplete(proc, version, path, b"a" * 1000)

    for wrong in (999, 1001, 0):
        answer = request(proc, "PATCH", location, append(version, wrong, False), b"b" * 10)
        document = assert_problem(answer, 409, "mismatching-upload-offset")
        assert (document["expected-offset"], document["provided-offset"]) == (1000, wrong), answer
        assert answer.header("Upload-Offset") == "1000", answer
        assert says_complete(answer, version) is False, answer
    assert_offset(head(proc, location, version), version, 1000, False, None)
    assert received_at(legacy, path) == []


@pytest.mark.parametrize("version", [6, 7, 8])
def test_patch_without_partial_upload_type_is_415(
    shared: tuple[ShimProcess, WholeFileServer], version: int
) -> None:
    """From interop 6 (-04) an append must be application/partial-upload: 415 otherwise, and
    the body is not kept; the same PATCH with the type then finishes the upload."""
    proc, legacy = shared
    path = unique_path(f"type{version}")
    data = os.urandom(5000)
    location = create_incomplete(proc, version, path)

    for content_type in (None, "application/octet-stream"):
        fields = append(version, 0, True)
        del fields["Content-Type"]
        if content_type is not None:
            fields["Content-Type"] = content_type
        refused = request(proc, "PATCH", location, fields, data)
        assert refused.status == 415, refused
        assert_offset(head(proc, location, version), version, 0, False, None)
    assert received_at(legacy, path) == []

    assert_final(request(proc, "PATCH", location, append(version, 0, True), data), version, path, data)
    delivered_once(legacy, path, data)


def test_unknown_version_incomplete_is_400(shared: tuple[ShimProcess, WholeFileServer]) -> None:
    """Upload-Complete: ?0 with an interop version the shim does not speak: no 104, a 400
    problem document, and the request does not reach the legacy server."""
    proc, legacy = shared
    path = unique_path("v99-incomplete")
    for value in ("99", "4", "eight"):
        answer = request(proc, "POST", path, {VERSION: value, "Upload-Complete": "?0"}, b"xyz")
        assert answer.interim == [], answer
        assert_problem(answer, 400)
    assert received_at(legacy, path) == []


def test_unknown_version_complete_is_delivered_without_104(
    shared: tuple[ShimProcess, WholeFileServer],
) -> None:
    """Upload-Complete: ?1 with interop version 99: the shim must not send a 104 ("Draft
    Version Identification"), but still delivers the request, once. The head and the whole
    body go out at once; the first response line read is the final one."""
    proc, legacy = shared
    path = unique_path("v99-complete")
    data = os.urandom(80 * KIB)
    conn = Http1(proc)
    try:
        conn.send_head("POST", path, {VERSION: "99", "Upload-Complete": "?1"}, len(data))
        conn.send_body(data)
        event = conn.next_event()
    finally:
        conn.close()
    assert isinstance(event, h11.Response), f"the first answer is not the final one: {event!r}"
    assert event.status_code == 201, event
    delivered_once(legacy, path, data)


def test_head_of_unknown_upload_is_404(shared: tuple[ShimProcess, WholeFileServer]) -> None:
    """HEAD, PATCH and DELETE of an upload resource that does not exist: 404."""
    proc, legacy = shared
    before = len(legacy.received)
    for version in VERSIONS:
        assert head(proc, f"{PREFIX}no-such-upload", version).status == 404
    assert request(proc, "PATCH", f"{PREFIX}no-such-upload", append(8, 0, True), b"x").status == 404
    assert request(proc, "DELETE", f"{PREFIX}no-such-upload", {VERSION: "8"}).status == 404
    assert len(legacy.received) == before


@pytest.mark.parametrize("version", VERSIONS)
def test_delete_then_the_upload_is_gone(shared: tuple[ShimProcess, WholeFileServer], version: int) -> None:
    """DELETE of a half-done upload: 204 (tus-js-client needs exactly 204); then HEAD and
    PATCH get 404 or 410, and nothing ever reaches the legacy server."""
    proc, legacy = shared
    path = unique_path(f"delete{version}")
    location = create_incomplete(proc, version, path, b"d" * 4000)

    deleted = request(proc, "DELETE", location, {VERSION: str(version)})
    assert deleted.status == 204, deleted
    assert head(proc, location, version).status in (404, 410)
    patch = request(proc, "PATCH", location, append(version, 4000, True), b"e" * 10)
    assert patch.status in (404, 410), patch
    assert received_at(legacy, path) == []


@pytest.mark.parametrize("version", [6, 7, 8])
def test_options_announces_limits(shared: tuple[ShimProcess, WholeFileServer], version: int) -> None:
    """OPTIONS of a target URL with an interop version: 200 with Upload-Limit (-05 on), and
    Accept-Patch: application/partial-upload from interop 8 (-10 on). The shim answers it."""
    proc, legacy = shared
    answer = request(proc, "OPTIONS", "/api/files", {VERSION: str(version)})
    assert answer.status == 200, answer
    assert answer.header("Upload-Limit") == LIMIT[version], answer
    assert answer.header("Accept-Patch") == (PARTIAL_UPLOAD if version == 8 else None), answer
    assert not [r for r in legacy.received if r.method == "OPTIONS"]


# --- 6. digests ------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha-256", "sha-512"])
def test_repr_digest_checked_before_delivery(
    shared: tuple[ShimProcess, WholeFileServer], algorithm: str
) -> None:
    """Repr-Digest (RFC 9530) on the creation request: with the right digest the file is
    delivered; with a wrong one the completing request gets 400 and nothing is delivered."""
    proc, legacy = shared
    data = os.urandom(120 * KIB)
    right = hashlib.new(algorithm.replace("-", ""), data).digest()
    wrong = hashlib.new(algorithm.replace("-", ""), data + b"!").digest()

    good = unique_path("digest-good")
    fields = creation(8, True, **{"Repr-Digest": f"{algorithm}={sf_binary(right)}"})
    final = request(proc, "POST", good, fields, data)
    assert_final(final, 8, good, data)
    delivered_once(legacy, good, data)

    bad = unique_path("digest-bad")
    fields = creation(8, True, **{"Repr-Digest": f"{algorithm}={sf_binary(wrong)}"})
    refused = request(proc, "POST", bad, fields, data)
    assert refused.interim and refused.interim[0].status == 104, refused
    assert_problem(refused, 400)
    assert received_at(legacy, bad) == []


def test_repr_digest_with_appends(shared: tuple[ShimProcess, WholeFileServer]) -> None:
    """Repr-Digest given at creation covers the whole upload: a wrong one refuses the final
    PATCH with 400 and delivers nothing; a right one delivers."""
    proc, legacy = shared
    data = os.urandom(90 * KIB)
    wrong, right = hashlib.sha256(b"other").digest(), hashlib.sha256(data).digest()
    for digest, delivered in ((wrong, False), (right, True)):
        path = unique_path("digest-parts")
        fields = creation(6, False, **{"Repr-Digest": f"sha-256={sf_binary(digest)}"})
        created = request(proc, "POST", path, fields, data[: 30 * KIB])
        location = resumption(created.interim[0], 6)
        final = request(proc, "PATCH", location, append(6, 30 * KIB, True), data[30 * KIB :])
        if delivered:
            assert_final(final, 6, path, data)
            delivered_once(legacy, path, data)
        else:
            assert_problem(final, 400)
            assert received_at(legacy, path) == []


def test_content_digest_mismatch_discards_the_chunk(shared: tuple[ShimProcess, WholeFileServer]) -> None:
    """Content-Digest (RFC 9530) of one PATCH's body: a mismatch keeps nothing of that body
    and refuses it (4xx); the same chunk with the right digest is taken (sha-256 and sha-512);
    an empty final PATCH then completes the upload."""
    proc, legacy = shared
    path = unique_path("content-digest")
    data = os.urandom(60 * KIB)
    location = create_incomplete(proc, 8, path, data[: 20 * KIB])
    chunk = data[20 * KIB :]

    for algorithm in ("sha-256", "sha-512"):
        wrong = hashlib.new(algorithm.replace("-", ""), chunk[:-1]).digest()
        fields = append(8, 20 * KIB, False, **{"Content-Digest": f"{algorithm}={sf_binary(wrong)}"})
        refused = request(proc, "PATCH", location, fields, chunk)
        assert 400 <= refused.status < 500, refused
        assert_offset(head(proc, location, 8), 8, 20 * KIB, False, None)

    right = hashlib.sha512(chunk).digest()
    fields = append(8, 20 * KIB, False, **{"Content-Digest": f"sha-512={sf_binary(right)}"})
    taken = request(proc, "PATCH", location, fields, chunk)
    assert (taken.status, taken.header("Upload-Offset")) == (204, str(len(data))), taken
    assert received_at(legacy, path) == []

    assert_final(request(proc, "PATCH", location, append(8, len(data), True)), 8, path, data)
    delivered_once(legacy, path, data)


def test_interop7_refused_append_says_incomplete(shared: tuple[ShimProcess, WholeFileServer]) -> None:
    """Drafts -06..-09 ("Upload Append"): "If the request didn't complete the upload, any
    response, successful or not, MUST include the Upload-Complete header field with a false
    value". The 409 does; the other refusals must too."""
    proc, _ = shared
    location = create_incomplete(proc, 7, unique_path("v7-refusals"), b"a" * 10)
    untyped = append(7, 10, False)
    del untyped["Content-Type"]
    refusals = {
        "wrong type": untyped,
        "malformed offset": append(7, 10, False, **{"Upload-Offset": "ten"}),
        "content digest": append(7, 10, False, **{"Content-Digest": f"sha-256={sf_binary(bytes(32))}"}),
    }
    answers = {name: request(proc, "PATCH", location, fields, b"b" * 10) for name, fields in refusals.items()}
    assert all(400 <= a.status < 500 for a in answers.values()), answers
    missing = {name: str(a) for name, a in answers.items() if a.header("Upload-Complete") != "?0"}
    assert not missing, missing


@pytest.mark.parametrize("status", [403, 500])
def test_legacy_refusal_is_passed_on(shared: tuple[ShimProcess, WholeFileServer], status: int) -> None:
    """The legacy server refuses the file: the client gets that answer itself, with
    Upload-Offset and (interop 7 on) Upload-Complete: ?1, which marks it as the result of
    processing the upload rather than of the upload (-06 on, "Upload Append"). The answer is
    recorded and replayed; the file is never sent twice."""
    proc, legacy = shared
    path = unique_path(f"refused{status}")
    data = os.urandom(30 * KIB)
    legacy.fail_status = status
    try:
        refused = request(proc, "POST", path, creation(8, True), data)
    finally:
        legacy.fail_status = None
    location = resumption(refused.interim[0], 8)
    assert refused.status == status, refused
    assert refused.body == f"configured to fail with {status}\n".encode(), refused
    assert refused.header("Upload-Offset") == str(len(data)), refused
    assert refused.header("Upload-Complete") == "?1", refused
    assert_no_protocol_leak(legacy)
    assert [(r.method, r.status, r.size) for r in received_at(legacy, path)] == [("POST", status, len(data))]

    # The refusal is the legacy server's last word: an empty final PATCH (what tus-js-client
    # sends to finish) gets it again, and nothing is sent a second time.
    replayed = request(proc, "PATCH", location, append(8, len(data), True))
    assert (replayed.status, replayed.body) == (status, refused.body), replayed
    assert len(received_at(legacy, path)) == 1


# --- 7. pass-through -------------------------------------------------------------------


def test_plain_post_passes_through(shared: tuple[ShimProcess, WholeFileServer]) -> None:
    """A POST without any Upload-* field is not the shim's: the legacy server answers it
    itself (201), with no 104 and no protocol field added."""
    proc, legacy = shared
    path = unique_path("plain")
    data = os.urandom(33 * KIB)
    answer = request(proc, "POST", path, {"Content-Type": "text/csv", "X-Request-Tag": "plain"}, data)
    assert answer.interim == [], answer
    assert (answer.status, answer.headers_named("Location")) == (201, [path]), answer
    assert answer.json() == {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert not [k for k, _ in answer.headers if k.lower().startswith("upload-")], answer
    delivery = delivered_once(legacy, path, data)
    assert (delivery.header("Content-Type"), delivery.header("X-Request-Tag")) == ("text/csv", "plain")


# --- 8. interop 9 (draft -12) ----------------------------------------------------------


def offset_of(proc: ShimProcess, method: str, location: str) -> Response:
    """Offset retrieval with HEAD or (interop 9 on) GET."""
    return request(proc, method, location, {VERSION: "9"})


def test_interop_9_session_creation_offsets_conflict_completion_and_replay(
    shim: ShimLauncher, legacy: WholeFileServer
) -> None:
    """Draft -12, raw on one shim of its own: a creation with ``Upload-Complete: ?0`` and the
    first part; the offset by HEAD and by GET ("Offset Retrieval"); PATCHes at wrong offsets
    get 409 with ``Upload-Complete: ?0`` ("Upload Append") and keep nothing; a middle part;
    the last part chunked, without Content-Length, whose end fixes the length ("Length");
    then HEAD and GET say the answer was produced, the completing request sent again gets
    the recorded answer, and more bytes are an inconsistent length (no completed-upload
    type in -12). The legacy server gets one request: the whole file, byte-exact."""
    proc = shim()
    path = "/api/v9-session"
    data = os.urandom(200 * KIB + 13)
    first, second = 64 * KIB, 150 * KIB + 1

    created = request(proc, "POST", path, creation(9, False, **{"Content-Type": "application/pdf"}),
                      data[:first])
    [interim] = created.interim
    location = resumption(interim, 9)
    assert created.status == 201, created
    assert urlsplit(created.header("Location") or "").path == location, created
    assert (created.header("Upload-Offset"), created.header("Upload-Complete")) == (str(first), "?0")
    assert created.header("Upload-Limit") == LIMIT[9], created
    for method in ("HEAD", "GET"):
        assert_offset(offset_of(proc, method, location), 9, first, False, None)

    for wrong in (0, first - 1, first + 1):
        conflict = request(proc, "PATCH", location, append(9, wrong, False), b"x" * 100)
        document = assert_problem(conflict, 409, "mismatching-upload-offset")
        assert (conflict.header("Upload-Complete"), conflict.header("Upload-Offset")) == (
            "?0", str(first)), conflict
        assert (document["expected-offset"], document["provided-offset"]) == (first, wrong)
    assert_offset(offset_of(proc, "GET", location), 9, first, False, None)

    middle = request(proc, "PATCH", location, append(9, first, False), data[first:second])
    assert (middle.status, middle.header("Upload-Offset"), middle.header("Upload-Complete")) == (
        204, str(second), "?0"), middle
    assert legacy.received == []

    conn = Http1(proc)
    try:
        conn.send_head("PATCH", location, append(9, second, True, **{"Transfer-Encoding": "chunked"}),
                       None)
        conn.send_body(data[second:])
        final = conn.read_response()
    finally:
        conn.close()
    assert_final(final, 9, path, data)
    for method in ("HEAD", "GET"):
        assert_offset(offset_of(proc, method, location), 9, len(data), True, len(data))

    again = request(proc, "PATCH", location, append(9, len(data), True))
    assert (again.status, again.body, again.header("Upload-Complete")) == (
        final.status, final.body, "?1"), again
    more = request(proc, "PATCH", location, append(9, len(data), True), b"more")
    assert_problem(more, 400, "inconsistent-upload-length")
    assert more.header("Upload-Complete") == "?0", more

    assert [(r.method, r.path) for r in legacy.received] == [("POST", path)]
    delivery = delivered_once(legacy, path, data)
    assert delivery.header("Content-Type") == "application/pdf"


def test_interop_9_options_announce_limits_without_accept_patch(
    shared: tuple[ShimProcess, WholeFileServer],
) -> None:
    """-12 "Limits": OPTIONS of a target URL gets Upload-Limit; Accept-Patch (-10, -11) is
    gone again. The shim answers it; the legacy server never sees it."""
    proc, legacy = shared
    answer = request(proc, "OPTIONS", "/api/files", {VERSION: "9"})
    assert (answer.status, answer.header(VERSION)) == (200, "9"), answer
    assert answer.header("Upload-Limit") == LIMIT[9], answer
    assert answer.header("Accept-Patch") is None, answer
    assert not [r for r in legacy.received if r.method == "OPTIONS"]


def test_interop_9_refusal_for_max_size_carries_upload_limit(
    shim: ShimLauncher, legacy: WholeFileServer
) -> None:
    """-12 "Limits": a request refused for ``max-size`` gets 413 with Upload-Limit, the
    creation whose length is past it as the append that would take the upload past it; the
    upload keeps what it had and nothing reaches the legacy server."""
    proc = shim({"ietf": {"max_size": 1000}})
    limit = "max-size=1000, max-age=86400"
    refused = request(proc, "POST", "/api/big", creation(9, True), b"b" * 1001)
    assert refused.interim == [], refused
    assert (refused.status, refused.header("Upload-Limit"), refused.header("Upload-Complete")) == (
        413, limit, "?0"), refused

    created = request(proc, "POST", "/api/grows", creation(9, False), b"a" * 600)
    assert created.status == 201, created
    location = urlsplit(created.header("Location") or "").path
    past = request(proc, "PATCH", location, append(9, 600, False), b"a" * 401)
    assert (past.status, past.header("Upload-Limit"), past.header("Upload-Complete")) == (
        413, limit, "?0"), past
    kept = offset_of(proc, "HEAD", location)
    assert (kept.status, kept.header("Upload-Offset"), kept.header("Upload-Limit")) == (
        204, "600", limit), kept
    assert legacy.received == []
