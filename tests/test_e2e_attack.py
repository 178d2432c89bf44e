"""End to end, issue 9, from the attacker's side: requests (and sequences) that break one of
the promises of README "Hostile input and limits" through a real ``mitmdump`` shim in front
of the recording ``tests.legacy_servers.LegacyServer``.

Each test here is one confirmed way through, written as the behaviour the issue demands:

- a tus partial upload (``Upload-Concat: partial``) skips ``auth.preflight``, so a client
  the legacy server refuses stores bytes anyway;
- an HTTP/2 request body without ``Content-Length`` that passes through reaches the legacy
  server as an empty body (the bytes go out unframed);
- ``X-HTTP-Method-Override`` carries a partial upload past the guard to a legacy server
  that honours the override (as Rails and Express's method-override do);
- a dot segment in the URL of a protocol restricted to ``paths`` is delivered as is, so a
  client's upload lands outside those paths once the legacy server resolves it;
- a tus final concatenation naming a part by an unparsable URL gets 500, not a 4xx.

The raw HTTP/1.1 client and the stacks are those of ``tests.hostile_cases``; HTTP/2 goes over
TLS on the shim's own port (mitmproxy makes up a certificate from its CA) with the h2 package.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import h2.config
import h2.connection
import h2.events
import pytest

from tests import hostile_cases as hc
from tests.hostile_cases import (
    IO_TIMEOUT,
    TUS_CHUNK,
    Field,
    Stack,
    exchange,
    unique,
)
from tests.legacy_servers import LegacyServer, Received

pytestmark = pytest.mark.timeout(60)

TUS: Field = ("Tus-Resumable", "1.0.0")
ONLY = "/only/"
DAV = "/dav/"
ATTACK_CONFIG: dict[str, Any] = {
    "content_range": {"paths": [ONLY]},
    "webdav": {"paths": [DAV]},
    "delivery": {"wait": 10.0},
}
"""Content-Range limited to /only/, WebDAV on /dav/, everything else as by default."""


# --- stacks ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """ATTACK_CONFIG."""
    yield from hc.stack(tmp_path_factory, "attack", ATTACK_CONFIG)


@pytest.fixture(scope="module")
def refusing_auth() -> Iterator[LegacyServer]:
    """An auth URL (nginx auth_request style) that answers 403 to everyone."""
    server = LegacyServer()
    server.start()
    server.set_mode("status:403")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def preflighted(tmp_path_factory: pytest.TempPathFactory,
                refusing_auth: LegacyServer) -> Iterator[Stack]:
    """auth.preflight: url, with an auth URL that refuses every client."""
    config = {"auth": {"preflight": "url", "url": refusing_auth.url + "/auth"}}
    yield from hc.stack(tmp_path_factory, "attack-preflight", config)


# --- helpers -----------------------------------------------------------------------------------


def show(received: Sequence[Received]) -> str:
    """Requests the legacy server got, for assertion messages."""
    return "; ".join(f"{r.method} {r.path} {r.headers} ({r.size} bytes)" for r in received)


def assert_nothing_reached(stack: Stack, mark: int, response: object = None) -> None:
    """The legacy server got no request since ``mark``."""
    got = stack.since(mark)
    assert got == [], f"the legacy server got {show(got)}; the client got {response}"


def bearer() -> Field:
    """An owner no other test uses."""
    return ("Authorization", f"Bearer {unique('attacker')}")


def has_dot_segment(path: str) -> bool:
    """Whether a request path has a `.` or `..` segment, percent-encoded or not."""
    return any(unquote(s) in (".", "..") for s in urlsplit(path).path.split("/"))


class Http2:
    """One HTTP/2 connection over TLS (ALPN h2) to the shim, driven with the h2 package."""

    def __init__(self, port: int) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # mitmproxy's certificate, made up from its CA
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self._flush()
        self.events: list[h2.events.Event] = []

    def _flush(self) -> None:
        if data := self.conn.data_to_send():
            self.sock.sendall(data)

    def request(self, method: str, path: str, fields: Sequence[tuple[str, str]],
                body: bytes) -> tuple[int, bytes]:
        """One request (no content-length unless ``fields`` has one); its status and body."""
        stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream, [(":method", method), (":path", path),
                                        (":scheme", "https"), (":authority", "localhost"),
                                        *fields], end_stream=not body)
        if body:
            self.conn.send_data(stream, body, end_stream=True)
        self._flush()
        while not any(isinstance(e, h2.events.StreamEnded | h2.events.StreamReset)
                      and e.stream_id == stream for e in self.events):
            data = self.sock.recv(65536)
            assert data, f"connection closed; events: {self.events}"
            for event in self.conn.receive_data(data):
                assert not isinstance(event, h2.events.ConnectionTerminated), event
                self.events.append(event)
            self._flush()
        mine = [e for e in self.events if getattr(e, "stream_id", None) == stream]
        [head] = [e for e in mine if isinstance(e, h2.events.ResponseReceived)]
        status = int(dict(head.headers or ())[":status"])
        return status, b"".join(e.data for e in mine if isinstance(e, h2.events.DataReceived))

    def close(self) -> None:
        self.sock.close()


# === auth.preflight: no byte stored for a client the legacy server refuses ====================


def test_preflight_refusal_applies_to_tus_partial_uploads(preflighted: Stack) -> None:
    """With auth.preflight refusing a client, an ordinary tus creation gets the 403 (control),
    and so must a creation with `Upload-Concat: partial`: it is as much a byte stored for a
    client the legacy server refuses. Broken: a partial has no delivery target, and
    Engine.create only asks the preflight when `new.target is not None`, so the partial is
    created (201) and its 5 bytes are on the shim's disk."""
    owner = bearer()
    control = exchange(preflighted.port, "POST", "/files/", [TUS, ("Upload-Length", "5"), owner])
    assert control.status == 403, control
    files_before = preflighted.stored_files()
    partial = exchange(preflighted.port, "POST", "/files/",
                       [TUS, ("Upload-Length", "5"), ("Upload-Concat", "partial"),
                        ("Content-Type", TUS_CHUNK), owner], b"hello")
    assert partial.status == 403, partial
    assert preflighted.stored_files() == files_before


# === HTTP/2: what passes through arrives whole ================================================


@pytest.mark.parametrize("path", ["/plain/", DAV], ids=["unclaimed-path", "webdav-path"])
def test_http2_body_without_content_length_passes_through_whole(attack: Stack, path: str) -> None:
    """An HTTP/2 PUT whose body has no content-length (legal: DATA frames frame it) and that
    the shim passes through must reach the legacy server with its whole body. Broken: the
    addon streams it (`_to_legacy` sets `request.stream`) without adding
    `Transfer-Encoding: chunked`, and mitmproxy's HTTP/1 client then writes the bytes with no
    framing: the legacy server reads an empty body (a partial file) and answers 201."""
    mark = attack.mark()
    target = unique(path + "h2-body")
    data = b"five bytes or more, over HTTP/2"
    client = Http2(attack.port)
    try:
        status, body = client.request("PUT", target, [bearer()], data)
    finally:
        client.close()
    got = [r for r in attack.since(mark) if r.path == target]
    assert len(got) == 1, f"{status} {body[:200]!r}; legacy got {show(attack.since(mark))}"
    assert (got[0].size, got[0].sha256) == (len(data), hc.sha256(data)), show(got)


# === the guard: X-HTTP-Method-Override is the method ==========================================


OVERRIDES = {
    "GET-as-PUT+content-range": ("GET", "PUT", [("Content-Range", "bytes 0-4/10")], b"hello"),
    "POST-as-PATCH+message-byteranges": (
        "POST", "PATCH", [("Content-Type", "message/byteranges")],
        b"Content-Range: bytes 0-4/10\r\n\r\nhello"),
    "DELETE-as-PUT+upload-complete-0": ("DELETE", "PUT", [("Upload-Complete", "?0")], b"hello"),
    "GET-as-PATCH+upload-offset": ("GET", "PATCH", [("Upload-Offset", "5")], b"hello"),
}


@pytest.mark.parametrize(("method", "override", "fields", "body"), list(OVERRIDES.values()),
                         ids=list(OVERRIDES))
def test_method_override_cannot_carry_a_partial_upload_past_the_guard(
        attack: Stack, method: str, override: str, fields: list[Field], body: bytes) -> None:
    """The shim itself takes `X-HTTP-Method-Override` as the method (tus), and so do many
    legacy stacks (Rails, Express method-override). A partial upload announced under an
    override on a path no protocol takes must be refused (400) like the same request sent
    with the overriding method, never forwarded. Broken: `guard.announced` looks only at
    the request line's method, so the partial body and its fields reach the legacy server."""
    mark = attack.mark()
    target = unique("/plain/override")
    response = exchange(attack.port, method, target,
                        [("X-HTTP-Method-Override", override), *fields], body)
    assert_nothing_reached(attack, mark, response)
    assert response.status == 400, response


# === protocols restricted to paths: a dot segment cannot leave them ===========================


ESCAPES = {
    "content-range/dotdot": (f"{ONLY}../outside/", [("Content-Range", "bytes 0-4/5")]),
    "content-range/pct-dotdot": (f"{ONLY}%2e%2e/outside/", [("Content-Range", "bytes 0-4/5")]),
    "content-range/pct-DOTDOT": (f"{ONLY}%2E%2E/outside/", [("Content-Range", "bytes 0-4/5")]),
    "content-range/dot": (f"{ONLY}./", [("Content-Range", "bytes 0-4/5")]),
    "webdav/dotdot": (f"{DAV}../outside/", []),
    "webdav/pct-dotdot": (f"{DAV}%2e%2e/outside/", []),
}


@pytest.mark.parametrize(("prefix", "fields"), list(ESCAPES.values()), ids=list(ESCAPES))
def test_dot_segment_cannot_take_an_upload_outside_the_protocols_paths(
        attack: Stack, prefix: str, fields: list[Field]) -> None:
    """`content_range.paths` / `webdav.paths` say where resumable uploads may go. A URL such
    as `/only/../outside/f` starts with `/only/` but names `/outside/f` (RFC 3986 section
    5.2.4; every server resolves it so). The shim must not deliver a file with a dot segment
    the client chose: refused (400), or at least never forwarded with it. Broken:
    `wire.path_allowed` is a string prefix test and the delivery target is the raw URL."""
    mark = attack.mark()
    target = unique(prefix + "f")
    response = exchange(attack.port, "PUT", target, [*fields, bearer()], b"hello")
    got = attack.since(mark)
    if fields:  # a partial upload: refused, nothing forwarded
        assert got == [] and response.status == 400, (show(got), response)
        return
    # A whole PUT that no protocol takes (outside webdav.paths once resolved) is the legacy
    # server's, as without the shim; what the shim delivers never has a dot segment.
    deliveries = [r for r in got if r.header("Idempotency-Key") is not None]
    assert not any(has_dot_segment(r.path) for r in deliveries), show(got)
    assert [(r.method, r.path, r.size) for r in got] == [("PUT", target, 5)], show(got)


# === no 5xx from client input ================================================================


@pytest.mark.parametrize("parts", ["http://[::1/files/abc", "https://[evil/files/x /files/y",
                                   "/files/a http://[/files/b"],
                         ids=["unclosed-ipv6", "two-urls-first-bad", "second-bad"])
def test_final_concatenation_naming_an_unparsable_url_is_4xx(attack: Stack, parts: str) -> None:
    """`Upload-Concat: final;<urls>` comes from the client: one that is no URL is a client
    error (400, or 404 as for a part that does not exist), never the shim's 500. Broken: the
    part URLs go through urlsplit unguarded, its ValueError ("Invalid IPv6 URL") escapes to
    the addon, which answers 500 and logs a traceback."""
    mark, logged = attack.mark(), len(attack.shim.output())
    response = exchange(attack.port, "POST", "/files/",
                        [TUS, ("Upload-Concat", f"final;{parts}"), bearer()])
    assert_nothing_reached(attack, mark, response)
    assert 400 <= response.status < 500, response
    log = attack.shim.output()[logged:]
    assert "Traceback" not in log, log[-3000:]
