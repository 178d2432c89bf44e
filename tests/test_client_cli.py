"""End to end: `python -m shim.client upload` (the client behind `python -m shim upload`) run
as a real process, through a link that keeps dropping, to a real shim and the real
whole-file legacy server.

The link is `CuttingProxy`, a TCP proxy between the client and the shim that cuts the
connection carrying every `cut_every`-th byte the client sends, as a link that drops every N
bytes does. It can also stall once `stall_at` bytes went through, so that a test can SIGKILL
the client mid-upload at a known point without timing guesses, then run it again.

What a user would notice is asserted: the exit status and the one-line outcome, that a run
after a kill resumes (the shim held bytes before it, and the link carried less than twice
the file in all), and that the legacy server got the file once, byte-exact, under its name
and media type, with no protocol field.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from shim.demo_server import ReceivedRequest, WholeFileServer
from tests.harness import (
    REPO_ROOT,
    OutputLog,
    PayloadFactory,
    ShimLauncher,
    ShimProcess,
    sha256_of,
    shared_shim,
    subprocess_env,
    wait_until,
)
from tests.legacy_servers import LegacyServer
from tests.links import MakeProxy

pytestmark = pytest.mark.timeout(120)

KIB = 1024
MIB = 1024 * KIB
TIMEOUT = 30.0
"""Deadline for anything a test waits for (normally well under a second)."""
CLIENT_TIMEOUT = 60.0
"""Seconds one client run may take (a few MiB over loopback: about one)."""
PROTOCOLS = ("tus", "content-range", "ietf")
LEAKED_PREFIXES = ("upload-", "tus-", "x-upload-")
LEAKED_NAMES = ("content-range", "content-digest", "repr-digest")
FAST_RETRIES = ("--retry-initial", "0.02", "--retry-max", "0.1", "--timeout", "10")
"""Backoff for tests: the shim on loopback is back at once; 1 s doubling would only be slow."""




# --- the client -----------------------------------------------------------------------------


def client_command(source: Path, url: str, protocol: str, state: Path, *extra: str) -> list[str]:
    """The real entry point, as a user runs it."""
    return [sys.executable, "-m", "shim", "upload", str(source), url,
            "--protocol", protocol, "--state", str(state), *FAST_RETRIES, *extra]


def run_client(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=False)


def show(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-3000:]}"


def remembered(state: Path) -> dict[str, str]:
    """The upload URLs in the client's state file, by key."""
    if not state.exists():
        return {}
    uploads = json.loads(state.read_text())["uploads"]
    return {key: entry["url"] for key, entry in uploads.items()}


def upload_target(protocol: str, name: str) -> str:
    """The path the client is pointed at: the tus endpoint, else the file's legacy URL."""
    return "/files/" if protocol == "tus" else f"/uploads/{name}"


def held_by_shim(proc: ShimProcess, protocol: str, state: Path, size: int) -> int:
    """The offset the shim reports for the client's upload, asked directly (not over the
    link): tus and IETF HEAD the URL the client remembered, Content-Range inquires."""
    if protocol == "content-range":
        inquiry = requests.put(proc.url + "/uploads/photo.png", timeout=TIMEOUT,
                               headers={"Content-Range": f"bytes */{size}"})
        assert inquiry.status_code == 308, inquiry
        stored = inquiry.headers.get("Range")
        return int(stored.rpartition("-")[2]) + 1 if stored else 0
    (url,) = remembered(state).values()
    fields = {"Tus-Resumable": "1.0.0"} if protocol == "tus" else \
        {"Upload-Draft-Interop-Version": "8"}
    answer = requests.head(proc.url + urlsplit(url).path, headers=fields, timeout=TIMEOUT)
    assert answer.status_code in (200, 204), (answer.status_code, dict(answer.headers))
    return int(answer.headers["Upload-Offset"])


# --- the legacy side ------------------------------------------------------------------------


def puts(legacy: WholeFileServer) -> list[ReceivedRequest]:
    return [r for r in list(legacy.received) if r.method == "PUT"]


def assert_delivered_once(legacy: WholeFileServer, source: Path, path: str) -> ReceivedRequest:
    """One PUT in all, to `path`, complete and byte-exact, stored, with no protocol field."""
    received = puts(legacy)
    assert [(r.path, r.status, r.complete) for r in received] == [(path, 201, True)], received
    (put,) = received
    assert (put.size, put.sha256) == (source.stat().st_size, sha256_of(source)), put
    assert sha256_of(legacy.directory / path.lstrip("/")) == sha256_of(source)
    leaked = [n for n in put.header_names() if n in LEAKED_NAMES or n.startswith(LEAKED_PREFIXES)]
    assert not leaked, f"protocol fields reached the legacy server: {leaked}"
    return put


# --- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cut_and_killed_client_resumes_and_delivers_once(
    protocol: str, shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory,
    cutting_proxy: MakeProxy, tmp_path: Path,
) -> None:
    """4 MiB over a link that drops every 600 KiB: the client is SIGKILLed once 2 MiB went
    through, and run again with the same arguments. The shim held bytes before the rerun,
    the rerun resumes (the link carried less than twice the file in all, across at least
    three cuts), and the legacy server gets the file once, byte-exact, with its media type;
    tus sends the file's name (the delivery path uses it) and sha256 checksums, so its
    chunks are smaller than the distance between drops."""
    proc = shim({"tus": {"forward": {"path": "/uploads/{id}-{filename}"}}})
    source = payload(4 * MIB + 4321, name="photo.png")
    size = source.stat().st_size
    proxy = cutting_proxy(proc.port, cut_every=600 * KIB, stall_at=2 * MIB)
    state = tmp_path / "client-state.json"
    chunk = "256K" if protocol == "tus" else "1M"
    command = client_command(source, proxy.url + upload_target(protocol, "photo.png"), protocol,
                             state, "--chunk-size", chunk)

    first = subprocess.Popen(command, cwd=REPO_ROOT, env=subprocess_env(),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        if not proxy.stalled.wait(TIMEOUT):
            first.kill()
            out, err = first.communicate(timeout=TIMEOUT)
            pytest.fail(f"the client never got 2 MiB through: exit {first.returncode}\n{out}\n{err}")
        first.send_signal(signal.SIGKILL)
        assert first.wait(TIMEOUT) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate(timeout=TIMEOUT)
    proxy.drop_all()
    assert len(remembered(state)) == 1, "the killed client did not remember its upload"
    wait_until(lambda: held_by_shim(proc, protocol, state, size) > 0, TIMEOUT,
               "the shim to hold the killed client's bytes")
    held = held_by_shim(proc, protocol, state, size)
    assert 0 < held < size, held
    assert not puts(legacy)

    second = run_client(command)

    assert second.returncode == 0, show(second)
    status, location = second.stdout.splitlines()
    assert status == "201 Created", show(second)
    assert location.startswith("Location: /uploads/"), show(second)
    assert "resuming" in second.stderr, show(second)
    assert proxy.cuts >= 3, (proxy.cuts, show(second))
    assert proxy.carried < 2 * size, (proxy.carried, size)
    put = assert_delivered_once(legacy, source, location.removeprefix("Location: "))
    assert put.header("Content-Type") == "image/png", put
    if protocol == "tus":
        assert put.path.endswith("-photo.png"), put
    else:
        assert put.path == "/uploads/photo.png", put
    assert remembered(state) == {}, "a finished upload stays in the state file"


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ShimProcess, WholeFileServer]]:
    """One shim for the refusal tests (starting one is most of a test's time): every
    protocol's max_size is 1000 bytes. Each test uses its own file size to find its own
    requests on the shared legacy server."""
    yield from shared_shim(tmp_path_factory, "client-refusals", {
        "tus": {"max_size": 1000}, "content_range": {"max_size": 1000},
        "ietf": {"max_size": 1000},
    })


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_4xx_stops_the_client_with_the_servers_message(
    protocol: str, strict: tuple[ShimProcess, WholeFileServer], payload: PayloadFactory,
    tmp_path: Path,
) -> None:
    """The protocol's max_size is 1000 and the file 5000 bytes: the shim answers 413, and the
    client exits 1 at once with one line naming the status and the shim's reason, instead of
    retrying. Nothing of it reaches the legacy server."""
    proc, legacy = strict
    size = 5000 + PROTOCOLS.index(protocol)
    source = payload(size, name=f"big-{protocol}.bin")
    result = run_client(client_command(source, proc.url + upload_target(protocol, source.name),
                                       protocol, tmp_path / "state.json", "--give-up-after", "20"))

    assert result.returncode == 1, show(result)
    assert result.stdout == "", show(result)
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("upload failed")]
    assert " 413 " in line and "1000" in line, show(result)
    assert "retrying" not in result.stderr, show(result)
    assert not [r for r in list(legacy.received) if r.size == size]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_legacy_refusal_is_final(
    protocol: str, strict: tuple[ShimProcess, WholeFileServer], payload: PayloadFactory,
    tmp_path: Path,
) -> None:
    """The legacy server refuses the finished file (403): the client exits 1 naming the 403
    after the one delivery, and a second run gets the recorded answer without the file
    being sent to the legacy server again."""
    proc, legacy = strict
    legacy.fail_status = 403
    size = 900 + PROTOCOLS.index(protocol)
    source = payload(size, name=f"doc-{protocol}.pdf")
    command = client_command(source, proc.url + upload_target(protocol, source.name), protocol,
                             tmp_path / "state.json", "--chunk-size", "300",
                             "--give-up-after", "20")

    for _ in range(2):
        result = run_client(command)
        assert result.returncode == 1, show(result)
        last = result.stderr.splitlines()[-1]
        assert last.startswith("upload failed: ") and "403" in last, show(result)
        mine = [r for r in puts(legacy) if r.size == size]
        assert [(r.status, r.complete) for r in mine] == [(403, True)], mine


@pytest.fixture(scope="module")
def flaky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ShimProcess, LegacyServer]]:
    """A shim in front of a scriptable legacy server, whose final requests wait only 1 s
    for the delivery before answering 503 with Retry-After."""
    tmp = tmp_path_factory.mktemp("client-flaky")
    legacy = LegacyServer()
    legacy.start()
    launcher = ShimLauncher(legacy.url, tmp)
    try:
        yield launcher({"delivery": {"wait": 1.0}}), legacy
    finally:
        launcher.kill_all()
        legacy.stop()
        print(launcher.report())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pending_delivery_is_waited_out(
    protocol: str, flaky: tuple[ShimProcess, LegacyServer], payload: PayloadFactory,
    tmp_path: Path,
) -> None:
    """The legacy server answers 503 when the file is complete: the shim answers 503 with
    Retry-After while its delivery goes on, and the client keeps asking (it never starts
    over) until the legacy server takes the file; it exits 0 with the legacy server's 201,
    and the file reached the legacy server whole, accepted once."""
    proc, legacy = flaky
    size = 700 * KIB + PROTOCOLS.index(protocol)
    source = payload(size, name=f"late-{protocol}.bin")
    command = client_command(source, proc.url + upload_target(protocol, source.name), protocol,
                             tmp_path / "state.json", "--chunk-size", "256K",
                             "--give-up-after", "60")
    legacy.set_mode("status:503")
    client = subprocess.Popen(command, cwd=REPO_ROOT, env=subprocess_env(),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        assert client.stderr is not None
        notes = OutputLog()
        notes.drain(client.stderr)
        waiting = notes.wait_for(re.compile(r"503 Service Unavailable.*retrying in"), 0, TIMEOUT)
        assert waiting is not None, notes.text()
        legacy.set_mode("ok")
        assert client.wait(CLIENT_TIMEOUT) == 0, notes.text()
        assert client.stdout is not None
        assert client.stdout.read().decode().splitlines()[0] == "201 Created", notes.text()
    finally:
        legacy.set_mode("ok")
        if client.poll() is None:
            client.kill()
            client.wait(TIMEOUT)
    mine = [r for r in legacy.requests() if r.size == size]
    assert [r.status for r in mine if r.complete][-1:] == [201], mine
    assert len([r for r in mine if r.status == 201]) == 1, mine
    assert all(r.sha256 == sha256_of(source) for r in mine), mine


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    """A file that does not exist: exit 2 with one line, nothing sent."""
    result = run_client(client_command(tmp_path / "nope.bin", "http://127.0.0.1:9/files/", "tus",
                                       tmp_path / "state.json"))
    assert result.returncode == 2, show(result)
    assert result.stderr.startswith("upload failed: ") and "nope.bin" in result.stderr, show(result)
    assert len(result.stderr.splitlines()) == 1, show(result)


def test_help_names_every_option() -> None:
    """`--help` documents the command line the README shows."""
    result = run_client([sys.executable, "-m", "shim.client", "upload", "--help"])
    assert result.returncode == 0, show(result)
    for option in ("--protocol", "--chunk-size", "--header", "--state", "--give-up-after"):
        assert option in result.stdout, option
    assert "content-range" in result.stdout
