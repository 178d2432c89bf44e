"""The admin listener (`admin.listen`, off the public port): `/healthz` (the process
answers), `/readyz` (the store is writable and the legacy server reachable) and `/metrics`
(Prometheus text format). A tiny h11 server, as the sink is: nothing here blocks the loop."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import h11
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shim.metrics import Metrics
from shim.sink import SmallServer

log = logging.getLogger("shim.admin")

ReadyCheck = Callable[[], Awaitable[str | None]]
"""None when ready, else why not (one line)."""


class Admin(SmallServer):
    def __init__(self, metrics: Metrics, ready: ReadyCheck) -> None:
        super().__init__()
        self.metrics = metrics
        self.ready = ready

    async def answer(self, request: h11.Request) -> tuple[int, list[tuple[str, str]], bytes]:
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

def _text(status: int, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    return status, [("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(body)))], body
