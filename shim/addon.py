"""The mitmproxy addon: translates flows to the shim's model and back, nothing more.

Run it with `mitmdump --mode reverse:http://LEGACY -s shim/addon.py [--set shim_config=FILE]`.
Requests no protocol claims pass through untouched. For claimed ones, `requestheaders` parses
and begins the exchange and routes a body to the in-process sink while writing it to disk;
the answer is set in `request` (no body) or `response` (streamed body); `error` keeps what
arrived when a client leaves mid-body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from functools import partial
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.net.http import url
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_specs import ReverseMode

from shim import config as shim_config
from shim.admin import Admin
from shim.backends import AnyStore, open_store, signals_for
from shim.commands import Command, Forward, NeedBody
from shim.cors import Cors
from shim.engine import Engine, Limits, every
from shim.exchange import Exchange
from shim.local_store import FolderInUse, LocalStore
from shim.metrics import Metrics
from shim.mitm import (
    answer_early,
    close_client,
    hold_client,
    limit_request_heads,
    send_interim,
)
from shim.model import Reply, Request
from shim.outbox import DeliveryPolicy, Outbox
from shim.preflight import Preflight
from shim.protocols import Protocol
from shim.protocols.byteranges import Byteranges
from shim.protocols.content_range import ContentRangeProtocol
from shim.protocols.guard import Guard
from shim.protocols.ietf import Ietf
from shim.protocols.routing import route
from shim.protocols.s3 import S3
from shim.protocols.seed001 import Seed001
from shim.protocols.tus import Tus
from shim.protocols.tus_target import TusTarget
from shim.protocols.webdav import Webdav
from shim.redis_store import RedisStore, safe_url
from shim.signals import RedisSignals
from shim.sink import Sink
from shim.store import StoreError
from shim.upstream import Origin, Upstream, UpstreamTLS, UpstreamTLSError
from shim.wire import as_bytes

log = logging.getLogger("shim")

GAUGE_INTERVAL = 5.0
STORE_RETRY = 1.0
"""Seconds between start-up attempts while the store cannot be reached."""
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
_CLAIMED_FIELD = "x-shim-claimed"
_STATE = "shim"
_FORWARD = "shim-forward"
_NEEDS_BODY = "shim-needs-body"


class _FlowState:
    """What the shim keeps about one claimed flow. A plain class, not a dataclass: mitmdump
    executes this file outside sys.modules, where @dataclass fails."""

    def __init__(self, exchange: Exchange | None, reply: Reply | None = None) -> None:
        self.exchange = exchange
        self.reply = reply
        """A reply decided before the body (an internal error), sent once the body is drained."""
        self.streamed = False
        self.answered = False
        """The answer is given (or being given): by `_answer`, or early, from the head."""
        self.early: asyncio.Future[None] | None = None
        """The attempt to answer early, which `_answer` waits for before it answers."""


class Shim:
    def __init__(self) -> None:
        self.config = shim_config.Config()
        self.engine: Engine | None = None
        self.protocols: list[Protocol] = []
        self.cors = Cors(shim_config.CorsConfig(), ())
        self.metrics = Metrics()
        self.admin: Admin | None = None
        self.sink = Sink()
        self._config_path: str | None = None
        self.store: AnyStore | None = None
        self.signals: RedisSignals | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        """Set once start-up recovery is done: no request sees a record before it."""
        self._starting = "recovering uploads"
        """What start-up waits for, while it does (/readyz)."""
        self.origin: Origin | None = None
        self._eager_sink = False
        self._rewrite_host = True
        self._first_connect: set[str] = set()
        self._background: set[asyncio.Future[None]] = set()

    # --- lifecycle ------------------------------------------------------------------------

    def load(self, loader: object) -> None:
        loader.add_option(  # type: ignore[attr-defined]
            "shim_config", str, "", "Path to the shim's YAML config; empty: embedded defaults."
        )
        loader.add_option(  # type: ignore[attr-defined]
            "shim_log_format", str, "text", "One line per upload event: 'text' (key=value) "
            "or 'json'."
        )
        loader.add_option(  # type: ignore[attr-defined]
            "shim_admin", str, "", "HOST:PORT of the admin listener, or 'off'; empty: the "
            "config's admin.listen."
        )

    def configure(self, updated: set[str]) -> None:
        if self._config_path is not None and not updated & {"shim_config", "mode"}:
            return
        path = ctx.options.shim_config
        try:
            config = shim_config.load(path or None)
        except shim_config.ConfigError as exc:
            raise exceptions.OptionsError(f"shim_config: {exc}") from exc
        origin = _reverse_origin(ctx.options.mode)
        if self._config_path is None:
            # The operator's keep_host_header, read before running() sets it for the shim's
            # own use (the client's Host is needed for the upload URLs).
            self._rewrite_host = not ctx.options.keep_host_header
        tls = UpstreamTLS.from_options(ctx.options)  # as mitmproxy's pass-through makes TLS
        if origin.scheme == "https":
            try:
                tls.check(origin.host)
            except UpstreamTLSError as exc:
                raise exceptions.OptionsError(str(exc)) from exc
        store = self._open_store(config.storage)
        self.config = config
        if self.store is not None:
            _close_later(self.store)
        upstream = Upstream(origin, config.upstream.timeout, tls, keep_host=not self._rewrite_host)
        delivery = config.delivery
        signals = signals_for(store)
        lease_ttl = config.storage.lease_ttl
        outbox = Outbox(store, upstream, DeliveryPolicy(
            wait=delivery.wait, give_up_after=delivery.give_up_after,
            on_unknown=delivery.on_unknown),
            metrics=Metrics("json" if ctx.options.shim_log_format == "json" else "text"),
            signals=signals, lease_ttl=lease_ttl)
        self.store, self.signals = store, signals
        limits = config.limits
        auth = config.auth
        preflight = None if auth.preflight == "none" else Preflight(
            auth.preflight, origin, auth.url, auth.timeout, tls, auth.expect_wait,
            keep_host=not self._rewrite_host).check
        self.metrics = outbox.metrics
        self.engine = Engine(store, outbox, config.storage.min_free_bytes, limits=Limits(
            uploads_per_owner=limits.uploads_per_owner, uploads_total=limits.uploads_total),
            preflight=preflight, signals=signals, lease_ttl=lease_ttl)
        self.protocols = _protocols(config)
        self.cors = Cors(config.cors, _upload_prefixes(config))
        self.origin = origin
        self._config_path = path
        for line in _banner(config, origin, store):
            log.info("shim: %s", line)

    def _open_store(self, storage: shim_config.StorageConfig) -> AnyStore:
        """The configured store (a local folder this process takes for itself first);
        anything that makes the folder unusable is one line that names it, and the shim does
        not start (or keeps its current store on a reload)."""
        folder = os.path.realpath(storage.dir)
        try:
            return open_store(storage, serving=True)
        except FolderInUse as exc:
            raise exceptions.OptionsError(f"storage.dir: {exc}") from exc
        except OSError as exc:
            raise exceptions.OptionsError(
                f"storage.dir: cannot use {folder}: {exc.strerror or exc}") from exc

    async def running(self) -> None:
        self.sink.max_head = self.config.limits.header_bytes + 4096  # the rerouting fields
        limit_request_heads(self.config.limits.header_bytes)
        # First: a client that connects from here on gets its connection to the sink (see
        # server_connect), which must be listening by then.
        await self.sink.start()
        # Each client connection gets its server connection to the sink at once. A TLS legacy
        # server rules that out: then connections are lazy, which still lets the shim answer
        # while the legacy server is down (MITMPROXY.md).
        self._eager_sink = self.origin is not None and self.origin.scheme == "http"
        # The client's own Host is needed to build absolute upload URLs; the shim rewrites it
        # for the legacy server itself, as mitmproxy's reverse mode would (_to_legacy).
        ctx.options.update(connection_strategy="eager" if self._eager_sink else "lazy",
                           keep_host_header=True, tcp_timeout=self.config.limits.client_timeout)
        if hasattr(ctx.options, "dumper_filter") and not ctx.options.dumper_filter:
            # mitmproxy's per-flow line for a request the shim answered itself would name the
            # internal sink and its 204; the upload event lines say what happened instead.
            ctx.options.update(dumper_filter=f"!~hq {_CLAIMED_FIELD}")
        if not ctx.options.listen_host:
            # mitmdump binds before an addon runs, so the shim cannot choose loopback itself.
            log.warning("shim: listening on every interface (mitmdump's default); add "
                        "--listen-host 127.0.0.1 to take uploads from this machine only")
        assert self.engine is not None and self.store is not None
        engine = self.engine
        await self._start_admin()
        await self._recover()
        self._ready.set()
        engine.outbox.start()
        self._tasks = [
            asyncio.create_task(every(self.config.storage.sweep_interval, self._sweep,
                                      "the expiry sweep")),
            asyncio.create_task(every(engine.lease_ttl / 3, engine.renew_leases, "lease renewal")),
            asyncio.create_task(every(GAUGE_INTERVAL, self._gauges, "the metrics gauges")),
        ]

    async def _recover(self) -> None:
        """Start-up recovery, tried again while the store cannot be reached (a Redis that is
        not up yet): requests wait for it, and /readyz says why."""
        assert self.engine is not None and self.store is not None
        if isinstance(self.store, LocalStore):
            await self.store.drop_leases()  # this process owns the folder: none can be live
        while True:
            try:
                if self.signals is not None:
                    await self.signals.start()  # before any request: one may be asked to end
                repaired = await self.engine.recover()
                break
            except StoreError as exc:
                self._starting = f"the store cannot be reached: {exc}"
                # A warning: mitmdump exits on an error logged while it starts.
                log.warning("shim: %s; trying again in %.0fs", self._starting, STORE_RETRY)
                await asyncio.sleep(STORE_RETRY)
        if repaired:
            log.info("shim: recovered %d uploads after a restart", repaired)

    async def _start_admin(self) -> None:
        listen = ctx.options.shim_admin or self.config.admin.listen
        if not listen or listen == "off":
            return
        host, _, port = listen.rpartition(":")
        self.admin = Admin(self.metrics, self._not_ready)
        try:
            await self.admin.start(host.strip("[]"), int(port))
        except OSError as exc:
            log.error("shim: admin listener on %s: %s", listen, exc.strerror or exc)
            return
        log.info("shim: admin (/healthz, /readyz, /metrics) at http://%s:%d", host, self.admin.port)

    async def _gauges(self) -> None:
        """The gauges a scrape reads, and how late the loop runs a timer (its lag)."""
        assert self.store is not None
        loop = asyncio.get_running_loop()
        asked = loop.time()
        await asyncio.sleep(0)
        self.metrics.loop_lag.set(loop.time() - asked)
        self.metrics.in_progress.set(await self.store.incomplete())
        self.metrics.disk_free.set(await self.store.free_bytes())

    async def _not_ready(self) -> str | None:
        """/readyz: why the shim cannot take uploads now, or None."""
        assert self.store is not None and self.origin is not None
        if not self._ready.is_set():
            return f"starting: {self._starting}"
        problem = await self.store.health()
        if problem is not None:
            return problem
        try:
            async with asyncio.timeout(2.0):
                _, writer = await asyncio.open_connection(self.origin.host, self.origin.port)
            writer.close()
        except (OSError, TimeoutError) as exc:
            return f"the legacy server {self.origin.authority} is unreachable: {exc!r}"
        return None

    async def done(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        await self.sink.stop()
        if self.admin is not None:
            await self.admin.stop()
        if self.engine is not None:
            await self.engine.outbox.stop()
        if self.signals is not None:
            await self.signals.close()
        if self.store is not None:
            await self.store.close()

    async def _sweep(self) -> None:
        assert self.engine is not None
        removed = await self.engine.sweep()
        if removed:
            log.info("shim: removed %d expired uploads", removed)

    # --- connections ----------------------------------------------------------------------

    def client_connected(self, client: connection.Client) -> None:
        if self._eager_sink:
            self._first_connect.add(client.id)

    def client_disconnected(self, client: connection.Client) -> None:
        self._first_connect.discard(client.id)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Point the connection mitmproxy opens eagerly for each client at the sink.

        mitmproxy passes body chunks to a stream callable only once its server connection is
        up; a client that leaves before it is loses the chunks queued meanwhile. With the
        sink connection open before the first request, every byte that arrived reaches the
        disk. Requests the shim does not claim are aimed back at the legacy server."""
        origin = self.origin
        if self._rewrite_host and origin is not None and \
                data.server.address == (origin.host, origin.port):
            # mitmproxy's reverse mode names the legacy server in SNI (and checks its
            # certificate against that name) unless keep_host_header is set, which the shim
            # sets for itself (running): without this, a TLS client's SNI would be used.
            data.server.sni = origin.host
        if data.client.id in self._first_connect:
            self._first_connect.discard(data.client.id)
            if self.sink.port:  # listening (running() starts it before connections come here)
                data.server.address = ("127.0.0.1", self.sink.port)

    def _to_legacy(self, flow: http.HTTPFlow) -> None:
        """A request the shim does not claim goes to the legacy server, as without the shim."""
        if self.origin is None:
            return
        request = flow.request
        if self._eager_sink:
            request.scheme = self.origin.scheme
            request.data.host = self.origin.host
            request.data.port = self.origin.port
        if self._rewrite_host:
            request.host_header = url.hostport(self.origin.scheme, self.origin.host, self.origin.port)
        if _has_body(request) and _NEEDS_BODY not in flow.metadata:
            request.stream = True  # constant memory whatever its size: nothing here reads it
            framed = "content-length" in request.headers or "transfer-encoding" in request.headers
            if not framed and request.method in _WITH_BODY:
                # An HTTP/2 body streamed on as HTTP/1.1 needs framing mitmproxy does not add.
                request.headers["transfer-encoding"] = "chunked"

    # --- hooks ----------------------------------------------------------------------------

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.engine is None:
            return
        if not self._ready.is_set():
            await self._ready.wait()
        try:
            state = await self._claim(flow, *self._model(flow))
        except Exception:
            log.exception("shim: failed to begin %s %s", flow.request.method, flow.request.path)
            state = _FlowState(None, _internal_error())
        if state is not None:
            flow.metadata[_STATE] = state
            self._route_to_sink(flow, state)
        else:
            self._to_legacy(flow)

    def _model(self, flow: http.HTTPFlow) -> tuple[Request, bool]:
        """The request as the protocols see it, and whether its Host may be written into
        the URLs the shim hands out (always, with `public_url`)."""
        origin = self.config.public_url.rstrip("/") or _client_origin(
            flow.request.host_header or "", flow.client_conn.tls_established)
        return _to_model(flow.request, origin or ""), origin is not None

    async def _claim(self, flow: http.HTTPFlow, request: Request, host_ok: bool
                     ) -> _FlowState | None:
        """Ask each protocol whether the request is theirs; begin the exchange if so."""
        assert self.engine is not None
        preflight = self.cors.preflight(request)
        if preflight is not None:
            return _FlowState(None, preflight)  # a browser asking whether it may upload
        routed = route(self.protocols, request, _owner(request, self.config.owner_header),
                       host_ok)
        if routed is None:
            return None
        protocol, command = routed
        exchange = Exchange(self.engine, protocol, request, command)
        if request.has_body and not isinstance(command, Forward | NeedBody):
            state = _FlowState(exchange)
            exchange.start(partial(close_client, flow, "a newer request took over"),
                           partial(self._after_begin, flow, state), partial(hold_client, flow))
            return state
        try:
            await exchange.begin()
            if exchange.declined:
                self._note_declined(flow, protocol, command, request, host_ok)
                return None
            exchange.on_interrupt(partial(close_client, flow, "a newer request took over"))
            await self._send_interim(flow, exchange)
        except Exception:
            await exchange.abort()  # whatever it began, it releases
            raise
        return _FlowState(exchange)

    async def _after_begin(self, flow: http.HTTPFlow, state: _FlowState) -> None:
        """Once a request with a body has begun: refused already (from its head: a wrong
        offset, a cap, a stranger's upload), it is answered at once, without reading the body
        it still sends; else the 1xx it asks for goes out."""
        exchange = state.exchange
        assert exchange is not None
        if exchange.error is None:
            await self._send_interim(flow, exchange)
        else:
            state.early = self._spawn(self._refuse_early(flow, state, exchange))

    async def _refuse_early(self, flow: http.HTTPFlow, state: _FlowState,
                            exchange: Exchange) -> None:
        reply = await _guarded(exchange.finish)
        if state.answered:
            return  # the body ended meanwhile and `_answer` gave the answer
        state.answered = True
        try:
            sent = await answer_early(flow, self._response(flow, reply))
        except Exception:
            log.exception("shim: failed to answer a refused request early")
            sent = False
        if not sent:
            state.reply, state.answered = reply, False  # too late: `_answer` sends it

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    @staticmethod
    async def _send_interim(flow: http.HTTPFlow, exchange: Exchange) -> None:
        """The 1xx the exchange asks for (IETF 104), unless it was refused already."""
        interim = exchange.interim
        if interim is not None:
            await send_interim(flow, interim.status, interim.reason or "", list(interim.headers))

    @staticmethod
    def _note_declined(flow: http.HTTPFlow, protocol: Protocol, command: Command,
                       request: Request, host_ok: bool) -> None:
        """A request that passes through, but that a protocol still has a word on. One that
        needs its body keeps its head as the client sent it: on the way to the legacy server
        its Host is rewritten, and a signature (S3) covers the client's."""
        if isinstance(command, Forward):
            flow.metadata[_FORWARD] = command
        elif isinstance(command, NeedBody):
            flow.metadata[_NEEDS_BODY] = (protocol, request, host_ok)  # mitmproxy buffers the body

    def _route_to_sink(self, flow: http.HTTPFlow, state: _FlowState) -> None:
        """Stream the body into the exchange; the legacy server sees nothing of this request."""
        flow.request.scheme = "http"
        flow.request.host = "127.0.0.1"
        flow.request.port = self.sink.port
        flow.request.headers.pop("content-length", None)
        flow.request.headers["transfer-encoding"] = "chunked"
        flow.request.headers[_CLAIMED_FIELD] = "1"  # only the sink sees it (see running)

        def stream(data: bytes) -> list[bytes]:
            state.streamed = True
            if state.exchange is not None and state.reply is None:
                try:
                    state.exchange.feed(data)
                except Exception:
                    log.exception("shim: failed to store a chunk")
                    state.reply = _internal_error()
            return []  # never b"": with chunked encoding that would end the body early

        flow.request.stream = stream

    async def request(self, flow: http.HTTPFlow) -> None:
        needs_body = flow.metadata.pop(_NEEDS_BODY, None)
        if needs_body is not None and self.engine is not None:
            await self._decide_on_body(flow, *needs_body)
        state = flow.metadata.get(_STATE)
        if isinstance(state, _FlowState) and not state.streamed:
            await self._answer(flow, state)

    async def _decide_on_body(self, flow: http.HTTPFlow, protocol: Protocol, head: Request,
                              host_ok: bool) -> None:
        """Ask the protocol again, now with the body; None leaves the request untouched."""
        assert self.engine is not None
        try:
            request = replace(head, body=flow.request.content or b"")
            routed = route([protocol], request, _owner(request, self.config.owner_header),
                           host_ok)
            if routed is None or isinstance(routed[1], NeedBody):
                return
            command = routed[1]
            exchange = Exchange(self.engine, protocol, request, command)
            flow.metadata[_STATE] = _FlowState(exchange)
            await exchange.begin()
        except Exception:
            log.exception("shim: failed to decide on %s %s", flow.request.method, flow.request.path)
            flow.metadata[_STATE] = _FlowState(None, _internal_error())

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """The legacy server's answers to requests the shim does not claim stream through
        (a download must not be held in memory); the shim's own are small."""
        if flow.response is not None and not (flow.metadata.keys() & {_STATE, _FORWARD}):
            flow.response.stream = True

    async def response(self, flow: http.HTTPFlow) -> None:
        forward = flow.metadata.pop(_FORWARD, None)
        if isinstance(forward, Forward) and flow.response is not None:
            _add_token(flow.response.headers, forward.field, forward.token)
        state = flow.metadata.get(_STATE)
        if isinstance(state, _FlowState) and state.streamed:
            await self._answer(flow, state)

    async def error(self, flow: http.HTTPFlow) -> None:
        state = flow.metadata.pop(_STATE, None)
        if isinstance(state, _FlowState) and state.exchange is not None:
            try:
                await state.exchange.abort()
            except Exception:
                log.exception("shim: failed to keep the bytes of an aborted request")

    async def _answer(self, flow: http.HTTPFlow, state: _FlowState) -> None:
        """The one place a claimed flow ends with an answer; the exchange's leases are
        released here whatever happened before (Exchange.finish, or abort)."""
        flow.metadata.pop(_STATE, None)
        if state.early is not None:
            await asyncio.shield(state.early)
        if state.answered:
            return  # answered early from its head: the flow is being closed
        state.answered = True
        reply = state.reply
        exchange = state.exchange
        if reply is None and exchange is not None:
            reply = await _guarded(exchange.finish)
        elif exchange is not None:
            await _guarded_abort(exchange)
        flow.response = self._response(flow, reply or _internal_error())

    def _response(self, flow: http.HTTPFlow, reply: Reply) -> http.Response:
        """An answer the shim gives itself, with the CORS fields a page on another origin
        needs to read it."""
        cors = self.cors.fields(_to_model(flow.request, ""))
        if cors and not any(k.lower() == "access-control-allow-origin" for k, _ in reply.headers):
            reply = replace(reply, headers=(*reply.headers, *cors))
        return _to_response(reply, flow.request.method)


def _protocols(config: shim_config.Config) -> list[Protocol]:
    """The enabled protocols, in the order they are asked whether a request is theirs."""
    enabled: list[Protocol] = []
    if config.s3.paths:  # first: every request under its prefixes is S3's
        enabled.append(S3(config.s3))
    if config.tus.enabled:
        enabled.append(Tus(config.tus))
    if config.webdav.paths:
        enabled.append(Webdav(config.webdav))
    if config.ietf.enabled:
        enabled.append(Ietf(config.ietf))
    if config.tus_target.enabled:
        enabled.append(TusTarget(config.tus_target, config.tus.endpoint))
    if config.seed001.query_range or config.seed001.expect_range:
        enabled.append(Seed001(config.seed001))
    if config.content_range.enabled:
        enabled.append(ContentRangeProtocol(config.content_range))
    if config.byteranges.enabled:
        enabled.append(Byteranges(config.byteranges))
    enabled.append(Guard(config.guard.pass_through))
    return enabled


def _upload_prefixes(config: shim_config.Config) -> tuple[str, ...]:
    """The paths that are the shim's own upload URLs, whatever a request carries."""
    prefixes = []
    if config.tus.enabled:
        prefixes.append(config.tus.endpoint)
    if config.ietf.enabled:
        prefixes.append(config.ietf.prefix)
    prefixes.extend(config.s3.paths)
    return tuple(prefixes)


def _banner(config: shim_config.Config, origin: Origin, store: AnyStore) -> list[str]:
    """What the shim does, where: for the person who just started it."""
    def where(paths: tuple[str, ...]) -> str:
        return "under " + ", ".join(paths) if paths else "on any path"

    lines = [f"delivering whole files to {origin.scheme}://{origin.authority}",
             f"keeping partial uploads in {store.directory}"]
    if isinstance(store, RedisStore):
        lines.append(f"sharing uploads with other instances through {safe_url(store.url)} "
                     f"(leases lapse after {config.storage.lease_ttl:g}s)")
    if config.s3.paths:
        lines.append(f"S3 multipart uploads and PutObject under {', '.join(config.s3.paths)} "
                     f"(auth: {config.s3.auth})")
    if config.tus.enabled:
        lines.append(f"tus: POST {config.tus.endpoint} (tus 1.0.0)")
    if config.webdav.paths:
        lines.append(f"WebDAV resumable PUT {where(config.webdav.paths)}")
    if config.ietf.enabled:
        lines.append(f"IETF resumable uploads {where(config.ietf.paths)} (resources under "
                     f"{config.ietf.prefix})")
    if config.tus_target.enabled:
        lines.append(f"tus on the target URL {where(config.tus_target.paths)}")
    if config.seed001.query_range or config.seed001.expect_range:
        lines.append(f"PUT ?range= / Expect: Range {where(config.seed001.paths)}")
    if config.content_range.enabled:
        sessions = " and Google-style sessions" if config.content_range.sessions else ""
        lines.append(f"PUT/POST with Content-Range{sessions} {where(config.content_range.paths)}")
    if config.byteranges.enabled:
        lines.append(f"PATCH with byte ranges {where(config.byteranges.paths)}")
    return lines


def _reverse_origin(modes: list[str]) -> Origin:
    from mitmproxy.proxy.mode_specs import ProxyMode

    for spec in modes:
        mode = ProxyMode.parse(spec)
        if isinstance(mode, ReverseMode):
            scheme = "https" if mode.scheme == "https" else "http"
            return Origin(scheme, mode.address[0], mode.address[1])
    raise exceptions.OptionsError("the shim needs mitmproxy in reverse mode: --mode reverse:URL")


async def _guarded(step: Callable[[], Awaitable[Reply]]) -> Reply:
    """An exception must never reach mitmproxy: it would forward the request (MITMPROXY.md)."""
    try:
        return await step()
    except Exception:
        log.exception("shim: failed to finish a request")
        return _internal_error()


def _close_later(store: AnyStore) -> None:
    """A store replaced by a new configuration closes once the loop gets to it."""
    with contextlib.suppress(RuntimeError):  # no loop yet: nothing was opened on a thread
        asyncio.get_running_loop().create_task(store.close())


async def _guarded_abort(exchange: Exchange) -> None:
    try:
        await exchange.abort()
    except Exception:
        log.exception("shim: failed to release an upload after an error")


def _to_model(request: http.Request, origin: str) -> Request:
    path, _, query = request.path.partition("?")
    fields = tuple((k, v) for k, v in request.headers.items(multi=True))
    if request.authority and "host" not in request.headers:
        # HTTP/2 and 3 name the host in :authority; as an HTTP/1.1 request (what mitmproxy's
        # pass-through and the delivery send) that is its Host (Http1Client.send).
        fields = (("Host", request.authority), *fields)
    length_text = request.headers.get("content-length")
    if length_text is not None and length_text.strip().isdigit():
        body_length: int | None = int(length_text)
    elif "chunked" in request.headers.get("transfer-encoding", "").lower():
        body_length = None
    else:
        body_length = None if request.is_http2 or request.is_http3 else 0
    return Request(request.method.upper(), path, query, fields, body_length, origin=origin)


def _client_origin(authority: str, tls: bool) -> str | None:
    """`scheme://host[:port]` as the client addressed the shim; "" when it named no host,
    None when its Host is not a valid host[:port] (RFC 9110 section 7.2), which must never
    be written into a URL the shim hands out."""
    if not authority:
        return ""
    try:
        url.parse_authority(authority, check=True)
    except ValueError:
        return None
    if not authority.isascii():
        return None
    return f"{'https' if tls else 'http'}://{authority}"


def _has_body(request: http.Request) -> bool:
    length = request.headers.get("content-length", "0").strip()
    return "transfer-encoding" in request.headers or length not in ("", "0") or \
        request.is_http2 or request.is_http3


def _owner(request: Request, header: str) -> str:
    """Who may touch an upload: a digest of the credentials that created it (or none)."""
    value = request.header(header) if header else None
    return hashlib.sha256(as_bytes(value)).hexdigest() if value else ""


def _to_response(reply: Reply, method: str) -> http.Response:
    # A reply to HEAD has no content (RFC 9110 section 9.3.2); a body there would be read as
    # the next response on a kept-alive connection.
    head = method.upper() == "HEAD"
    response = http.Response.make(
        reply.status, b"" if head else reply.body,
        [(as_bytes(k), as_bytes(v)) for k, v in reply.headers],
    )
    declared = dict((k.lower(), v) for k, v in reply.headers).get("content-length")
    if head and declared is not None:
        response.headers["content-length"] = declared  # the length a GET would have
    if reply.reason:
        response.reason = reply.reason
    if reply.status == 204 or reply.status < 200:
        response.headers.pop("content-length", None)  # RFC 9110 section 8.6
    return response


def _add_token(headers: http.Headers, field: str, token: str) -> None:
    """Add a token to a comma-separated field (RFC 9110 section 5.6.1), once."""
    tokens = [t.strip() for t in headers.get(field, "").split(",") if t.strip()]
    if token.lower() not in (t.lower() for t in tokens):
        headers[field] = ", ".join([*tokens, token])


def _internal_error() -> Reply:
    return Reply(500, (("Content-Type", "text/plain; charset=utf-8"),),
                 b"the shim failed to handle this request; nothing was forwarded\n")


addons = [Shim()]
