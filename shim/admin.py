"""The admin listener (`admin.listen`, off the public port): `/healthz` (the process
answers), `/readyz` (the store is writable and the legacy server reachable) and `/metrics`
(Prometheus text format). A tiny h11 server, as the sink is: nothing here blocks the loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import h11
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shim.metrics import Metrics

log = logging.getLogger("shim.admin")

ReadyCheck = Callable[[], Awaitable[str | None]]
"""None when ready, else why not (one line)."""


class Admin:
    def __init__(self, metrics: Metrics, ready: ReadyCheck) -> None:
        self.metrics = metrics
        self.ready = ready
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _answer(self, target: bytes) -> tuple[int, str, bytes]:
        path = target.split(b"?")[0]
        if path == b"/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == b"/readyz":
            problem = await self.ready()
            if problem is None:
                return 200, "text/plain; charset=utf-8", b"ready\n"
            return 503, "text/plain; charset=utf-8", f"not ready: {problem}\n".encode()
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)
        return 404, "text/plain; charset=utf-8", b"/healthz, /readyz or /metrics\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    if not data:
                        return
                elif isinstance(event, h11.Request):
                    status, content_type, body = await self._answer(event.target)
                    headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
                    writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
                    if event.method != b"HEAD":
                        writer.write(conn.send(h11.Data(data=body)) or b"")
                    writer.write(conn.send(h11.EndOfMessage()) or b"")
                    await writer.drain()
                elif isinstance(event, h11.EndOfMessage):
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (h11.ProtocolError, ConnectionError):
            return
        finally:
            writer.close()
