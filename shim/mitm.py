"""The only place the shim reaches into mitmproxy internals (not API; pinned to 12.2.x in
pyproject.toml). Every lookup is guarded: a client that is already gone is not an error."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from mitmproxy import ctx, http
from mitmproxy.connection import Client
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import HttpLayer, SendHttp
from mitmproxy.proxy.layers.http._events import ResponseHeaders

log = logging.getLogger("shim.mitm")


def close_client(flow: http.HTTPFlow, reason: str) -> bool:
    """Close the client connection of a flow whose body is still arriving, the way mitmproxy's
    own inactivity timeout does (ConnectionHandler.on_timeout); its `error` hook then runs.

    Used to end an earlier request on an upload when a new one arrives (IETF resumable
    uploads draft, "Concurrency"; also how tusd releases stale locks). On HTTP/2 this closes
    the whole connection, not only the stream."""
    try:
        proxyserver = ctx.master.addons.get("proxyserver")
        handler = proxyserver.connections[flow.client_conn.id]
        task = handler.transports[handler.client].handler
    except (AttributeError, KeyError):
        return False
    if task is None:
        return False
    log.info("shim: closing %s: %s", flow.client_conn.peername, reason)
    task.cancel(reason)
    return True


class _InterimSource:
    """Stands where an HttpStream would in HttpLayer.command_sources: when its command
    'completes', it emits the interim response on the flow's stream."""

    def __init__(self, stream_id: int, response: http.Response, client: Client) -> None:
        self.stream_id = stream_id
        self.response = response
        self.client = client

    def handle_event(self, event: object) -> Iterator[object]:
        yield SendHttp(ResponseHeaders(self.stream_id, self.response, False), self.client)


async def send_interim(flow: http.HTTPFlow, status: int, reason: str,
                       headers: list[tuple[str, str]]) -> bool:
    """Send a 1xx (e.g. 104 Upload Resumption Supported) before the request body is read.

    mitmproxy has no API for this. Its HTTP layer emits `100 Continue` as a ResponseHeaders
    event on the stream; this sends a 104 the same way, through a one-shot command source, so
    it works for HTTP/1.1, TLS and HTTP/2 alike (MITMPROXY.md, "Sending a 104"). Call it from
    an async `requestheaders` hook. False when the connection or stream is gone."""
    try:
        handler = ctx.master.addons.get("proxyserver").connections[flow.client_conn.id]
        layer = _http_layer(handler.layer)
        stream_id = next(sid for sid, stream in layer.streams.items() if stream.flow is flow)
    except (AttributeError, KeyError, LookupError, StopIteration):
        log.info("shim: no live stream for an interim %d", status)
        return False
    response = http.Response.make(status, b"", [(k.encode(), v.encode()) for k, v in headers])
    response.reason = reason
    response.headers.pop("content-length", None)
    wakeup = commands.RequestWakeup(0)
    layer.command_sources[wakeup] = _InterimSource(stream_id, response, flow.client_conn)  # type: ignore[assignment]
    await handler.server_event(events.Wakeup(wakeup))
    return True


def _http_layer(layer: object) -> HttpLayer:
    for _ in range(16):  # NextLayer -> proxy mode -> TLS -> NextLayer -> HttpLayer, or so
        if isinstance(layer, HttpLayer):
            return layer
        layer = getattr(layer, "layer", None) or getattr(layer, "child_layer", None)
    raise LookupError("no HTTP layer on this connection")
