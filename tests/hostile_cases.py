"""Hostile requests for tests/test_e2e_hostile.py (issue 9): a raw HTTP/1.1 client that can
send any bytes (CR, LF, NUL, obs-text, a Host that is no host), the shim-plus-recording-legacy
stacks the tests share, and the tables of hostile cases, counted by kind.

The closing note of issue 9 asks for "the hostile cases tried (count, by kind) and how many
reached the legacy server". Every case lives in one of the tables below, each test asserts
that none of its cases reached the legacy server, and ``python -m tests.hostile_cases`` prints
the counts (``pytest --collect-only -q tests/test_e2e_hostile.py`` lists the same cases by
their parametrize ids, which start with the kind).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ShimLauncher, ShimProcess
from tests.legacy_servers import LegacyServer, Received

__all__ = [
    "CASES",
    "INTEROP",
    "IO_TIMEOUT",
    "TUS_CHUNK",
    "Case",
    "Creation",
    "Field",
    "RawResponse",
    "Stack",
    "b64",
    "case_ids",
    "cases",
    "chunked",
    "closes_after",
    "counts",
    "creation",
    "exchange",
    "head_bytes",
    "send",
    "sha256",
    "stack",
    "unique",
]

IO_TIMEOUT = 15.0
"""Seconds a raw exchange may take before the test fails (they normally take milliseconds)."""

Field = tuple[str, str | bytes]
"""A header line as sent: the value may be bytes, to carry exactly what a test wants."""


# --- the tables of hostile cases -----------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One hostile request (or request sequence) a test sends; ``params`` say what varies."""

    kind: str
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The pytest id: kind first, so that ids group and count by kind."""
        return f"{self.kind}:{self.name}"


def _table(kind: str, rows: Mapping[str, Mapping[str, Any]]) -> list[Case]:
    return [Case(kind, name, params) for name, params in rows.items()]


def _ascii(text: str) -> bytes:
    return text.encode("latin-1")


# 1. "The client picks the legacy path": tus metadata values in a {user}/{filename} template.
DOT_SEGMENTS = _table("path", {
    f"{key}={label}": {"key": key, "value": value}
    for key in ("user", "filename")
    for label, value in (("dotdot", ".."), ("dot", "."), ("empty", ""), ("no-value", None),
                         ("pct-dotdot", "%2e%2e"), ("pct-DOTDOT", "%2E%2E"), ("dot-pct", ".%2e"),
                         ("pct-dot", "%2e"))
})
ID_OVERRIDE = _table("path", {
    f"id={label}": {"value": value}
    for label, value in (("word", "attacker"), ("climb", "../../etc/passwd"), ("dotdot", ".."),
                         ("empty", ""), ("slash", "a/b"))
})

# 2. "Accepted, then undeliverable": creating-request fields that are no field value, and
# filetype/contentType values that are no media type. Raw bytes as they go on the wire.
BAD_FIELD_VALUES: dict[str, bytes] = {
    "obs-fold-crlf": b"first\r\n second",
    "bare-cr": b"first\rsecond",
    "nul": b"first\x00second",
    "soh": b"first\x01second",
    "esc": b"first\x1bsecond",
    "del": b"first\x7fsecond",
}
CREATION_PROTOCOLS = ("tus", "ietf", "content-range", "session", "tus-target", "byteranges",
                      "webdav", "query-range", "expect-range")
BAD_FIELDS = _table("field", {
    f"{protocol}/{label}": {"protocol": protocol, "value": value}
    for protocol in CREATION_PROTOCOLS
    for label, value in BAD_FIELD_VALUES.items()
    if protocol == "tus" or label in ("obs-fold-crlf", "nul")
})
BAD_MEDIA_TYPES = _table("field", {
    f"{key}={label}": {"key": key, "value": value}
    for key in ("filetype", "contentType")
    for label, value in (("crlf-injection", "text/plain\r\nX-Injected: 1"),
                         ("lf-part-injection", "text/plain\n\nINJECTED"),
                         ("no-subtype", "text"), ("empty-subtype", "text/"), ("words", "not a type"),
                         ("climb", "../../etc"), ("nul", "text/plain\x00"),
                         ("non-ascii", "text/pl\u00e4in"))
})
OBS_TEXT = _table("field", {
    f"{protocol}/{label}": {"protocol": protocol, "value": value}
    for protocol in ("tus", "ietf", "content-range", "tus-target", "webdav")
    for label, value in (("latin1-e9", b"caf\xe9"), ("utf8-bytes", "\u00e9t\u00e9 \u2603".encode()))
})

# 3. "Partial files and protocol fields reach the legacy server".
TWO_PROTOCOLS = _table("partial", {
    "tus-target+content-range-10-14": {
        "method": "PUT", "dav": False,
        "fields": [("Tus-Resumable", "1.0.0"), ("Content-Range", "bytes 10-14/100")]},
    "tus-target+content-range-0-4": {
        "method": "PUT", "dav": False,
        "fields": [("Tus-Resumable", "1.0.0"), ("Content-Range", "bytes 0-4/100")]},
    "tus-target-length+content-range": {
        "method": "PUT", "dav": False,
        "fields": [("Tus-Resumable", "1.0.0"), ("Upload-Length", "100"),
                   ("Content-Range", "bytes 10-14/100")]},
    "tus-target+expect-range": {
        "method": "PUT", "dav": False,
        "fields": [("Tus-Resumable", "1.0.0"), ("Expect", "Range"), ("Range", "bytes 0-4/100")]},
    "ietf-complete+content-range": {
        "method": "PUT", "dav": False,
        "fields": [("Upload-Draft-Interop-Version", "8"), ("Upload-Complete", "?1"),
                   ("Content-Range", "bytes 0-4/100")]},
    "ietf-complete+query-range": {
        "method": "PUT", "dav": False, "query": "range=0-4/100",
        "fields": [("Upload-Draft-Interop-Version", "8"), ("Upload-Complete", "?1")]},
    "webdav+ietf-incomplete-v8": {
        "method": "PUT", "dav": True,
        "fields": [("Upload-Draft-Interop-Version", "8"), ("Upload-Complete", "?0")]},
    "webdav+ietf-incomplete-no-version": {
        "method": "PUT", "dav": True, "fields": [("Upload-Complete", "?0")]},
    "webdav+ietf-v3-incomplete": {
        "method": "PUT", "dav": True,
        "fields": [("Upload-Draft-Interop-Version", "3"), ("Upload-Incomplete", "?1")]},
    "webdav+tus-length": {
        "method": "PUT", "dav": True, "fields": [("Tus-Resumable", "1.0.0"), ("Upload-Length", "100")]},
    "webdav+query-range": {"method": "PUT", "dav": True, "query": "range=0-4/100", "fields": []},
    "webdav+expect-range": {
        "method": "PUT", "dav": True, "fields": [("Expect", "Range"), ("Range", "bytes 0-4/100")]},
    "webdav+upload-offset": {"method": "PUT", "dav": True, "fields": [("Upload-Offset", "0"),
                                                                        ("Upload-Length", "100")]},
})
OUTSIDE_PATHS = _table("partial", {
    "put-content-range": {"method": "PUT", "fields": [("Content-Range", "bytes 0-4/10")],
                          "names": ("content-range",)},
    "post-content-range": {"method": "POST", "fields": [("Content-Range", "bytes 0-4/10")],
                           "names": ("content-range",)},
    "patch-content-range": {"method": "PATCH", "fields": [("Content-Range", "bytes 0-4/10")],
                            "names": ("content-range",)},
    "put-content-range-last": {"method": "PUT", "fields": [("Content-Range", "bytes 5-9/10")],
                               "names": ("content-range",)},
    "tus-upload-length": {"method": "PUT",
                          "fields": [("Tus-Resumable", "1.0.0"), ("Upload-Length", "10")],
                          "names": ("tus-resumable", "upload-length")},
    "tus-defer-length": {"method": "PUT",
                         "fields": [("Tus-Resumable", "1.0.0"), ("Upload-Defer-Length", "1")],
                         "names": ("tus-resumable", "upload-defer-length")},
    "tus-post-upload-length": {"method": "POST",
                               "fields": [("Tus-Resumable", "1.0.0"), ("Upload-Length", "10")],
                               "names": ("tus-resumable", "upload-length")},
    "message-byteranges": {"method": "PATCH", "body": "message",
                           "fields": [("Content-Type", "message/byteranges")],
                           "names": ("byteranges",)},
    "multipart-byteranges": {"method": "PATCH", "body": "multipart",
                             "fields": [("Content-Type", "multipart/byteranges; boundary=B")],
                             "names": ("byteranges",)},
    "query-range": {"method": "PUT", "query": "range=0-4/10", "fields": [], "names": ("range",)},
    "query-range-second-param": {"method": "PUT", "query": "v=1&range=0-4/10", "fields": [],
                                 "names": ("range",)},
    "expect-range": {"method": "PUT", "fields": [("Expect", "Range"), ("Range", "bytes 0-4/10")],
                     "names": ("expect", "range")},
    "upload-complete-0": {"method": "POST", "fields": [("Upload-Complete", "?0")],
                          "names": ("upload-complete",)},
    "upload-complete-0-put-v8": {"method": "PUT", "fields": [("Upload-Complete", "?0"),
                                                             ("Upload-Draft-Interop-Version", "8")],
                                 "names": ("upload-complete",)},
    "upload-incomplete-1": {"method": "PUT", "fields": [("Upload-Incomplete", "?1")],
                            "names": ("upload-incomplete", "upload-complete")},
    "upload-offset-put": {"method": "PUT", "fields": [("Upload-Offset", "5")],
                          "names": ("upload-offset",)},
    "upload-offset-patch": {"method": "PATCH", "fields": [("Upload-Offset", "0")],
                            "names": ("upload-offset",)},
})
LONGER_BODIES = _table("partial", {
    f"{protocol}/{label}": {"protocol": protocol, "announced": announced, "total": total,
                            "sent": sent}
    for protocol in ("content-range-put", "content-range-post", "webdav", "query-range",
                     "expect-range")
    for label, announced, total, sent in (("5-of-5-sent-6", 5, 5, 6), ("5-of-5-sent-10", 5, 5, 10),
                                          ("5-of-10-sent-8", 5, 10, 8))
    if protocol.startswith("content-range") or label != "5-of-10-sent-8"
} | {
    "content-range-put/5-of-5-sent-3": {"protocol": "content-range-put", "announced": 5,
                                        "total": 5, "sent": 3},
    "content-range-put/64k-of-64k-sent-64k+1": {"protocol": "content-range-put",
                                                "announced": 65536, "total": 65536, "sent": 65537},
})
MALFORMED_RANGES = _table("partial", {
    f"{protocol}/{label}": {"protocol": protocol, "value": value}
    for protocol in ("content-range", "webdav", "expect-range", "byteranges", "session")
    for label, value in (("equals", "bytes=0-4/5"), ("two-spaces", "bytes  0-4/5"),
                         ("space-in-range", "bytes 0 -4/5"), ("space-before-total", "bytes 0-4 /5"),
                         ("no-unit", "0-4/5"), ("no-first", "bytes -4/5"), ("no-last", "bytes 0-/5"),
                         ("equals-star", "bytes=*/5"), ("list", "bytes 0-4/5, 0-4/5"))
    if protocol == "content-range" or label in ("equals", "two-spaces")
})

# 4. "Refused requests change state".
REFUSED_TUS_PATCHES = _table("state", {
    f"tus-patch/{name}": params for name, params in {
        "offset-behind": {"offset": 0, "fields": [], "status": 409},
        "offset-ahead": {"offset": 7, "fields": [], "status": 409},
        "wrong-content-type": {"offset": 3, "fields": [("Content-Type", "application/octet-stream")],
                               "status": 415},
        "wrong-version": {"offset": 3, "fields": [("Tus-Resumable", "0.2.2")], "status": 412},
        "bad-checksum": {"offset": 3, "fields": [("Upload-Checksum", "sha1 " + base64.b64encode(
            b"\0" * 20).decode())], "status": 460},
    }.items()
})
REFUSED_DIGESTS = _table("state", {
    "digest/bogus-on-409": {"refusal": "offset", "first_digest": False},
    "digest/bogus-on-415": {"refusal": "content-type", "first_digest": False},
    "digest/bogus-on-409-after-good-one": {"refusal": "offset", "first_digest": True},
})
REFUSED_IETF_PATCHES = _table("state", {
    f"ietf-patch/{name}": params for name, params in {
        "offset-behind": {"offset": 2, "complete": False, "fields": [], "status": 409},
        "offset-zero": {"offset": 0, "complete": False, "fields": [], "status": 409},
        "offset-ahead": {"offset": 9, "complete": False, "fields": [], "status": 409},
        "offset-ahead-completing": {"offset": 9, "complete": True, "fields": [], "status": 409},
        "offset-ahead-with-length": {"offset": 9, "complete": False,
                                     "fields": [("Upload-Length", "12")], "status": 409},
        "wrong-content-type": {"offset": 5, "complete": False,
                               "fields": [("Content-Type", "application/octet-stream")],
                               "status": 415},
        "wrong-content-type-completing": {"offset": 5, "complete": True,
                                          "fields": [("Content-Type", "application/octet-stream")],
                                          "status": 415},
    }.items()
})

# 5. "Exhaustion": the creations tried once the caps are reached (each must get 429).
CAPPED_PROTOCOLS = _table("exhaustion", {
    f"{owner}-cap/{protocol}": {"protocol": protocol, "owner": owner}
    for owner in ("owner", "total") for protocol in CREATION_PROTOCOLS
})
NO_SPACE = _table("exhaustion", {
    f"no-space/{protocol}": {"protocol": protocol} for protocol in CREATION_PROTOCOLS
})
HEADER_FLOODS = _table("exhaustion", {
    f"{target}/{label}": {"target": target, "count": count, "size": size}
    for target in ("tus", "ietf", "unclaimed")
    for label, count, size in (("one-70k", 1, 70_000), ("100x1k", 100, 1024), ("one-1m", 1, 1 << 20))
})
EARLY_REFUSALS = _table("exhaustion", {
    name: {"refusal": name} for name in ("tus-unknown-id-404", "tus-wrong-offset-409",
                                          "tus-wrong-version-412", "tus-too-large-413",
                                          "tus-completed-403")
})

# 6. "Leaks and reflection".
OTHER_OWNER = _table("leak", {
    f"{protocol}/{method}": {"protocol": protocol, "method": method}
    for protocol in ("tus", "ietf") for method in ("HEAD", "PATCH", "DELETE")
})
BAD_HOSTS = _table("leak", {
    f"{protocol}/{label}": {"protocol": protocol, "host": host}
    for protocol in ("ietf", "session", "tus")
    for label, host in (("userinfo", "a@evil"), ("path-query", "evil:1/p?x="),
                        ("bad-port", "evil:99999x"), ("space", "evil example"),
                        ("backslash", "evil\\x"))
})

# 7. "tus conformance".
METHOD_OVERRIDES = _table("tus", {
    "GET-as-OPTIONS-endpoint": {"method": "GET", "override": "OPTIONS", "on": "endpoint",
                                "tus": True},
    "GET-as-OPTIONS-endpoint-no-version": {"method": "GET", "override": "OPTIONS",
                                           "on": "endpoint", "tus": False},
    "GET-as-HEAD": {"method": "GET", "override": "HEAD", "on": "upload", "tus": True},
    "GET-as-DELETE": {"method": "GET", "override": "DELETE", "on": "upload", "tus": True},
    "PATCH-as-HEAD": {"method": "PATCH", "override": "HEAD", "on": "upload", "tus": True},
    "PATCH-as-DELETE": {"method": "PATCH", "override": "DELETE", "on": "upload", "tus": True},
    "POST-as-DELETE": {"method": "POST", "override": "DELETE", "on": "upload", "tus": True},
    "POST-as-HEAD": {"method": "POST", "override": "HEAD", "on": "upload", "tus": True},
})
BAD_FINALS = _table("tus", {
    "final-with-body": {"extra": "body", "status": 403},
    "final-with-upload-length": {"extra": "length", "status": 400},
    "final-with-body-and-length": {"extra": "both", "status": (400, 403)},
    "final-past-max-size": {"extra": "big", "status": 413},
    "final-unfinished-past-max-size": {"extra": "big-unfinished", "status": 413},
})

CASES: dict[str, list[Case]] = {}
for _table_cases in (DOT_SEGMENTS, ID_OVERRIDE, BAD_FIELDS, BAD_MEDIA_TYPES, OBS_TEXT,
                     TWO_PROTOCOLS, OUTSIDE_PATHS, LONGER_BODIES, MALFORMED_RANGES,
                     REFUSED_TUS_PATCHES, REFUSED_IETF_PATCHES, REFUSED_DIGESTS, CAPPED_PROTOCOLS,
                     NO_SPACE, HEADER_FLOODS,
                     EARLY_REFUSALS, OTHER_OWNER, BAD_HOSTS, METHOD_OVERRIDES, BAD_FINALS):
    for _case in _table_cases:
        CASES.setdefault(_case.kind, []).append(_case)


def cases(table: Sequence[Case]) -> list[Any]:
    """``pytest.param`` for each case of a table, with its kind-first id."""
    return [pytest.param(case, id=case.id) for case in table]


def case_ids(table: Sequence[Case]) -> list[str]:
    """The ids of a table's cases."""
    return [case.id for case in table]


def counts() -> dict[str, int]:
    """The number of hostile cases by kind (for the closing note of issue 9)."""
    return {kind: len(found) for kind, found in sorted(CASES.items())}


# --- values -----------------------------------------------------------------------------------


def b64(value: str) -> str:
    """Base64 of a UTF-8 string, as tus Upload-Metadata carries values."""
    return base64.b64encode(value.encode()).decode()


def unique(name: str) -> str:
    """A name no other test uses: the shared legacy server records every request."""
    return f"{name}-{uuid.uuid4().hex[:12]}"


def sha256(data: bytes) -> str:
    """Hex SHA-256."""
    return hashlib.sha256(data).hexdigest()


# --- a raw HTTP/1.1 client ----------------------------------------------------------------------


@dataclass
class RawResponse:
    """A final response, the 1xx responses before it, and whether the server then closed."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    interim: list[RawResponse] = field(default_factory=list)
    elapsed: float = 0.0
    """Seconds from the end of sending to the end of the final response."""

    def header(self, name: str) -> str | None:
        """A field's value (lines joined with ", "), latin-1 decoded; None if absent."""
        wanted = name.lower()
        values = [v for k, v in self.headers if k.lower() == wanted]
        return ", ".join(values) if values else None

    def locations(self) -> list[str]:
        """Every Location, interim responses' included."""
        return [v for r in (*self.interim, self) for k, v in r.headers if k.lower() == "location"]

    @property
    def text(self) -> str:
        """The body as text."""
        return self.body.decode("utf-8", "replace")

    def __str__(self) -> str:
        """For assertion messages."""
        interim = "".join(f"[{r.status} {r.headers}] " for r in self.interim)
        return f"{interim}{self.status} {self.reason} {self.headers} {self.body[:300]!r}"


class _Reader:
    """Buffered reads from a socket against a deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buffer = b""
        self.eof = False

    def fill(self) -> bool:
        """Read more; False at end of stream."""
        if self.eof:
            return False
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete response in time; got {self.buffer[:500]!r}")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        except TimeoutError as exc:
            raise TimeoutError(f"no complete response in time; got {self.buffer[:500]!r}") from exc
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            if not self.fill():
                raise ConnectionError(f"closed before {marker!r}; got {self.buffer[:500]!r}")
        found, _, self.buffer = self.buffer.partition(marker)
        return found

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self.fill():
                raise ConnectionError(f"closed after {len(self.buffer)} of {size} body bytes")
        found, self.buffer = self.buffer[:size], self.buffer[size:]
        return found

    def rest(self) -> bytes:
        while self.fill():
            pass
        found, self.buffer = self.buffer, b""
        return found


def _read_response(reader: _Reader, bodiless: bool) -> RawResponse:
    interim: list[RawResponse] = []
    while True:
        head = reader.until(b"\r\n\r\n").decode("latin-1")
        status_line, *lines = head.split("\r\n")
        _, status_text, *reason = status_line.split(" ", 2)
        headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]
        response = RawResponse(int(status_text), reason[0] if reason else "", headers)
        if 100 <= response.status < 200:
            interim.append(response)
            continue
        break
    response.interim = interim
    length = response.header("content-length")
    if bodiless or response.status in (204, 304):
        return response
    if "chunked" in (response.header("transfer-encoding") or "").lower():
        body = b""
        while size := int(reader.until(b"\r\n").split(b";")[0], 16):
            body += reader.exactly(size)
            reader.until(b"\r\n")
        reader.until(b"\r\n")
        response.body = body
    elif length is not None:
        response.body = reader.exactly(int(length))
    else:
        response.body = reader.rest()
    return response


def head_bytes(method: str, target: str, fields: Sequence[Field], host: str | bytes | None) -> bytes:
    """A request head exactly as given: nothing is checked, escaped or added but ``Host``
    (left out when ``host`` is None)."""
    lines = [f"{method} {target} HTTP/1.1".encode("latin-1")]
    if host is not None:
        lines.append(b"Host: " + (host if isinstance(host, bytes) else host.encode("latin-1")))
    for name, value in fields:
        lines.append(name.encode("latin-1") + b": " + (value if isinstance(value, bytes)
                                                        else value.encode("latin-1")))
    return b"\r\n".join(lines) + b"\r\n\r\n"


def chunked(body: bytes, pieces: int = 2) -> bytes:
    """``body`` in chunked transfer coding, in ``pieces`` chunks."""
    size = max(1, -(-len(body) // pieces))
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                   for i in range(0, len(body), size))
    return out + b"0\r\n\r\n"


def exchange(port: int, method: str, target: str, fields: Sequence[Field] = (),
             body: bytes = b"", *, host: str | bytes | None = None, length: bool = True,
             send_body: bool = True, timeout: float = IO_TIMEOUT,
             raw_body: bytes | None = None) -> RawResponse:
    """One request on a fresh connection, its answer read to the end.

    ``Content-Length`` is added for ``body`` unless ``length`` is false; ``raw_body`` is sent
    as is instead (for a chunked body, with ``Transfer-Encoding`` in ``fields``);
    ``send_body=False`` sends the head only (for refusals that must come without the body).
    """
    fields = list(fields)
    if length and raw_body is None:
        fields.append(("Content-Length", str(len(body))))
    host_value = f"127.0.0.1:{port}" if host is None else host
    data = head_bytes(method, target, fields, host_value)
    if send_body:
        data += body if raw_body is None else raw_body
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)  # a server that refuses a huge head may close before its end
        started = time.monotonic()
        reader = _Reader(sock, started + timeout)
        response = _read_response(reader, method == "HEAD")
        response.elapsed = time.monotonic() - started
        return response


def closes_after(port: int, method: str, target: str, fields: Sequence[Field], body_length: int,
                 timeout: float) -> tuple[RawResponse, bool]:
    """Send only the head of a request that announces ``body_length`` bytes; the answer that
    comes without the body (TimeoutError if none does within ``timeout``), and whether the
    server closed the connection after it."""
    data = head_bytes(method, target, [*fields, ("Content-Length", str(body_length))],
                      f"127.0.0.1:{port}")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        started = time.monotonic()
        reader = _Reader(sock, started + timeout)
        response = _read_response(reader, method == "HEAD")
        response.elapsed = time.monotonic() - started
        reader.deadline = time.monotonic() + timeout
        try:
            closed = not reader.buffer and not reader.fill()
        except TimeoutError:
            closed = False
        return response, closed


# --- creations, one per protocol ---------------------------------------------------------------

TUS_CHUNK = "application/offset+octet-stream"
INTEROP = "Upload-Draft-Interop-Version"


@dataclass
class Creation:
    """The request that creates an upload (and may carry all of it) in one protocol."""

    protocol: str
    method: str
    target: str
    fields: list[Field]
    body: bytes
    path: str | None
    """Where the legacy server gets the finished file; None for tus (it is in the answer)."""

    def delivered_path(self, response: RawResponse) -> str:
        """The legacy path of this upload, once ``response`` answered the creation."""
        if self.path is not None:
            return self.path
        location = response.header("Location") or ""
        return "/uploads/" + location.rsplit("/", 1)[-1]


def creation(protocol: str, data: bytes, *, complete: bool = True, extra: Sequence[Field] = (),
             owner: str | None = None, spare: int = 10) -> Creation:
    """A creation in ``protocol`` carrying ``data`` (a session's initiation carries none):
    the whole file when ``complete``, else the first ``len(data)`` of ``len(data) + spare``
    bytes. ``extra`` fields are added; ``owner`` becomes ``Authorization: Bearer <owner>``."""
    size = len(data)
    total = size if complete else size + spare
    span = f"0-{size - 1}/{total}"
    name = unique(protocol)
    fields: list[Field]
    body = data
    path: str | None = None
    if protocol == "tus":
        method, target = "POST", "/files/"
        fields = [("Tus-Resumable", "1.0.0"), ("Upload-Length", str(total)),
                  ("Upload-Metadata", f"filename {b64(name)}")]
        if data:
            fields.append(("Content-Type", TUS_CHUNK))
    elif protocol == "ietf":
        method, target = "POST", f"/ietf/{name}"
        fields = [(INTEROP, "8"), ("Upload-Complete", "?1" if complete else "?0")]
    elif protocol == "content-range":
        method, target = "PUT", f"/cr/{name}"
        fields = [("Content-Range", f"bytes {span}")]
    elif protocol == "session":
        method, target, body = "POST", f"/gs/{name}?uploadType=resumable", b""
        fields = [("X-Upload-Content-Length", str(total))]
        path = f"/gs/{name}"
    elif protocol == "tus-target":
        method, target = "PUT", f"/tt/{name}"
        fields = [("Tus-Resumable", "1.0.0"), ("Upload-Length", str(total))]
    elif protocol == "byteranges":
        method, target = "PATCH", f"/br/{name}"
        fields = [("Content-Type", "message/byteranges")]
        body = f"Content-Range: bytes {span}\r\n\r\n".encode() + data
    elif protocol == "webdav":
        method, target = "PUT", f"/dav/{name}"
        fields = [] if complete else [("Content-Range", f"bytes {span}")]
    elif protocol == "query-range":
        method, target = "PUT", f"/qr/{name}?range={span}"
        fields = []
        path = f"/qr/{name}"
    elif protocol == "expect-range":
        method, target = "PUT", f"/er/{name}"
        fields = [("Expect", "Range"), ("Range", f"bytes {span}")]
    else:
        raise ValueError(f"no such protocol {protocol!r}")
    if path is None and protocol != "tus":
        path = target
    if owner is not None:
        fields.append(("Authorization", f"Bearer {owner}"))
    return Creation(protocol, method, target, [*fields, *extra], body, path)


def send(port: int, made: Creation, **options: Any) -> RawResponse:
    """Send a creation (see :func:`exchange` for ``options``)."""
    return exchange(port, made.method, made.target, made.fields, made.body, **options)


# --- a shim in front of a recording legacy server, shared by a module's tests ----------------


class Stack:
    """A shim and the recording legacy server behind it."""

    def __init__(self, shim: ShimProcess, legacy: LegacyServer) -> None:
        self.shim = shim
        self.legacy = legacy

    @property
    def port(self) -> int:
        return self.shim.port

    @property
    def url(self) -> str:
        return self.shim.url

    def mark(self) -> int:
        """How many requests the legacy server has seen so far (see :meth:`since`)."""
        return len(self.legacy.requests())

    def since(self, mark: int) -> list[Received]:
        """The requests the legacy server got after ``mark``."""
        return self.legacy.requests()[mark:]

    def at(self, path: str) -> list[Received]:
        """The requests the legacy server got for exactly ``path``."""
        return [r for r in self.legacy.requests() if r.path == path]

    def stored_files(self) -> list[Path]:
        """The shim's data files (partial and complete uploads)."""
        data = self.shim.storage_dir / "data"
        return sorted(p for p in data.rglob("*") if p.is_file()) if data.is_dir() else []


def stack(tmp_path_factory: pytest.TempPathFactory, name: str,
          config: Mapping[str, Any]) -> Iterator[Stack]:
    """Body of a module-scoped fixture: one recording legacy server and one shim with
    ``config``; starting mitmdump is most of an end-to-end test's time."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp_path_factory.getbasetemp()))
    legacy = LegacyServer()
    legacy.start()
    launcher = ShimLauncher(legacy.url, tmp)
    try:
        shim = launcher(config)
        # mitmdump listens before the addon's running() has set its options (tcp_timeout,
        # connection_strategy): a connection made in that window gets mitmproxy's defaults.
        # A request the shim answers itself waits for running(); tests start after it.
        ready = exchange(shim.port, "OPTIONS", "/files/", [("Tus-Resumable", "1.0.0")], length=False)
        assert ready.status in (200, 204), ready
        yield Stack(shim, legacy)
    finally:
        launcher.kill_all()
        legacy.stop()
        if launcher.started:
            print(launcher.report(120))


if __name__ == "__main__":  # pragma: no cover - a report for the closing note
    total = 0
    for kind, number in counts().items():
        total += number
        print(f"{kind:12} {number}")
    print(f"{'total':12} {total}")
