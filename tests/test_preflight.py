"""The preflight (issue 9 item 6): the legacy server authorizes a creation before any byte is
stored, by `Expect: 100-continue` on the head of the delivery it will get, or by a GET to an
auth URL (nginx's `auth_request`).

Every legacy server here is a tiny asyncio server on 127.0.0.1 port 0, run in the test's own
event loop (each test body is one coroutine under `asyncio.run`, as in tests/test_engine.py).
It records the head it got and every byte that followed it until the shim closed the
connection, so the tests can assert what a user of the legacy server would see: the client's
credentials and the whole file's length in the head, and never a body.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shim.errors import ShimError
from shim.model import Answer, Target
from shim.preflight import MAX_ANSWER_BODY, Preflight, PreflightUnavailable, ask_expect, ask_url
from shim.upstream import Origin

DEADLINE = 10.0
"""Seconds any wait on a condition may take before the test fails."""
TIMEOUT = 5.0
"""The preflight's own timeout where a test does not measure it."""
CLOSE = b""
"""A reply that closes the connection without answering."""


@dataclass
class Seen:
    """One connection as the legacy server saw it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    raw_head: bytes
    after_head: bytearray = field(default_factory=bytearray)
    """Every byte the client sent after the head, until it closed the connection."""
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        found = self.values(name)
        return found[0] if found else None


Respond = Callable[[Seen], bytes | None]
"""What the server writes once the head is in: bytes, CLOSE, or None (nothing: wait)."""


class Legacy:
    """A legacy server answering each request head as `respond` says, then reading (and
    recording) whatever the client sends until it closes."""

    def __init__(self, respond: Respond, tls: ssl.SSLContext | None = None,
                 hang_up: bool = False) -> None:
        self.respond = respond
        self.tls = tls
        self.hang_up = hang_up
        """Close the connection right after the reply."""
        self.seen: list[Seen] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Legacy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await asyncio.wait_for(self._server.wait_closed(), DEADLINE)

    @property
    def origin(self) -> Origin:
        return Origin("https" if self.tls else "http", "127.0.0.1", self.port)

    def url(self, path: str) -> str:
        return f"{self.origin.scheme}://127.0.0.1:{self.port}{path}"

    async def finished(self, count: int = 1) -> list[Seen]:
        """The first `count` connections, once the client has closed each of them."""
        deadline = time.monotonic() + DEADLINE
        while len(self.seen) < count:
            assert time.monotonic() < deadline, f"only {len(self.seen)} of {count} connections"
            await asyncio.sleep(0.01)
        for seen in self.seen[:count]:
            await asyncio.wait_for(seen.closed.wait(), max(0.0, deadline - time.monotonic()))
        return self.seen[:count]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = [(k.strip(), v.strip()) for k, v in
                   (line.split(":", 1) for line in lines[1:] if line)]
        seen = Seen(method, target, headers, head)
        self.seen.append(seen)
        try:
            reply = self.respond(seen)
            if reply:
                writer.write(reply)
                await writer.drain()
            if reply == CLOSE or self.hang_up:
                return
            async with asyncio.timeout(DEADLINE):
                while data := await reader.read(65536):
                    seen.after_head += data
        except (ConnectionError, TimeoutError, ssl.SSLError):
            pass
        finally:
            seen.closed.set()
            writer.close()


def response(status: int, reason: str, body: bytes = b"", *fields: str) -> bytes:
    head = [f"HTTP/1.1 {status} {reason}", *fields, f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(head).encode("latin-1") + body


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


def refused_port() -> socket.socket:
    """A socket bound to a port on 127.0.0.1 but not listening: connecting to it is refused,
    and no other process can take the port while the socket stays open."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def by_user(seen: Seen) -> bytes | None:
    """bob may not upload (401); alice may (100 Continue)."""
    if seen.header("Authorization") == "Bearer bob":
        return response(401, "Unauthorized", b"bob may not upload\n",
                        'WWW-Authenticate: Bearer realm="files"')
    if seen.header("Authorization") == "Bearer alice":
        return CONTINUE
    return response(400, "Bad Request", b"who?\n")


# --- expect mode --------------------------------------------------------------------------


def test_legacy_server_refuses_bob_and_lets_alice_upload() -> None:
    """The issue's preflight test: 401 to one user is relayed, 100 to another is go ahead.
    The legacy server got the head of the delivery (method, path, credentials, the whole
    file's Content-Length, Expect: 100-continue), never a body byte."""
    async def body() -> None:
        async with Legacy(by_user) as legacy:
            fields = (("Content-Type", "application/pdf"), ("X-Request-Id", "r1"))
            bob = await ask_expect(legacy.origin, "PUT", "/uploads/report.pdf",
                                   (("Authorization", "Bearer bob"), *fields), 1048576, TIMEOUT)
            alice = await ask_expect(legacy.origin, "PUT", "/uploads/report.pdf",
                                     (("Authorization", "Bearer alice"), *fields), 1048576,
                                     TIMEOUT)
            assert isinstance(bob, Answer)
            assert (bob.status, bob.reason, bob.body) == (401, "Unauthorized",
                                                          b"bob may not upload\n")
            assert ("WWW-Authenticate", 'Bearer realm="files"') in bob.headers
            assert alice is None
            for seen, user in zip(await legacy.finished(2), ("bob", "alice"), strict=True):
                assert (seen.method, seen.target) == ("PUT", "/uploads/report.pdf")
                assert seen.values("Authorization") == [f"Bearer {user}"]
                assert seen.values("Content-Length") == ["1048576"]
                assert seen.values("Expect") == ["100-continue"]
                assert seen.values("Host") == [f"127.0.0.1:{legacy.port}"]
                assert seen.header("Content-Type") == "application/pdf"
                assert seen.header("X-Request-Id") == "r1"
                assert seen.header("Transfer-Encoding") is None
                assert bytes(seen.after_head) == b"", "the preflight sent a body"
    run(body)


def test_legacy_server_refuses_by_content_length_with_413() -> None:
    """A server with a size limit refuses the whole file's length before it is stored."""
    def limit(seen: Seen) -> bytes:
        if int(seen.header("Content-Length") or 0) > 1000:
            return response(413, "Content Too Large", b"max 1000 bytes\n", "Connection: close")
        return CONTINUE

    async def body() -> None:
        async with Legacy(limit) as legacy:
            auth = (("Authorization", "Basic YTpi"),)
            big = await ask_expect(legacy.origin, "POST", "/files", auth, 1001, TIMEOUT)
            small = await ask_expect(legacy.origin, "POST", "/files", auth, 1000, TIMEOUT)
            assert isinstance(big, Answer) and (big.status, big.body) == (413, b"max 1000 bytes\n")
            assert small is None
            seen = await legacy.finished(2)
            assert [s.header("Content-Length") for s in seen] == ["1001", "1000"]
            assert all(bytes(s.after_head) == b"" for s in seen)
    run(body)


def test_server_that_ignores_expect_means_go_ahead_after_the_wait() -> None:
    """Most servers never answer Expect and wait for the body: after `expect_wait` the shim
    goes ahead (RFC 9110 section 10.1.1) and closes, having sent no body."""
    async def body() -> None:
        async with Legacy(lambda seen: None) as legacy:
            started = time.monotonic()
            verdict = await ask_expect(legacy.origin, "PUT", "/u/a.bin",
                                       (("Authorization", "Bearer alice"),), 10, TIMEOUT,
                                       expect_wait=0.3)
            waited = time.monotonic() - started
            assert verdict is None
            assert 0.3 <= waited < TIMEOUT
            [seen] = await legacy.finished()
            assert seen.header("Expect") == "100-continue"
            assert bytes(seen.after_head) == b""
    run(body)


@pytest.mark.parametrize(("status", "reason", "relayed"), [
    (200, "OK", False), (204, "No Content", False), (201, "Created", False),
    (403, "Forbidden", True), (417, "Expectation Failed", True), (404, "Not Found", True),
])
def test_final_answer_to_the_head(status: int, reason: str, relayed: bool) -> None:
    """A 2xx to the head alone is go ahead; any other final status is relayed as it came."""
    async def body() -> None:
        async with Legacy(lambda seen: response(status, reason, b"said so\n")) as legacy:
            verdict = await ask_expect(legacy.origin, "PUT", "/x", (), 5, TIMEOUT)
            if relayed:
                assert isinstance(verdict, Answer)
                assert (verdict.status, verdict.reason, verdict.body) == (status, reason,
                                                                          b"said so\n")
            else:
                assert verdict is None
            [seen] = await legacy.finished()
            assert bytes(seen.after_head) == b""
    run(body)


def test_informational_answers_before_the_refusal_are_skipped() -> None:
    """103 Early Hints is not the verdict; the 401 after it is."""
    async def body() -> None:
        hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        async with Legacy(lambda seen: hints + response(401, "Unauthorized", b"no\n")) as legacy:
            verdict = await ask_expect(legacy.origin, "PUT", "/x", (), 5, TIMEOUT)
            assert isinstance(verdict, Answer) and verdict.status == 401
    run(body)


@pytest.mark.parametrize("length", [None, 0])
def test_unknown_or_empty_length_announces_chunked(length: int | None) -> None:
    """Without a length (or with 0: RFC 9110 section 10.1.1 forbids 100-continue without
    content, and `Content-Length: 0` would be a whole request) the head is chunked; a 411
    to it is go ahead, since the delivery itself will carry a Content-Length."""
    async def body() -> None:
        async with Legacy(lambda seen: response(411, "Length Required")) as legacy:
            verdict = await ask_expect(legacy.origin, "PUT", "/x",
                                       (("Authorization", "Bearer alice"),), length, TIMEOUT)
            assert verdict is None
            [seen] = await legacy.finished()
            assert seen.values("Transfer-Encoding") == ["chunked"]
            assert seen.header("Content-Length") is None
            assert seen.header("Expect") == "100-continue"
            assert bytes(seen.after_head) == b"", "not even the last chunk"
    run(body)


def test_411_to_a_head_with_a_length_is_relayed() -> None:
    async def body() -> None:
        async with Legacy(lambda seen: response(411, "Length Required")) as legacy:
            verdict = await ask_expect(legacy.origin, "PUT", "/x", (), 7, TIMEOUT)
            assert isinstance(verdict, Answer) and verdict.status == 411
    run(body)


def test_hop_by_hop_fields_are_never_forwarded() -> None:
    """The client's connection fields (and its framing, Host and Expect) never reach the
    legacy server; the shim sets Host, Content-Length and Expect itself, once each."""
    async def body() -> None:
        async with Legacy(lambda seen: CONTINUE) as legacy:
            client = (
                ("Host", "evil.example"), ("Content-Length", "3"), ("Expect", "something"),
                ("Transfer-Encoding", "chunked"), ("Connection", "close, X-Private"),
                ("X-Private", "secret"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
                ("Trailer", "X-Digest"), ("Upgrade", "h2c"), ("Proxy-Connection", "keep-alive"),
                ("Proxy-Authorization", "Basic cHJveHk6cHc="), ("Authorization", "Bearer alice"),
                ("X-Keep", "yes"),
            )
            assert await ask_expect(legacy.origin, "PUT", "/x", client, 42, TIMEOUT) is None
            [seen] = await legacy.finished()
            names = {k.lower() for k, _ in seen.headers}
            for gone in ("transfer-encoding", "connection", "x-private", "keep-alive", "te",
                         "trailer", "upgrade", "proxy-connection", "proxy-authorization"):
                assert gone not in names, gone
            assert seen.values("Host") == [f"127.0.0.1:{legacy.port}"]
            assert seen.values("Content-Length") == ["42"]
            assert seen.values("Expect") == ["100-continue"]
            assert seen.header("Authorization") == "Bearer alice"
            assert seen.header("X-Keep") == "yes"
    run(body)


def test_obs_text_is_sent_byte_for_byte() -> None:
    """mitmproxy hands fields over as UTF-8 with surrogate escapes; the head carries the
    bytes the client sent (RFC 9110 section 5.5 obs-text), not a re-encoding."""
    async def body() -> None:
        async with Legacy(lambda seen: CONTINUE) as legacy:
            value = b"caf\xe9 \xc3\xa9".decode("utf-8", "surrogateescape")
            assert await ask_expect(legacy.origin, "PUT", "/x", (("X-Name", value),), 1,
                                    TIMEOUT) is None
            [seen] = await legacy.finished()
            assert b"\r\nX-Name: caf\xe9 \xc3\xa9\r\n" in seen.raw_head
    run(body)


def test_a_refusal_body_is_bounded_and_its_framing_dropped() -> None:
    """A 1 MiB refusal is relayed with its first MAX_ANSWER_BODY bytes; its Content-Length
    (which no longer matches) is not part of the answer, its other fields are."""
    async def body() -> None:
        huge = b"x" * (1024 * 1024)
        reply = response(401, "Unauthorized", huge, "WWW-Authenticate: Basic",
                         "Connection: keep-alive")
        async with Legacy(lambda seen: reply) as legacy:
            verdict = await ask_expect(legacy.origin, "PUT", "/x", (), 5, TIMEOUT)
            assert isinstance(verdict, Answer)
            assert verdict.body == huge[:MAX_ANSWER_BODY]
            names = {k.lower() for k, _ in verdict.headers}
            assert "www-authenticate" in names
            assert not names & {"content-length", "connection", "transfer-encoding"}
    run(body)


def test_a_refusal_whose_body_stalls_is_relayed_after_the_timeout() -> None:
    """The status is the verdict: a body that never finishes does not hold the creation."""
    async def body() -> None:
        head = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\npartial"
        async with Legacy(lambda seen: head) as legacy:
            verdict = await ask_expect(legacy.origin, "PUT", "/x", (), 5, 0.5)
            assert isinstance(verdict, Answer)
            assert (verdict.status, verdict.body) == (403, b"partial")
    run(body)


def test_unreachable_legacy_server_is_unavailable() -> None:
    async def body() -> None:
        with refused_port() as sock:
            origin = Origin("http", "127.0.0.1", sock.getsockname()[1])
            with pytest.raises(PreflightUnavailable):
                await ask_expect(origin, "PUT", "/x", (("Authorization", "Bearer a"),), 5,
                                 TIMEOUT)
    run(body)


@pytest.mark.parametrize("reply", [CLOSE, b"this is not HTTP\r\n\r\n",
                                   b"HTTP/1.1 401 Unauthorized\r\nContent-Le"])
def test_no_verdict_from_the_legacy_server_is_unavailable(reply: bytes) -> None:
    """Closed without an answer, garbage, or a head cut off: nothing may be created."""
    async def body() -> None:
        async with Legacy(lambda seen: reply, hang_up=True) as legacy:
            with pytest.raises(PreflightUnavailable):
                await ask_expect(legacy.origin, "PUT", "/x", (), 5, TIMEOUT,
                                 expect_wait=TIMEOUT)
    run(body)


@pytest.mark.parametrize(("method", "path", "fields"), [
    ("PUT", "/x", (("X-Evil", "a\r\nX-Injected: 1"),)),
    ("PUT", "/a b", ()),
    ("P UT", "/x", ()),
])
def test_a_head_that_is_not_http_is_never_sent(method: str, path: str,
                                                fields: tuple[tuple[str, str], ...]) -> None:
    """CR/LF in a field, a space in the path or the method: ValueError, no connection."""
    async def body() -> None:
        async with Legacy(lambda seen: CONTINUE) as legacy:
            with pytest.raises(ValueError):
                await ask_expect(legacy.origin, method, path, fields, 5, TIMEOUT)
            await asyncio.sleep(0)  # let an (unexpected) connection be accepted
            assert legacy.seen == []
    run(body)


# --- url mode -----------------------------------------------------------------------------


def auth_service(seen: Seen) -> bytes:
    """An auth_request endpoint: the path names the verdict."""
    verdicts = {
        "/ok": response(204, "No Content"),
        "/fine": response(200, "OK", b"{}"),
        "/deny401": response(401, "Unauthorized", b"log in\n", 'WWW-Authenticate: Bearer'),
        "/deny403": response(403, "Forbidden", b"not yours\n"),
        "/broken": response(500, "Internal Server Error", b"oops\n"),
        "/moved": response(302, "Found", b"", "Location: /ok"),
        "/missing": response(404, "Not Found", b"no\n"),
    }
    return verdicts[seen.target.split("?")[0]]


@pytest.mark.parametrize(("path", "status"), [
    ("/ok", None), ("/fine", None), ("/deny401", 401), ("/deny403", 403),
    ("/broken", "unavailable"), ("/moved", "unavailable"), ("/missing", "unavailable"),
])
def test_auth_url_verdicts(path: str, status: int | str | None) -> None:
    """2xx allows, 401/403 is relayed, anything else is no verdict (the shim answers 503).
    The auth service got a GET with the client's credentials and no body."""
    async def body() -> None:
        async with Legacy(auth_service) as service:
            headers = (("Authorization", "Bearer bob"), ("Cookie", "s=1"),
                       ("Content-Length", "1048576"), ("Connection", "keep-alive"))
            call = ask_url(service.url(f"{path}?scope=upload"), headers, TIMEOUT)
            if status == "unavailable":
                with pytest.raises(PreflightUnavailable):
                    await call
            else:
                verdict = await call
                if status is None:
                    assert verdict is None
                else:
                    assert isinstance(verdict, Answer) and verdict.status == status
                    assert verdict.body in (b"log in\n", b"not yours\n")
            [seen] = await service.finished()
            assert (seen.method, seen.target) == ("GET", f"{path}?scope=upload")
            assert seen.values("Authorization") == ["Bearer bob"]
            assert seen.header("Cookie") == "s=1"
            assert seen.values("Host") == [f"127.0.0.1:{service.port}"]
            assert seen.header("Content-Length") is None
            assert seen.header("Connection") is None
            assert bytes(seen.after_head) == b""
    run(body)


def test_auth_url_that_never_answers_is_unavailable_after_the_timeout() -> None:
    async def body() -> None:
        async with Legacy(lambda seen: None) as service:
            started = time.monotonic()
            with pytest.raises(PreflightUnavailable):
                await ask_url(service.url("/slow"), (), 0.5)
            assert 0.5 <= time.monotonic() - started < DEADLINE
    run(body)


def test_auth_url_unreachable_is_unavailable() -> None:
    async def body() -> None:
        with refused_port() as sock, pytest.raises(PreflightUnavailable):
            await ask_url(f"http://127.0.0.1:{sock.getsockname()[1]}/auth", (), TIMEOUT)
    run(body)


@pytest.mark.parametrize("url", ["/auth", "ftp://127.0.0.1/auth", "127.0.0.1:80/auth"])
def test_auth_url_must_be_absolute_http(url: str) -> None:
    async def body() -> None:
        with pytest.raises(ValueError):
            await ask_url(url, (), TIMEOUT)
    run(body)


# --- TLS ----------------------------------------------------------------------------------


def self_signed(tmp_path: Path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


def test_https_legacy_server_with_and_without_verification(tmp_path: Path) -> None:
    """TLS is made as deliveries make it: `verify_tls=False` talks to a self-signed legacy
    server; `verify_tls=True` refuses its certificate, which is no verdict."""
    async def body() -> None:
        async with Legacy(by_user, tls=self_signed(tmp_path)) as legacy:
            bob = (("Authorization", "Bearer bob"),)
            alice = (("Authorization", "Bearer alice"),)
            refused = await ask_expect(legacy.origin, "PUT", "/x", bob, 5, TIMEOUT,
                                       verify_tls=False)
            assert isinstance(refused, Answer) and refused.status == 401
            assert await ask_expect(legacy.origin, "PUT", "/x", alice, 5, TIMEOUT,
                                    verify_tls=False) is None
            with pytest.raises(PreflightUnavailable):
                await ask_expect(legacy.origin, "PUT", "/x", alice, 5, TIMEOUT)
            with pytest.raises(PreflightUnavailable):
                await ask_url(legacy.url("/auth"), alice, TIMEOUT)
    run(body)


def test_https_auth_url_without_verification(tmp_path: Path) -> None:
    async def body() -> None:
        async with Legacy(auth_service, tls=self_signed(tmp_path)) as service:
            assert await ask_url(service.url("/ok"), (), TIMEOUT, verify_tls=False) is None
            denied = await ask_url(service.url("/deny403"), (), TIMEOUT, verify_tls=False)
            assert isinstance(denied, Answer) and denied.status == 403
    run(body)



@pytest.mark.parametrize(("status", "reason"), [(302, "Found"), (500, "Internal Server Error"),
                                                (503, "Service Unavailable")])
def test_a_3xx_or_5xx_to_the_head_is_no_verdict(status: int, reason: str) -> None:
    """Only a 4xx says something about this client; a redirect or a server error is the
    legacy server being unable to judge (the shim answers 503), as in url mode."""
    async def body() -> None:
        async with Legacy(lambda seen: response(status, reason, b"later\n")) as legacy:
            with pytest.raises(PreflightUnavailable):
                await ask_expect(legacy.origin, "PUT", "/x", (), 5, TIMEOUT)
    run(body)


def test_the_preflight_relays_every_challenge_and_asks_with_the_deliverys_head() -> None:
    """Preflight.check: the head is the delivery's (its multipart Content-Type and framed
    length); a refusal keeps all its WWW-Authenticate challenges (RFC 9110 section 11.6.1)."""
    def refuse(seen: Seen) -> bytes:
        return response(401, "Unauthorized", b"no\n", "WWW-Authenticate: Basic realm=a",
                        "WWW-Authenticate: Bearer realm=b", "X-Other: dropped")

    async def body() -> None:
        async with Legacy(refuse) as legacy:
            check = Preflight("expect", legacy.origin, "", TIMEOUT, expect_wait=TIMEOUT).check
            target = Target("POST", "/in/f", (("Authorization", "Bearer bob"),),
                            body="multipart", filename="f.bin")
            with pytest.raises(ShimError) as refused:
                await check(target, 1000)
            assert refused.value.status == 401 and refused.value.message == "no"
            assert dict(refused.value.fields) == {
                "Www-Authenticate": "Basic realm=a, Bearer realm=b"}
            [seen] = await legacy.finished()
            content_type = seen.header("Content-Type") or ""
            assert content_type.startswith("multipart/form-data; boundary=")
            assert int(seen.header("Content-Length") or 0) > 1000  # the part's framing too
    run(body)
