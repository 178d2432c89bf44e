"""A tiny in-process HTTP/1.1 server that streamed request bodies are routed to.

mitmproxy hands a body to an addon chunk by chunk only while it streams the request to some
server (MITMPROXY.md, "Receiving a body chunk by chunk"). The shim's stream callable writes
each chunk to disk and passes nothing on, so this sink only ever sees a request head and an
empty chunked body, and answers 204; the addon replaces that answer in its `response` hook.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import h11


class SmallServer:
    """A tiny in-process HTTP/1.1 server on the event loop (the sink, the admin listener):
    `answer` says what each request gets."""

    max_head = 16 * 1024

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def answer(self, request: h11.Request) -> tuple[int, list[tuple[str, str]], bytes]:
        return 204, [], b""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_http(reader, writer, self.answer, self.max_head)


class Sink(SmallServer):
    """Answers every request 204 once its (empty) body has ended."""

    def __init__(self) -> None:
        super().__init__()
        self.max_head = 64 * 1024
        """The largest request head it reads; set to the shim's own limit plus what mitmproxy
        adds, so that every head the shim accepts reaches it (h11's default is 16 KiB)."""


Respond = Callable[[h11.Request], Awaitable[tuple[int, list[tuple[str, str]], bytes]]]
"""Status, fields and body for a request whose whole message has arrived."""


async def serve_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     respond: Respond, max_head: int = 16 * 1024) -> None:
    """One keep-alive HTTP/1.1 connection of a tiny in-process server (the sink, the admin
    listener): each request is answered once its message has ended."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
    request: h11.Request | None = None
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data:
                    return
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                status, headers, body = await respond(request)
                writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
                if body and request.method != b"HEAD":
                    writer.write(conn.send(h11.Data(data=body)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return
    except (h11.ProtocolError, ConnectionError):
        return
    finally:
        writer.close()
