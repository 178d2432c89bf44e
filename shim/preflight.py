"""Ask the legacy server (or an auth URL) whether a creation is allowed, before any byte is stored.

The shim stores partial files on the legacy server's behalf, so without a preflight anyone can
fill the shim's disk with uploads the legacy server would refuse at once (401, 403, 413). Two
ways to ask (`auth.preflight`):

* `expect` (:func:`ask_expect`): send the head of the request that will eventually be
  delivered, with `Expect: 100-continue` (RFC 9110 section 10.1.1), and never its body. A
  server that would take it answers `100 Continue` (RFC 9110 section 15.2.1); one that would
  refuse it answers the final status it would give the whole request.
* `url` (:func:`ask_url`): a GET to a configured URL with the client's credentials, as
  nginx's `auth_request` does: 2xx allows, 401/403 refuses.

Both return None for "go ahead" and an :class:`shim.model.Answer` for a refusal the caller
relays to the client; :class:`PreflightUnavailable` means no usable answer (the caller answers
503). Connections, TLS (`shim.upstream.UpstreamTLS`) and the `Host` of an `expect` head
(`shim.upstream.delivery_host`) are made exactly as deliveries make them, over h11 on
asyncio; no mitmproxy here.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

import h11

from shim.errors import ShimError
from shim.model import Answer, HeaderList, Target
from shim.targets import HOP_BY_HOP, connection_fields
from shim.upstream import Framing, Origin, Upstream, UpstreamTLS, delivery_host
from shim.wire import as_bytes

__all__ = ["EXPECT_WAIT", "MAX_ANSWER_BODY", "Preflight", "PreflightUnavailable", "ask_expect", "ask_url"]

MAX_ANSWER_BODY = 64 * 1024
"""A refusal's body is relayed up to this size; the rest is never read (it would cost the shim
memory and time on the legacy server's say-so)."""

EXPECT_WAIT = 1.0
"""Seconds to wait for an answer to `Expect: 100-continue` before going ahead anyway (RFC 9110
section 10.1.1 lets a client proceed after waiting; many servers never answer the Expect)."""

_CLOSE_WAIT = 1.0
"""Seconds given to closing a preflight connection cleanly; it is abandoned after that."""

_READ_SIZE = 65536


class PreflightUnavailable(Exception):
    """No usable answer: unreachable, closed without answering, timed out (url mode), or (url
    mode) a status that is neither 2xx nor 401/403. Nothing may be created; answer 503."""


async def ask_expect(origin: Origin, method: str, path: str, headers: HeaderList,
                     length: int | None, timeout: float, verify_tls: bool | UpstreamTLS = True,
                     expect_wait: float = EXPECT_WAIT, host: str | None = None
                     ) -> Answer | None:
    """Send the legacy server the head of the request it will eventually get and return its
    verdict: None to go ahead, or the refusal to relay.

    `verify_tls` is how an https origin is reached, as deliveries reach it (a bool:
    `UpstreamTLS(verify=that)`). The head is `method path`, `Host: <host>` (the Host the
    delivery will send; default the origin's authority), the given `headers` (the client's
    credentials and the other fields the delivery will carry; hop-by-hop fields, including any
    Host, Content-Length, Transfer-Encoding and Expect, are dropped: see `_fields`),
    `Content-Length: <length>` and `Expect: 100-continue` (RFC 9110 section 10.1.1). The body
    is never sent; the connection is closed once the verdict is known.

    * `100 Continue` (RFC 9110 section 15.2.1) -> None.
    * A final status -> None if 2xx, else an Answer (status, reason, the server's fields minus
      hop-by-hop/framing ones, the body up to MAX_ANSWER_BODY) to relay: 401, 403, 413, and
      also 417 (a server that refuses the expectation itself: the operator should choose
      another preflight). A 2xx to the head alone is taken as "go ahead"; note that such a
      server answered a request whose body it never saw, so it may not check what this
      preflight is meant to check.
    * No answer within `expect_wait` seconds of sending the head -> None: the common case of a
      server that ignores Expect and waits for the body (RFC 9110 section 10.1.1 lets a client
      send the body after a wait). Such a server then sees a request whose body never comes and
      a closed connection; a server that acts on an incomplete body would act on this one.

    When `length` is None (unknown yet) or 0 the head says `Transfer-Encoding: chunked`
    instead: RFC 9110 section 10.1.1 forbids 100-continue on a request without content, and a
    `Content-Length: 0` head would be a complete request the server might act on. A 411
    (Length Required) to that chunked head is taken as "go ahead", as the delivery itself
    always carries a Content-Length.

    `timeout` bounds connecting and sending the head, and then reading a refusal's body (a
    refusal whose body does not arrive in time is relayed with what arrived). Raises
    PreflightUnavailable when the server cannot be reached or closes (or breaks HTTP) without
    a verdict, and ValueError when the head cannot be written at all (a method, path or field
    value that is not valid HTTP; creations check those first)."""
    chunked = not length
    framing = [(b"Transfer-Encoding", b"chunked")] if chunked else [
        (b"Content-Length", str(length).encode("ascii"))]
    request = _request(method, path, [
        (b"Host", as_bytes(host or origin.authority)), *_fields(headers), *framing,
        (b"Expect", b"100-continue")])
    conn = h11.Connection(h11.CLIENT)
    reader, writer = await _open(origin, timeout, verify_tls)
    try:
        try:
            async with asyncio.timeout(timeout):
                writer.write(conn.send(request) or b"")
                await writer.drain()
        except (OSError, TimeoutError) as exc:
            raise PreflightUnavailable(
                f"cannot send the preflight head to {origin.authority}: {exc!r}") from exc
        try:
            async with asyncio.timeout(expect_wait) as waiting:
                response = await _final_or_continue(conn, reader)
        except TimeoutError as exc:
            if waiting.expired():
                return None  # the server ignores Expect: go ahead (RFC 9110 section 10.1.1)
            raise PreflightUnavailable(f"{origin.authority} broke off the preflight: {exc!r}") from exc
        except (OSError, h11.ProtocolError) as exc:
            raise PreflightUnavailable(
                f"{origin.authority} gave no answer to the preflight: {exc!r}") from exc
        status = response.status_code
        if status == 100 or 200 <= status < 300 or (status == 411 and chunked):
            return None
        if not 400 <= status < 500:  # a 3xx or 5xx says nothing about this client
            raise PreflightUnavailable(f"{origin.authority} answered the preflight {status}")
        return await _answer(response, conn, reader, timeout)
    finally:
        await _close(writer)


async def ask_url(url: str, headers: HeaderList, timeout: float,
                  verify_tls: bool | UpstreamTLS = True) -> Answer | None:
    """GET `url` (absolute, http or https) with the client's `headers` and return the verdict:
    None when it answers 2xx (allowed), the Answer to relay when it answers 401 or 403.

    This is nginx's `auth_request`: the URL's service decides from the credentials alone, and
    sees no body. Hop-by-hop fields (see `_fields`; Host, Content-Length and Expect among
    them) are dropped from `headers`; Host is the URL's authority. Redirects are not
    followed. `timeout` bounds the whole exchange up to the status line, and then reading a
    refusal's body (which is relayed with what arrived by then, up to MAX_ANSWER_BODY).

    Raises PreflightUnavailable for any other status (3xx, 404, 5xx, ...), for no connection,
    and for no answer within `timeout`; ValueError for a URL that is not absolute http(s) or
    fields that cannot be written. TLS to an https URL is made with `verify_tls` (as
    deliveries make it; a client certificate folder is looked up under the URL's host)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the preflight URL must be absolute http(s), not {url!r}")
    origin = Origin.parse(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = _request("GET", target, [
        (b"Host", origin.authority.encode("ascii")), *_fields(headers)])
    conn = h11.Connection(h11.CLIENT)
    reader, writer = await _open(origin, timeout, verify_tls)
    try:
        try:
            async with asyncio.timeout(timeout):
                writer.write(conn.send(request) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                response = await _final_or_continue(conn, reader)
                while response.status_code < 200:  # 1xx to a GET: wait for the final one
                    response = await _final_or_continue(conn, reader)
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            raise PreflightUnavailable(f"the preflight URL {url} gave no answer: {exc!r}") from exc
        status = response.status_code
        if 200 <= status < 300:
            return None
        if status in (401, 403):
            return await _answer(response, conn, reader, timeout)
        raise PreflightUnavailable(f"the preflight URL {url} answered {status}, "
                                   "neither 2xx (allow) nor 401/403 (refuse)")
    finally:
        await _close(writer)


def _fields(headers: HeaderList) -> list[tuple[bytes, bytes]]:
    """`headers` minus hop-by-hop fields (the fixed ones and those a `Connection` field
    names, RFC 9110 section 7.6.1), as the bytes the client sent.

    mitmproxy hands header text over decoded as UTF-8 with surrogate escapes; encoding it back
    the same way forwards obs-text (RFC 9110 section 5.5) byte for byte."""
    dropped = connection_fields(headers)
    return [(as_bytes(name), as_bytes(value)) for name, value in headers
            if name.lower() not in dropped]


def _request(method: str, target: str, headers: list[tuple[bytes, bytes]]) -> h11.Request:
    """The request head, validated by h11 before any connection is made."""
    try:
        return h11.Request(method=method, target=target.encode("utf-8", "surrogateescape"),
                           headers=headers)
    except (h11.LocalProtocolError, UnicodeEncodeError) as exc:
        raise ValueError(f"cannot write a preflight request for {method} {target!r}: {exc}") from exc


async def _open(origin: Origin, timeout: float, verify_tls: bool | UpstreamTLS
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection made as deliveries make theirs (same TLS settings), within `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            return await Upstream(origin, timeout, verify_tls)._connect()
    except (OSError, TimeoutError) as exc:
        raise PreflightUnavailable(f"cannot connect to {origin.authority}: {exc!r}") from exc


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    """The next h11 event, reading as needed; the end of the stream is fed to h11, which turns
    it into ConnectionClosed or a RemoteProtocolError (cut off mid-message)."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(_READ_SIZE))


async def _final_or_continue(conn: h11.Connection,
                             reader: asyncio.StreamReader) -> h11.Response | h11.InformationalResponse:
    """The first `100 Continue` or final response; other 1xx (102, 103) are skipped."""
    while True:
        event = await _next_event(conn, reader)
        if isinstance(event, h11.Response):
            return event
        if isinstance(event, h11.InformationalResponse):
            if event.status_code == 100:
                return event
            continue
        raise h11.RemoteProtocolError(f"no response, got {event!r}")


async def _answer(response: h11.Response | h11.InformationalResponse, conn: h11.Connection,
                  reader: asyncio.StreamReader, timeout: float) -> Answer:
    """The refusal to relay: its body is read for at most `timeout` seconds and
    MAX_ANSWER_BODY bytes; whatever arrived by then is kept, as the status is the verdict.

    Framing and hop-by-hop fields are dropped from the headers: the body may be cut short and
    the relay frames it anew. Names keep the server's spelling; text is decoded as latin-1,
    as shim.upstream decodes answers."""
    body = bytearray()
    with contextlib.suppress(OSError, TimeoutError, h11.ProtocolError):
        async with asyncio.timeout(timeout):
            while len(body) < MAX_ANSWER_BODY:
                event = await _next_event(conn, reader)
                if isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
    headers = tuple((k.decode("latin-1"), v.decode("latin-1"))
                    for k, v in response.headers.raw_items()
                    if k.decode("latin-1").lower() not in HOP_BY_HOP)
    return Answer(response.status_code, response.reason.decode("latin-1"), headers,
                  bytes(body[:MAX_ANSWER_BODY]))


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close the connection without sending anything more (no body ever follows a preflight
    head), waiting a little for the close to complete so that nothing is left behind."""
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), _CLOSE_WAIT)


_RELAYED = frozenset({"www-authenticate", "retry-after", "link"})
"""Fields of a refusal passed on to the client with its status (RFC 9110 section 11.6.1:
a 401 needs its WWW-Authenticate)."""


class Preflight:
    """`auth.preflight`: ask the legacy server, before an upload is created, whether it
    would take this file from this client; its refusal is the client's answer."""

    def __init__(self, mode: str, origin: Origin, url: str, timeout: float,
                 tls: UpstreamTLS | bool = True, expect_wait: float = EXPECT_WAIT,
                 keep_host: bool = False) -> None:
        """`tls` and `keep_host` as the delivery's `shim.upstream.Upstream` has them, so
        that the legacy server is asked over the connection, and with the Host, that the
        delivery will use."""
        self.mode = mode
        self.origin = origin
        self.url = url
        self.timeout = timeout
        self.tls = tls if isinstance(tls, UpstreamTLS) else UpstreamTLS(verify=tls)
        self.expect_wait = expect_wait
        self.keep_host = keep_host

    async def check(self, target: Target, length: int | None) -> None:
        """Raise ShimError with the legacy server's refusal (its status, WWW-Authenticate
        and body), or 503 when it gives no verdict; return when it allows the upload."""
        try:
            if self.mode == "expect":
                # The head of the delivery to come: its Content-Type and framed length.
                framing = Framing.for_target(target)
                framed = None if length is None else \
                    len(framing.head) + length + len(framing.tail)
                fields = (*target.headers, *((("Content-Type", framing.content_type),)
                                             if framing.content_type else ()))
                answer = await ask_expect(self.origin, target.method, target.path, fields,
                                          framed, self.timeout, self.tls, self.expect_wait,
                                          delivery_host(self.origin, target, self.keep_host))
            else:
                answer = await ask_url(self.url, target.headers, self.timeout, self.tls)
        except (PreflightUnavailable, ValueError) as exc:
            raise ShimError("preflight-unavailable", f"the legacy server could not be asked "
                            f"whether it takes this upload: {exc}", 503,
                            {"Retry-After": 10}) from exc
        if answer is not None:
            # Capitalised: ShimError carries response fields under capitalised keys; repeated
            # ones (several WWW-Authenticate challenges) joined (RFC 9110 section 5.3).
            relayed: dict[str, str] = {}
            for name, value in answer.headers:
                if name.lower() in _RELAYED:
                    key = name.title()
                    relayed[key] = f"{relayed[key]}, {value}" if key in relayed else value
            text = answer.body.decode("utf-8", "replace").strip()
            raise ShimError("preflight-refused", text or f"the legacy server refused this "
                            f"upload: {answer.status} {answer.reason}", answer.status,
                            dict(relayed))
