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
from shim.sink import serve_http

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

    async def _answer(self, request: h11.Request) -> tuple[int, list[tuple[str, str]], bytes]:
        path = request.target.split(b"?")[0]
        if path == b"/healthz":
            return _text(200, b"ok\n")
        if path == b"/readyz":
            problem = await self.ready()
            if problem is None:
                return _text(200, b"ready\n")
            return _text(503, f"not ready: {problem}\n".encode())
        if path == b"/metrics":
            body = generate_latest(self.metrics.registry)
            return 200, [("Content-Type", CONTENT_TYPE_LATEST),
                         ("Content-Length", str(len(body)))], body
        return _text(404, b"/healthz, /readyz or /metrics\n")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_http(reader, writer, self._answer)


def _text(status: int, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    return status, [("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(body)))], body
