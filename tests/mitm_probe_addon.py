"""A test-only mitmproxy addon that exercises shim/mitm.py in a real mitmdump, without the shim.

tests/test_mitm_limits.py runs it as ``mitmdump --mode reverse:<test server> -s <this file>``.
What it does with a request depends on the first segment of its path:

* ``/early/<status>/...``: an async ``requestheaders`` hook refuses it with
  ``shim.mitm.answer_early`` (a text body naming the status), before the body is read;
* ``/claim/...``: claimed as the shim claims an upload: the request is pointed at an
  in-process sink, its body goes chunk by chunk to a stream callable that counts the bytes;
  the answer (``201``, body ``received <n>``) is set in ``response``;
* ``/slowhook/<seconds>/...``: like ``/claim`` after ``requestheaders`` has awaited that long;
* anything else goes to the test server unchanged (the reverse proxy's normal service).

Every hook prints a ``probe: <hook> <path> ...`` line, so tests can tell which hooks saw a
request and what the stream callable received. Option ``probe_head_limit`` is passed to
``shim.mitm.limit_request_heads`` (0: no limit).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mitmproxy import ctx, http

from shim.mitm import ANSWERED_EARLY, answer_early, limit_request_heads

log = logging.getLogger("probe")

_RECEIVED = "probe.received"
_CHUNKED_END = b"0\r\n\r\n"


class _Sink:
    """The claimed requests' server: reads a head and an empty chunked body, answers 204.

    The stream callable swallows every chunk, so the only chunked data the sink sees is the
    terminator, which makes its parsing trivial."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = b""
        try:
            while True:
                while _CHUNKED_END not in buffer:
                    data = await reader.read(65536)
                    if not data:
                        return
                    buffer += data
                buffer = buffer.split(_CHUNKED_END, 1)[1]
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            writer.close()


class Probe:
    """See the module docstring."""

    def __init__(self) -> None:
        self.sink = _Sink()

    def load(self, loader: Any) -> None:
        loader.add_option("probe_head_limit", int, 65536, "request head limit (0: none)")
        # tests.harness.ShimProcess always passes --set shim_config=...; accepted, unused.
        loader.add_option("shim_config", str, "", "unused by the probe")

    def configure(self, updated: set[str]) -> None:
        if "probe_head_limit" in updated:
            limit_request_heads(ctx.options.probe_head_limit)

    async def running(self) -> None:
        await self.sink.start()  # the test waits for the line below before it sends anything
        log.info("probe: sink on port %d, tcp_timeout %s", self.sink.port, ctx.options.tcp_timeout)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        path = flow.request.path
        parts = path.split("/")
        log.info("probe: requestheaders %s", path)
        if len(parts) > 2 and parts[1] == "early":
            status = int(parts[2])
            response = http.Response.make(status, f"refused by the probe: {status}\n",
                                          {"Content-Type": "text/plain"})
            sent = await answer_early(flow, response)
            log.info("probe: early %s sent=%s", path, sent)
        elif len(parts) > 2 and parts[1] == "slowhook":
            await asyncio.sleep(float(parts[2]))
            log.info("probe: slowhook done %s", path)
            self._claim(flow)
        elif parts[1:2] == ["claim"]:
            self._claim(flow)

    def _claim(self, flow: http.HTTPFlow) -> None:
        """Point the flow at the sink and count its body chunks as they arrive."""
        flow.metadata[_RECEIVED] = 0
        request = flow.request
        request.scheme = "http"
        request.host = "127.0.0.1"
        request.port = self.sink.port
        request.headers.pop("content-length", None)
        request.headers.pop("expect", None)
        request.headers["transfer-encoding"] = "chunked"

        def count(chunk: bytes) -> list[bytes]:
            flow.metadata[_RECEIVED] += len(chunk)
            return []

        request.stream = count

    def request(self, flow: http.HTTPFlow) -> None:
        log.info("probe: request %s received=%s", flow.request.path, flow.metadata.get(_RECEIVED))

    def response(self, flow: http.HTTPFlow) -> None:
        if _RECEIVED in flow.metadata:
            flow.response = http.Response.make(201, f"received {flow.metadata[_RECEIVED]}\n")
        assert flow.response is not None
        log.info("probe: response %s %d", flow.request.path, flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        log.info("probe: error %s: %s | received=%s answered_early=%s", flow.request.path,
                 flow.error.msg if flow.error else None, flow.metadata.get(_RECEIVED),
                 flow.metadata.get(ANSWERED_EARLY))


addons = [Probe()]
