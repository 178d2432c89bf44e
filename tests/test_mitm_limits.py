"""End to end over real sockets: shim/mitm.py's request-head limit, early answers and
mitmproxy's idle timeout, in a real ``mitmdump`` without the shim.

``tests/mitm_probe_addon.py`` is loaded in reverse mode in front of a recording test server
(tests/legacy_servers.py). It calls ``limit_request_heads`` with its ``probe_head_limit``
option (64 KiB here, the shim's default ``limits.header_bytes``), refuses ``/early/<status>``
requests from an async ``requestheaders`` hook with ``answer_early``, and claims ``/claim``
requests the way the shim claims an upload (body chunks to a stream callable, request pointed
at an in-process sink). Its ``probe: <hook> <path>`` lines tell which hooks saw a request.

What a user would notice, and what these tests assert:

* a request head over the limit (complete, or endless without its blank line) gets ``431``
  with ``Connection: close`` and a clean close (FIN, not RST), and no hook or upstream sees
  it; heads under the limit and large bodies behind small heads are served as before;
* a refusal decided from the headers reaches a client that announced 1 GiB at once, while
  the proxy reads only what is in flight (bounded: the lingering close discards at most
  ``LINGER_BYTES``); nothing goes upstream; the ``error`` hook runs without a crash;
* ``tcp_timeout`` closes a client that sends a head and then nothing, or half a body, also
  while its flow is claimed, and also (racily, see the last test) while a ``requestheaders``
  hook is still awaiting.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from shim.mitm import LINGER_BYTES
from tests.harness import ShimProcess
from tests.legacy_servers import LegacyServer

pytestmark = pytest.mark.timeout(120)

PROBE = Path(__file__).with_name("mitm_probe_addon.py")
KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
LIMIT = 64 * KIB
IO_TIMEOUT = 20.0
IDLE_TIMEOUT = 2
"""tcp_timeout of the second probe, in seconds."""


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def upstream() -> Iterator[LegacyServer]:
    """The test server behind the probe: records every request it gets, answers 201."""
    server = LegacyServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _start_probe(upstream: LegacyServer, tmp: Path, *extra: str) -> ShimProcess:
    # lazy: mitmproxy opens no upstream connection before a request needs one, so a refused
    # request leaves the test server untouched (the shim itself is eager, towards its sink).
    proc = ShimProcess.start("mitmdump", upstream.url, {}, tmp, addon=PROBE, extra_args=[
        "--set", "connection_strategy=lazy", "--set", f"probe_head_limit={LIMIT}", *extra])
    proc.wait_for_output(r"probe: sink on port \d+")  # mitmdump says "listening" before
    return proc


@pytest.fixture(scope="module")
def probe(upstream: LegacyServer, tmp_path_factory: pytest.TempPathFactory,
          ) -> Iterator[ShimProcess]:
    """mitmdump + the probe addon, head limit 64 KiB, default tcp_timeout."""
    proc = _start_probe(upstream, tmp_path_factory.mktemp("probe"))
    try:
        yield proc
    finally:
        proc.kill()
        print(proc.output()[-20000:])


@pytest.fixture(scope="module")
def idle_probe(upstream: LegacyServer, tmp_path_factory: pytest.TempPathFactory,
               ) -> Iterator[ShimProcess]:
    """The same with tcp_timeout=2 s."""
    proc = _start_probe(upstream, tmp_path_factory.mktemp("idle-probe"),
                        "--set", f"tcp_timeout={IDLE_TIMEOUT}")
    try:
        yield proc
    finally:
        proc.kill()
        print(proc.output()[-20000:])


# --- raw HTTP/1 helpers ---------------------------------------------------------------------

@dataclass
class Reply:
    """One response as read off the socket."""

    status: int
    headers: dict[str, str]
    """Lower-case names."""
    body: bytes
    raw: bytes


def unique(prefix: str) -> str:
    """A path no other test uses, so logs and the test server's records can be told apart."""
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


def connect(proc: ShimProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proc.port), timeout=IO_TIMEOUT)


def tls_context(alpn: list[str]) -> ssl.SSLContext:
    """Trust anything: mitmproxy makes up its certificate from the CA in its confdir."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(alpn)
    return context


def read_reply(sock: socket.socket) -> Reply:
    """One response: head, then a body of its Content-Length."""
    sock.settimeout(IO_TIMEOUT)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a whole response head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = (line.partition(":") for line in lines[1:])
    headers = {name.strip().lower(): value.strip() for name, _, value in fields}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed within the body: {data + rest!r}"
        rest += chunk
    return Reply(int(lines[0].split(" ")[1]), headers, rest[:length], head + b"\r\n\r\n" + rest)


def how_it_ends(sock: socket.socket, timeout: float = IO_TIMEOUT) -> str:
    """Read and drop until the peer closes: 'EOF' (FIN), 'reset' (RST) or 'open'."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except TimeoutError:
        return "open"
    return "EOF"


def send_until_refused(sock: socket.socket, limit: int) -> tuple[int, str]:
    """Send zeros until the peer stops the connection or ``limit`` bytes went out."""
    sent = 0
    chunk = bytes(64 * KIB)
    try:
        while sent < limit:
            sent += sock.send(chunk)
    except OSError as e:
        return sent, type(e).__name__
    return sent, "limit reached"


def big_head(path: str, value_bytes: int, extra: str = "") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: origin.test\r\n{extra}X-Big: ".encode()
            + b"v" * value_bytes + b"\r\n\r\n")


def probe_lines(proc: ShimProcess, path: str) -> list[str]:
    """The probe's hook lines about ``path``."""
    return [line for line in proc.output().splitlines()
            if "probe: " in line and path in line]


def assert_no_crash(proc: ShimProcess) -> None:
    output = proc.output()
    assert "Traceback" not in output and "has crashed" not in output, output[-5000:]


def assert_never_seen(proc: ShimProcess, upstream: LegacyServer, path: str) -> None:
    """Neither an addon hook nor the test server saw ``path``. A request sent after it, on
    a new connection, is awaited first: the proxy had every chance to forward the refused one."""
    marker = unique("/marker")
    sock = connect(proc)
    try:
        sock.sendall(f"GET {marker} HTTP/1.1\r\nHost: origin.test\r\n\r\n".encode())
        assert read_reply(sock).status == 201
    finally:
        sock.close()
    assert upstream.requests(path) == []
    assert not [line for line in probe_lines(proc, path) if "probe: requestheaders" in line]


def assert_431(reply: Reply) -> None:
    assert reply.status == 431, reply.raw[:300]
    assert reply.headers.get("connection", "").lower() == "close"
    assert reply.headers.get("content-type", "").startswith("text/plain")
    assert b"too large" in reply.body and str(LIMIT).encode() in reply.body


# --- 1. request-head limit ------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["one 70 KiB header", "70 headers of 1 KiB", "in pieces"])
def test_head_over_limit_gets_431_and_a_clean_close(
        probe: ShimProcess, upstream: LegacyServer, shape: str) -> None:
    """A 70 KiB head (limit 64 KiB) is answered 431 and the connection closed with a FIN
    after the answer; no hook sees it, nothing goes upstream. The shape of the head (one
    huge field, many fields, sent slowly in pieces) makes no difference."""
    path = unique("/h431")
    sock = connect(probe)
    try:
        if shape == "one 70 KiB header":
            sock.sendall(big_head(path, 70 * KIB))
        else:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: origin.test\r\n".encode())
            for i in range(70):
                sock.sendall(f"X-Field-{i}: ".encode() + b"f" * KIB + b"\r\n")
                if shape == "in pieces":
                    time.sleep(0.002)  # each piece its own read on the proxy's side
            sock.sendall(b"\r\n")
        assert_431(read_reply(sock))
        assert how_it_ends(sock) == "EOF"
    finally:
        sock.close()
    assert_never_seen(probe, upstream, path)
    assert_no_crash(probe)


def test_endless_head_gets_431_and_is_not_read_on(probe: ShimProcess, upstream: LegacyServer,
                                                  ) -> None:
    """A head that never ends (no blank line, bytes keep coming) is refused as soon as it
    passes 64 KiB; the client reads the 431 while it is still sending, and the proxy stops
    reading after a bounded amount instead of buffering without end."""
    path = unique("/endless")
    sock = connect(probe)
    replies: list[Reply] = []
    ends: list[str] = []

    def reader() -> None:
        replies.append(read_reply(sock))
        ends.append(how_it_ends(sock))

    thread = threading.Thread(target=reader, daemon=True)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: origin.test\r\nX-Endless: ".encode())
        thread.start()
        sent, why = send_until_refused(sock, 256 * MIB)
        thread.join(IO_TIMEOUT)
    finally:
        sock.close()
    assert replies, "no answer to an endless head"
    assert_431(replies[0])
    assert ends == ["EOF"]
    # the proxy dropped the connection after at most LINGER_BYTES, plus what the two
    # kernels' socket buffers held (a few MiB on loopback)
    assert why != "limit reached" and sent < LINGER_BYTES + 32 * MIB, (sent, why)
    assert_never_seen(probe, upstream, path)


def test_second_request_over_limit_on_a_kept_alive_connection(
        probe: ShimProcess, upstream: LegacyServer) -> None:
    """The limit applies to every request on a connection, not only to the first."""
    first, second = unique("/ka-first"), unique("/ka-second")
    sock = connect(probe)
    try:
        sock.sendall(f"GET {first} HTTP/1.1\r\nHost: origin.test\r\n\r\n".encode())
        assert read_reply(sock).status == 201
        sock.sendall(big_head(second, 70 * KIB))
        assert_431(read_reply(sock))
        assert how_it_ends(sock) == "EOF"
    finally:
        sock.close()
    assert len(upstream.requests(first)) == 1
    assert_never_seen(probe, upstream, second)


def test_head_under_limit_is_served(probe: ShimProcess, upstream: LegacyServer) -> None:
    """A 60 KiB head (limit 64 KiB) reaches the server whole and gets its answer."""
    path = unique("/h60k")
    sock = connect(probe)
    try:
        sock.sendall(big_head(path, 60 * KIB))
        reply = read_reply(sock)
    finally:
        sock.close()
    assert reply.status == 201, reply.raw[:300]
    [received] = upstream.requests(path)
    assert received.header("x-big") == "v" * 60 * KIB


def test_small_head_with_big_body_in_one_send_is_served(probe: ShimProcess,
                                                        upstream: LegacyServer) -> None:
    """The limit counts the head only: a small head followed at once by 1 MiB of body (one
    read on the proxy's side holds far more than 64 KiB) is served."""
    path = unique("/bigbody")
    body = b"b" * MIB
    sock = connect(probe)
    try:
        sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: origin.test\r\nContent-Length: {len(body)}"
                     "\r\n\r\n".encode() + body)
        reply = read_reply(sock)
    finally:
        sock.close()
    assert reply.status == 201, reply.raw[:300]
    [received] = upstream.requests(path)
    assert received.size == len(body) and received.complete


# --- 2. early answers -----------------------------------------------------------------------

def _discarded(proc: ShimProcess, port: int) -> int:
    """How many bytes the proxy drained and dropped after answering the client on ``port``."""
    match = proc.wait_for_output(rf"shim: closed 127\.0\.0\.1:{port} after discarding (\d+) bytes")
    return int(match.group(1))


def _assert_refused_early(proc: ShimProcess, upstream: LegacyServer, path: str, reply: Reply,
                          status: int) -> None:
    assert reply.status == status, reply.raw[:300]
    assert reply.body == f"refused by the probe: {status}\n".encode()
    assert reply.headers.get("connection", "").lower() == "close"
    proc.wait_for_output(rf"probe: error {re.escape(path)}: Connection killed\. .*"
                         rf"answered_early={status}")
    lines = probe_lines(proc, path)
    assert not [line for line in lines if "probe: request " in line or "probe: response" in line]
    assert upstream.requests(path) == []
    assert_no_crash(proc)


def test_early_413_reaches_a_client_announcing_1_gib(probe: ShimProcess,
                                                     upstream: LegacyServer) -> None:
    """Headers announce 1 GiB; the client sends 1 MiB and then reads: it gets the whole 413
    and a clean close, the proxy drained at most that 1 MiB (and read no further), the error
    hook ran, and nothing went upstream."""
    path = unique("/early/413")
    sock = connect(probe)
    try:
        port = sock.getsockname()[1]
        sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: origin.test\r\nContent-Length: {GIB}"
                     "\r\n\r\n".encode())
        sock.sendall(bytes(MIB))
        reply = read_reply(sock)
        assert how_it_ends(sock) == "EOF"
    finally:
        sock.close()
    _assert_refused_early(probe, upstream, path, reply, 413)
    assert _discarded(probe, port) <= MIB


@pytest.mark.parametrize("status", [409, 403])
def test_early_answer_reaches_a_client_that_keeps_sending(
        probe: ShimProcess, upstream: LegacyServer, status: int) -> None:
    """A client that keeps sending its 1 GiB (as curl does, reading meanwhile) gets the
    whole answer; the proxy drains at most LINGER_BYTES, then closes, so the client's
    sending fails long before 1 GiB."""
    path = unique(f"/early/{status}")
    sock = connect(probe)
    replies: list[Reply] = []
    thread = threading.Thread(target=lambda: replies.append(read_reply(sock)), daemon=True)
    try:
        port = sock.getsockname()[1]
        sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: origin.test\r\nContent-Length: {GIB}"
                     "\r\n\r\n".encode())
        thread.start()
        sent, why = send_until_refused(sock, GIB)
        thread.join(IO_TIMEOUT)
    finally:
        sock.close()
    assert replies, f"no answer; sent {sent} bytes ({why})"
    _assert_refused_early(probe, upstream, path, replies[0], status)
    assert why != "limit reached" and sent < LINGER_BYTES + 32 * MIB, (sent, why)
    assert _discarded(probe, port) <= LINGER_BYTES + 64 * KIB


def test_early_answer_instead_of_100_continue(probe: ShimProcess, upstream: LegacyServer,
                                              ) -> None:
    """A client waiting for `100 Continue` gets the final answer instead, and sends nothing."""
    path = unique("/early/413")
    sock = connect(probe)
    try:
        sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: origin.test\r\nExpect: 100-continue\r\n"
                     f"Content-Length: {GIB}\r\n\r\n".encode())
        reply = read_reply(sock)
        assert how_it_ends(sock) == "EOF"
    finally:
        sock.close()
    assert b"100 Continue" not in reply.raw
    _assert_refused_early(probe, upstream, path, reply, 413)


def test_early_answer_when_the_small_body_already_arrived(probe: ShimProcess,
                                                          upstream: LegacyServer) -> None:
    """A body sent with its head (all read before the hook answers) changes nothing."""
    path = unique("/early/409")
    sock = connect(probe)
    try:
        sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 5\r\n\r\n"
                     "hello".encode())
        reply = read_reply(sock)
        assert how_it_ends(sock) == "EOF"
    finally:
        sock.close()
    _assert_refused_early(probe, upstream, path, reply, 409)


def test_early_answer_over_tls(probe: ShimProcess, upstream: LegacyServer) -> None:
    """Through mitmproxy's TLS layer (HTTP/1.1 over TLS on the same port) as over TCP."""
    path = unique("/early/413")
    raw = connect(probe)
    sock = tls_context(["http/1.1"]).wrap_socket(raw, server_hostname="localhost")
    try:
        sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: origin.test\r\nContent-Length: {GIB}"
                     "\r\n\r\n".encode())
        sock.sendall(bytes(MIB))
        reply = read_reply(sock)
    finally:
        sock.close()
    _assert_refused_early(probe, upstream, path, reply, 413)


class Http2:
    """One HTTP/2 connection over TLS (ALPN h2), driven with the h2 package."""

    def __init__(self, proc: ShimProcess) -> None:
        self.sock = tls_context(["h2"]).wrap_socket(connect(proc), server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.flush()
        self.events: list[h2.events.Event] = []

    def flush(self) -> None:
        if data := self.conn.data_to_send():
            self.sock.sendall(data)

    def request(self, method: str, path: str, headers: list[tuple[str, str]],
                end: bool) -> int:
        stream_id: int = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [(":method", method), (":path", path),
                                           (":scheme", "https"), (":authority", "localhost"),
                                           *headers], end_stream=end)
        self.flush()
        return stream_id

    def until(self, stream_id: int, kind: type[h2.events.Event]) -> list[h2.events.Event]:
        """Read until an event of ``kind`` on the stream; the stream's events so far."""
        self.sock.settimeout(IO_TIMEOUT)
        while not any(isinstance(e, kind) and getattr(e, "stream_id", None) == stream_id
                      for e in self.events):
            data = self.sock.recv(65536)
            assert data, f"connection closed; events: {self.events}"
            for event in self.conn.receive_data(data):
                assert not isinstance(event, h2.events.ConnectionTerminated), event
                self.events.append(event)
            self.flush()
        return [e for e in self.events if getattr(e, "stream_id", None) == stream_id]

    def close(self) -> None:
        self.sock.close()


def _h2_reply(events: list[h2.events.Event]) -> tuple[int, bytes]:
    [head] = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    fields = {str(k): str(v) for k, v in head.headers or ()}  # str: header_encoding is set
    status = int(fields[":status"])
    return status, b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))


def test_early_answer_http2_resets_only_its_stream(probe: ShimProcess, upstream: LegacyServer,
                                                   ) -> None:
    """HTTP/2: the whole answer ends the stream, RST_STREAM(NO_ERROR) tells the client to stop
    sending (RFC 9113 8.1), and the connection serves the next request."""
    path, after = unique("/early/413"), unique("/after-early")
    client = Http2(probe)
    try:
        stream = client.request("PUT", path, [("content-length", str(GIB))], end=False)
        for _ in range(3):  # within the default 64 KiB flow-control window
            client.conn.send_data(stream, bytes(16 * KIB))
        client.flush()
        events = client.until(stream, h2.events.StreamReset)
        status, body = _h2_reply(events)
        assert status == 413 and body == b"refused by the probe: 413\n"
        assert any(isinstance(e, h2.events.StreamEnded) for e in events)
        [reset] = [e for e in events if isinstance(e, h2.events.StreamReset)]
        assert reset.error_code == 0
        next_stream = client.request("GET", after, [], end=True)
        assert _h2_reply(client.until(next_stream, h2.events.StreamEnded))[0] == 201
    finally:
        client.close()
    probe.wait_for_output(rf"probe: error {re.escape(path)}: Connection killed\.")
    assert upstream.requests(path) == [] and len(upstream.requests(after)) == 1
    assert_no_crash(probe)


def test_http2_head_over_limit_gets_431_on_its_stream(probe: ShimProcess,
                                                      upstream: LegacyServer) -> None:
    """HTTP/2: a 70 KiB header list gets 431 on its stream, no hook sees it, and the
    connection serves a 60 KiB one next."""
    path, after = unique("/h2-431"), unique("/h2-60k")
    client = Http2(probe)
    try:
        stream = client.request("GET", path, [("x-big", "v" * 70 * KIB)], end=True)
        status, body = _h2_reply(client.until(stream, h2.events.StreamEnded))
        assert status == 431 and str(LIMIT).encode() in body
        next_stream = client.request("GET", after, [("x-big", "v" * 60 * KIB)], end=True)
        assert _h2_reply(client.until(next_stream, h2.events.StreamEnded))[0] == 201
    finally:
        client.close()
    assert_never_seen(probe, upstream, path)
    [received] = upstream.requests(after)
    assert received.header("x-big") == "v" * 60 * KIB


# --- 3. idle clients (tcp_timeout) ----------------------------------------------------------

def _seconds_until_closed(sock: socket.socket) -> tuple[float, str]:
    start = time.monotonic()
    end = how_it_ends(sock, timeout=30.0)
    return time.monotonic() - start, end


@pytest.mark.parametrize("what", ["claimed, head only", "claimed, half the body",
                                  "unclaimed, half the body", "head without its blank line"])
def test_idle_client_is_closed_after_tcp_timeout(idle_probe: ShimProcess, what: str) -> None:
    """A client that stops sending is closed tcp_timeout (2 s) after its last byte, whether
    its body is being streamed to a sink (as the shim claims uploads), buffered, or its head
    is unfinished; a claimed flow's error hook then sees the bytes that had arrived."""
    prefix = "/plain" if what.startswith("unclaimed") else "/claim"
    path = unique(prefix)
    head = f"PUT {path} HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 100000\r\n".encode()
    data = {"claimed, head only": head + b"\r\n",
            "claimed, half the body": head + b"\r\n" + bytes(50000),
            "unclaimed, half the body": head + b"\r\n" + bytes(50000),
            "head without its blank line": head}[what]
    sock = connect(idle_probe)
    try:
        sock.sendall(data)
        seconds, end = _seconds_until_closed(sock)
    finally:
        sock.close()
    assert end != "open"
    assert IDLE_TIMEOUT - 0.5 <= seconds <= IDLE_TIMEOUT + 4, seconds
    if what.startswith("claimed"):
        received = 50000 if "half" in what else 0
        idle_probe.wait_for_output(rf"probe: error {re.escape(path)}: .*received={received} ")


def test_idle_client_during_an_awaiting_requestheaders_hook(idle_probe: ShimProcess) -> None:
    """A client idle while a 4 s requestheaders hook awaits is closed, and the flow ends in
    its error hook once the hook has returned, with the bytes that had arrived; no crash.

    When it is closed is a race in mitmproxy 12.2's TimeoutWatchdog.watch: hooks disarm the
    timer, but after its sleep the watchdog checks only `last_activity + timeout < now`, not
    whether a hook is running. If the head arrived within the event loop's wake-up lateness
    of the activity the sleep was computed from (the connection's creation, for a head sent
    at once), the client is closed tcp_timeout after its last byte, in the middle of the
    hook (2.0 s here); otherwise tcp_timeout after the hook returned (6.0 s). Both seen."""
    path = unique("/slowhook/4")
    sock = connect(idle_probe)
    try:
        sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: origin.test\r\nContent-Length: 100000\r\n"
                     "\r\n".encode() + bytes(50000))
        seconds, end = _seconds_until_closed(sock)
    finally:
        sock.close()
    assert end != "open"
    assert IDLE_TIMEOUT - 0.5 <= seconds <= 4 + IDLE_TIMEOUT + 4, seconds
    idle_probe.wait_for_output(rf"probe: slowhook done {re.escape(path)}")
    idle_probe.wait_for_output(rf"probe: error {re.escape(path)}: .*peer closed connection "
                               r"without sending complete message body \(received 50000 bytes")
    assert_no_crash(idle_probe)
