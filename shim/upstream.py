"""The only code that talks to the legacy server: ONE complete request, streamed from disk.

Uses h11 (already a mitmproxy dependency) over an asyncio connection, draining after each
chunk so that memory stays flat whatever the file size.

A delivery reaches the legacy server as mitmproxy's pass-through reaches it: TLS made with the
same options (`UpstreamTLS`: trusted CA file and folder, client certificate, verification off)
and the same `Host` (`delivery_host`: the legacy server's authority, or with mitmproxy's
`keep_host_header` the client's own), so a legacy server that works for one works for both.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from urllib.parse import urlsplit

import certifi
import h11

from shim.model import Answer, HeaderList, Target
from shim.store import FileRange
from shim.targets import HOP_BY_HOP
from shim.wire import as_bytes

MAX_ANSWER_BODY = 1024 * 1024
"""The legacy server's answer body is kept (and replayed) up to this size."""
SLICE = 64 * 1024 * 1024
"""Bytes handed to one sendfile call (Upstream._send_range)."""
_TCP_INFO_BYTES_ACKED = slice(120, 128)
"""Where Linux's struct tcp_info holds tcpi_bytes_acked (a u64, since Linux 4.1)."""
SEND_BUFFER = 256 * 1024
"""The kernel's send buffer for a delivery (SO_SNDBUF; Linux doubles it)."""

_MANAGED_HEADERS = HOP_BY_HOP | {"content-type"}
"""Fields the delivery sets itself; the target's own are dropped."""


class UpstreamError(Exception):
    """The legacy server gave no answer."""


class Unreachable(UpstreamError):
    """No answer, and the legacy server cannot have received a whole request: safe to retry."""


class OutcomeUnknown(UpstreamError):
    """The whole file was sent, then no answer came: the legacy server may have acted on it."""


class UpstreamTLSError(OSError):
    """A TLS setting cannot be used (a CA file, CA folder or client certificate that does not
    load). An OSError, so that a delivery or preflight meeting it is "cannot connect" (retried,
    or 503), as it is when mitmproxy's pass-through meets it; check it at start-up with
    `UpstreamTLS.check` to say so at once."""


@dataclass(frozen=True)
class UpstreamTLS:
    """How to make TLS to an https legacy server: mitmproxy's options for its own upstream
    connections, so that deliveries and preflights trust what pass-through trusts.

    * `verify`: not `ssl_insecure`. Off: no certificate or host name check (and, as
      mitmproxy, legacy renegotiation allowed).
    * `ca_file` (`ssl_verify_upstream_trusted_ca`), `ca_dir`
      (`ssl_verify_upstream_trusted_confdir`, a c_rehash folder): the trusted CAs. With
      neither, certifi's bundle, as mitmproxy (not the system store: a CA only the system
      trusts fails pass-through too, and would be a difference between the two).
    * `client_cert` (`client_certs`): a PEM file with key and certificate chain, or a folder
      holding `<host>.pem` for the legacy server's host (none there: no client certificate).

    The host name (or IP address) checked is the legacy server's host, which is what
    mitmproxy's reverse mode sends as SNI."""

    verify: bool = True
    ca_file: str | None = None
    ca_dir: str | None = None
    client_cert: str | None = None

    @classmethod
    def from_options(cls, options: object) -> UpstreamTLS:
        """The settings from mitmproxy's options (`ctx.options`), by the names mitmproxy
        reads them under (mitmproxy/addons/tlsconfig.py, `tls_start_server`)."""

        def text(name: str) -> str | None:
            value = getattr(options, name, None)
            return value if isinstance(value, str) and value else None

        return cls(verify=not getattr(options, "ssl_insecure", False),
                   ca_file=text("ssl_verify_upstream_trusted_ca"),
                   ca_dir=text("ssl_verify_upstream_trusted_confdir"),
                   client_cert=text("client_certs"))

    def client_cert_for(self, server_name: str) -> str | None:
        """The client certificate file for `server_name`, as mitmproxy picks it: `client_cert`
        itself when it is a file, else `<folder>/<server_name>.pem` if that exists."""
        if not self.client_cert:
            return None
        path = os.path.expanduser(self.client_cert)
        if os.path.isfile(path):
            return path
        candidate = os.path.join(path, f"{server_name}.pem")
        return candidate if os.path.isfile(candidate) else None

    def context(self, server_name: str) -> ssl.SSLContext:
        """The client context for a connection to `server_name` (built once, then reused).
        Raises UpstreamTLSError when a file named in the settings does not load."""
        return _tls_context(self, server_name)

    def check(self, server_name: str) -> None:
        """Raise UpstreamTLSError now if a connection to `server_name` could not be made
        with these settings (for start-up, so the operator hears of it at once)."""
        self.context(server_name)


@functools.lru_cache(maxsize=32)
def _tls_context(tls: UpstreamTLS, server_name: str) -> ssl.SSLContext:
    """As mitmproxy's `create_proxy_server_context` (mitmproxy/net/tls.py) makes it. Cached as
    mitmproxy caches its own: files are read once, when first needed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # TLS 1.2 at least, as mitmproxy
    # mitmproxy checks subjectAltName only (X509_CHECK_FLAG_NEVER_CHECK_SUBJECT), as browsers.
    context.hostname_checks_common_name = False
    ca_file, ca_dir = tls.ca_file, tls.ca_dir
    if ca_file is None and ca_dir is None:
        ca_file = certifi.where()
    try:
        context.load_verify_locations(cafile=ca_file, capath=ca_dir)
    except (OSError, ValueError) as exc:
        raise UpstreamTLSError(f"cannot load the trusted CA certificates (file {ca_file!r}, "
                               f"folder {ca_dir!r}) for the legacy server: {exc}") from exc
    client_cert = tls.client_cert_for(server_name)
    if client_cert is not None:
        try:
            # The key and the chain in one PEM file, as mitmproxy reads it; an encrypted key
            # fails here instead of prompting on a terminal nobody watches.
            context.load_cert_chain(client_cert, password=_no_password)
        except (OSError, ValueError) as exc:
            raise UpstreamTLSError(f"cannot load the client certificate {client_cert!r} for "
                                   f"the legacy server: {exc}") from exc
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.options |= ssl.OP_LEGACY_SERVER_CONNECT  # as mitmproxy with ssl_insecure
    context.set_alpn_protocols(["http/1.1"])  # all a delivery speaks
    return context


def _no_password() -> bytes:
    return b""


_HANDSHAKE_ALERTS = frozenset({
    "SSLV3_ALERT_HANDSHAKE_FAILURE", "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV1_ALERT_UNKNOWN_CA",
    "TLSV1_ALERT_ACCESS_DENIED", "TLSV1_ALERT_DECRYPT_ERROR", "TLSV1_ALERT_INSUFFICIENT_SECURITY",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
})
"""TLS alerts (RFC 8446 section 6.2) a server sends only while it refuses the handshake."""


def _refused_handshake(exc: BaseException) -> bool:
    """The legacy server refused the TLS handshake (no client certificate, one it does not
    take): it cannot have read a byte of the request. With TLS 1.3 the client finishes its
    side of the handshake first and may send the whole file before the server's alert comes
    (RFC 8446 section 4.4.2.4), which must not be taken for "sent, outcome unknown"."""
    return isinstance(exc, ssl.SSLError) and exc.reason in _HANDSHAKE_ALERTS


def delivery_host(origin: Origin, target: Target, keep_host: bool) -> str:
    """The `Host` a delivery (and its preflight) sends: the legacy server's authority, as
    mitmproxy's reverse mode rewrites it; with `keep_host` (mitmproxy's `keep_host_header`)
    the creating request's own Host, as pass-through would send it, when it had one."""
    return target.host if keep_host and target.host else origin.authority


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) origin: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port)

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True)
class Framing:
    """How the file's bytes are wrapped: nothing (raw) or one multipart/form-data part."""

    content_type: str | None
    head: bytes = b""
    tail: bytes = b""

    @classmethod
    def for_target(cls, target: Target) -> Framing:
        if target.body == "raw":
            return cls(target.content_type)
        boundary = f"shim-{secrets.token_hex(16)}"
        filename = (target.filename or "upload").translate(_FORM_ESCAPES)
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{target.field.translate(_FORM_ESCAPES)}"; '
            f'filename="{filename}"\r\n'
            f"Content-Type: {target.content_type or 'application/octet-stream'}\r\n\r\n"
        )
        tail = f"\r\n--{boundary}--\r\n"
        return cls(f"multipart/form-data; boundary={boundary}", head.encode(), tail.encode())


# The WHATWG HTML form encoding's escapes for names and filenames in multipart/form-data.
_FORM_ESCAPES = str.maketrans({'"': "%22", "\r": "%0D", "\n": "%0A"})


class Upstream:
    """Sends one finished file and reads the answer, early or late.

    `timeout` is an idle timeout: each connect, write and read must make progress within it,
    so a slow but progressing legacy server is never cut off. `tls` is how an https legacy
    server is reached (a bool: `UpstreamTLS(verify=that)`); `keep_host` sends the creating
    request's Host instead of the legacy server's authority (`delivery_host`)."""

    def __init__(self, origin: Origin, timeout: float, tls: UpstreamTLS | bool = True,
                 keep_host: bool = False) -> None:
        self.origin = origin
        self.timeout = timeout
        self.tls = tls if isinstance(tls, UpstreamTLS) else UpstreamTLS(verify=tls)
        self.keep_host = keep_host

    async def send(self, target: Target, length: int, body: AsyncIterator[bytes | FileRange],
                   extra: HeaderList = ()) -> Answer:
        """Send `target` with `length` bytes of `body` (and `extra` header fields); a
        FileRange goes with sendfile(2), so its bytes never pass through Python.

        The answer is read while the body is still being sent (RFC 9112 section 9.5 lets a
        server answer early, as nginx does with 413): an early answer stops the sending and
        is returned. Raises Unreachable when the legacy server cannot have seen a whole
        request, OutcomeUnknown when it may have."""
        framing = Framing.for_target(target)
        try:
            reader, writer = await self._timed(self._connect())
        except (OSError, TimeoutError) as exc:
            raise Unreachable(f"cannot connect to {self.origin.authority}: {exc!r}") from exc
        conn = h11.Connection(h11.CLIENT)
        sending = asyncio.Event()
        answer = asyncio.ensure_future(self._read_answer(conn, reader, sending))
        sent_all = False
        try:
            total = len(framing.head) + length + len(framing.tail)
            head = h11.Request(method=target.method, target=target.path,
                               headers=self._headers(target, framing, total, extra))
            try:
                sent_all = await self._send_all(conn, writer, head, framing, body, answer)
                sending.set()
            except (OSError, TimeoutError, h11.ProtocolError) as exc:
                sending.set()
                if not answer.done():  # the server may have answered and closed: look first
                    await asyncio.wait([answer], timeout=min(self.timeout, 5.0))
                if not answer.done() or answer.exception() is not None:
                    raise Unreachable(f"{self.origin.authority} broke off the delivery "
                                      f"before the whole file was sent: {exc!r}") from exc
            try:
                return await answer
            except (OSError, TimeoutError, h11.ProtocolError, UpstreamError) as exc:
                if sent_all and not _refused_handshake(exc):
                    raise OutcomeUnknown(f"the whole file was sent, then {exc}") from exc
                raise Unreachable(f"{self.origin.authority} broke off: {exc!r}") from exc
        finally:
            answer.cancel()
            writer.close()

    async def _send_all(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                        head: h11.Request, framing: Framing,
                        body: AsyncIterator[bytes | FileRange],
                        answer: asyncio.Future[Answer]) -> bool:
        """Whether the whole request went out. A server that reads it all and then closes
        may end `answer` before this returns: only an answer (or close) that came while bytes
        were still to send means the legacy server cannot have seen the whole file."""
        await self._put(writer, conn.send(head))
        await self._put(writer, conn.send(h11.Data(data=framing.head)))
        async for chunk in body:
            if answer.done():
                return False  # answered early: the rest is not wanted
            if isinstance(chunk, FileRange):
                if not await self._send_range(conn, writer, chunk, answer):
                    return False
            else:
                await self._put(writer, conn.send(h11.Data(data=chunk)))
        await self._put(writer, conn.send(h11.Data(data=framing.tail)))
        await self._put(writer, conn.send(h11.EndOfMessage()))
        return True

    async def _send_range(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                          piece: FileRange, answer: asyncio.Future[Answer]) -> bool:
        """One range of a data file, by sendfile (read and written in Python over TLS), in
        SLICE-sized calls (few large ones are what makes sendfile fast), with a look at an
        early answer between them. h11 counts the bytes without seeing them (its "sendfile"
        support: an object with a length passes `send_with_data_passthrough`)."""
        conn.send_with_data_passthrough(h11.Data(data=piece))  # type: ignore[arg-type]
        position, end = piece.offset, piece.offset + piece.count
        while position < end and not answer.done():
            size = min(SLICE, end - position)
            sent = await self._watched(writer, loop_sendfile(writer, piece, position, size))
            if sent != size:
                raise OSError(f"the data file ended {size - sent} bytes early")
            position += sent
        return position == end

    async def _watched(self, writer: asyncio.StreamWriter, sending: Awaitable[int]) -> int:
        """Await a sendfile call under the idle timeout, counted on progress: it fails only
        when the legacy server acknowledged no byte for `timeout` seconds (TCP_INFO), however
        long the whole call takes. Where the kernel does not say, the call as a whole gets
        `timeout`."""
        sock = writer.get_extra_info("socket")
        acked = _bytes_acked(sock)
        if acked is None:
            return await self._timed(sending)
        task = asyncio.ensure_future(sending)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.timeout)
                if done:
                    return task.result()
                now = _bytes_acked(sock)
                if now is None or now == acked:
                    raise TimeoutError(f"no byte taken in {self.timeout}s")
                acked = now
        finally:
            task.cancel()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        context = self.tls.context(self.origin.host) if self.origin.scheme == "https" else None
        reader, writer = await asyncio.open_connection(self.origin.host, self.origin.port,
                                                       ssl=context)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Bytes the kernel holds are bytes whose progress the idle timeout cannot see: keep
            # them few, so a slow but steady legacy server is told apart from a dead one.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        return reader, writer

    def _headers(self, target: Target, framing: Framing, total: int,
                 extra: HeaderList) -> list[tuple[bytes, bytes]]:
        headers = [("Host", delivery_host(self.origin, target, self.keep_host)),
                   ("Content-Length", str(total))]
        if framing.content_type:
            headers.append(("Content-Type", framing.content_type))
        headers += [(k, v) for k, v in (*target.headers, *extra)
                    if k.lower() not in _MANAGED_HEADERS]
        return [(as_bytes(k), as_bytes(v)) for k, v in headers]  # obs-text as received

    async def _put(self, writer: asyncio.StreamWriter, data: bytes | None) -> None:
        if data:
            writer.write(data)
            await self._timed(writer.drain())

    async def _receive(self, reader: asyncio.StreamReader, sending: asyncio.Event) -> bytes:
        """The next bytes of the answer. While the request is still being sent, the sending
        side's own timeouts watch the legacy server; once it is all sent, silence longer
        than the idle timeout (counted from then, or from the last bytes received) is one."""
        read = asyncio.ensure_future(reader.read(65536))
        try:
            if not sending.is_set():
                sent = asyncio.ensure_future(sending.wait())
                await asyncio.wait({read, sent}, return_when=asyncio.FIRST_COMPLETED)
                sent.cancel()
            return await asyncio.wait_for(asyncio.shield(read), self.timeout)
        finally:
            read.cancel()

    async def _timed[T](self, step: Awaitable[T]) -> T:
        async with asyncio.timeout(self.timeout):
            return await step

    async def _read_answer(self, conn: h11.Connection, reader: asyncio.StreamReader,
                           sending: asyncio.Event) -> Answer:
        response: h11.Response | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await self._receive(reader, sending)
                if not data and response is None:
                    raise UpstreamError("the legacy server closed the connection without an answer")
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data[: max(0, MAX_ANSWER_BODY - len(body))]
            elif isinstance(event, h11.EndOfMessage) and response is not None:
                headers = tuple((k.decode("latin-1"), v.decode("latin-1"))
                                for k, v in response.headers)
                return Answer(response.status_code, response.reason.decode("latin-1"), headers,
                              bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                raise UpstreamError("the legacy server closed the connection without an answer")


def loop_sendfile(writer: asyncio.StreamWriter, piece: FileRange, offset: int,
                  count: int) -> Awaitable[int]:
    """`count` bytes of `piece`'s file from `offset` onto the writer's transport."""
    return asyncio.get_running_loop().sendfile(writer.transport, piece.file, offset, count)


def _bytes_acked(sock: socket.socket | None) -> int | None:
    """The bytes the peer has acknowledged on `sock` (progress the idle timeout can see), or
    None where the kernel does not say."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if sock is None or tcp_info is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 256)
    except OSError:
        return None
    if len(info) < _TCP_INFO_BYTES_ACKED.stop:
        return None
    return int.from_bytes(info[_TCP_INFO_BYTES_ACKED], sys.byteorder)
