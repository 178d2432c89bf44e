"""The only place the shim reaches into mitmproxy internals (not API; pinned to 12.2.x in
pyproject.toml). Every lookup is guarded: a client that is already gone is not an error."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Generator, Iterator
from typing import Any

from h2 import events as h2_events
from mitmproxy import ctx, http
from mitmproxy.connection import Client, ConnectionState
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import DropStream, HttpLayer, SendHttp
from mitmproxy.proxy.layers.http._events import (
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
)
from mitmproxy.proxy.layers.http._http1 import Http1Server
from mitmproxy.proxy.layers.http._http2 import Http2Server
from mitmproxy.utils import human

log = logging.getLogger("shim.mitm")


def _client_transport(flow: http.HTTPFlow) -> Any:
    """mitmproxy's transport record of the flow's client connection, or None when it is gone
    (its `handler` task reads the connection; its `writer` holds the asyncio transport)."""
    try:
        proxyserver = ctx.master.addons.get("proxyserver")
        handler = proxyserver.connections[flow.client_conn.id]
        return handler.transports[handler.client]
    except (AttributeError, KeyError):
        return None


def close_client(flow: http.HTTPFlow, reason: str) -> bool:
    """Close the client connection of a flow whose body is still arriving, the way mitmproxy's
    own inactivity timeout does (ConnectionHandler.on_timeout); its `error` hook then runs.

    Used to end an earlier request on an upload when a new one arrives (IETF resumable
    uploads draft, "Concurrency"; also how tusd releases stale locks). On HTTP/2 this closes
    the whole connection, not only the stream."""
    client = _client_transport(flow)
    task = client.handler if client is not None else None
    if task is None:
        return False
    log.info("shim: closing %s: %s", flow.client_conn.peername, reason)
    task.cancel(reason)
    return True


def hold_client(flow: http.HTTPFlow) -> Callable[[], None] | None:
    """Stop reading from the flow's client connection (TCP flow control then slows the
    client down); returns what reads from it again, or None when the connection is gone.
    On HTTP/2 this holds every stream of the connection."""
    client = _client_transport(flow)
    writer = client.writer if client is not None else None
    if writer is None or writer.transport.is_closing():
        return None
    transport = writer.transport
    transport.pause_reading()

    def resume() -> None:
        if not transport.is_closing():
            transport.resume_reading()

    return resume


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


# --- Request-head size limit (issue 9, item 4) -------------------------------------------

_HEAD_LIMIT_ATTR = "_shim_head_limit"
"""Where the limit lives: a class attribute of Http1Server/Http2Server, so that the latest
value wins and a re-imported shim.mitm (script reload) finds the patch already in place."""
_ORIGINAL_ATTR = "_shim_original"
_BLANK_LINE = re.compile(rb"\n\r?\n")  # what h11's ReceiveBuffer.maybe_extract_lines ends a head on
LINGER_SECONDS = 2.0
"""How long a refused HTTP/1 connection is drained after the answer (nginx's lingering_time
idea): closing a socket with unread bytes makes the kernel send RST, which can destroy the
answer before the client has read it."""
LINGER_BYTES = 16 * 1024 * 1024
"""How much a refused HTTP/1 connection may still send (discarded) before it is closed."""


def limit_request_heads(max_bytes: int) -> None:
    """Refuse HTTP/1 request heads larger than ``max_bytes`` with 431 and close the connection.

    mitmproxy's Http1Server.read_headers buffers a head without bound until its blank line
    (`# FIXME: protect against header size DoS`). This wraps it once per process: past the
    limit, whether the head is complete or still arriving, the client gets `431 Request Header
    Fields Too Large` (text body, `Connection: close`), the connection is drained for a bounded
    time and closed; no addon hook and no upstream sees the request. On HTTP/2 a request whose
    header list (counted as HTTP/1 lines) is larger gets the same 431 on its stream, which is
    then reset (NO_ERROR); the connection stays up. h2's HPACK decoder keeps a hard limit of
    twice the limit (advertised as SETTINGS_MAX_HEADER_LIST_SIZE): past it h2 ends the whole
    connection (GOAWAY), because the HPACK state is lost. ``max_bytes`` <= 0 lifts the limit.

    Idempotent: the first call installs the hooks, every call sets the limit, which applies
    at once (the HTTP/2 hard limit: to connections opened afterwards). If mitmproxy's
    internals are not what this was written against, it logs a warning and does nothing."""
    try:
        from mitmproxy.proxy.layers.http import _http1, _http2

        h1: Any = _http1.Http1Server
        h2: Any = _http2.Http2Server
        targets = (h1.read_headers, h2.__init__, h2.handle_h2_event)
        _ = (commands.CloseTcpConnection, commands.RequestWakeup, events.Wakeup,
             h2_events.RequestReceived, _http1.Http1Server.done)
    except (ImportError, AttributeError) as e:
        log.warning("shim: cannot limit request heads, mitmproxy internals changed: %s", e)
        return
    if not all(callable(t) for t in targets):
        log.warning("shim: cannot limit request heads, mitmproxy internals changed")
        return
    limit = max(0, int(max_bytes))
    h1._shim_head_limit = limit
    h2._shim_head_limit = limit
    if getattr(h1.read_headers, _ORIGINAL_ATTR, None) is None:
        h1.read_headers = _limited_read_headers(h1.read_headers)
    if getattr(h2.handle_h2_event, _ORIGINAL_ATTR, None) is None:
        h2.__init__ = _limited_h2_init(h2.__init__)
        h2.handle_h2_event = _limited_h2_event(h2.handle_h2_event)


def _head_too_large(buf: object, limit: int) -> bool:
    """Whether the head at the start of an Http1Server's buffer is (or will be) larger than
    ``limit`` bytes. Leading empty lines count; a head whose blank line is not within the
    first ``limit`` bytes is too large whether or not the rest has arrived. Reads at most
    limit + 1 bytes, so a huge buffer costs nothing more than a small one."""
    if len(buf) <= limit:  # type: ignore[arg-type]
        return False
    data = getattr(buf, "_data", None)
    window = bytes(data[: limit + 1]) if isinstance(data, bytearray) else bytes(buf)[: limit + 1]  # type: ignore[call-overload]
    start = len(window) - len(window.lstrip(b"\r\n"))
    match = _BLANK_LINE.search(window, start)
    return match is None or match.end() > limit


def _too_large_text(limit: int) -> bytes:
    return f"Request header fields too large: the limit is {limit} bytes.\n".encode()


def _too_large_http1(limit: int) -> bytes:
    body = _too_large_text(limit)
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))


class _Linger:
    """Replaces an Http1Server's state after a final answer on a connection whose request was
    not read to its end: discards what still arrives (buffering nothing) and closes once the
    client closes, LINGER_BYTES have been discarded, or a Wakeup (the LINGER_SECONDS timer)
    arrives. By then the client has had the answer in its receive buffer for a while."""

    __name__ = "shim_linger"  # Layer.__repr__ reads the state's name

    def __init__(self, server: Any, budget: int) -> None:
        self.server = server
        self.budget = budget
        self.discarded = 0

    def __call__(self, event: events.Event) -> Generator[commands.Command, Any, None]:
        if isinstance(event, events.DataReceived):
            self.discarded += len(self.server.buf)
            self.server.buf = type(self.server.buf)()
            if self.discarded > self.budget:
                yield from self.close("byte budget spent")
        elif isinstance(event, events.ConnectionClosed):
            yield from self.close("client closed")
        elif isinstance(event, events.Wakeup):
            yield from self.close("linger time over")

    def close(self, why: str) -> Generator[commands.Command, Any, None]:
        conn = self.server.conn
        if conn.state is not ConnectionState.CLOSED:
            yield commands.CloseConnection(conn)
        self.server.state = self.server.done
        yield commands.Log(f"shim: closed {human.format_address(conn.peername)} after "
                           f"discarding {self.discarded} bytes ({why})")


def _linger(server: Any, seconds: float, budget: int) -> Generator[commands.Command, Any, None]:
    """Half-close an HTTP/1 client after its answer (FIN after the queued bytes are flushed)
    and drain it; the Wakeup comes back to ``server`` (HttpLayer routes it to its source)."""
    server.state = _Linger(server, budget)
    yield commands.CloseTcpConnection(server.conn, half_close=True)
    yield commands.RequestWakeup(seconds)


def _limited_read_headers(original: Callable[..., Any]) -> Callable[..., Any]:
    def read_headers(self: Any, event: events.ConnectionEvent) -> Generator[commands.Command, Any, None]:
        limit = getattr(self, _HEAD_LIMIT_ATTR, 0)
        try:
            refuse = (limit > 0 and isinstance(event, events.DataReceived)
                      and _head_too_large(self.buf, limit))
        except Exception:  # an internals surprise must not kill the connection
            log.warning("shim: request head check failed; not limiting", exc_info=True)
            refuse = False
        if not refuse:
            yield from original(self, event)
            return
        yield commands.Log(f"{human.format_address(self.conn.peername)}: request head larger "
                           f"than {limit} bytes, answered 431")
        yield commands.SendData(self.conn, _too_large_http1(limit))
        yield from _linger(self, LINGER_SECONDS, LINGER_BYTES)

    setattr(read_headers, _ORIGINAL_ATTR, original)
    return read_headers


def _limited_h2_init(original: Callable[..., Any]) -> Callable[..., Any]:
    def __init__(self: Any, context: Any) -> None:
        original(self, context)
        limit = getattr(self, _HEAD_LIMIT_ATTR, 0)
        if limit <= 0:
            return
        try:  # before Start: initiate_connection() sends these settings
            hard = 2 * limit
            self.h2_conn.local_settings.max_header_list_size = hard
            self.h2_conn.local_settings.acknowledge()
            self.h2_conn.decoder.max_header_list_size = hard
        except Exception:
            log.warning("shim: cannot set h2 max_header_list_size", exc_info=True)

    setattr(__init__, _ORIGINAL_ATTR, original)
    return __init__


def _limited_h2_event(original: Callable[..., Any]) -> Callable[..., Any]:
    def handle_h2_event(self: Any, event: object) -> Generator[commands.Command, Any, bool]:
        limit = getattr(self, _HEAD_LIMIT_ATTR, 0)
        if limit > 0 and isinstance(event, h2_events.RequestReceived):
            try:
                # counted as HTTP/1 lines would be ("name: value\r\n"), pseudo-headers included
                size = sum(len(k) + len(v) + 4 for k, v in event.headers or ())
                if size > limit:
                    _refuse_h2_stream(self.h2_conn, event, limit)
                    yield commands.SendData(self.conn, self.h2_conn.data_to_send())
                    yield commands.Log(f"{human.format_address(self.conn.peername)}: HTTP/2 "
                                       f"request head larger than {limit} bytes, answered 431")
                    return False
            except Exception:
                log.warning("shim: HTTP/2 request head check failed; not limiting", exc_info=True)
        handled: bool = yield from original(self, event)
        return handled

    setattr(handle_h2_event, _ORIGINAL_ATTR, original)
    return handle_h2_event


def _refuse_h2_stream(h2_conn: Any, event: Any, limit: int) -> None:
    body = _too_large_text(limit)
    h2_conn.send_headers(event.stream_id, [
        (b":status", b"431"),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
    ])
    h2_conn.send_data(event.stream_id, body, end_stream=True)
    if not event.stream_ended:  # RFC 9113 8.1: a complete answer, then RST_STREAM(NO_ERROR)
        h2_conn.reset_stream(event.stream_id, 0)


# --- Answering from the headers, without reading the body (issue 9, item 4) --------------

ANSWERED_EARLY = "shim.answered_early"
"""flow.metadata key set by answer_early (to the status sent): the flow's `error` hook then
sees flow.error.msg == 'Connection killed.' and should treat it as answered, not failed."""


class _EarlyAnswer:
    """One-shot command source (see _InterimSource): on its first event it sends a whole
    response on the flow's stream and stops reading the request; on the Wakeup it asked for
    (HTTP/1 linger timer) it closes the client connection."""

    def __init__(self, conn_layer: Any, stream_id: int, response: http.Response,
                 client: Client, linger_seconds: float, linger_bytes: int) -> None:
        self.conn_layer = conn_layer
        self.stream_id = stream_id
        self.response = response
        self.client = client
        self.linger_seconds = linger_seconds
        self.linger_bytes = linger_bytes
        self.sent = False

    def handle_event(self, event: object) -> Iterator[object]:
        if self.sent:  # the linger timer
            if isinstance(self.conn_layer.state, _Linger):
                yield from self.conn_layer.state.close("linger time over")
            return
        self.sent = True
        sid, client = self.stream_id, self.client
        body = self.response.raw_content or b""
        yield SendHttp(ResponseHeaders(sid, self.response, not body), client)
        if body:
            yield SendHttp(ResponseData(sid, body), client)
        yield SendHttp(ResponseEndOfMessage(sid), client)
        yield DropStream(sid)  # body bytes still arriving are no longer routed to the flow
        if isinstance(self.conn_layer, Http1Server):
            if self.conn_layer.state != self.conn_layer.done:  # not closed by mark_done
                self.conn_layer.state = _Linger(self.conn_layer, self.linger_bytes)
                yield commands.CloseTcpConnection(client, half_close=True)
                yield commands.RequestWakeup(self.linger_seconds)
        else:  # HTTP/2: end only this stream, RFC 9113 8.1
            h2_conn = self.conn_layer.h2_conn
            if not self.conn_layer.is_closed(sid) and not h2_conn.stream_buffers.get(sid):
                h2_conn.reset_stream(sid, 0)
                yield commands.SendData(client, h2_conn.data_to_send())
            self.conn_layer.streams.pop(sid, None)


async def answer_early(flow: http.HTTPFlow, response: http.Response, *,
                       linger_seconds: float = LINGER_SECONDS,
                       linger_bytes: int = LINGER_BYTES) -> bool:
    """Send ``response`` now, before the request body is read, and stop reading that body.

    For refusals decided from the headers (409, 413, 403, ...): a client announcing 1 GiB
    gets its answer at once and the shim reads only what is already in flight. Call it from
    an async `requestheaders` hook and return right after. HTTP/1: the response goes out with
    `Connection: close`; then the client connection is half-closed (FIN once the answer is
    flushed) and drained for at most ``linger_seconds`` / ``linger_bytes`` before it is
    closed, so the kernel's RST (sent when a socket is closed with unread data) does not
    destroy the answer. HTTP/2: the response ends the stream, which is then reset with
    NO_ERROR (RFC 9113 8.1); the connection stays up. The flow is killed, so nothing goes
    upstream; mitmproxy then runs the `error` hook ('Connection killed.') and
    ``flow.metadata[ANSWERED_EARLY]`` holds the status. False (nothing sent, flow untouched)
    when the stream is gone or the connection is neither HTTP/1 nor HTTP/2."""
    try:
        handler = ctx.master.addons.get("proxyserver").connections[flow.client_conn.id]
        layer = _http_layer(handler.layer)
        stream_id = next(sid for sid, stream in layer.streams.items() if stream.flow is flow)
        conn_layer = layer.connections[flow.client_conn]
    except (AttributeError, KeyError, LookupError, StopIteration):
        log.info("shim: no live stream for an early %d", response.status_code)
        return False
    if isinstance(conn_layer, Http1Server):
        if conn_layer.stream_id != stream_id:
            return False
        response.headers["connection"] = "close"
    elif isinstance(conn_layer, Http2Server):
        response.headers.pop("connection", None)
    else:
        log.info("shim: early answers need HTTP/1 or HTTP/2, not %r", conn_layer)
        return False
    wakeup = commands.RequestWakeup(0)
    layer.command_sources[wakeup] = _EarlyAnswer(  # type: ignore[assignment]
        conn_layer, stream_id, response, flow.client_conn, linger_seconds, linger_bytes)
    await handler.server_event(events.Wakeup(wakeup))
    flow.metadata[ANSWERED_EARLY] = response.status_code
    if flow.killable:
        flow.kill()
    return True
