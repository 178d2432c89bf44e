"""End to end: PUT/POST with Content-Range and 308 Resume Incomplete (seed 000, Google Cloud
Storage sessions) through a real ``mitmdump`` shim to the real whole-file-only legacy server.

Clients are real: ``curl`` (seed 000's exchange, byte for byte), google-resumable-media (the
GCS JSON-API client, PROTOCOLS.md section 3) and ``requests``.  Every test that finishes a file
asserts what a user would notice on the legacy side: exactly one request for that file,
byte-exact, and never a Content-Range, X-Upload-* or other protocol header.

Connections are cut without timing guesses: the head and part of a chunk go out on a raw
socket; once mitmproxy logs that it streams that request into the shim, the socket is closed
and the test waits for the shim's own log line saying what it kept. Progress is not watched
with inquiries: an inquiry on an upload ends a request still writing to it (take-over).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest
import requests
from google import resumable_media
from google.resumable_media.requests import ResumableUpload

from shim.demo_server import ReceivedRequest, WholeFileServer
from tests.harness import PayloadFactory, ShimLauncher, ShimProcess, sha256_of, shared_shim, wait_until

pytestmark = pytest.mark.timeout(120)

KIB = 1024
MIB = 1024 * KIB
TIMEOUT = 30.0
"""Deadline for anything the tests wait for (they normally wait well under a second)."""
HTTP_TIMEOUT = 10.0
LEAKED_PREFIXES = ("upload-", "tus-", "x-upload-")
LEAKED_NAMES = ("content-range", "x-goog-resumable")
LEFT_MID_BODY = re.compile(r"client left mid-body; upload \S+ keeps (\d+) bytes")
"""What the shim logs once it has let go of a request cut off mid-body (shim/exchange.py)."""
GCS_PATH = "/upload/storage/v1/b/bucket/o"

Shared = tuple[ShimProcess, WholeFileServer]


# --- talking to the shim ------------------------------------------------------------------


def content_range(start: int, size: int, total: int | None) -> str:
    """``bytes S-E/TOTAL`` for ``size`` bytes at ``start`` (``*`` for an unknown total)."""
    return f"bytes {start}-{start + size - 1}/{'*' if total is None else total}"


def put_chunk(
    url: str,
    data: bytes,
    start: int,
    total: int | None,
    headers: Mapping[str, str] | None = None,
    method: str = "PUT",
) -> requests.Response:
    """Send ``data`` as the bytes from ``start`` of an upload of ``total`` bytes."""
    fields = {"Content-Range": content_range(start, len(data), total), **(headers or {})}
    return requests.request(
        method, url, data=data, headers=fields, timeout=HTTP_TIMEOUT, allow_redirects=False
    )


def inquire(
    url: str, total: int | None, headers: Mapping[str, str] | None = None, method: str = "PUT"
) -> requests.Response:
    """The status inquiry: an empty request with ``Content-Range: bytes */TOTAL`` (or ``*/*``)."""
    fields = {"Content-Range": f"bytes */{'*' if total is None else total}", **(headers or {})}
    return requests.request(
        method, url, data=b"", headers=fields, timeout=HTTP_TIMEOUT, allow_redirects=False
    )


def show(response: requests.Response) -> str:
    """A response, for assertion messages."""
    return f"{response.status_code} {response.reason} {dict(response.headers)} {response.text[:300]!r}"


def range_of(stored: int) -> str | None:
    """The ``Range`` a 308 carries when ``stored`` bytes are stored (none for nothing)."""
    return f"bytes=0-{stored - 1}" if stored else None


def stored_by(response: requests.Response) -> int:
    """Bytes stored according to a 308 Resume Incomplete (no Range: none)."""
    assert response.status_code == 308, show(response)
    assert response.reason == "Resume Incomplete", show(response)
    field = response.headers.get("Range")
    if field is None:
        return 0
    match = re.fullmatch(r"bytes=0-(\d+)", field)
    assert match is not None, show(response)
    return int(match.group(1)) + 1


def assert_resume_incomplete(response: requests.Response, stored: int) -> None:
    """A 308 Resume Incomplete showing exactly ``stored`` bytes, without a body."""
    assert stored_by(response) == stored, show(response)
    assert response.headers.get("Range") == range_of(stored), show(response)
    assert response.content == b"", show(response)


def stored_bytes(url: str, total: int | None, headers: Mapping[str, str] | None = None) -> int:
    """Bytes the shim holds for an upload, asked with an inquiry."""
    return stored_by(inquire(url, total, headers))


def assert_text_refusal(response: requests.Response, status: int, fragment: str) -> None:
    """A refusal by the shim itself: ``status`` with a plain-text message containing ``fragment``."""
    assert response.status_code == status, show(response)
    assert response.headers.get("Content-Type", "").startswith("text/plain"), show(response)
    assert fragment in response.text, show(response)


def absolute(proc: ShimProcess, location: str) -> str:
    """A Location of the shim (it may be relative) as an absolute URL on its current port."""
    return urljoin(f"{proc.url}/", location)


def session_id(location: str) -> str:
    """The ``upload_id`` of a session URI."""
    return parse_qs(urlsplit(location).query)["upload_id"][0]


def legacy_json(body: bytes) -> dict[str, Any]:
    """The legacy server's JSON answer to a stored file (path, size, sha256)."""
    parsed = json.loads(body)
    assert isinstance(parsed, dict), body
    return parsed


# --- cutting a chunk off midway -----------------------------------------------------------


def send_partial(
    proc: ShimProcess, method: str, target: str, headers: Mapping[str, str], length: int, part: bytes
) -> socket.socket:
    """Open a raw connection and send a request head announcing ``length`` body bytes, then
    only ``part`` of the body. The caller closes the socket (see :func:`cut_off`)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{proc.port}"]
    lines += [f"{name}: {value}" for name, value in headers.items() if name.lower() != "content-length"]
    lines.append(f"Content-Length: {length}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    sock = socket.create_connection(("127.0.0.1", proc.port), timeout=HTTP_TIMEOUT)
    sock.sendall(head + part)
    return sock


def kept_after_cuts(proc: ShimProcess) -> list[int]:
    """What the shim kept of each request cut off so far (from its log)."""
    return [int(m.group(1)) for m in LEFT_MID_BODY.finditer(proc.output())]


def wait_until_streaming(proc: ShimProcess, sock: socket.socket) -> None:
    """Wait until the shim streams the body arriving on ``sock`` into its store.

    mitmproxy logs this once the request is connected to the shim's sink; body bytes that came
    earlier were queued and are fed first, in order. A client that goes away before this
    loses what it sent (see test_bytes_of_a_chunk_cut_at_once_are_kept)."""
    port = sock.getsockname()[1]
    proc.wait_for_output(rf"\[127\.0\.0\.1:{port}\] Streaming request to ", TIMEOUT)


def cut_off(proc: ShimProcess, sock: socket.socket, expected: int) -> None:
    """Close a connection in the middle of its body, as a broken network does, and wait until
    the shim has let go of the request; it must keep ``expected`` bytes (all that were sent).

    No inquiry is used to watch progress: an inquiry is a write on the upload and ends the
    running request itself (see test_inquiry_ends_a_stalled_chunk)."""
    wait_until_streaming(proc, sock)
    before = len(kept_after_cuts(proc))
    sock.close()
    wait_until(lambda: len(kept_after_cuts(proc)) > before, TIMEOUT, "the shim letting go of the request")
    assert kept_after_cuts(proc)[before:] == [expected], proc.output()


# --- the legacy server's side -------------------------------------------------------------


def assert_no_protocol_leak(legacy: WholeFileServer) -> None:
    """The legacy server never saw Content-Range, X-Upload-*, Upload-*, Tus-* or x-goog-resumable."""
    for request in legacy.received:
        leaked = [n for n in request.header_names() if n in LEAKED_NAMES or n.startswith(LEAKED_PREFIXES)]
        assert not leaked, f"{request.method} {request.path} carried {leaked}"


def delivered_once(
    legacy: WholeFileServer, source: Path, method: str, path: str, *, alone: bool = True
) -> ReceivedRequest:
    """The one request the legacy server received at ``path`` (path and query): the whole
    file, accepted (201). With ``alone`` it received nothing else either (a legacy server of
    the test's own, not the shared one)."""
    assert_no_protocol_leak(legacy)
    received = list(legacy.received)
    mine = [r for r in received if r.path == path]
    assert [(r.method, r.path, r.status) for r in mine] == [(method, path, 201)], received
    if alone:
        assert len(received) == 1, received
    [request] = mine
    assert request.complete
    assert (request.size, request.sha256) == (source.stat().st_size, sha256_of(source))
    return request


def assert_legacy_stored(legacy: WholeFileServer, stored_path: str, source: Path, body: bytes) -> None:
    """The legacy server's answer describes ``source`` and its copy on disk is byte-exact."""
    answer = legacy_json(body)
    assert answer == {"path": stored_path, "size": source.stat().st_size, "sha256": sha256_of(source)}
    assert sha256_of(legacy.directory / stored_path.lstrip("/")) == sha256_of(source)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """One legacy server and one shim (default config) for the tests that need no config of
    their own and no legacy failure; starting mitmdump is most of an e2e test's time. Each
    test uses its own URL, so they share no upload, and looks only at its own path on the
    legacy side."""
    yield from shared_shim(tmp_path_factory, "content-range-shared")


# --- 1. seed 000 with curl -----------------------------------------------------------------


class CurlResult(NamedTuple):
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


def curl_path() -> str:
    """The curl executable; the seed-000 test fails (not skips) without it."""
    path = shutil.which("curl")
    if path is None:
        pytest.fail("curl is not installed; the seed-000 test drives the real curl", pytrace=False)
    return path


def curl(url: str, args: list[str], workdir: Path) -> CurlResult:
    """Run curl once; return the status, the (last) header block and the body it got."""
    head_file, body_file = workdir / "curl-head.txt", workdir / "curl-body.bin"
    command = [curl_path(), "-sS", "--max-time", str(TIMEOUT), "-D", str(head_file), "-o", str(body_file)]
    result = subprocess.run(
        [*command, *args, url], capture_output=True, text=True, timeout=TIMEOUT + 10, check=False
    )
    assert result.returncode == 0, f"curl exited {result.returncode}: {result.stderr}"
    blocks = [b for b in head_file.read_bytes().decode("latin-1").split("\r\n\r\n") if b.strip()]
    status_line, *field_lines = blocks[-1].split("\r\n")  # the last block: after any 100 Continue
    _, status, reason = [*status_line.split(" ", 2), ""][:3]
    headers = {}
    for line in field_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return CurlResult(int(status), reason, headers, body_file.read_bytes())


def test_seed_000_exchange_with_curl(
    shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory, tmp_path: Path
) -> None:
    """Seed 000 verbatim with curl: 524288-byte chunks of a 2,000,000-byte zip, one chunk cut
    off, the ``bytes */2000000`` inquiry, resume from Range end + 1, a final chunk overlapping
    the stored bytes, the legacy server's 201 to curl, one whole PUT upstream."""
    curl_path()
    proc = shim()
    total, chunk = 2_000_000, 524_288
    source = payload(total, "abc.zip")
    data = source.read_bytes()
    target = "/api/upload?file=abc.zip"
    url = f"{proc.url}{target}"
    chunk_file = tmp_path / "chunk.bin"

    def send(start: int, end: int) -> CurlResult:
        """``curl -X PUT --data-binary @chunk`` for bytes start..end, as in the seed."""
        chunk_file.write_bytes(data[start : end + 1])
        return curl(url, [
            "-X", "PUT", "--data-binary", f"@{chunk_file}",
            "-H", f"Content-Range: bytes {start}-{end}/{total}",
            "-H", "Content-Type: application/zip",
        ], tmp_path)

    def assert_308(result: CurlResult, last: int) -> None:
        assert (result.status, result.reason) == (308, "Resume Incomplete"), result
        assert result.headers.get("range") == f"bytes=0-{last}", result
        assert (result.headers.get("content-length"), result.body) == ("0", b""), result

    assert_308(send(0, 524_287), 524_287)
    assert_308(send(524_288, 1_048_575), 1_048_575)

    # The third chunk breaks off after 200,000 of its 524,288 bytes.
    cut_at = 1_048_576 + 200_000
    sock = send_partial(
        proc, "PUT", target,
        {"Content-Range": f"bytes 1048576-1572863/{total}", "Content-Type": "application/zip"},
        chunk, data[1_048_576:cut_at],
    )
    cut_off(proc, sock, cut_at)

    # The seed's inquiry: PUT, Content-Length: 0, Content-Range: bytes */2000000.
    inquiry = curl(url, [
        "-X", "PUT", "--data-binary", "", "-H", "Content-Type:",
        "-H", f"Content-Range: bytes */{total}",
    ], tmp_path)
    assert_308(inquiry, cut_at - 1)  # every byte that arrived is kept
    resume_at = int(inquiry.headers["range"].rpartition("-")[2]) + 1
    assert resume_at == cut_at

    # Resume from Range end + 1 with a full chunk ...
    assert_308(send(resume_at, resume_at + chunk - 1), resume_at + chunk - 1)
    assert legacy.received == []
    # ... then the client's own last chunk, which starts before the stored end: the overlap
    # is skipped, the rest appended, and the file is complete.
    final = send(1_572_864, total - 1)
    assert final.status == 201, final
    assert final.headers.get("location") == "/api/upload", final
    assert final.headers.get("content-type") == "application/json", final
    assert_legacy_stored(legacy, "/api/upload", source, final.body)

    request = delivered_once(legacy, source, "PUT", target)
    assert request.header("Content-Type") == "application/zip"

    # A retried final chunk gets the recorded answer; nothing goes upstream again.
    again = send(1_572_864, total - 1)
    assert (again.status, again.body) == (201, final.body), again
    assert len(legacy.received) == 1


def test_inquiry_ends_a_stalled_chunk(shared: Shared, payload: PayloadFactory) -> None:
    """A chunk whose connection stalls (no FIN ever comes, as behind a dead NAT mapping) is
    ended by the client's inquiry when it comes back: the shim closes the stale connection,
    keeps what it had read, and the 308 shows exactly that; the upload resumes from there."""
    proc, legacy = shared
    size = 1_000_000
    source = payload(size)
    data = source.read_bytes()
    target = "/stalled/upload?file=stalled.bin"
    url = f"{proc.url}{target}"
    assert_resume_incomplete(put_chunk(url, data[:300_000], 0, size), 300_000)

    fields = {"Content-Range": content_range(300_000, 400_000, size)}
    sock = send_partial(proc, "PUT", target, fields, 400_000, data[300_000:500_000])
    wait_until_streaming(proc, sock)
    before = len(kept_after_cuts(proc))

    stored = stored_by(inquire(url, size))
    assert 300_000 <= stored <= 500_000  # what the shim had read of the stalled chunk
    wait_until(lambda: len(kept_after_cuts(proc)) > before, TIMEOUT, "the shim ending the stalled chunk")
    assert kept_after_cuts(proc)[before:] == [stored]
    sock.settimeout(TIMEOUT)
    try:
        leftover = sock.recv(65536)
    except ConnectionResetError:
        leftover = b""
    finally:
        sock.close()
    assert leftover == b"", leftover  # closed without an answer

    final = put_chunk(url, data[stored:], stored, size)
    assert final.status_code == 201, show(final)
    delivered_once(legacy, source, "PUT", target, alone=False)


# --- 2. google-resumable-media -------------------------------------------------------------


class ShimTransport:
    """The transport google-resumable-media calls (``requests.Session.request``'s shape).

    It resolves the shim's session URI against the shim's URL (the shim answers a relative
    Location, see test_google_client_uses_the_location_as_is) and cuts one chunk off midway:
    the chunk starting at ``cut_at`` goes out half on a raw socket, which is closed once the
    shim holds that half; the client sees a ConnectionError, as on a broken network.
    """

    def __init__(self, proc: ShimProcess, cut_at: int | None = None) -> None:
        self.proc = proc
        self.cut_at = cut_at
        self.cuts = 0
        self.ranges: list[str] = []
        """The Content-Range of every request, in order ("" for none)."""
        self.session = requests.Session()

    def request(
        self,
        method: str,
        url: str,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | tuple[float, float] | None = None,
    ) -> requests.Response:
        url = absolute(self.proc, url)
        fields = dict(headers or {})
        range_field = next((v for k, v in fields.items() if k.lower() == "content-range"), "")
        self.ranges.append(range_field)
        if self.cut_at is not None and method == "PUT" and data and range_field.startswith(
            f"bytes {self.cut_at}-"
        ):
            self.cut_at = None
            self._cut(url, fields, data, int(range_field.split()[1].split("-")[0]))
            raise requests.exceptions.ConnectionError("the test cut this chunk off midway")
        return self.session.request(
            method, url, data=data, headers=fields, timeout=timeout or HTTP_TIMEOUT, allow_redirects=False
        )

    def _cut(self, url: str, fields: Mapping[str, str], data: bytes, start: int) -> None:
        parts = urlsplit(url)
        half = len(data) // 2
        sock = send_partial(self.proc, "PUT", f"{parts.path}?{parts.query}", fields, len(data), data[:half])
        cut_off(self.proc, sock, start + half)
        self.cuts += 1


def gcs_upload(proc: ShimProcess, path: str = GCS_PATH) -> ResumableUpload:
    """A JSON-API resumable upload of 1 MiB chunks to the shim; the library's own retries
    are off, so a broken chunk surfaces and the test recovers explicitly (upload.recover)."""
    upload = ResumableUpload(f"{proc.url}{path}?uploadType=resumable", chunk_size=MIB)
    upload._retry_strategy = resumable_media.RetryStrategy(max_retries=0)
    return upload


def transmit_all(upload: ResumableUpload, transport: ShimTransport) -> tuple[requests.Response, list[int]]:
    """transmit_next_chunk until finished; after a broken chunk, recover() and go on.
    Returns the last response and what recover() found stored after each break."""
    recovered: list[int] = []
    response: requests.Response | None = None
    while not upload.finished:
        try:
            response = upload.transmit_next_chunk(transport)
        except requests.exceptions.ConnectionError:
            assert not upload.invalid  # a transport error does not invalidate; recover anyway
            upload.recover(transport)
            recovered.append(upload.bytes_uploaded)
    assert response is not None
    return response, recovered


def test_google_resumable_media_recovers_from_a_cut_chunk(
    shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory
) -> None:
    """20 MiB in 1 MiB chunks with google-resumable-media; the 8th chunk is cut off halfway,
    recover() asks ``bytes */*``, the upload continues from there: one POST upstream."""
    proc = shim()
    size = 20 * MIB
    source = payload(size)
    transport = ShimTransport(proc, cut_at=7 * MIB)
    upload = gcs_upload(proc)

    with source.open("rb") as stream:
        initiated = upload.initiate(
            transport, stream, metadata={"name": "x.bin"}, content_type="application/octet-stream"
        )
        assert initiated.status_code == 200, show(initiated)
        assert session_id(upload.resumable_url)
        assert upload.total_bytes == size
        response, recovered = transmit_all(upload, transport)

    assert transport.cuts == 1
    assert recovered == [7 * MIB + MIB // 2]  # the half that arrived is kept
    assert response.status_code == 200, show(response)  # the legacy 201, given as 200 in a session
    assert upload.bytes_uploaded == size
    assert_legacy_stored(legacy, GCS_PATH, source, response.content)

    request = delivered_once(legacy, source, "POST", GCS_PATH)
    assert urlsplit(request.path).query == ""  # uploadType=resumable is not passed on
    assert request.header("Content-Type") == "application/octet-stream"  # X-Upload-Content-Type

    # The session URI now answers with the recorded answer; nothing is delivered again.
    replay = inquire(absolute(proc, upload.resumable_url), None)
    assert (replay.status_code, replay.content) == (200, response.content), show(replay)
    assert len(legacy.received) == 1


@pytest.mark.parametrize(
    ("size", "empty_last"),
    [(3 * MIB + 123_457, False), (3 * MIB + MIB // 2, True)],
    ids=["last-chunk-short", "last-chunk-full-then-empty"],
)
def test_google_resumable_media_with_unknown_size(
    shared: Shared, payload: PayloadFactory, size: int, empty_last: bool
) -> None:
    """stream_final=False: no X-Upload-Content-Length, chunks say ``bytes S-E/*``; the total
    comes with the last, short chunk, or, when the last chunk is full (the resumed chunks
    start at 1.5 MiB), with an empty ``bytes */N`` after it. Cut once, recovered, delivered
    once."""
    proc, legacy = shared
    source = payload(size)
    path = f"/upload/storage/v1/b/unknown-size-{int(empty_last)}/o"
    transport = ShimTransport(proc, cut_at=MIB)
    upload = gcs_upload(proc, path)

    with source.open("rb") as stream:
        initiated = upload.initiate(
            transport, stream, metadata={"name": "x.bin"}, content_type="application/octet-stream",
            stream_final=False,
        )
        assert initiated.status_code == 200, show(initiated)
        assert upload.total_bytes is None
        response, recovered = transmit_all(upload, transport)

    assert recovered == [MIB + MIB // 2]
    assert response.status_code == 200, show(response)
    assert upload.bytes_uploaded == size
    chunks = [r for r in transport.ranges if r and r != "bytes */*"]  # not initiate/recover
    assert all(r.endswith("/*") for r in chunks[:-1]), chunks
    if empty_last:  # the last full chunk did not know it was the last; an empty one says so
        assert chunks[-2:] == [f"bytes {size - MIB}-{size - 1}/*", f"bytes */{size}"], chunks
    else:
        assert chunks[-1].endswith(f"-{size - 1}/{size}"), chunks
    assert_legacy_stored(legacy, path, source, response.content)
    request = delivered_once(legacy, source, "POST", path, alone=False)
    assert request.header("Content-Type") == "application/octet-stream"


def test_google_client_uses_the_location_as_is(shared: Shared, payload: PayloadFactory) -> None:
    """google-resumable-media with a plain requests.Session, as applications use it: the
    session URI from Location must be absolute (GCS answers an absolute https URL)."""
    proc, legacy = shared
    source = payload(300 * KIB)
    path = "/upload/storage/v1/b/location-bucket/o"
    upload = ResumableUpload(f"{proc.url}{path}?uploadType=resumable", chunk_size=256 * KIB)
    session = requests.Session()
    with source.open("rb") as stream:
        upload.initiate(session, stream, metadata={"name": "x.bin"}, content_type="application/octet-stream")
        assert urlsplit(upload.resumable_url).netloc == f"127.0.0.1:{proc.port}"
        while not upload.finished:
            response = upload.transmit_next_chunk(session)
    assert response.status_code == 200
    delivered_once(legacy, source, "POST", path, alone=False)


# --- 3. XML-API sessions (x-goog-resumable: start) ------------------------------------------


def open_xml_session(proc: ShimProcess, path: str, headers: Mapping[str, str]) -> str:
    """``POST path`` with ``x-goog-resumable: start``: 200 and a session URI (absolute)."""
    response = requests.post(
        f"{proc.url}{path}", headers={"x-goog-resumable": "start", **headers}, timeout=HTTP_TIMEOUT
    )
    assert response.status_code == 200, show(response)
    location = response.headers["Location"]
    assert urlsplit(location).path == path and session_id(location), show(response)
    return absolute(proc, location)


def test_xml_api_session_delivers_one_post(shared: Shared, payload: PayloadFactory) -> None:
    """x-goog-resumable: start, three chunks to the session URI, the last answered with the
    legacy server's answer as 200; the file arrives as one POST with the session's headers."""
    proc, legacy = shared
    size = 700_000
    source = payload(size)
    data = source.read_bytes()
    path = "/bucket/obj.bin"

    def mine() -> list[ReceivedRequest]:
        return [r for r in legacy.received if r.path == path]

    session = open_xml_session(
        proc, path, {"Content-Type": "application/x-obj", "X-Custom": "kept", "Authorization": "Bearer a"}
    )
    assert_resume_incomplete(inquire(session, None), 0)  # nothing stored: no Range

    step = 256 * KIB
    for start in range(0, step * 2, step):
        assert_resume_incomplete(put_chunk(session, data[start : start + step], start, size), start + step)
    assert_resume_incomplete(inquire(session, size), 2 * step)
    assert mine() == []

    final = put_chunk(session, data[2 * step :], 2 * step, size)
    assert final.status_code == 200, show(final)  # the legacy server's 201, as 200 (GCS clients)
    assert_legacy_stored(legacy, path, source, final.content)

    request = delivered_once(legacy, source, "POST", path, alone=False)
    assert request.header("Content-Type") == "application/x-obj"
    assert request.header("X-Custom") == "kept"
    assert request.header("Authorization") == "Bearer a"

    again = put_chunk(session, data[2 * step :], 2 * step, size)
    assert (again.status_code, again.content) == (200, final.content), show(again)
    assert mine() == [request]


def test_xml_api_session_cancelled_and_unknown(shared: Shared, payload: PayloadFactory) -> None:
    """DELETE of a session answers 499 and discards its bytes; an unknown session is 404;
    another session on the same path is not affected."""
    proc, legacy = shared
    size = 600_000
    source = payload(size)
    data = source.read_bytes()
    path = "/bucket/cancel.bin"
    kept = open_xml_session(proc, path, {"Content-Type": "application/x-obj"})
    cancelled = open_xml_session(proc, path, {"Content-Type": "application/x-obj"})
    assert kept != cancelled

    assert_resume_incomplete(put_chunk(kept, data[: 256 * KIB], 0, size), 256 * KIB)
    assert_resume_incomplete(put_chunk(cancelled, data[: 256 * KIB], 0, size), 256 * KIB)
    data_file = proc.storage_dir / "data" / session_id(cancelled)
    assert data_file.stat().st_size == 256 * KIB

    deleted = requests.delete(cancelled, timeout=HTTP_TIMEOUT)
    assert deleted.status_code == 499, show(deleted)
    assert not data_file.exists()  # the bytes are discarded

    no_session = f"{proc.url}{path}?uploadType=resumable&upload_id=no-such-session"
    unknown = put_chunk(no_session, data[:10], 0, size)
    assert unknown.status_code == 404, show(unknown)
    assert inquire(no_session, None).status_code == 404

    # The other session goes on and finishes.
    assert stored_bytes(kept, size) == 256 * KIB
    final = put_chunk(kept, data[256 * KIB :], 256 * KIB, size)
    assert final.status_code == 200, show(final)
    delivered_once(legacy, source, "POST", path, alone=False)


def test_chunk_to_a_cancelled_session_is_404(shared: Shared) -> None:
    """After DELETE <session> (499), the session is unknown: a later chunk gets 404."""
    proc, legacy = shared
    path = "/bucket/cancelled-404.bin"
    session = open_xml_session(proc, path, {"Content-Type": "application/x-obj"})
    assert_resume_incomplete(put_chunk(session, b"a" * 1000, 0, 2000), 1000)
    assert requests.delete(session, timeout=HTTP_TIMEOUT).status_code == 499
    later = put_chunk(session, b"b" * 1000, 1000, 2000)
    assert not [r for r in legacy.received if r.path.startswith(path)]
    assert later.status_code == 404, show(later)
    assert inquire(session, 2000).status_code == 404


def test_expired_session_is_404(shim: ShimLauncher, legacy: WholeFileServer) -> None:
    """content_range.expiration: 1 s. Once the session has expired it is unknown: 404."""
    proc = shim({"content_range": {"expiration": 1}})
    session = open_xml_session(proc, "/bucket/expiring.bin", {"Content-Type": "application/x-obj"})
    assert_resume_incomplete(put_chunk(session, b"a" * 1000, 0, 2000), 1000)
    answers: list[requests.Response] = []

    def expired() -> bool:
        answers.append(inquire(session, 2000))
        return answers[-1].status_code != 308

    wait_until(expired, TIMEOUT, "the session expiring", interval=0.1)
    assert answers[-1].status_code == 404, show(answers[-1])
    assert put_chunk(session, b"b" * 1000, 1000, 2000).status_code == 404
    assert legacy.received == []


# --- 4. malformed and refused chunks -------------------------------------------------------


TOTAL = 3000
STORED = 1000


class Refusal(NamedTuple):
    content_range: str
    body: int
    status: int
    message: str
    """A fragment of the shim's text/plain message."""


# What the shim answers, with 1000 of 3000 bytes stored at the URL (the closing note's table):
#
#   Content-Range              body  answer
#   "bytes 0-1"                  2   400 malformed Content-Range 'bytes 0-1': want 'bytes S-E/TOTAL'
#   "bytes=0-1/2"                2   400 malformed Content-Range (Range's syntax, not RFC 9110's)
#   "items 0-1/2"                2   400 malformed Content-Range
#   "bytes 5-1/10"               2   400 Content-Range 'bytes 5-1/10' ends before it starts
#   "bytes 0-10/10"             11   416 Content-Range 'bytes 0-10/10' goes past its total
#   "bytes -1-5/10"              2   400 malformed Content-Range
#   "bytes 0-5/abc"              6   400 malformed Content-Range
#   "bytes 0-1/2, 3-4/5"         2   400 malformed Content-Range
#   ""                           2   400 malformed Content-Range ''
#   "bytes 1000-1099/3000"      50   400 Content-Range announces 100 bytes, the body has 50
#   "bytes 1000-1099/4000"     100   400 the upload's length is 3000, not 4000
#   "bytes 1500-1599/3000"     100   416 1000 bytes are stored; a range must start at or before
#                                        1000, not at 1500   (with Range: bytes=0-999)
#   "bytes */3000"              10   400 an inquiry (Content-Range: bytes */N) must have no body
REFUSALS = {
    "no-total": Refusal("bytes 0-1", 2, 400, "malformed Content-Range 'bytes 0-1'"),
    "equals-sign": Refusal("bytes=0-1/2", 2, 400, "malformed Content-Range 'bytes=0-1/2'"),
    "other-unit": Refusal("items 0-1/2", 2, 400, "malformed Content-Range 'items 0-1/2'"),
    "end-before-start": Refusal("bytes 5-1/10", 2, 400, "ends before it starts"),
    "end-past-total": Refusal("bytes 0-10/10", 11, 416, "goes past its total"),
    "negative-start": Refusal("bytes -1-5/10", 2, 400, "malformed Content-Range 'bytes -1-5/10'"),
    "total-not-a-number": Refusal("bytes 0-5/abc", 6, 400, "malformed Content-Range 'bytes 0-5/abc'"),
    "two-ranges": Refusal("bytes 0-1/2, 3-4/5", 2, 400, "malformed Content-Range"),
    "empty": Refusal("", 2, 400, "malformed Content-Range ''"),
    "length-mismatch": Refusal("bytes 1000-1099/3000", 50, 400, "announces 100 bytes, the body has 50"),
    "total-changes": Refusal("bytes 1000-1099/4000", 100, 400, "the upload's length is 3000, not 4000"),
    "gap": Refusal("bytes 1500-1599/3000", 100, 416, "must start at or before 1000, not at 1500"),
    "inquiry-with-body": Refusal("bytes */3000", 10, 400, "must have no body"),
}


@pytest.mark.parametrize("case", list(REFUSALS), ids=list(REFUSALS))
def test_refused_chunk_leaves_the_upload_unchanged(
    shared: Shared, payload: PayloadFactory, case: str
) -> None:
    """Each malformed or inconsistent chunk gets its 400/416 with a text message; the stored
    range is unchanged and the upload still completes byte-exact."""
    proc, legacy = shared
    refusal = REFUSALS[case]
    source = payload(TOTAL)
    data = source.read_bytes()
    target = f"/api/upload?case={case}"
    url = f"{proc.url}{target}"
    assert_resume_incomplete(put_chunk(url, data[:STORED], 0, TOTAL), STORED)

    response = requests.put(
        url, data=b"x" * refusal.body, headers={"Content-Range": refusal.content_range},
        timeout=HTTP_TIMEOUT, allow_redirects=False,
    )
    assert_text_refusal(response, refusal.status, refusal.message)
    if case == "gap":
        assert response.headers.get("Range") == range_of(STORED), show(response)
    else:
        assert "Range" not in response.headers, show(response)

    assert_resume_incomplete(inquire(url, TOTAL), STORED)
    assert_resume_incomplete(inquire(url, None), STORED)
    final = put_chunk(url, data[STORED:], STORED, TOTAL)
    assert final.status_code == 201, show(final)
    mine = [r for r in legacy.received if r.path == target]
    assert [(r.method, r.status, r.size, r.sha256) for r in mine] == [("PUT", 201, TOTAL, sha256_of(source))]
    assert_no_protocol_leak(legacy)


def test_first_chunk_must_start_at_zero(shared: Shared) -> None:
    """A chunk that does not start at 0 for a URL with nothing stored: 416 without Range;
    an inquiry there: 308 without Range; nothing is created."""
    proc, legacy = shared
    url = f"{proc.url}/api/upload?case=fresh"
    response = put_chunk(url, b"x" * 100, 100, 1000)
    assert_text_refusal(response, 416, "nothing is stored; a range must start at 0, not at 100")
    assert "Range" not in response.headers
    assert_resume_incomplete(inquire(url, 1000), 0)
    assert_resume_incomplete(inquire(url, None), 0)
    assert not [r for r in legacy.received if r.path.endswith("case=fresh")]


def test_bytes_equals_separator_is_refused(
    shared: Shared, payload: PayloadFactory
) -> None:
    """``bytes=S-E/TOTAL`` is Range's syntax, not RFC 9110 section 14.4's Content-Range
    (``bytes SP first-last/complete``): refused (400), nothing stored or delivered."""
    proc, legacy = shared
    data = payload(TOTAL).read_bytes()
    target = "/api/upload?case=equals-separator"
    url = f"{proc.url}{target}"
    first = requests.put(
        url, data=data[:STORED], headers={"Content-Range": f"bytes=0-{STORED - 1}/{TOTAL}"},
        timeout=HTTP_TIMEOUT, allow_redirects=False,
    )
    assert_text_refusal(first, 400, "malformed Content-Range")
    assert_resume_incomplete(inquire(url, TOTAL), 0)
    assert not [r for r in legacy.received if r.path == target]


def test_bytes_of_a_chunk_cut_at_once_are_kept(
    shared: Shared, payload: PayloadFactory
) -> None:
    """A client sends a chunk's head and 64 KiB of its body and is cut off at once: every
    byte that reached the shim is kept. The connection has carried a chunk before, as a real
    client's has by then (the shim opens its sink connection when a client connects; a
    loopback client that sends head, body and FIN within a millisecond of connecting can beat
    it, see README). Three tries, so a lucky race cannot make it pass."""
    proc, _ = shared
    size, first, sent = 300_000, 10_000, 64 * KIB
    data = payload(size).read_bytes()
    results = []
    for attempt in range(3):
        target = f"/api/upload?case=quick-cut-{attempt}"
        url = f"{proc.url}{target}"
        with socket.create_connection(("127.0.0.1", proc.port), timeout=TIMEOUT) as sock:
            sock.sendall(_chunk_head(target, 0, first, size) + data[:first])
            assert sock.recv(65536).startswith(b"HTTP/1.1 308")
            cuts = len(kept_after_cuts(proc)) + 1
            sock.sendall(_chunk_head(target, first, size - first, size)
                         + data[first : first + sent])
        wait_until(lambda: len(kept_after_cuts(proc)) >= cuts, TIMEOUT, "the shim letting go")  # noqa: B023
        results.append((kept_after_cuts(proc)[-1], stored_bytes(url, size)))
    assert results == [(first + sent, first + sent)] * 3


def _chunk_head(target: str, start: int, length: int, total: int) -> bytes:
    return (f"PUT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Range: bytes {start}-{start + length - 1}/{total}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


# --- 5. path restriction -------------------------------------------------------------------


def test_paths_restrict_which_urls_are_resumable(
    shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory
) -> None:
    """content_range.paths: [/api/upload]: a Content-Range PUT elsewhere is refused by the
    shim (400 naming the field) and never reaches the legacy server as a partial file; under
    /api/upload it is spooled (308); a plain PUT there passes through."""
    proc = shim({"content_range": {"paths": ["/api/upload"]}})
    data = payload(2000).read_bytes()

    elsewhere = put_chunk(f"{proc.url}/other/x", data[:1000], 0, 2000)
    assert elsewhere.status_code == 400, show(elsewhere)
    assert "Content-Range" in elsewhere.text and "nothing was forwarded" in elsewhere.text
    assert not elsewhere.headers.get("Server", "").startswith("WholeFileServer"), show(elsewhere)
    assert legacy.received == []
    assert_resume_incomplete(put_chunk(f"{proc.url}/api/upload?file=0", data[:1000], 0, 2000), 1000)

    for spooled_url in (f"{proc.url}/api/upload?file=a", f"{proc.url}/api/upload/sub?x=1"):
        assert_resume_incomplete(put_chunk(spooled_url, data[:1000], 0, 2000), 1000)
    assert legacy.received == []

    plain = requests.put(f"{proc.url}/api/upload/plain.bin", data=data, timeout=HTTP_TIMEOUT)
    assert plain.status_code == 201, show(plain)
    assert legacy_json(plain.content)["sha256"] == legacy.received[-1].sha256
    assert [(r.method, r.path, r.status, r.size) for r in legacy.received] == [
        ("PUT", "/api/upload/plain.bin", 201, 2000)
    ]


def test_guard_pass_through_forwards_content_range_outside_the_paths(
    shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory
) -> None:
    """guard.pass_through: true, for a legacy server that speaks Content-Range itself: a
    Content-Range PUT outside content_range.paths reaches it untouched (this one refuses it
    itself)."""
    proc = shim({"content_range": {"paths": ["/api/upload"]}, "guard": {"pass_through": True}})
    data = payload(2000).read_bytes()
    elsewhere = put_chunk(f"{proc.url}/other/x", data[:1000], 0, 2000)
    assert elsewhere.status_code == 400, show(elsewhere)
    assert elsewhere.text == "resumable uploads are not supported: Content-Range\n"  # the legacy's own
    [passed] = legacy.received
    assert (passed.method, passed.path, passed.status, passed.size) == ("PUT", "/other/x", 400, 1000)
    assert passed.header("Content-Range") == "bytes 0-999/2000"


def test_upload_id_parameter_outside_the_paths_passes_through(
    shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory
) -> None:
    """With content_range.paths: [/api/upload], a plain PUT to /reports/r.csv?upload_id=7 (the
    legacy application's own parameter) is not a resumable upload: it reaches the legacy
    server untouched."""
    proc = shim({"content_range": {"paths": ["/api/upload"]}})
    source = payload(2000)
    target = "/reports/r.csv?upload_id=7"
    plain = requests.put(f"{proc.url}{target}", data=source.read_bytes(), timeout=HTTP_TIMEOUT)
    assert plain.status_code == 201, show(plain)
    delivered_once(legacy, source, "PUT", target)


# --- 6. the legacy server fails the delivery -----------------------------------------------


@pytest.mark.parametrize("retry", ["inquiry", "final-chunk"])
def test_legacy_503_then_retry_delivers_once(
    shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory, retry: str
) -> None:
    """The legacy server answers 503 to the delivery: the final chunk gets 503 with
    Retry-After and the outbox tries again in the background; an inquiry or the retried
    final chunk then gets the 201; after that the answer is replayed, never resent."""
    proc = shim()
    size, half = 900_000, 450_000
    source = payload(size)
    data = source.read_bytes()
    target = "/api/upload?file=retry.bin"
    url = f"{proc.url}{target}"
    assert_resume_incomplete(put_chunk(url, data[:half], 0, size), half)

    legacy.fail_status = 503
    failed = put_chunk(url, data[half:], half, size)
    assert failed.status_code == 503 and int(failed.headers["Retry-After"]) >= 1, show(failed)
    assert [(r.status, r.size, r.complete) for r in legacy.received] == [(503, size, True)]

    legacy.fail_status = None
    answers: list[requests.Response] = []

    def answered_201() -> bool:
        answers.append(inquire(url, size) if retry == "inquiry"
                       else put_chunk(url, data[half:], half, size))
        assert answers[-1].status_code in (201, 503), show(answers[-1])
        return answers[-1].status_code == 201

    wait_until(answered_201, 30.0, "the background delivery")
    answered = answers[-1]
    assert_legacy_stored(legacy, "/api/upload", source, answered.content)

    replay = put_chunk(url, data[half:], half, size) if retry == "inquiry" else inquire(url, size)
    assert (replay.status_code, replay.content) == (201, answered.content), show(replay)

    assert_no_protocol_leak(legacy)
    statuses = [(r.method, r.path, r.status) for r in legacy.received]
    assert statuses[-1] == ("PUT", target, 201) and len(statuses) >= 2
    assert [s for _, _, s in statuses[:-1]] == [503] * (len(statuses) - 1)
    assert all((r.size, r.sha256) == (size, sha256_of(source)) for r in legacy.received)


def test_legacy_500_is_relayed_and_replayed(
    shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory
) -> None:
    """A 500 is the legacy server's answer: the client gets it, and a retried final chunk or
    an inquiry gets it again; the file is never sent twice."""
    proc = shim()
    size, half = 300_000, 100_000
    data = payload(size).read_bytes()
    url = f"{proc.url}/api/upload?file=refused.bin"
    assert_resume_incomplete(put_chunk(url, data[:half], 0, size), half)
    legacy.fail_status = 500
    failed = put_chunk(url, data[half:], half, size)
    assert (failed.status_code, failed.text) == (500, "configured to fail with 500\n"), show(failed)
    legacy.fail_status = None
    for again in (put_chunk(url, data[half:], half, size), inquire(url, size)):
        assert (again.status_code, again.text) == (500, failed.text), show(again)
    assert [r.status for r in legacy.received] == [500]


# --- 7. the shim is killed ------------------------------------------------------------------


def test_shim_killed_after_two_chunks_resumes_after_restart(
    shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory
) -> None:
    """SIGKILL after two acknowledged chunks; restarted on a new port, the inquiry shows both
    and the upload completes byte-exact."""
    proc = shim()
    size, step = 1_300_000, 512 * KIB
    source = payload(size)
    data = source.read_bytes()
    target = "/api/upload?file=crash.bin"
    headers = {"Content-Type": "application/x-crash"}
    for start in (0, step):
        chunk = put_chunk(f"{proc.url}{target}", data[start : start + step], start, size, headers)
        assert_resume_incomplete(chunk, start + step)

    proc.kill()  # SIGKILL, like a crash
    proc.restart()  # same storage, a new port
    url = f"{proc.url}{target}"

    assert_resume_incomplete(inquire(url, size, headers), 2 * step)
    assert_resume_incomplete(inquire(url, None, headers), 2 * step)
    final = put_chunk(url, data[2 * step :], 2 * step, size, headers)
    assert final.status_code == 201, show(final)
    request = delivered_once(legacy, source, "PUT", target)
    assert request.header("Content-Type") == "application/x-crash"


# --- 8. owners ------------------------------------------------------------------------------


def test_same_url_different_authorization_are_separate_uploads(
    shared: Shared, payload: PayloadFactory
) -> None:
    """Bearer alice and Bearer bob on one URL are two uploads: bob sees nothing of alice's,
    each file is delivered with its own Authorization."""
    proc, legacy = shared
    size, half = 400_000, 200_000
    alice_file, bob_file = payload(size), payload(size)
    alice_data, bob_data = alice_file.read_bytes(), bob_file.read_bytes()
    target = "/owners/upload?file=shared.bin"
    url = f"{proc.url}{target}"
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}

    assert_resume_incomplete(put_chunk(url, alice_data[:half], 0, size, alice), half)
    assert_resume_incomplete(inquire(url, size, bob), 0)  # no Range: nothing of bob's
    assert_resume_incomplete(inquire(url, size), 0)  # nor of anonymous
    gap = put_chunk(url, bob_data[half:], half, size, bob)  # bob cannot continue alice's
    assert_text_refusal(gap, 416, "nothing is stored")
    assert_resume_incomplete(put_chunk(url, bob_data[:1000], 0, size, bob), 1000)
    assert_resume_incomplete(inquire(url, size, alice), half)

    done = put_chunk(url, alice_data[half:], half, size, alice)
    assert done.status_code == 201, show(done)
    request = delivered_once(legacy, alice_file, "PUT", target, alone=False)
    assert request.header("Authorization") == "Bearer alice"
    assert_resume_incomplete(inquire(url, size, bob), 1000)  # bob's upload goes on

    bob_done = put_chunk(url, bob_data[1000:], 1000, size, bob)
    assert bob_done.status_code == 201, show(bob_done)
    assert_no_protocol_leak(legacy)
    first, second = [r for r in legacy.received if r.path == target]
    assert first is request
    assert (second.method, second.status, second.complete) == ("PUT", 201, True)
    assert (second.size, second.sha256) == (size, sha256_of(bob_file))
    assert second.header("Authorization") == "Bearer bob"


# --- POST, unknown total ---------------------------------------------------------------------


def test_post_chunks_with_unknown_total_are_delivered_as_one_post(
    shared: Shared, payload: PayloadFactory
) -> None:
    """POST chunks ``bytes S-E/*`` then a last one with the total: one POST upstream; a PUT
    inquiry on the same URL is another upload (keyed by method)."""
    proc, legacy = shared
    size, step = 700_000, 300_000
    source = payload(size)
    data = source.read_bytes()
    target = "/posts/post.bin"
    url = f"{proc.url}{target}"
    headers = {"Content-Type": "application/x-post", "X-Request-Tag": "t1"}
    for start in (0, step):
        chunk = put_chunk(url, data[start : start + step], start, None, headers, method="POST")
        assert_resume_incomplete(chunk, start + step)
    assert_resume_incomplete(inquire(url, None, method="POST"), 2 * step)
    assert_resume_incomplete(inquire(url, None, method="PUT"), 0)

    final = put_chunk(url, data[2 * step :], 2 * step, size, method="POST")
    assert final.status_code == 201, show(final)
    assert_legacy_stored(legacy, target, source, final.content)
    request = delivered_once(legacy, source, "POST", target, alone=False)
    assert request.header("Content-Type") == "application/x-post"  # the first chunk's headers
    assert request.header("X-Request-Tag") == "t1"
