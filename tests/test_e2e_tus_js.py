"""End to end: tus-js-client under node -> a real shim process -> the real legacy server.

Every test drives tests/js/tus_upload.mjs (tus-js-client 4) against the shim started as a
real ``mitmdump`` (or ``python -m shim``) in front of the whole-file-only WholeFileServer and
asserts what a user would notice on the legacy side: exactly one request per finished file,
byte-exact, and never a PATCH or a resumable-upload header.

Connections are cut without timing guesses: with ``holdAfterBytes`` the client stops in the
middle of a PATCH body; the test polls HEAD until the shim shows every byte handed over, then
kills the client (or the shim) while that body is still open.
"""

from __future__ import annotations

import email.policy
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests

from shim.demo_server import ReceivedRequest, WholeFileServer
from tests.harness import (
    PayloadFactory,
    ShimKind,
    ShimLauncher,
    ShimProcess,
    run_tus_js,
    sha256_of,
    start_tus_js,
    tus_js_events,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024
TIMEOUT = 30.0
"""Deadline for anything the tests wait for (they normally wait well under a second)."""
HTTP_TIMEOUT = 10.0
CLIENT_TIMEOUT = 60.0
TUS = {"Tus-Resumable": "1.0.0"}
PROTOCOL_HEADER_PREFIXES = ("upload-", "tus-", "x-upload-")

Event = dict[str, Any]


# --- talking to the shim directly ----------------------------------------------------------


def endpoint(proc: ShimProcess) -> str:
    """The tus creation URL of a running shim."""
    return f"{proc.url}/files/"


def upload_id(url: str) -> str:
    """The id at the end of an upload URL."""
    return urlsplit(url).path.rsplit("/", 1)[-1]


def on_current_port(url: str, proc: ShimProcess) -> str:
    """``url`` pointed at the port the shim listens on now (it changes with every restart)."""
    return urlunsplit(urlsplit(url)._replace(netloc=f"127.0.0.1:{proc.port}"))


def tus_head(url: str) -> requests.Response:
    """A tus HEAD of an upload."""
    return requests.head(url, headers=TUS, timeout=HTTP_TIMEOUT)


def offset_of(url: str) -> int:
    """The Upload-Offset a tus HEAD reports (the HEAD must succeed)."""
    response = tus_head(url)
    assert response.status_code == 200, (response.status_code, dict(response.headers))
    return int(response.headers["Upload-Offset"])


def tus_delete(url: str) -> requests.Response:
    """DELETE an upload, asking again while the shim answers 423 Locked.

    423 means the shim still holds the PATCH of a client that has just gone away; it lets go
    as soon as it notices the closed connection (tus-js-client retries a 423 the same way).
    """
    answers: list[requests.Response] = []

    def answered() -> bool:
        answers.append(requests.delete(url, headers=TUS, timeout=HTTP_TIMEOUT))
        return answers[-1].status_code != 423

    wait_until(answered, TIMEOUT, "a DELETE not answered 423 Locked", interval=0.05)
    return answers[-1]


# --- the legacy server's side -------------------------------------------------------------


def assert_no_protocol_leak(legacy: WholeFileServer) -> None:
    """The legacy server never saw a PATCH, Content-Range or an Upload-*/Tus-* header."""
    for request in legacy.received:
        assert request.method != "PATCH", request
        leaked = [
            name
            for name in request.header_names()
            if name == "content-range" or name.startswith(PROTOCOL_HEADER_PREFIXES)
        ]
        assert not leaked, f"{request.method} {request.path} carried {leaked}"


def delivered_once(
    legacy: WholeFileServer, source: Path | None = None, method: str = "PUT"
) -> ReceivedRequest:
    """The only request the legacy server received: one complete, accepted ``method``.

    With ``source``, its body must be exactly that file (raw delivery).
    """
    received = list(legacy.received)
    assert_no_protocol_leak(legacy)
    assert [(r.method, r.status) for r in received] == [(method, 201)], received
    [request] = received
    assert request.complete
    if source is not None:
        assert (request.size, request.sha256) == (source.stat().st_size, sha256_of(source))
    return request


def assert_not_delivered_again(url: str, legacy: WholeFileServer, size: int) -> None:
    """A HEAD of a delivered upload shows it complete and sends nothing more upstream."""
    before = len(legacy.received)
    assert offset_of(url) == size
    assert len(legacy.received) == before, legacy.received[before:]


# --- the tus-js-client driver -------------------------------------------------------------


def run_client(args: Mapping[str, Any], expect: int = 0) -> list[Event]:
    """Run the driver to its end with response tracing; check its exit code; return events."""
    result = run_tus_js({"traceResponses": True, **args}, timeout=CLIENT_TIMEOUT)
    output = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == expect, output
    return tus_js_events(result.stdout)


def last(events: list[Event], kind: str) -> Event:
    """The last event of type ``kind``."""
    matching = [e for e in events if e.get("event") == kind]
    assert matching, f"no {kind!r} event in {events}"
    return matching[-1]


def responses(events: list[Event], method: str | None = None) -> list[Event]:
    """The traced responses, optionally only those to ``method``."""
    return [e for e in events if e.get("event") == "response" and (method is None or e["method"] == method)]


class BackgroundClient:
    """The driver started with start_tus_js; threads collect its output as it comes."""

    def __init__(self, args: Mapping[str, Any]) -> None:
        """Start the driver with ``args``."""
        self.proc = start_tus_js(args)
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._pumps = [_drain(self.proc.stdout, self._stdout), _drain(self.proc.stderr, self._stderr)]

    def finished(self) -> bool:
        """Whether the process has exited and all its output was read."""
        return self.proc.poll() is not None and not any(t.is_alive() for t in self._pumps)

    def events(self) -> list[Event]:
        """The events printed so far."""
        return tus_js_events("".join(self._stdout))

    def output(self) -> str:
        """Everything printed so far, for failure messages."""
        return f"stdout:\n{''.join(self._stdout)}\nstderr:\n{''.join(self._stderr)}"

    def wait_for_event(self, kind: str, timeout: float = TIMEOUT) -> Event:
        """Wait until the driver printed an event of type ``kind`` and return the last one."""

        def printed() -> bool:
            return any(e.get("event") == kind for e in self.events())

        wait_until(lambda: printed() or self.finished(), timeout, f"a {kind!r} event")
        assert printed(), f"the client ended without a {kind!r} event\n{self.output()}"
        return last(self.events(), kind)

    def wait(self, timeout: float = TIMEOUT) -> int:
        """Wait for the driver to exit on its own; return its exit code."""
        code = self.proc.wait(timeout)
        for pump in self._pumps:
            pump.join(timeout)
        return code

    def kill(self) -> None:
        """Kill the driver at once (its connections break mid-request) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()


def _drain(pipe: IO[str], sink: list[str]) -> threading.Thread:
    """Append every line of ``pipe`` to ``sink`` in a daemon thread."""

    def pump() -> None:
        with pipe:
            for line in pipe:
                sink.append(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


StartClient = Callable[[Mapping[str, Any]], BackgroundClient]


@pytest.fixture
def start_client(node: None) -> Iterator[StartClient]:
    """Factory starting the driver in the background (with response tracing); killed at teardown."""
    started: list[BackgroundClient] = []

    def start(args: Mapping[str, Any]) -> BackgroundClient:
        client = BackgroundClient({"traceResponses": True, **args})
        started.append(client)
        return client

    yield start
    for client in started:
        client.kill()


def wait_for_offset(url: str, wanted: int, client: BackgroundClient) -> None:
    """Poll HEAD until the shim shows ``wanted`` bytes; fail at once if the client died."""
    seen: list[int] = []

    def reached() -> bool:
        if client.proc.poll() is not None:
            raise AssertionError(f"the client exited early\n{client.output()}")
        seen.append(offset_of(url))
        return seen[-1] >= wanted

    try:
        wait_until(reached, TIMEOUT, f"HEAD showing offset {wanted}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last offsets seen: {seen[-5:]}") from exc
    assert seen[-1] == wanted, f"the shim shows {seen[-1]} bytes, the client sent only {wanted}"


def cut_mid_body(start_client: StartClient, args: Mapping[str, Any], at: int) -> str:
    """Upload up to file position ``at`` (inside a PATCH body), then kill the client.

    Returns once the shim has shown every byte handed over; the PATCH carrying them never
    ended. Returns the upload URL.
    """
    client = start_client({**args, "holdAfterBytes": at})
    url = str(client.wait_for_event("url")["url"])
    client.wait_for_event("holding")
    wait_for_offset(url, at, client)
    client.kill()
    return url


# --- scenarios ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "size"),
    [("mitmdump", 50 * MIB), ("python-m-shim", 5 * MIB)],
    ids=["mitmdump-50MiB", "python-m-shim-5MiB"],
)
def test_upload_cut_twice_mid_body_resumes_and_arrives_once(
    shim: ShimLauncher,
    legacy: WholeFileServer,
    payload: PayloadFactory,
    start_client: StartClient,
    kind: ShimKind,
    size: int,
) -> None:
    """Cut off twice mid-PATCH (~1/3, ~2/3), resumed with uploadUrl: one byte-exact PUT."""
    proc = shim(kind=kind)
    source = payload(size)
    first_cut, second_cut = size // 3 + 12_345, 2 * size // 3 + 6_789
    # Both cuts fall inside a PATCH body: chunks start at 0, then at first_cut after resuming.
    assert first_cut % MIB and (second_cut - first_cut) % MIB
    chunked = {"file": source, "chunkSize": MIB}

    url = cut_mid_body(start_client, {**chunked, "endpoint": endpoint(proc)}, first_cut)
    after_first = offset_of(url)
    assert 0 < after_first == first_cut  # every byte that reached the shim is kept

    assert cut_mid_body(start_client, {**chunked, "uploadUrl": url}, second_cut) == url
    after_second = offset_of(url)
    assert after_first < after_second == second_cut  # never backwards
    assert legacy.received == []

    events = run_client({**chunked, "uploadUrl": url})
    assert last(events, "success")["url"] == url
    patches = responses(events, "PATCH")
    assert int(patches[0]["requestOffset"]) == second_cut  # resumed, not started over
    assert (patches[-1]["status"], patches[-1]["upstreamStatus"]) == (204, "201")
    assert patches[-1]["upstreamLocation"] == f"/uploads/{upload_id(url)}"

    request = delivered_once(legacy, source)
    assert request.path == f"/uploads/{upload_id(url)}"
    assert sha256_of(legacy.directory / "uploads" / upload_id(url)) == sha256_of(source)
    assert_not_delivered_again(url, legacy, size)


def test_parallel_uploads_are_concatenated_and_delivered_once(
    node: None, shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory
) -> None:
    """parallelUploads: 3 (concatenation): only the final upload reaches the legacy server."""
    proc = shim()
    source = payload(12 * MIB)

    events = run_client({"endpoint": endpoint(proc), "file": source, "parallelUploads": 3, "chunkSize": MIB})
    url = str(last(events, "success")["url"])

    posts = responses(events, "POST")
    assert [p["status"] for p in posts] == [201] * 4  # three partial uploads and the final one
    assert posts[-1]["upstreamStatus"] == "201"
    partial_ids = {upload_id(p["url"]) for p in responses(events, "PATCH")}
    assert len(partial_ids) == 3 and upload_id(url) not in partial_ids
    assert all(p["status"] == 204 for p in responses(events, "PATCH"))

    request = delivered_once(legacy, source)
    assert request.path == f"/uploads/{upload_id(url)}"
    assert_not_delivered_again(url, legacy, source.stat().st_size)


def test_deferred_length_upload_arrives_once(
    node: None, shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory
) -> None:
    """uploadLengthDeferred: the length comes with the last PATCH; one byte-exact PUT."""
    proc = shim()
    source = payload(3 * MIB + 4_321)

    events = run_client(
        {"endpoint": endpoint(proc), "file": source, "chunkSize": MIB, "uploadLengthDeferred": True}
    )
    url = str(last(events, "success")["url"])
    patches = responses(events, "PATCH")
    assert len(patches) == 4
    assert (patches[-1]["responseOffset"], patches[-1]["upstreamStatus"]) == (
        str(source.stat().st_size),
        "201",
    )

    request = delivered_once(legacy, source)
    assert request.path == f"/uploads/{upload_id(url)}"


def test_metadata_names_the_delivery_path_and_content_type(
    node: None, shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory
) -> None:
    """tus.forward.path /in/{filename}: PUT /in/report%202026.pdf, Content-Type from filetype."""
    proc = shim({"tus": {"forward": {"path": "/in/{filename}"}}})
    source = payload(700 * 1024)
    metadata = {"filename": "report 2026.pdf", "filetype": "application/pdf"}

    events = run_client(
        {"endpoint": endpoint(proc), "file": source, "chunkSize": 256 * 1024, "metadata": metadata}
    )
    final = responses(events, "PATCH")[-1]
    assert (final["upstreamStatus"], final["upstreamLocation"]) == ("201", "/in/report%202026.pdf")

    request = delivered_once(legacy, source)
    assert request.path == "/in/report%202026.pdf"
    assert request.header("Content-Type") == "application/pdf"
    assert sha256_of(legacy.directory / "in" / "report 2026.pdf") == sha256_of(source)


def test_multipart_delivery_carries_the_file_as_one_form_part(
    node: None, shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory
) -> None:
    """tus.forward body multipart: one POST, multipart/form-data, part "upload" = the file."""
    forward = {"method": "POST", "body": "multipart", "field": "upload", "path": "/forms/{filename}"}
    proc = shim({"tus": {"forward": forward}})
    source = payload(300 * 1024)
    filename = "scan 0042.bin"

    events = run_client(
        {
            "endpoint": endpoint(proc),
            "file": source,
            "chunkSize": 100 * 1024,
            "metadata": {"filename": filename, "filetype": "application/octet-stream"},
        }
    )
    assert responses(events, "PATCH")[-1]["upstreamStatus"] == "201"

    request = delivered_once(legacy, method="POST")
    assert request.path == "/forms/scan%200042.bin"
    content_type = request.header("Content-Type")
    assert content_type is not None and content_type.startswith("multipart/form-data;")
    stored = (legacy.directory / "forms" / filename).read_bytes()
    assert request.size == len(stored) > source.stat().st_size

    message = BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + stored
    )
    assert isinstance(message, EmailMessage) and message.is_multipart()
    [part] = list(message.iter_parts())
    assert part.get_content_disposition() == "form-data"
    assert part.get_param("name", header="content-disposition") == "upload"
    assert part.get_filename() == filename
    assert part.get_content_type() == "application/octet-stream"
    assert part.get_payload(decode=True) == source.read_bytes()


def terminate_half_done_upload(proc: ShimProcess, source: Path) -> str:
    """Upload with tus-js-client, abort at ~50%, DELETE the upload (204); return its URL."""
    size = source.stat().st_size
    events = run_client(
        {"endpoint": endpoint(proc), "file": source, "chunkSize": MIB, "stopAfterBytes": size // 2},
        expect=3,
    )
    url = str(last(events, "aborted")["url"])
    assert 0 < offset_of(url) < size

    deleted = tus_delete(url)
    assert deleted.status_code == 204, deleted.text
    assert tus_head(url).status_code in (404, 410)
    return url


def test_terminated_upload_is_never_delivered(
    node: None, shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory
) -> None:
    """Abort at ~50%, DELETE: 204, then 404/410; resuming it fails and nothing is delivered."""
    proc = shim()
    source = payload(6 * MIB)
    url = terminate_half_done_upload(proc, source)

    # uploadUrl alone: tus-js-client cannot resume it, nor create a new upload (no endpoint).
    events = run_client({"uploadUrl": url, "file": source, "retryDelays": []}, expect=1)
    assert last(events, "error")["message"]
    assert responses(events, "PATCH") == []

    # Nor can anyone append to it.
    patch = requests.patch(
        url,
        data=b"x",
        headers={**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
        timeout=HTTP_TIMEOUT,
    )
    assert patch.status_code in (404, 410)
    assert tus_head(url).status_code in (404, 410)
    assert legacy.received == []


def test_resuming_a_terminated_upload_with_an_endpoint_starts_a_new_one(
    node: None, shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory
) -> None:
    """tus-js-client with uploadUrl and endpoint: HEAD 404/410, then a new upload from 0.

    tus-js-client sends the creation POST on the connection of that HEAD: a body on the HEAD's
    error reply would be read where the POST's status line should be ("Parse Error")."""
    proc = shim()
    source = payload(2 * MIB)
    url = terminate_half_done_upload(proc, source)

    events = run_client(
        {
            "endpoint": endpoint(proc),
            "uploadUrl": url,
            "file": source,
            "chunkSize": MIB,
            "retryDelays": [],
        }
    )
    assert responses(events)[0]["method"] == "HEAD"
    assert responses(events)[0]["status"] in (404, 410)
    new_url = str(last(events, "success")["url"])
    assert new_url != url
    assert responses(events, "PATCH")[0]["requestOffset"] == "0"

    request = delivered_once(legacy, source)
    assert request.path == f"/uploads/{upload_id(new_url)}"
    assert tus_head(url).status_code in (404, 410)


def test_shim_killed_mid_upload_resumes_after_restart(
    shim: ShimLauncher,
    legacy: WholeFileServer,
    payload: PayloadFactory,
    start_client: StartClient,
) -> None:
    """SIGKILL of the shim mid-PATCH; after a restart the upload resumes where it was."""
    proc = shim()
    source = payload(40 * MIB)
    size = source.stat().st_size
    hold_at = 10 * MIB + 300 * 1024 + 7

    client = start_client(
        {
            "endpoint": endpoint(proc),
            "file": source,
            "chunkSize": MIB,
            "retryDelays": [],
            "holdAfterBytes": hold_at,
        }
    )
    url = str(client.wait_for_event("url")["url"])
    wait_for_offset(url, hold_at, client)  # HEAD shows > 10 MiB, a PATCH body is open

    proc.kill()
    try:
        assert client.wait() != 0  # it noticed the broken connection (retries are off)
    except subprocess.TimeoutExpired:
        client.kill()
    acknowledged = max(int(r["responseOffset"]) for r in responses(client.events(), "PATCH"))
    assert acknowledged == 10 * MIB

    proc.restart()
    resumed_url = on_current_port(url, proc)
    after_restart = offset_of(resumed_url)
    # Acknowledged bytes were fsynced; the open PATCH may have kept some more.
    assert 0 < acknowledged <= after_restart <= hold_at
    assert legacy.received == []

    events = run_client({"uploadUrl": resumed_url, "file": source, "chunkSize": MIB})
    assert last(events, "success")["url"] == resumed_url
    patches = responses(events, "PATCH")
    assert int(patches[0]["requestOffset"]) == after_restart  # not from 0
    assert patches[-1]["upstreamStatus"] == "201"

    request = delivered_once(legacy, source)
    assert request.path == f"/uploads/{upload_id(url)}"
    assert_not_delivered_again(resumed_url, legacy, size)


def test_legacy_failure_is_retried_by_resuming(
    node: None, shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory
) -> None:
    """Legacy answers 503: the client gets 503 (Retry-After) and the shim retries in the
    background; resuming (HEAD, with tus-js-client's own retries) gets the 201, and no byte
    is sent again."""
    proc = shim()
    source = payload(3 * MIB + 99)
    size = source.stat().st_size
    legacy.fail_status = 503

    events = run_client(
        {"endpoint": endpoint(proc), "file": source, "chunkSize": MIB, "retryDelays": []}, expect=1
    )
    url = str(last(events, "url")["url"])
    assert last(events, "error")["status"] == 503
    final = responses(events)[-1]
    assert (final["method"], final["status"]) == ("PATCH", 503)
    path = f"/uploads/{upload_id(url)}"
    assert [(r.method, r.path, r.status, r.size) for r in legacy.received] == [("PUT", path, 503, size)]

    legacy.fail_status = None
    events = run_client({"uploadUrl": url, "file": source, "chunkSize": MIB})
    assert last(events, "success")["url"] == url
    # HEADs only: the outbox delivered the file; no byte was sent again.
    answers = [(r["method"], r["status"], r["upstreamStatus"]) for r in responses(events)]
    assert answers[-1] == ("HEAD", 200, "201"), answers
    assert {method for method, _, _ in answers} == {"HEAD"}, answers

    assert_no_protocol_leak(legacy)
    statuses = [(r.method, r.path, r.status) for r in legacy.received]
    assert statuses[-1] == ("PUT", path, 201)
    assert {status for _, _, status in statuses[:-1]} == {503}
    accepted = legacy.received[-1]
    assert (accepted.size, accepted.sha256) == (size, sha256_of(source))
    assert_not_delivered_again(url, legacy, size)
