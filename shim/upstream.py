"""The only code that talks to the legacy server: ONE complete request, streamed from disk.

Uses h11 (already a mitmproxy dependency) over an asyncio connection, draining after each
chunk so that memory stays flat whatever the file size.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

from shim.model import Answer, HeaderList, Target
from shim.targets import HOP_BY_HOP
from shim.wire import as_bytes

MAX_ANSWER_BODY = 1024 * 1024
SEND_BUFFER = 256 * 1024
"""The kernel's send buffer for a delivery (SO_SNDBUF; Linux doubles it)."""
"""The legacy server's answer body is kept (and replayed) up to this size."""

_MANAGED_HEADERS = HOP_BY_HOP | {"content-type"}
"""Fields the delivery sets itself; the target's own are dropped."""


class UpstreamError(Exception):
    """The legacy server gave no answer."""


class Unreachable(UpstreamError):
    """No answer, and the legacy server cannot have received a whole request: safe to retry."""


class OutcomeUnknown(UpstreamError):
    """The whole file was sent, then no answer came: the legacy server may have acted on it."""


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
    so a slow but progressing legacy server is never cut off."""

    def __init__(self, origin: Origin, timeout: float, verify_tls: bool = True) -> None:
        self.origin = origin
        self.timeout = timeout
        self.verify_tls = verify_tls

    async def send(self, target: Target, length: int, body: AsyncIterator[bytes],
                   extra: HeaderList = ()) -> Answer:
        """Send `target` with `length` bytes of `body` (and `extra` header fields).

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
                await self._send_all(conn, writer, head, framing, body, answer)
                sent_all = not answer.done()
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
                if sent_all:
                    raise OutcomeUnknown(f"the whole file was sent, then {exc}") from exc
                raise Unreachable(f"{self.origin.authority} broke off: {exc!r}") from exc
        finally:
            answer.cancel()
            writer.close()

    async def _send_all(self, conn: h11.Connection, writer: asyncio.StreamWriter,
                        head: h11.Request, framing: Framing, body: AsyncIterator[bytes],
                        answer: asyncio.Future[Answer]) -> None:
        await self._put(writer, conn.send(head))
        await self._put(writer, conn.send(h11.Data(data=framing.head)))
        async for chunk in body:
            if answer.done():
                return  # answered early: the rest is not wanted
            await self._put(writer, conn.send(h11.Data(data=chunk)))
        await self._put(writer, conn.send(h11.Data(data=framing.tail)))
        await self._put(writer, conn.send(h11.EndOfMessage()))

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        context: ssl.SSLContext | None = None
        if self.origin.scheme == "https":
            context = ssl.create_default_context()
            if not self.verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
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
        headers = [("Host", self.origin.authority), ("Content-Length", str(total))]
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


