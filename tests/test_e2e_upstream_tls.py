"""End to end: a legacy server as it is deployed, behind TLS with a private CA.

Issue 10 item 7. A delivery must reach the legacy server exactly as mitmproxy's pass-through
reaches it: with the same upstream TLS options (`ssl_verify_upstream_trusted_ca`,
`ssl_verify_upstream_trusted_confdir`, `client_certs`, `ssl_insecure`), the same `Host`
(the legacy server's authority, or the client's own with `keep_host_header`), and the
`cookie` fields an HTTP/2 client splits joined into one `Cookie` line. So every test here
sends one file through a real mitmdump shim (a tus upload, the delivery) and one request the
shim does not claim (a GET, the pass-through), and checks that both got through, or both did
not, and what the legacy server saw.

The PKI is made here with `cryptography`: a private CA, a server certificate for 127.0.0.1
only (no DNS name), and a client CA with a client certificate. The legacy server is the demo
WholeFileServer with its listening socket wrapped in TLS (the handshake happens in the
connection's thread). Everything listens on 127.0.0.1 with kernel-chosen ports; waits poll a
condition against a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto

from shim.demo_server import ReceivedRequest, WholeFileServer
from shim.model import Target
from shim.targets import forwarded_fields, target
from shim.upstream import Origin, Upstream, UpstreamTLS, UpstreamTLSError
from tests.harness import ShimKind, ShimLauncher, ShimProcess, wait_until
from tests.pki import Issued, issue, make_ca

pytestmark = pytest.mark.timeout(90)

KIB = 1024
TIMEOUT = 15.0
"""Deadline for any one request or wait; they normally take well under it."""
TUS = {"Tus-Resumable": "1.0.0"}
CHUNK_TYPE = "application/offset+octet-stream"
PAGE = b"a page the legacy server serves itself\n"
"""What the pass-through GET fetches: a file put in the legacy server's folder beforehand."""


# --- a private PKI ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Issued
    """The legacy server's private CA."""
    server: Issued
    """The legacy server's certificate: 127.0.0.1 only."""
    client_ca: Issued
    """The CA the legacy server trusts for client certificates."""
    client: Issued
    """A client certificate it accepts."""
    ca_dir: Path
    """A c_rehash folder (`<subject hash>.0`) holding `ca`."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "legacy-ca")
    client_ca = make_ca(folder, "client-ca")
    ca_dir = folder / "trusted"
    ca_dir.mkdir()
    # OpenSSL looks a CA up in a folder by its subject name hash (what `c_rehash` names files).
    subject_hash = crypto.X509.from_cryptography(ca.cert).subject_name_hash()
    (ca_dir / f"{subject_hash:08x}.0").write_bytes(ca.cert_pem.read_bytes())
    return Pki(ca, issue(ca, folder, "legacy-server", ip="127.0.0.1"), client_ca,
               issue(client_ca, folder, "shim-client", client=True), ca_dir)


# --- the legacy server, behind TLS ------------------------------------------------------------


class TlsLegacy:
    """The demo WholeFileServer behind TLS: its certificate for 127.0.0.1 from the private CA,
    and, with `client_ca`, a client certificate from that CA required."""

    def __init__(self, directory: Path, pki: Pki, require_client_cert: bool = False) -> None:
        self.server = WholeFileServer(directory)
        (directory / "page.txt").write_bytes(PAGE)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.server.bundle_pem)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(pki.client_ca.cert_pem)
        inner = self.server._server
        # The handshake in the connection's own thread (on its first read), not in accept():
        # a client that fails it must not hold up the next one.
        inner.socket = context.wrap_socket(inner.socket, server_side=True,
                                           do_handshake_on_connect=False)
        # Failed handshakes are what some tests are about; socketserver would print each one.
        inner.handle_error = lambda request, client_address: None  # type: ignore[method-assign]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def received(self) -> list[ReceivedRequest]:
        return list(self.server.received)

    def uploads(self) -> list[ReceivedRequest]:
        """The deliveries it got (a PUT below /uploads/, tus's default `forward.path`)."""
        return [r for r in self.received if r.method == "PUT" and r.path.startswith("/uploads/")]


@pytest.fixture
def tls_legacy(tmp_path: Path, pki: Pki) -> Iterator[TlsLegacy]:
    legacy = TlsLegacy(tmp_path / "tls-legacy", pki)
    legacy.server.start()
    try:
        yield legacy
    finally:
        legacy.server.stop()


@pytest.fixture
def mtls_legacy(tmp_path: Path, pki: Pki) -> Iterator[TlsLegacy]:
    legacy = TlsLegacy(tmp_path / "mtls-legacy", pki, require_client_cert=True)
    legacy.server.start()
    try:
        yield legacy
    finally:
        legacy.server.stop()


def config(wait: float = 10.0, give_up_after: float = 86400.0) -> dict[str, Any]:
    return {
        "delivery": {"wait": wait, "give_up_after": give_up_after},
        "upstream": {"timeout": 5.0},
        "storage": {"fsync": False},
    }


def front(shim: ShimLauncher, legacy: TlsLegacy, *options: str, kind: ShimKind = "mitmdump",
          **config_args: float) -> ShimProcess:
    """A shim in front of `legacy` with mitmproxy options `name=value` (`--set`, which both
    mitmdump and `python -m shim` take)."""
    extra: list[str] = []
    for option in options:
        extra += ["--set", option]
    return shim(config(**config_args), kind, upstream_url=legacy.url, extra_args=extra)


# --- talking to the shim ----------------------------------------------------------------------


def show(response: requests.Response) -> str:
    return f"{response.status_code} {dict(response.headers)} {response.text[:300]!r}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(proc: ShimProcess, data: bytes, headers: Mapping[str, str] | None = None
           ) -> tuple[str, requests.Response]:
    """A tus upload of `data`: create, then one PATCH with all of it; the upload's path and
    the PATCH's answer (204 once the legacy server took it)."""
    created = requests.post(proc.url + "/files/", timeout=TIMEOUT, headers={
        **TUS, "Upload-Length": str(len(data)), **(headers or {})})
    assert created.status_code == 201, show(created)
    path = urlsplit(created.headers["Location"]).path
    final = requests.patch(proc.url + path, data=data, timeout=TIMEOUT, headers={
        **TUS, "Upload-Offset": "0", "Content-Type": CHUNK_TYPE, **(headers or {})})
    return path, final


def head(proc: ShimProcess, path: str) -> requests.Response:
    return requests.head(proc.url + path, headers=TUS, timeout=TIMEOUT)


def wait_for_head(proc: ShimProcess, path: str, status: int) -> requests.Response:
    """Poll HEAD until it answers `status` (503, pending, meanwhile)."""
    answers: list[requests.Response] = []

    def answered() -> bool:
        answers.append(head(proc, path))
        assert answers[-1].status_code in (status, 503), show(answers[-1])
        return answers[-1].status_code == status

    wait_until(answered, TIMEOUT, f"HEAD {path} answering {status}", interval=0.1)
    return answers[-1]


def pass_through(proc: ShimProcess, headers: Mapping[str, str] | None = None,
                 timeout: float = TIMEOUT) -> requests.Response:
    """A request no protocol claims: mitmproxy sends it on to the legacy server."""
    return requests.get(proc.url + "/page.txt", headers=headers, timeout=timeout)


def assert_both_work(proc: ShimProcess, legacy: TlsLegacy) -> None:
    """A tus upload is delivered (204, the legacy server's 201, its bytes once, byte-exact)
    and a pass-through GET gets the legacy server's page."""
    data = os.urandom(200 * KIB + 3)
    path, final = upload(proc, data)
    assert final.status_code == 204, show(final)
    assert final.headers["Shim-Upstream-Status"] == "201", show(final)
    [delivered] = legacy.uploads()
    assert (delivered.size, delivered.sha256, delivered.status) == (len(data), sha256(data), 201)
    assert delivered.path == f"/uploads/{path.rsplit('/', 1)[-1]}", delivered

    page = pass_through(proc)
    assert page.status_code == 200 and page.content == PAGE, show(page)


def assert_both_fail(proc: ShimProcess, legacy: TlsLegacy, refused_late: bool = False) -> None:
    """The pass-through GET gets mitmproxy's 502; the delivery gets no answer (503 while it is
    retried, then FAILED: 502); the legacy server never saw a request of either.

    `refused_late`: the legacy server refuses the handshake only after the client finished its
    side (TLS 1.3, a missing client certificate). mitmproxy then sometimes answers the GET 502
    and sometimes leaves it unanswered (its own pass-through, not the shim's doing): either
    way, not the page."""
    if refused_late:
        try:
            page_status = pass_through(proc, timeout=3.0).status_code
        except requests.RequestException:
            page_status = None
        assert page_status in (502, None), page_status
    else:
        page = pass_through(proc)
        assert page.status_code == 502, show(page)

    data = os.urandom(20 * KIB)
    path, final = upload(proc, data)
    assert final.status_code == 503, show(final)
    failed = wait_for_head(proc, path, 502)
    assert "Shim-Upstream-Status" not in failed.headers, show(failed)
    assert legacy.received == [], legacy.received


# --- 1. the trusted CA, as a file or a folder; verification off -------------------------------


def test_private_ca_file_serves_delivery_and_pass_through(
        shim: ShimLauncher, tls_legacy: TlsLegacy, pki: Pki) -> None:
    """`ssl_verify_upstream_trusted_ca=<the private CA>`: pass-through trusts the legacy
    server's certificate, and so does the delivery (before issue 10 every delivery failed)."""
    proc = front(shim, tls_legacy, f"ssl_verify_upstream_trusted_ca={pki.ca.cert_pem}")
    assert_both_work(proc, tls_legacy)


def test_python_m_shim_takes_the_same_tls_options(
        shim: ShimLauncher, tls_legacy: TlsLegacy, pki: Pki) -> None:
    """`python -m shim --set ssl_verify_upstream_trusted_ca=...`, as mitmdump's --set."""
    proc = front(shim, tls_legacy, f"ssl_verify_upstream_trusted_ca={pki.ca.cert_pem}",
                 kind="python-m-shim")
    assert_both_work(proc, tls_legacy)


def test_private_ca_folder_serves_delivery_and_pass_through(
        shim: ShimLauncher, tls_legacy: TlsLegacy, pki: Pki) -> None:
    """`ssl_verify_upstream_trusted_confdir=<a c_rehash folder>` works as the file does."""
    proc = front(shim, tls_legacy, f"ssl_verify_upstream_trusted_confdir={pki.ca_dir}")
    assert_both_work(proc, tls_legacy)


def test_without_the_ca_both_fail(shim: ShimLauncher, tls_legacy: TlsLegacy) -> None:
    """No CA option: the legacy server's certificate is not trusted (mitmproxy trusts
    certifi's bundle, and so must the delivery): pass-through is 502 and the delivery fails;
    no request reaches the legacy server."""
    proc = front(shim, tls_legacy, wait=0.5, give_up_after=1.0)
    assert_both_fail(proc, tls_legacy)


def test_another_ca_is_not_trusted(shim: ShimLauncher, tls_legacy: TlsLegacy, pki: Pki) -> None:
    """A CA file that did not sign the legacy server's certificate (the client CA) is no
    better than none: both fail."""
    proc = front(shim, tls_legacy, f"ssl_verify_upstream_trusted_ca={pki.client_ca.cert_pem}",
                 wait=0.5, give_up_after=1.0)
    assert_both_fail(proc, tls_legacy)


def test_ssl_insecure_reaches_it_without_the_ca(shim: ShimLauncher, tls_legacy: TlsLegacy) -> None:
    """`ssl_insecure=true` turns verification off for both."""
    proc = front(shim, tls_legacy, "ssl_insecure=true")
    assert_both_work(proc, tls_legacy)


# --- 2. a client certificate ------------------------------------------------------------------


@pytest.mark.parametrize("as_folder", [False, True], ids=["file", "folder"])
def test_client_certificate_is_presented(shim: ShimLauncher, mtls_legacy: TlsLegacy, pki: Pki,
                                         tmp_path: Path, as_folder: bool) -> None:
    """A legacy server that requires a client certificate: `client_certs` names a PEM file
    with key and chain, or a folder where `<legacy host>.pem` is the one for that server
    (mitmproxy's rule); the delivery presents it, as pass-through does."""
    cert = pki.client.bundle_pem
    if as_folder:
        folder = tmp_path / "client-certs"
        folder.mkdir()
        (folder / "127.0.0.1.pem").write_bytes(cert.read_bytes())
        (folder / "other.example.pem").write_bytes(b"not for this server")
        cert = folder
    proc = front(shim, mtls_legacy, f"ssl_verify_upstream_trusted_ca={pki.ca.cert_pem}",
                 f"client_certs={cert}")
    assert_both_work(proc, mtls_legacy)


def test_without_a_client_certificate_both_fail(shim: ShimLauncher, mtls_legacy: TlsLegacy,
                                                pki: Pki) -> None:
    """The same legacy server without `client_certs`: the handshake is refused, for both. With
    TLS 1.3 the refusal (alert 116, certificate_required) may come after the delivery sent the
    whole file: it is still "never received" (retried, then FAILED), not "outcome unknown"."""
    proc = front(shim, mtls_legacy, f"ssl_verify_upstream_trusted_ca={pki.ca.cert_pem}",
                 wait=0.5, give_up_after=1.0)
    assert_both_fail(proc, mtls_legacy, refused_late=True)


# --- 3. Host, as pass-through sends it --------------------------------------------------------


def _host_seen(legacy: TlsLegacy, method: str) -> list[str | None]:
    return [r.header("Host") for r in legacy.received if r.method == method]


def test_host_is_the_legacy_servers_by_default(shim: ShimLauncher, tls_legacy: TlsLegacy,
                                               pki: Pki) -> None:
    """Without `keep_host_header`, mitmproxy's reverse mode sends the legacy server's own
    authority as Host, whatever the client's was; the delivery sends the same."""
    proc = front(shim, tls_legacy, f"ssl_verify_upstream_trusted_ca={pki.ca.cert_pem}")
    client_host = f"uploads.example:{proc.port}"
    page = pass_through(proc, {"Host": client_host})
    assert page.status_code == 200, show(page)
    _, final = upload(proc, os.urandom(10 * KIB), {"Host": client_host})
    assert final.status_code == 204, show(final)
    assert _host_seen(tls_legacy, "GET") == [tls_legacy.authority]
    assert _host_seen(tls_legacy, "PUT") == [tls_legacy.authority]


def test_keep_host_header_sends_the_clients_host(shim: ShimLauncher, tls_legacy: TlsLegacy,
                                                 pki: Pki) -> None:
    """With `keep_host_header=true`, pass-through sends the client's own Host; so must the
    delivery: the Host of the request that created the upload."""
    proc = front(shim, tls_legacy, f"ssl_verify_upstream_trusted_ca={pki.ca.cert_pem}",
                 "keep_host_header=true")
    client_host = f"uploads.example:{proc.port}"
    page = pass_through(proc, {"Host": client_host})
    assert page.status_code == 200, show(page)
    _, final = upload(proc, os.urandom(10 * KIB), {"Host": client_host})
    assert final.status_code == 204, show(final)
    assert _host_seen(tls_legacy, "GET") == [client_host]
    assert _host_seen(tls_legacy, "PUT") == [client_host]


def test_tls_client_pass_through_checks_the_legacy_servers_name(
        shim: ShimLauncher, tls_legacy: TlsLegacy, pki: Pki) -> None:
    """A client that reaches the shim over TLS, naming it `localhost` (SNI): pass-through must
    still check the legacy server's certificate against the legacy server's host (127.0.0.1),
    as mitmproxy's reverse mode does without `keep_host_header`, and as the delivery does."""
    proc = front(shim, tls_legacy, f"ssl_verify_upstream_trusted_ca={pki.ca.cert_pem}")
    with Http11Tls(proc, server_hostname="localhost") as conn:
        status, body = conn.get("/page.txt")
    assert (status, body) == (200, PAGE)


class Http11Tls:
    """One HTTP/1.1 GET over TLS to the shim (mitmproxy makes the shim's certificate up: it is
    not checked), with a chosen SNI."""

    def __init__(self, proc: ShimProcess, server_hostname: str) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["http/1.1"])
        raw = socket.create_connection(("127.0.0.1", proc.port), timeout=TIMEOUT)
        self.sock = context.wrap_socket(raw, server_hostname=server_hostname)

    def __enter__(self) -> Http11Tls:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def get(self, path: str) -> tuple[int, bytes]:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        received = bytearray()
        while chunk := self.sock.recv(65536):
            received += chunk
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body


# --- 4. Cookie: one line, however the client split it -----------------------------------------


def test_split_cookie_fields_are_joined_into_one() -> None:
    """RFC 9113 section 8.2.3 lets an HTTP/2 client send one `cookie` field per cookie; an
    HTTP/1.1 server must get one `Cookie` line (RFC 6265 section 5.4), "; "-joined in order,
    where the first was, as mitmproxy joins them for pass-through."""
    fields = (("authorization", "Bearer a"), ("cookie", "session=abc"), ("x-trace", "1"),
              ("cookie", "theme=dark"), ("Cookie", "lang=en"))
    assert forwarded_fields(fields) == (
        ("authorization", "Bearer a"), ("cookie", "session=abc; theme=dark; lang=en"), ("x-trace", "1"))
    one = (("Cookie", "session=abc"),)
    assert forwarded_fields(one) == one
    made = target("PUT", "/uploads/x", fields)
    assert [v for k, v in made.headers if k.lower() == "cookie"] == ["session=abc; theme=dark; lang=en"]


def test_http1_client_cookie_lines_arrive_as_one(shim: ShimLauncher, tls_legacy: TlsLegacy,
                                                 pki: Pki) -> None:
    """A client that sent its cookies on two lines: the delivery carries them on one."""
    proc = front(shim, tls_legacy, f"ssl_verify_upstream_trusted_ca={pki.ca.cert_pem}")
    data = os.urandom(5 * KIB)
    head_lines = (f"POST /files/ HTTP/1.1\r\nHost: 127.0.0.1:{proc.port}\r\nTus-Resumable: 1.0.0\r\n"
                  f"Upload-Length: {len(data)}\r\nContent-Type: {CHUNK_TYPE}\r\n"
                  f"Content-Length: {len(data)}\r\nCookie: session=abc\r\nCookie: theme=dark\r\n"
                  "Connection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", proc.port), timeout=TIMEOUT) as sock:
        sock.sendall(head_lines.encode() + data)
        answer = bytearray()
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 201"), bytes(answer[:500])
    [delivered] = tls_legacy.uploads()
    assert delivered.sha256 == sha256(data)
    assert [v for k, v in delivered.headers if k.lower() == "cookie"] == ["session=abc; theme=dark"]


@pytest.mark.parametrize("keep_host", [False, True], ids=["rewrite-host", "keep-host"])
def test_http2_client_reaches_it_as_pass_through_does(shim: ShimLauncher, tls_legacy: TlsLegacy,
                                                      pki: Pki, keep_host: bool) -> None:
    """An HTTP/2 client (over TLS to the shim) splitting its cookies and naming the shim in
    `:authority` (it sends no Host field): pass-through (mitmproxy) and the delivery both give
    the legacy server one `Cookie` line, and the same Host: the legacy server's, or with
    `keep_host_header` the client's `:authority`."""
    options = [f"ssl_verify_upstream_trusted_ca={pki.ca.cert_pem}"]
    if keep_host:
        options.append("keep_host_header=true")
    proc = front(shim, tls_legacy, *options)
    data = os.urandom(30 * KIB)
    crumbs = [("cookie", "session=abc"), ("cookie", "theme=dark")]
    authority = f"uploads.example:{proc.port}"
    with Http2(proc, authority) as conn:
        page = conn.request("GET", "/page.txt", crumbs)
        created = conn.request("POST", "/files/", [
            ("tus-resumable", "1.0.0"), ("upload-length", str(len(data))),
            ("content-type", CHUNK_TYPE), *crumbs], data)
    assert (page.status, page.body) == (200, PAGE), page
    assert created.status == 201, created
    [got] = [r for r in tls_legacy.received if r.method == "GET"]
    assert [v for k, v in got.headers if k.lower() == "cookie"] == ["session=abc; theme=dark"]
    [delivered] = tls_legacy.uploads()
    assert delivered.sha256 == sha256(data)
    assert [v for k, v in delivered.headers if k.lower() == "cookie"] == ["session=abc; theme=dark"]
    host = authority if keep_host else tls_legacy.authority
    assert (got.header("Host"), delivered.header("Host")) == (host, host)


@dataclass
class H2Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class Http2:
    """One HTTP/2 connection over TLS (ALPN h2) to the shim, one request at a time."""

    def __init__(self, proc: ShimProcess, authority: str) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", proc.port), timeout=TIMEOUT)
        self.sock = context.wrap_socket(raw, server_hostname=None)  # no SNI: see the SNI test
        assert self.sock.selected_alpn_protocol() == "h2"
        self.authority = authority
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self._flush()

    def __enter__(self) -> Http2:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def _flush(self) -> None:
        if data := self.conn.data_to_send():
            self.sock.sendall(data)

    def request(self, method: str, path: str, fields: Sequence[tuple[str, str]],
                body: bytes = b"") -> H2Response:
        stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream, [(":method", method), (":path", path), (":scheme", "https"),
                                        (":authority", self.authority), *fields],
                               end_stream=not body)
        view = memoryview(body)
        while view:
            window = min(self.conn.local_flow_control_window(stream),
                         self.conn.max_outbound_frame_size)
            if window > 0:
                self.conn.send_data(stream, bytes(view[:window]), end_stream=len(view) <= window)
                view = view[window:]
            self._flush()
            if view and window <= 0:
                self._receive(stream, None)
        self._flush()
        response = H2Response(0, [], b"")
        while not self._receive(stream, response):
            pass
        return response

    def _receive(self, stream: int, response: H2Response | None) -> bool:
        """Read once; fill `response`; whether its stream ended."""
        data = self.sock.recv(65536)
        assert data, "the shim closed the HTTP/2 connection"
        ended = False
        for event in self.conn.receive_data(data):
            if getattr(event, "stream_id", stream) != stream or response is None:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                text = [(str(k), str(v)) for k, v in event.headers or []]
                response.status = int(dict(text)[":status"])
                response.headers = [(k, v) for k, v in text if not k.startswith(":")]
            elif isinstance(event, h2.events.DataReceived):
                response.body += event.data or b""
                self.conn.acknowledge_received_data(event.flow_controlled_length or 0, stream)
            elif isinstance(event, h2.events.StreamEnded):
                ended = True
            elif isinstance(event, h2.events.StreamReset):
                raise AssertionError(f"stream reset: {event!r}")
        self._flush()
        return ended


# --- 5. the settings themselves ---------------------------------------------------------------


class _Options:
    """What mitmproxy's `ctx.options` holds, for `UpstreamTLS.from_options`."""

    ssl_insecure = False
    ssl_verify_upstream_trusted_ca: str | None = "/etc/ca.pem"
    ssl_verify_upstream_trusted_confdir: str | None = None
    client_certs: str | None = "~/certs"


def test_settings_are_read_from_mitmproxys_options() -> None:
    assert UpstreamTLS.from_options(_Options()) == UpstreamTLS(
        verify=True, ca_file="/etc/ca.pem", ca_dir=None, client_cert="~/certs")
    insecure = _Options()
    insecure.ssl_insecure = True
    insecure.client_certs = None
    assert UpstreamTLS.from_options(insecure) == UpstreamTLS(verify=False, ca_file="/etc/ca.pem")


def test_client_certificate_folder_is_looked_up_by_host(pki: Pki, tmp_path: Path) -> None:
    """A folder of `<host>.pem`: the one for the host, or none at all (no certificate sent,
    as mitmproxy)."""
    (tmp_path / "legacy.internal.pem").write_bytes(pki.client.bundle_pem.read_bytes())
    tls = UpstreamTLS(client_cert=str(tmp_path))
    assert tls.client_cert_for("legacy.internal") == str(tmp_path / "legacy.internal.pem")
    assert tls.client_cert_for("other.internal") is None
    assert UpstreamTLS(client_cert=str(pki.client.bundle_pem)).client_cert_for("x") == \
        str(pki.client.bundle_pem)


def test_unusable_files_are_reported_at_check(pki: Pki, tmp_path: Path) -> None:
    """A CA file or client certificate that does not load is an UpstreamTLSError naming it,
    which `check` raises at once (for start-up) and a delivery meets as "cannot connect"."""
    missing = tmp_path / "no-such-ca.pem"
    with pytest.raises(UpstreamTLSError, match=r"no-such-ca\.pem"):
        UpstreamTLS(ca_file=str(missing)).check("127.0.0.1")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(UpstreamTLSError, match=r"garbage\.pem"):
        UpstreamTLS(client_cert=str(garbage)).check("127.0.0.1")
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(pki.client.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")) + pki.client.cert_pem.read_bytes())
    with pytest.raises(UpstreamTLSError, match=r"encrypted\.pem"):  # and no prompt on a terminal
        UpstreamTLS(client_cert=str(encrypted)).check("127.0.0.1")
    UpstreamTLS(ca_file=str(pki.ca.cert_pem), client_cert=str(pki.client.bundle_pem)).check("127.0.0.1")


def test_unusable_ca_file_makes_a_delivery_unreachable(tmp_path: Path) -> None:
    """A delivery meeting a CA file that does not load is "cannot connect" (retried later),
    never an exception the delivery worker does not expect."""
    from shim.upstream import Unreachable

    async def attempt() -> None:
        upstream = Upstream(Origin("https", "127.0.0.1", 9), 1.0,
                            UpstreamTLS(ca_file=str(tmp_path / "missing.pem")))

        async def body() -> Any:
            yield b"x"

        await upstream.send(Target("PUT", "/x"), 1, body())

    with pytest.raises(Unreachable, match=r"missing\.pem"):
        asyncio.run(attempt())
