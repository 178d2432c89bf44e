"""End to end: the protocols of issue 5 through a real ``mitmdump`` shim to the real
whole-file-only legacy server.

- PATCH with ``message/byteranges`` / ``multipart/byteranges`` (seed 004), HEAD for progress;
- WebDAV resumable upload, IT Hit style (seed 002): PUT, REPORT upload-progress, resume with
  Content-Range, CANCELUPLOAD, OPTIONS;
- tus core on the target URL (seed 003): PUT with Tus-Resumable, HEAD, PATCH;
- seed 001's variants: ``PUT <url>?range=S-E/TOTAL`` and ``Expect: Range`` + ``Range``;
- and that none of them takes a request that is not its own.

Clients are raw: ``requests`` and, to break a connection mid-body, a plain socket. Every test
that finishes a file asserts what a user would notice on the legacy side: exactly one request
writing the file (reads the test sends on purpose are counted separately), byte-exact, and
never a PATCH, Content-Range, Range, ``Expect: Range``, Upload-*/Tus-* header or ``range``
query parameter.

Connections are cut without timing guesses: the head and part of a body go out on a raw
socket; once mitmproxy logs that it streams that request into the shim, the socket is closed
and the test polls (REPORT or HEAD, with a deadline) until the shim shows every byte sent.
"""

from __future__ import annotations

import email.utils
import json
import random
import socket
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from hashlib import sha256
from typing import NamedTuple
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests

from shim.demo_server import ReceivedRequest, WholeFileServer
from tests.harness import PayloadFactory, ShimProcess, sha256_of, shared_shim, wait_until

pytestmark = pytest.mark.timeout(120)

KIB = 1024
MIB = 1024 * KIB
TIMEOUT = 30.0
"""Deadline for anything the tests wait for (they normally wait well under a second)."""
HTTP_TIMEOUT = 20.0
FULL_CONFIG = {"webdav": {"paths": ["/dav/"]}, "seed001": {"query_range": True, "expect_range": True}}
"""Every protocol of issue 5 on; byteranges and tus on the target URL are on by default."""
LEAKED_PREFIXES = ("upload-", "tus-", "x-upload-")
LEAKED_NAMES = ("content-range", "range")
TUS = {"Tus-Resumable": "1.0.0"}
TUS_PATCH = {**TUS, "Content-Type": "application/offset+octet-stream"}
DAV = "DAV:"
ITHIT = "ithit"
UPLOAD_PROGRESS = b'<?xml version="1.0" encoding="utf-8"?>\n<i:upload-progress xmlns:i="ithit" />'
READS = ("GET", "HEAD", "OPTIONS", "REPORT", "PROPFIND")
"""Methods that do not write a file: a test may send them to the legacy server on purpose."""

Shared = tuple[ShimProcess, WholeFileServer]


# --- shims shared by the tests of this module ---------------------------------------------


def _shared(
    tmp_path_factory: pytest.TempPathFactory, name: str, config: Mapping[str, object]
) -> Iterator[Shared]:
    """One legacy server and one shim; starting mitmdump is most of an e2e test's time. Each
    test uses its own paths, so they share no upload, and looks only at its own paths on the
    legacy side."""
    yield from shared_shim(tmp_path_factory, name, config)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """A shim with every protocol of issue 5 switched on (FULL_CONFIG)."""
    yield from _shared(tmp_path_factory, "more-protocols-full", FULL_CONFIG)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """A shim with the default config: no WebDAV paths, seed 001's variants off."""
    yield from _shared(tmp_path_factory, "more-protocols-plain", {})


# --- talking to the shim ------------------------------------------------------------------


def send(
    url: str, method: str, body: bytes = b"", headers: Mapping[str, str] | None = None
) -> requests.Response:
    """One request with ``requests`` (no redirects followed)."""
    return requests.request(
        method, url, data=body, headers=dict(headers or {}), timeout=HTTP_TIMEOUT, allow_redirects=False
    )


def show(response: requests.Response) -> str:
    """A response, for assertion messages."""
    return f"{response.status_code} {response.reason} {dict(response.headers)} {response.content[:300]!r}"


def from_legacy(response: requests.Response) -> bool:
    """Whether the answer is the legacy server's own (the shim's replies carry no Server)."""
    return response.headers.get("Server", "").startswith("WholeFileServer")


def assert_shim_refusal(response: requests.Response, status: int, fragment: str = "") -> None:
    """A refusal by the shim itself: ``status`` with a plain-text message."""
    assert response.status_code == status, show(response)
    assert not from_legacy(response), show(response)
    assert response.headers.get("Content-Type", "").startswith("text/plain"), show(response)
    assert fragment in response.text, show(response)


def assert_legacy_created(response: requests.Response, path: str, data: bytes) -> None:
    """The client got the legacy server's own 201 for the whole file at ``path``."""
    assert response.status_code == 201, show(response)
    assert response.headers.get("Location") == path, show(response)
    answer = json.loads(response.content)
    assert answer == {"path": path, "size": len(data), "sha256": sha256(data).hexdigest()}, show(response)


# --- cutting a body off midway ------------------------------------------------------------


def send_partial(
    proc: ShimProcess, method: str, target: str, headers: Mapping[str, str], length: int, part: bytes
) -> socket.socket:
    """Open a raw connection, send a head announcing ``length`` body bytes, then only ``part``
    of the body. The caller closes the socket (see :func:`cut_off`)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{proc.port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {length}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    sock = socket.create_connection(("127.0.0.1", proc.port), timeout=HTTP_TIMEOUT)
    sock.sendall(head + part)
    return sock


def wait_until_streaming(proc: ShimProcess, sock: socket.socket) -> None:
    """Wait until mitmproxy streams the body arriving on ``sock`` into the shim.

    Bytes that arrive earlier are queued and fed first; a loopback client that leaves within
    milliseconds of connecting can lose them (README, "Guarantees and their limits"), which
    these tests do not mean to exercise."""
    port = sock.getsockname()[1]
    proc.wait_for_output(rf"\[127\.0\.0\.1:{port}\] Streaming request to ", TIMEOUT)


def cut_off(proc: ShimProcess, sock: socket.socket) -> None:
    """Close a connection in the middle of its body, as a broken network does."""
    wait_until_streaming(proc, sock)
    sock.close()


def poll(read: Callable[[], int], expected: int, what: str) -> None:
    """Poll ``read`` until it returns ``expected``; fail with the values seen otherwise."""
    seen: list[int] = []

    def reached() -> bool:
        seen.append(read())
        return seen[-1] == expected

    try:
        wait_until(reached, TIMEOUT, what, interval=0.05)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last values seen: {seen[-5:]}") from exc


# --- the legacy server's side -------------------------------------------------------------


def requests_for(legacy: WholeFileServer, path: str) -> list[ReceivedRequest]:
    """What the legacy server received for ``path`` (any query)."""
    return [r for r in list(legacy.received) if r.path.partition("?")[0] == path]


def writes_for(legacy: WholeFileServer, path: str) -> list[ReceivedRequest]:
    """The requests for ``path`` that could write it (anything but reads)."""
    return [r for r in requests_for(legacy, path) if r.method not in READS]


def assert_clean(request: ReceivedRequest) -> None:
    """No trace of a resumable-upload protocol in a request the legacy server received."""
    assert request.method != "PATCH", request
    leaked = [n for n in request.header_names() if n in LEAKED_NAMES or n.startswith(LEAKED_PREFIXES)]
    assert not leaked, f"{request.method} {request.path} carried {leaked}"
    expect = (request.header("Expect") or "").lower()
    assert "range" not in expect, f"{request.method} {request.path} carried Expect: {expect}"
    query = parse_qsl(urlsplit(request.path).query, keep_blank_values=True)
    assert "range" not in dict(query), f"{request.method} {request.path} carried the range parameter"


def delivered_once(
    legacy: WholeFileServer,
    path: str,
    data: bytes,
    reads: Sequence[tuple[str, int]] = (),
    target: str | None = None,
) -> ReceivedRequest:
    """The legacy server received exactly ONE request writing ``path``: a PUT of the whole file
    (to ``target``, path and query, if given), accepted, byte-exact. Besides it only the
    ``reads`` (method, status) the test sent on purpose, in that order; none of them, nor the
    PUT, carries a trace of a resumable-upload protocol."""
    mine = requests_for(legacy, path)
    for request in mine:
        assert_clean(request)
    assert [(r.method, r.status) for r in mine if r.method in READS] == list(reads), mine
    writes = [r for r in mine if r.method not in READS]
    assert [(r.method, r.status) for r in writes] == [("PUT", 201)], mine
    [request] = writes
    assert request.complete
    assert request.path == (target or path), request
    assert (request.size, request.sha256) == (len(data), sha256(data).hexdigest()), request
    assert sha256_of(legacy.directory / path.lstrip("/")) == sha256(data).hexdigest()
    return request


def assert_passed_through(
    legacy: WholeFileServer,
    response: requests.Response,
    method: str,
    target: str,
    body: bytes,
    headers: Mapping[str, str],
) -> ReceivedRequest:
    """The request reached the legacy server as sent (method, path and query, body, the
    given header values) exactly once, and the client got the legacy server's answer."""
    mine = requests_for(legacy, target.partition("?")[0])
    assert [(r.method, r.path) for r in mine] == [(method, target)], mine
    [request] = mine
    assert (request.size, request.sha256) == (len(body), sha256(body).hexdigest()), request
    for name, value in headers.items():
        assert request.header(name) == value, (name, request.headers)
    assert from_legacy(response), show(response)
    assert response.status_code == request.status, show(response)
    return request


# --- 1, 2. PATCH with message/byteranges and multipart/byteranges (seed 004) ---------------


def message_body(data: bytes, start: int, end: int, total: int | None = None) -> bytes:
    """A ``message/byteranges`` body carrying bytes start..end (inclusive) of ``data``."""
    size = len(data) if total is None else total
    return f"Content-Range: bytes {start}-{end}/{size}\r\n\r\n".encode() + data[start : end + 1]


def multipart_body(data: bytes, ranges: Sequence[tuple[int, int]], boundary: str) -> bytes:
    """A ``multipart/byteranges`` body (RFC 9110 section 14.6) with one part per range."""
    body = b""
    for start, end in ranges:
        body += (
            f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Range: bytes {start}-{end}/{len(data)}\r\n\r\n"
        ).encode() + data[start : end + 1] + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


MESSAGE = {"Content-Type": "message/byteranges"}


def patch_message(url: str, body: bytes, headers: Mapping[str, str] | None = None) -> requests.Response:
    return send(url, "PATCH", body, {**MESSAGE, **(headers or {})})


def shim_offset(url: str) -> int:
    """The bytes uploaded so far, from a HEAD the shim answers itself (200, Content-Length and
    Upload-Offset both that number)."""
    response = send(url, "HEAD")
    assert response.status_code == 200, show(response)
    assert not from_legacy(response), show(response)
    assert response.headers["Content-Length"] == response.headers["Upload-Offset"], show(response)
    return int(response.headers["Upload-Offset"])


def assert_accepted(response: requests.Response, offset: int) -> None:
    """202 Accepted from the shim: the upload is incomplete, ``offset`` bytes are stored."""
    assert response.status_code == 202, show(response)
    assert response.headers.get("Upload-Offset") == str(offset), show(response)
    assert not from_legacy(response), show(response)


def test_byteranges_in_three_segments_arrive_as_one_put(full: Shared, payload: PayloadFactory) -> None:
    """Three message/byteranges PATCHes of a 2 MiB file: the first with If-None-Match: *, the
    second overlapping the first, HEADs between them; one whole PUT reaches the legacy server
    and its 201 is the answer to the last PATCH."""
    proc, legacy = full
    data = payload(2 * MIB).read_bytes()
    size = len(data)
    path = "/br/three-segments.bin"
    url = proc.url + path

    before = send(url, "HEAD")  # nothing in progress: the legacy server answers
    assert before.status_code == 404 and from_legacy(before), show(before)

    assert_accepted(patch_message(url, message_body(data, 0, 799_999), {"If-None-Match": "*"}), 800_000)
    assert shim_offset(url) == 800_000

    # If-None-Match: * while an upload is in progress: 412, nothing changes.
    again = patch_message(url, message_body(data, 0, 99_999), {"If-None-Match": "*"})
    assert_shim_refusal(again, 412)
    assert shim_offset(url) == 800_000

    # Overlapping the first: the stored bytes are skipped, the rest appended.
    assert_accepted(patch_message(url, message_body(data, 600_000, 1_499_999)), 1_500_000)
    assert shim_offset(url) == 1_500_000
    assert writes_for(legacy, path) == []

    final = patch_message(url, message_body(data, 1_500_000, size - 1))
    assert_legacy_created(final, path, data)
    delivered_once(legacy, path, data, reads=[("HEAD", 404)])


def test_byteranges_multipart_with_three_parts_arrives_as_one_put(
    full: Shared, payload: PayloadFactory
) -> None:
    """One multipart/byteranges PATCH with three parts is the whole 2 MiB file: one PUT."""
    proc, legacy = full
    data = payload(2 * MIB).read_bytes()
    size = len(data)
    path = "/br/multipart.bin"
    ranges = [(0, 699_999), (700_000, 1_399_999), (1_400_000, size - 1)]
    boundary = "3d6b6a416f9b5"

    response = send(
        proc.url + path,
        "PATCH",
        multipart_body(data, ranges, boundary),
        {"Content-Type": f'multipart/byteranges; boundary="{boundary}"', "If-None-Match": "*"},
    )
    assert_legacy_created(response, path, data)
    delivered_once(legacy, path, data)


MALFORMED_TOTAL = 600_000
MALFORMED_STORED = 1_000
BOUNDARY = "sep42"
MULTIPART = {"Content-Type": f"multipart/byteranges; boundary={BOUNDARY}"}


class Malformed(NamedTuple):
    """A PATCH body refused as a whole, with the status and message fragment it gets."""

    headers: dict[str, str]
    body: Callable[[bytes], bytes]
    status: int
    fragment: str


def _range_head(start: int, end: int | str, total: int | str = MALFORMED_TOTAL) -> bytes:
    return f"Content-Range: bytes {start}-{end}/{total}\r\n\r\n".encode()


def _part(data: bytes, start: int, end: int, total: int = MALFORMED_TOTAL) -> bytes:
    head = f"--{BOUNDARY}\r\n".encode() + _range_head(start, end, total)
    return head + data[start : end + 1] + b"\r\n"


_CLOSE = f"--{BOUNDARY}--\r\n".encode()
_S = MALFORMED_STORED
"""Every case starts where the stored bytes end (or overlaps them) unless it is about a gap;
its ranges are ~300 KB, so a part spans several chunks of the streamed body."""

MALFORMED: dict[str, Malformed] = {
    "message-without-content-range": Malformed(
        MESSAGE, lambda d: b"Content-Type: text/plain\r\n\r\n" + d[_S:300_000], 400, "no Content-Range"
    ),
    "message-data-longer-than-range": Malformed(
        MESSAGE, lambda d: _range_head(_S, 299_999) + d[_S:300_001], 400, "after the end of the range"
    ),
    "message-body-ends-inside-range": Malformed(
        MESSAGE, lambda d: _range_head(_S, 299_999) + d[_S:299_000], 400, "ended inside the range"
    ),
    "message-without-blank-line": Malformed(
        MESSAGE, lambda d: _range_head(_S, 299_999)[:-2], 400, "ended inside the range"
    ),
    "message-range-after-stored-end": Malformed(
        MESSAGE, lambda d: _range_head(_S + 1, 299_999) + d[_S + 1 : 300_000], 416, "must start at or before"
    ),
    "message-total-changes": Malformed(
        MESSAGE, lambda d: _range_head(_S, 299_999, 700_000) + d[_S:300_000], 400, "length is 600000"
    ),
    "message-range-past-total": Malformed(
        MESSAGE,
        lambda d: _range_head(_S, MALFORMED_TOTAL) + d[_S:] + b"x",
        416,
        "goes past its total",
    ),
    "message-inquiry-form": Malformed(
        MESSAGE, lambda d: f"Content-Range: bytes */{MALFORMED_TOTAL}\r\n\r\n".encode(), 400, "bytes */N"
    ),
    "message-garbage-content-range": Malformed(
        MESSAGE, lambda d: b"Content-Range: bytes abc\r\n\r\n" + d[_S:2_000], 400, "malformed Content-Range"
    ),
    "message-range-ends-before-start": Malformed(
        MESSAGE, lambda d: _range_head(2_000, _S) + d[_S:2_001], 400, "ends before it starts"
    ),
    "message-header-line-without-colon": Malformed(
        MESSAGE,
        lambda d: f"Content-Range bytes {_S}-1999/{MALFORMED_TOTAL}\r\n\r\n".encode() + d[_S:2_000],
        400,
        "malformed header line",
    ),
    "multipart-without-boundary-parameter": Malformed(
        {"Content-Type": "multipart/byteranges"},
        lambda d: _part(d, _S, 299_999) + _CLOSE,
        400,
        "needs a boundary",
    ),
    "multipart-other-boundary-in-body": Malformed(
        {"Content-Type": "multipart/byteranges; boundary=not-the-one"},
        lambda d: _part(d, _S, 299_999) + _CLOSE,
        400,
        "boundary",  # "no multipart boundary found" once 16 KiB are searched in vain
    ),
    "multipart-part-without-content-range": Malformed(
        MULTIPART,
        lambda d: f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\n".encode()
        + d[_S:300_000]
        + b"\r\n"
        + _CLOSE,
        400,
        "no Content-Range",
    ),
    "multipart-second-part-without-content-range": Malformed(
        MULTIPART,
        lambda d: _part(d, _S, 299_999)
        + f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\n".encode()
        + d[300_000:400_000]
        + b"\r\n"
        + _CLOSE,
        400,
        "no Content-Range",
    ),
    "multipart-parts-out-of-order": Malformed(
        MULTIPART,
        lambda d: _part(d, _S, 299_999) + _part(d, 0, _S - 1) + _CLOSE,
        400,
        "in order",
    ),
    "multipart-parts-overlap": Malformed(
        MULTIPART,
        lambda d: _part(d, _S, 299_999) + _part(d, 200_000, 399_999) + _CLOSE,
        400,
        "must not overlap",
    ),
    "multipart-part-longer-than-range": Malformed(
        MULTIPART,
        lambda d: f"--{BOUNDARY}\r\n".encode() + _range_head(_S, 299_999) + d[_S:300_100] + b"\r\n" + _CLOSE,
        400,
        "longer than its Content-Range",
    ),
    "multipart-without-closing-boundary": Malformed(
        MULTIPART,
        lambda d: _part(d, _S, 299_999) + _part(d, 300_000, 399_999),
        400,
        "before its closing boundary",
    ),
    "multipart-body-ends-inside-part": Malformed(
        MULTIPART,
        lambda d: _part(d, _S, 299_999) + f"--{BOUNDARY}\r\n".encode() + _range_head(300_000, 399_999)
        + d[300_000:350_000],
        400,
        "before its closing boundary",
    ),
    "multipart-gap-between-parts": Malformed(
        MULTIPART,
        lambda d: _part(d, _S, 299_999) + _part(d, 300_001, 399_999) + _CLOSE,
        416,
        "after the 300000 bytes stored",
    ),
    "multipart-first-part-after-stored-end": Malformed(
        MULTIPART,
        lambda d: _part(d, _S + 1, 299_999) + _CLOSE,
        416,
        "must start at or before",
    ),
    "multipart-parts-disagree-on-total": Malformed(
        MULTIPART,
        lambda d: _part(d, _S, 299_999) + _part(d, 300_000, 399_999, total=700_000) + _CLOSE,
        400,
        "disagree on the total",
    ),
    "multipart-without-parts": Malformed(MULTIPART, lambda d: _CLOSE, 400, "before its closing boundary"),
    "multipart-malformed-boundary-line": Malformed(
        MULTIPART,
        lambda d: _part(d, _S, 299_999)
        + f"--{BOUNDARY}x\r\n".encode()
        + _range_head(300_000, 399_999)
        + d[300_000:400_000]
        + b"\r\n"
        + _CLOSE,
        400,
        "malformed multipart boundary line",
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_byteranges_malformed_body_is_refused_and_changes_nothing(full: Shared, name: str) -> None:
    """A malformed or gap-leaving PATCH body: 400 or 416 from the shim, the HEAD offset is the
    same as before, nothing reaches the legacy server; the upload then completes byte-exact,
    so nothing of the refused body was kept."""
    proc, legacy = full
    case = MALFORMED[name]
    data = random.Random(name).randbytes(MALFORMED_TOTAL)  # a misplaced byte changes the sha256
    path = f"/br/malformed/{name}.bin"
    url = proc.url + path
    assert_accepted(patch_message(url, message_body(data, 0, _S - 1)), _S)
    assert shim_offset(url) == _S

    response = send(url, "PATCH", case.body(data), case.headers)
    assert_shim_refusal(response, case.status, case.fragment)
    assert shim_offset(url) == _S
    assert writes_for(legacy, path) == []

    assert_legacy_created(patch_message(url, message_body(data, _S, MALFORMED_TOTAL - 1)), path, data)
    delivered_once(legacy, path, data)


def test_byteranges_refused_first_patch_leaves_nothing_behind(full: Shared) -> None:
    """A first PATCH whose body ends inside its range: 400, and afterwards everything is as if
    it had never been sent: HEAD reaches the legacy server, If-None-Match: * is satisfied."""
    proc, legacy = full
    data = bytes(range(200)) * 50
    path = "/br/refused-first.bin"
    url = proc.url + path

    refused = patch_message(url, message_body(data, 0, 999)[:-1], {"If-None-Match": "*"})
    assert_shim_refusal(refused, 400, "ended inside the range")

    head = send(url, "HEAD")
    assert (head.status_code, from_legacy(head)) == (404, True), show(head)
    retry = patch_message(url, message_body(data, 0, 999), {"If-None-Match": "*"})
    assert_accepted(retry, 1000)
    assert writes_for(legacy, path) == []


def test_byteranges_head_after_delivery_reaches_the_legacy_server(full: Shared) -> None:
    """No upload in progress after delivery: a HEAD is the legacy server's again (byteranges
    module docstring), so it describes the file the legacy server holds now."""
    proc, legacy = full
    data = bytes(range(256)) * 40
    path = "/br/head-after-delivery.bin"
    url = proc.url + path
    assert_legacy_created(patch_message(url, message_body(data, 0, len(data) - 1)), path, data)

    replaced = send(url, "PUT", b"12345")  # a plain PUT: the legacy server's own business
    assert replaced.status_code == 201 and from_legacy(replaced), show(replaced)

    head = send(url, "HEAD")
    assert head.status_code == 200, show(head)
    assert "Upload-Offset" not in head.headers, show(head)
    assert (from_legacy(head), head.headers.get("Content-Length")) == (True, "5"), show(head)
    assert [r.method for r in requests_for(legacy, path)] == ["PUT", "PUT", "HEAD"]


# --- 3, 4, 5. WebDAV (seed 002) -------------------------------------------------------------


class Progress(NamedTuple):
    """One D:response of an upload-progress report."""

    bytes_uploaded: int
    total: int
    last_chunk_saved: str
    status: str


def report(url: str, body: bytes = UPLOAD_PROGRESS) -> requests.Response:
    return send(url, "REPORT", body, {"Content-Type": 'text/xml; charset="utf-8"'})


def parse_progress(response: requests.Response) -> dict[str, Progress]:
    """The 207 Multi-Status of an upload-progress REPORT: {href path: Progress}."""
    assert (response.status_code, response.reason) == (207, "Multi-Status"), show(response)
    assert response.headers.get("Content-Type", "").startswith("text/xml"), show(response)
    root = ET.fromstring(response.content)
    assert root.tag == f"{{{DAV}}}multistatus", show(response)
    found: dict[str, Progress] = {}
    for entry in root.findall(f"{{{DAV}}}response"):
        href = entry.findtext(f"{{{DAV}}}href")
        prop = entry.find(f"{{{DAV}}}propstat/{{{DAV}}}prop")
        assert href is not None and prop is not None, show(response)
        path = urlsplit(href).path  # absolute URLs (as in the seed) or paths
        assert path not in found, show(response)
        found[path] = Progress(
            int(prop.findtext(f"{{{ITHIT}}}bytes-uploaded") or "-1"),
            int(prop.findtext(f"{{{ITHIT}}}total-content-length") or "-1"),
            prop.findtext(f"{{{ITHIT}}}last-chunk-saved") or "",
            entry.findtext(f"{{{DAV}}}propstat/{{{DAV}}}status") or "",
        )
    return found


def progress_of(url: str, path: str) -> Progress | None:
    return parse_progress(report(url)).get(path)


def wait_for_bytes_uploaded(url: str, path: str, expected: int) -> Progress:
    """Poll REPORT on ``url`` until it shows ``expected`` bytes uploaded for ``path``."""

    def uploaded() -> int:
        entry = progress_of(url, path)
        return -1 if entry is None else entry.bytes_uploaded

    poll(uploaded, expected, f"REPORT showing {expected} bytes of {path}")
    entry = progress_of(url, path)
    assert entry is not None
    return entry


def assert_progress(entry: Progress | None, uploaded: int, total: int) -> None:
    assert entry is not None
    assert (entry.bytes_uploaded, entry.total, entry.status) == (uploaded, total, "HTTP/1.1 200 OK"), entry
    assert email.utils.parsedate_to_datetime(entry.last_chunk_saved) is not None, entry


def test_webdav_put_broken_off_then_resumed_from_report(full: Shared, payload: PayloadFactory) -> None:
    """OPTIONS shows resumable-upload; a 30 MiB PUT breaks off after 10 MiB; GET meanwhile
    gets the old file from the legacy server; REPORT shows the 10 MiB; the PUT with
    Content-Range from there completes it; the legacy server gets the new file once."""
    proc, legacy = full
    data = payload(30 * MIB).read_bytes()
    size, sent = len(data), 10 * MIB
    folder, path = "/dav/broken/", "/dav/broken/big.bin"
    url = proc.url + path
    old = b"the old version, served while the new one is uploaded\n"
    stored = legacy.directory / path.lstrip("/")
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_bytes(old)  # put there behind everybody's back: no request recorded

    options = send(proc.url + folder, "OPTIONS")
    assert from_legacy(options), show(options)
    assert "resumable-upload" in [t.strip() for t in options.headers.get("DAV", "").split(",")], show(options)
    [seen] = requests_for(legacy, folder)
    assert (seen.method, seen.status) == ("OPTIONS", options.status_code)

    sock = send_partial(proc, "PUT", path, {"Content-Type": "application/zip"}, size, data[:sent])
    try:
        wait_until_streaming(proc, sock)
        during = send(url, "GET")  # while the PUT is open
        assert (during.status_code, during.content, from_legacy(during)) == (200, old, True), show(during)
    finally:
        sock.close()

    entry = wait_for_bytes_uploaded(url, path, sent)
    assert_progress(entry, sent, size)
    assert_progress(progress_of(proc.url + folder, path), sent, size)
    after = send(url, "GET")  # broken off, not finished: still the old file
    assert (after.status_code, after.content) == (200, old), show(after)
    assert writes_for(legacy, path) == []

    resume_at = entry.bytes_uploaded
    resumed = send(
        url,
        "PUT",
        data[resume_at:],
        {"Content-Range": f"bytes {resume_at}-{size - 1}/{size}", "Content-Type": "application/zip"},
    )
    assert_legacy_created(resumed, path, data)
    request = delivered_once(legacy, path, data, reads=[("GET", 200), ("GET", 200)])
    assert request.header("Content-Type") == "application/zip"
    assert parse_progress(report(url)) == {}


def test_webdav_report_on_a_folder_and_cancelupload(full: Shared, payload: PayloadFactory) -> None:
    """Two uploads in progress below /dav/tree/ (one in a subfolder, one broken off) and one in
    /dav/tree-other/: a REPORT on the folder lists exactly the two; CANCELUPLOAD of one
    removes it from the reports, it cannot be resumed and never reaches the legacy server."""
    proc, legacy = full
    data = payload(1 * MIB).read_bytes()
    nested = payload(3 * MIB).read_bytes()
    top, other = "/dav/tree/a.bin", "/dav/tree-other/c.bin"
    sub_target = "/dav/tree/sub/b%20c&d.bin"  # as sent; the legacy server would store "b c&d.bin"
    first, sent = 300_000, MIB + 12_345

    started = send(proc.url + top, "PUT", data[:first], {"Content-Range": f"bytes 0-{first - 1}/{len(data)}"})
    assert started.status_code == 202 and not from_legacy(started), show(started)
    elsewhere = send(proc.url + other, "PUT", data[:1000], {"Content-Range": f"bytes 0-999/{len(data)}"})
    assert elsewhere.status_code == 202, show(elsewhere)
    sock = send_partial(proc, "PUT", sub_target, {}, len(nested), nested[:sent])
    cut_off(proc, sock)
    sub_href = urlsplit(proc.url + sub_target).path
    wait_for_bytes_uploaded(proc.url + "/dav/tree/sub/", sub_href, sent)

    listing = parse_progress(report(proc.url + "/dav/tree/"))
    assert sorted(listing) == sorted([top, sub_href]), listing
    assert_progress(listing[top], first, len(data))
    assert_progress(listing[sub_href], sent, len(nested))
    assert sorted(parse_progress(report(proc.url + "/dav/"))) == sorted([top, sub_href, other])

    cancelled = send(proc.url + sub_target, "CANCELUPLOAD")
    assert cancelled.status_code == 200 and not from_legacy(cancelled), show(cancelled)
    assert list(parse_progress(report(proc.url + "/dav/tree/"))) == [top]
    assert parse_progress(report(proc.url + sub_target)) == {}
    assert_shim_refusal(send(proc.url + sub_target, "CANCELUPLOAD"), 404)

    resumed = send(
        proc.url + sub_target,
        "PUT",
        nested[sent:],
        {"Content-Range": f"bytes {sent}-{len(nested) - 1}/{len(nested)}"},
    )
    assert_shim_refusal(resumed, 416, "nothing is stored")

    done = send(
        proc.url + top, "PUT", data[first:], {"Content-Range": f"bytes {first}-{len(data) - 1}/{len(data)}"}
    )
    assert_legacy_created(done, top, data)
    delivered_once(legacy, top, data)
    assert requests_for(legacy, sub_target) == []
    assert list(parse_progress(report(proc.url + "/dav/"))) == [other]
    assert send(proc.url + other, "CANCELUPLOAD").status_code == 200


def xml_attacks(base: str) -> dict[str, bytes]:
    """REPORT bodies that must never be expanded or fetched. The external ones point at
    ``base`` (the legacy server, which records any request made for them)."""
    return {
        "billion-laughs": (
            b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
            + b"".join(
                f' <!ENTITY lol{i} "{f"&lol{i - 1};" * 10 if i > 1 else "&lol;" * 10}">\n'.encode()
                for i in range(1, 10)
            )
            + b']>\n<i:upload-progress xmlns:i="ithit">&lol9;</i:upload-progress>'
        ),
        "external-entity-file": (
            b'<?xml version="1.0"?>\n<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
            b'<i:upload-progress xmlns:i="ithit">&xxe;</i:upload-progress>'
        ),
        "external-entity-http": (
            f'<?xml version="1.0"?>\n<!DOCTYPE r [<!ENTITY xxe SYSTEM "{base}/xxe-entity">]>\n'
            '<i:upload-progress xmlns:i="ithit">&xxe;</i:upload-progress>'
        ).encode(),
        "external-dtd": (
            f'<?xml version="1.0"?>\n<!DOCTYPE r SYSTEM "{base}/xxe.dtd">\n'
            '<i:upload-progress xmlns:i="ithit" />'
        ).encode(),
        "parameter-entity": (
            f'<?xml version="1.0"?>\n<!DOCTYPE r [<!ENTITY % p SYSTEM "{base}/xxe-param"> %p;]>\n'
            '<i:upload-progress xmlns:i="ithit" />'
        ).encode(),
        "plain-doctype": b'<?xml version="1.0"?>\n<!DOCTYPE r>\n<i:upload-progress xmlns:i="ithit" />',
        "unclosed-element": b'<?xml version="1.0"?>\n<i:upload-progress xmlns:i="ithit">',
        "not-xml": b"upload-progress, please",
        "empty": b"",
        "unbound-prefix": b'<?xml version="1.0"?>\n<i:upload-progress />',
    }


ATTACKS = [
    "billion-laughs", "external-entity-file", "external-entity-http", "external-dtd",
    "parameter-entity", "plain-doctype", "unclosed-element", "not-xml", "empty", "unbound-prefix",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_webdav_malformed_or_hostile_report_is_refused(full: Shared, attack: str) -> None:
    """Malformed XML, any DTD, entity expansion, external entities: 400 from the shim;
    nothing is expanded or fetched, nothing reaches the legacy server, and an upload in
    progress at that path is unchanged."""
    proc, legacy = full
    path = f"/dav/attacks/{attack}.bin"
    url = proc.url + path
    started = send(url, "PUT", b"x" * 100, {"Content-Range": "bytes 0-99/1000"})
    assert started.status_code == 202, show(started)

    body = xml_attacks(legacy.url)[attack]
    assert sorted(xml_attacks(legacy.url)) == sorted(ATTACKS)
    response = report(url, body)
    assert_shim_refusal(response, 400, "not acceptable XML")
    assert b"root:" not in response.content and b"lollollol" not in response.content
    assert requests_for(legacy, path) == []
    fetched = [r for r in list(legacy.received) if r.path.startswith("/xxe")]
    assert fetched == [], fetched
    assert_progress(progress_of(url, path), 100, 1000)
    assert send(url, "CANCELUPLOAD").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        b'<?xml version="1.0" encoding="utf-8"?>\n<D:version-tree xmlns:D="DAV:"><D:prop>'
        b"<D:version-name/></D:prop></D:version-tree>",
        b'<?xml version="1.0"?>\n<D:upload-progress xmlns:D="DAV:" />',  # not IT Hit's namespace
    ],
    ids=["version-tree", "upload-progress-in-dav-namespace"],
)
def test_webdav_other_report_reaches_the_legacy_server(full: Shared, body: bytes) -> None:
    """A REPORT that is not IT Hit's upload-progress is the legacy server's, body and all."""
    proc, legacy = full
    target = f"/dav/other-report/{sha256(body).hexdigest()[:12]}.bin"
    headers = {"Content-Type": 'text/xml; charset="utf-8"'}
    response = send(proc.url + target, "REPORT", body, headers)
    assert_passed_through(legacy, response, "REPORT", target, body, headers)


# --- 6. tus on the target URL (seed 003) ----------------------------------------------------


def tus_head(url: str) -> tuple[int, int | None]:
    """(Upload-Offset, Upload-Length) from a tus HEAD the shim answers."""
    response = send(url, "HEAD", headers=TUS)
    assert response.status_code == 200 and not from_legacy(response), show(response)
    assert response.headers.get("Tus-Resumable") == "1.0.0", show(response)
    length = response.headers.get("Upload-Length")
    return int(response.headers["Upload-Offset"]), None if length is None else int(length)


def tus_patch(url: str, data: bytes, offset: int) -> requests.Response:
    return send(url, "PATCH", data, {**TUS_PATCH, "Upload-Offset": str(offset)})


def test_tus_on_target_put_then_patches_arrive_as_one_put(full: Shared, payload: PayloadFactory) -> None:
    """PUT with Upload-Length 3 MiB and 1 MiB of body, HEAD, a PATCH at a wrong offset (409),
    two PATCHes with the rest: the last gets the legacy server's 201 (with Upload-Offset)."""
    proc, legacy = full
    data = payload(3 * MIB).read_bytes()
    size = len(data)
    path = "/tus-target/report.bin"
    url = proc.url + path

    created = send(url, "PUT", data[:MIB], {**TUS, "Upload-Length": str(size), "Content-Type": "text/csv"})
    assert created.status_code in (200, 201, 204) and not from_legacy(created), show(created)
    assert created.headers.get("Upload-Offset") == str(MIB), show(created)
    assert tus_head(url) == (MIB, size)

    wrong = tus_patch(url, data[MIB : 2 * MIB], MIB + 1)
    assert_shim_refusal(wrong, 409)
    assert tus_head(url) == (MIB, size)

    second = tus_patch(url, data[MIB : 2 * MIB], MIB)
    assert second.status_code == 204 and second.headers.get("Upload-Offset") == str(2 * MIB), show(second)
    assert writes_for(legacy, path) == []

    final = tus_patch(url, data[2 * MIB :], 2 * MIB)
    assert_legacy_created(final, path, data)
    assert final.headers.get("Upload-Offset") == str(size), show(final)
    request = delivered_once(legacy, path, data)
    assert request.header("Content-Type") == "text/csv"


def test_tus_on_target_dropped_put_keeps_its_bytes(full: Shared, payload: PayloadFactory) -> None:
    """A tus PUT broken off mid-body keeps every byte sent (HEAD); a PATCH finishes it."""
    proc, legacy = full
    data = payload(2 * MIB + 333).read_bytes()
    size, sent = len(data), 700_001
    path = "/tus-target/dropped.bin"
    url = proc.url + path

    sock = send_partial(proc, "PUT", path, {**TUS, "Upload-Length": str(size)}, size, data[:sent])
    cut_off(proc, sock)
    poll(lambda: tus_head(url)[0], sent, f"HEAD showing {sent} bytes")
    assert tus_head(url) == (sent, size)
    assert writes_for(legacy, path) == []

    final = tus_patch(url, data[sent:], sent)
    assert_legacy_created(final, path, data)
    delivered_once(legacy, path, data)


# --- 7. seed 001's variants -----------------------------------------------------------------


def assert_range_accepted(response: requests.Response, last: int) -> None:
    """202 from the shim with ``Range: bytes=0-LAST`` (what is stored)."""
    assert response.status_code == 202 and not from_legacy(response), show(response)
    assert response.headers.get("Range") == f"bytes=0-{last}", show(response)


def test_seed001_query_range_in_three_puts(full: Shared, payload: PayloadFactory) -> None:
    """PUT ?version=2&range=S-E/TOTAL three times (and an inquiry ``range=*/TOTAL``): one PUT
    of the whole file to ?version=2, without the range parameter."""
    proc, legacy = full
    data = payload(MIB + 17).read_bytes()
    size = len(data)
    path = "/seed001/query.bin"
    cuts = [(0, 399_999), (400_000, 899_999), (900_000, size - 1)]

    def put(start: int, end: int) -> requests.Response:
        return send(f"{proc.url}{path}?version=2&range={start}-{end}/{size}", "PUT", data[start : end + 1])

    assert_range_accepted(put(*cuts[0]), 399_999)
    assert_range_accepted(put(*cuts[1]), 899_999)
    inquiry = send(f"{proc.url}{path}?version=2&range=*/{size}", "PUT")
    assert_range_accepted(inquiry, 899_999)
    assert writes_for(legacy, path) == []

    assert_legacy_created(put(*cuts[2]), path, data)
    delivered_once(legacy, path, data, target=f"{path}?version=2")


def test_seed001_expect_range_in_two_puts(full: Shared, payload: PayloadFactory) -> None:
    """PUT with Expect: Range and Range: bytes S-E/TOTAL twice: one whole PUT, no Expect."""
    proc, legacy = full
    data = payload(MIB + 5).read_bytes()
    size = len(data)
    path = "/seed001/expect.bin"
    url = proc.url + path

    def put(start: int, end: int) -> requests.Response:
        fields = {"Expect": "Range", "Range": f"bytes {start}-{end}/{size}", "Content-Type": "image/jpeg"}
        return send(url, "PUT", data[start : end + 1], fields)

    assert_range_accepted(put(0, 599_999), 599_999)
    assert writes_for(legacy, path) == []
    assert_legacy_created(put(600_000, size - 1), path, data)
    request = delivered_once(legacy, path, data)
    assert request.header("Content-Type") == "image/jpeg"


def test_seed001_query_range_forwards_the_other_parameters_as_sent(full: Shared) -> None:
    """Only ``range=...`` is removed from the query; the rest reaches the legacy server as sent."""
    proc, legacy = full
    data = bytes(range(256)) * 8
    path = "/seed001/query-as-sent.bin"
    query = "overwrite&name=a%20b"
    first = send(f"{proc.url}{path}?{query}&range=0-999/{len(data)}", "PUT", data[:1000])
    assert_range_accepted(first, 999)
    last = send(f"{proc.url}{path}?{query}&range=1000-{len(data) - 1}/{len(data)}", "PUT", data[1000:])
    assert last.status_code == 201, show(last)
    delivered_once(legacy, path, data, target=f"{path}?{query}")


def test_seed001_variants_off_are_refused_not_forwarded(plain: Shared, payload: PayloadFactory) -> None:
    """With the variants off (the default) both kinds of PUT announce a part of a file that no
    protocol takes: the guard refuses them (400 naming the field) and the legacy server never
    stores a partial body."""
    proc, legacy = plain
    data = payload(1000).read_bytes()
    before = len(legacy.received)

    query_target = "/seed001-off/query.bin?range=0-499/1000"
    response = send(proc.url + query_target, "PUT", data[:500])
    assert response.status_code == 400 and "range=" in response.text, show(response)

    fields = {"Expect": "Range", "Range": "bytes 0-499/1000"}
    response = send(proc.url + "/seed001-off/expect.bin", "PUT", data[:500], fields)
    assert response.status_code == 400 and "Expect: Range" in response.text, show(response)

    assert len(legacy.received) == before
    assert not (legacy.directory / "seed001-off").exists()


# --- 8. protocols do not steal each other's requests -------------------------------------


class PassThrough(NamedTuple):
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    status: int


PASS_THROUGH: dict[str, PassThrough] = {
    "plain-put-below-dav-without-webdav": PassThrough("PUT", "/dav/x", {}, b"a whole file\n", 201),
    "upload-progress-report-without-webdav": PassThrough(
        "REPORT", "/dav/y", {"Content-Type": "text/xml"}, UPLOAD_PROGRESS, 405
    ),
    "cancelupload-without-webdav": PassThrough("CANCELUPLOAD", "/dav/z", {}, b"", 405),
    "json-patch": PassThrough(
        "PATCH", "/api/objects/7", {"Content-Type": "application/json"}, b'{"name": "seven"}', 400
    ),
    "plain-put": PassThrough("PUT", "/plain.txt", {"Content-Type": "text/plain"}, b"hello\n", 201),
    "plain-put-with-query": PassThrough("PUT", "/plain-q.txt?range=yes", {}, b"hello\n", 201),
}


@pytest.mark.parametrize("case", list(PASS_THROUGH.values()), ids=list(PASS_THROUGH))
def test_requests_of_no_protocol_pass_through_default_config(plain: Shared, case: PassThrough) -> None:
    """With the default config: WebDAV requests (no webdav.paths), a JSON PATCH and plain PUTs
    reach the legacy server as sent; its answer is the answer (a PATCH: its 400)."""
    proc, legacy = plain
    response = send(proc.url + case.target, case.method, case.body, case.headers)
    assert_passed_through(legacy, response, case.method, case.target, case.body, case.headers)
    assert response.status_code == case.status, show(response)


@pytest.mark.parametrize(
    "case",
    [
        PassThrough("PATCH", "/api/objects/8", {"Content-Type": "application/json"}, b'{"n": 8}', 400),
        PassThrough("PATCH", "/dav/objects/9", {"Content-Type": "application/json"}, b'{"n": 9}', 400),
        PassThrough("PUT", "/plain-full.txt", {"Content-Type": "text/plain"}, b"hello\n", 201),
        PassThrough("POST", "/dav/form", {"Content-Type": "text/plain"}, b"posted\n", 201),
        PassThrough("GET", "/dav/missing.bin", {}, b"", 404),
        PassThrough("HEAD", "/br/missing.bin", {}, b"", 404),
    ],
    ids=["json-patch", "json-patch-below-dav", "plain-put", "post-below-dav", "get-below-dav", "head"],
)
def test_requests_of_no_protocol_pass_through_all_protocols_on(full: Shared, case: PassThrough) -> None:
    """With every protocol of issue 5 on, requests that are none of theirs still pass through."""
    proc, legacy = full
    response = send(proc.url + case.target, case.method, case.body, case.headers)
    assert_passed_through(legacy, response, case.method, case.target, case.body, case.headers)
    assert response.status_code == case.status, show(response)


def test_chunked_put_below_dav_passes_through(full: Shared) -> None:
    """A chunked PUT below a WebDAV prefix announces no length: nothing to resume, so it is the
    legacy server's (webdav module), and it stores the whole body."""
    proc, legacy = full
    target = "/dav/chunked.bin"
    pieces = [b"first piece\n", b"second piece\n"]
    response = requests.put(proc.url + target, data=iter(pieces), timeout=HTTP_TIMEOUT)
    body = b"".join(pieces)
    request = assert_passed_through(legacy, response, "PUT", target, body, {})
    assert request.header("Transfer-Encoding") == "chunked"
    assert response.status_code == 201, show(response)
    assert (legacy.directory / "dav" / "chunked.bin").read_bytes() == body

