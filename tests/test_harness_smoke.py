"""Smoke tests of the test harness itself: legacy fixture, ShimProcess, the node driver.

ShimProcess is exercised against a stub mitmproxy addon (plain reverse proxy), so these
tests do not depend on the shim's own behaviour; the tests that start the real shim are
skipped while its entry points do not exist yet.
"""

from __future__ import annotations

import http.client
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import cast

import pytest

from shim.demo_server import WholeFileServer
from tests.harness import (
    ADDON_PATH,
    REPO_ROOT,
    PayloadFactory,
    ShimLauncher,
    ShimProcess,
    last_event,
    run_tus_js,
    sha256_of,
    tus_js_events,
)

TIMEOUT = 10.0

STUB_ADDON = '''
"""Stub of the shim addon: declares the shim_config option, proxies everything."""


class Stub:
    def load(self, loader):
        loader.add_option("shim_config", str, "", "path of the shim config")


addons = [Stub()]
'''


@pytest.fixture
def stub_addon(tmp_path: Path) -> Path:
    """A mitmproxy addon script that only declares the ``shim_config`` option."""
    path = tmp_path / "stub_addon.py"
    path.write_text(STUB_ADDON)
    return path


def get(url: str, path: str) -> tuple[int, bytes]:
    """GET ``url + path`` on a fresh connection; return status and body."""
    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_legacy_fixture_answers(legacy: WholeFileServer, payload: PayloadFactory) -> None:
    """The legacy fixture is listening on 127.0.0.1 and stores a PUT."""
    source = payload(1024 * 1024 + 1)
    conn = http.client.HTTPConnection("127.0.0.1", legacy.port, timeout=TIMEOUT)
    conn.request("PUT", "/smoke.bin", body=source.read_bytes())
    status = conn.getresponse().status
    conn.close()

    assert legacy.url == f"http://127.0.0.1:{legacy.port}"
    assert status == 201
    assert sha256_of(legacy.directory / "smoke.bin") == sha256_of(source)
    assert legacy.wait_for(1, TIMEOUT)[0].method == "PUT"


def test_payload_factory_makes_distinct_random_files(payload: PayloadFactory) -> None:
    """payload(size) returns new files of exactly that size with different content."""
    first, second, empty = payload(3 * 1024 * 1024 + 5), payload(3 * 1024 * 1024 + 5), payload(0)

    assert first != second
    assert first.stat().st_size == second.stat().st_size == 3 * 1024 * 1024 + 5
    assert sha256_of(first) != sha256_of(second)
    assert empty.stat().st_size == 0


def test_shim_process_lifecycle_with_stub_addon(
    shim: ShimLauncher, legacy: WholeFileServer, stub_addon: Path
) -> None:
    """Start, proxy, stop, restart on a fresh port, kill: all through ShimProcess."""
    proc = shim({"answer": 42}, addon=stub_addon)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", proc.url)
    assert proc.config == {"answer": 42, "storage": {"dir": str(proc.workdir / "store")}}
    assert get(proc.url, "/through-the-proxy")[0] == 404
    assert legacy.wait_for(1, TIMEOUT)[0].path == "/through-the-proxy"

    proc.stop()
    assert not proc.is_running()
    with pytest.raises(RuntimeError):
        _ = proc.url

    proc.restart()
    assert get(proc.url, "/after-restart")[0] == 404
    assert [r.path for r in legacy.wait_for(2, TIMEOUT)][-1] == "/after-restart"
    assert proc.output().count("listening at 127.0.0.1:") == 2

    assert proc.kill() == -9
    assert not proc.is_running()


def test_shim_process_reports_failed_start(tmp_path: Path, legacy: WholeFileServer) -> None:
    """A shim that exits at once raises RuntimeError carrying its output."""
    with pytest.raises(RuntimeError, match="No such script"):
        ShimProcess.start(
            "mitmdump", legacy.url, None, tmp_path, addon=tmp_path / "does-not-exist.py"
        )


def test_shim_process_start_classmethod(
    tmp_path: Path, legacy: WholeFileServer, stub_addon: Path
) -> None:
    """ShimProcess.start works without the fixture and honours a given storage dir."""
    store = tmp_path / "elsewhere"
    with ShimProcess.start(
        "mitmdump", legacy.url, {"storage": {"dir": str(store)}}, tmp_path, addon=stub_addon
    ) as proc:
        assert proc.storage_dir == store
        assert proc.wait_for_output(r"listening at").group(0) == "listening at"


@pytest.mark.skipif(not ADDON_PATH.exists(), reason="shim/addon.py does not exist yet")
def test_real_addon_starts_and_passes_through(shim: ShimLauncher, legacy: WholeFileServer) -> None:
    """mitmdump with the real shim addon starts with a trivial config and proxies a GET."""
    proc = shim()
    assert get(proc.url, "/not-an-upload")[0] == 404
    assert legacy.wait_for(1, TIMEOUT)[0].path == "/not-an-upload"
    proc.stop()


@pytest.mark.skipif(
    not (REPO_ROOT / "shim" / "__main__.py").exists(), reason="shim/__main__.py does not exist yet"
)
def test_python_m_shim_starts(shim: ShimLauncher, legacy: WholeFileServer) -> None:
    """``python -m shim`` starts with a trivial config and proxies a GET."""
    proc = shim(kind="python-m-shim")
    assert get(proc.url, "/not-an-upload")[0] == 404
    proc.stop()


def test_node_driver_reports_unreachable_endpoint(node: None, payload: PayloadFactory) -> None:
    """The driver prints an error event and exits 1 when nobody listens."""
    args = {"endpoint": "http://127.0.0.1:1/files/", "file": payload(10), "retryDelays": []}
    result = run_tus_js(args, timeout=60)

    assert result.returncode == 1, result.stderr
    assert last_event(result.stdout, "error")["message"]


# --- a minimal in-memory tus 1.0 server, only to check the node driver -------------------


@dataclass
class _Upload:
    """One upload of the stub tus server."""

    length: int | None
    data: bytearray = field(default_factory=bytearray)


class _TusServer(ThreadingHTTPServer):
    """Holds the uploads of :class:`_TusHandler`."""

    daemon_threads = True

    def __init__(self) -> None:
        """Listen on 127.0.0.1 at a free port."""
        self.uploads: dict[str, _Upload] = {}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _TusHandler)


class _TusHandler(BaseHTTPRequestHandler):
    """tus 1.0 core + creation (+ deferred length), kept in memory."""

    protocol_version = "HTTP/1.1"

    @property
    def tus(self) -> _TusServer:
        """The server with the uploads."""
        return cast(_TusServer, self.server)

    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet."""

    def reply(self, status: int, headers: dict[str, str] | None = None) -> None:
        """Send an empty response."""
        self.send_response(status)
        for name, value in {"Tus-Resumable": "1.0.0", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def upload(self) -> _Upload | None:
        """The upload the request path names."""
        return self.tus.uploads.get(self.path.rsplit("/", 1)[-1])

    def do_POST(self) -> None:
        """Create an upload."""
        key = uuid.uuid4().hex
        length = self.headers.get("Upload-Length")
        self.tus.uploads[key] = _Upload(int(length) if length is not None else None)
        self.reply(201, {"Location": f"/files/{key}"})

    def do_HEAD(self) -> None:
        """Report the offset (and length) of an upload."""
        upload = self.upload()
        if upload is None:
            self.reply(404)
            return
        headers = {"Upload-Offset": str(len(upload.data)), "Cache-Control": "no-store"}
        if upload.length is not None:
            headers["Upload-Length"] = str(upload.length)
        self.reply(200, headers)

    def do_PATCH(self) -> None:
        """Append a chunk (whole chunks only: a broken one is dropped)."""
        upload = self.upload()
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            return
        if upload is None or int(self.headers["Upload-Offset"]) != len(upload.data):
            self.reply(404 if upload is None else 409)
            return
        if "Upload-Length" in self.headers:
            upload.length = int(self.headers["Upload-Length"])
        upload.data.extend(body)
        self.reply(204, {"Upload-Offset": str(len(upload.data))})


@pytest.fixture
def tus_server() -> Iterator[_TusServer]:
    """The stub tus server, serving in a thread."""
    server = _TusServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def _endpoint(server: _TusServer) -> str:
    """Creation URL of the stub server."""
    return f"http://127.0.0.1:{server.server_address[1]}/files/"


@pytest.mark.parametrize("deferred", [False, True])
def test_node_driver_uploads_in_chunks(
    node: None, tus_server: _TusServer, payload: PayloadFactory, deferred: bool
) -> None:
    """A chunked upload arrives complete; the driver prints url, progress and success."""
    source = payload(300_000)
    args = {
        "endpoint": _endpoint(tus_server),
        "file": source,
        "chunkSize": 64 * 1024,
        "retryDelays": [],
        "uploadLengthDeferred": deferred,
    }
    result = run_tus_js(args, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr
    events = tus_js_events(result.stdout)
    url = events[0]["url"]
    assert events[0]["event"] == "url"
    assert events[-1] == {"event": "success", "url": url}
    progress = [e for e in events if e["event"] == "progress"]
    assert 2 <= len(progress) <= 25
    [upload] = tus_server.uploads.values()
    assert (bytes(upload.data), upload.length) == (source.read_bytes(), 300_000)


def test_node_driver_stops_and_resumes(
    node: None, tus_server: _TusServer, payload: PayloadFactory
) -> None:
    """stopAfterBytes aborts with exit 3 and the URL; uploadUrl resumes to completion."""
    source = payload(512 * 1024)
    args = {
        "endpoint": _endpoint(tus_server),
        "file": source,
        "chunkSize": 64 * 1024,
        "retryDelays": [],
        "stopAfterBytes": 200 * 1024,
    }
    stopped = run_tus_js(args, timeout=60)
    assert stopped.returncode == 3, stopped.stdout + stopped.stderr
    url = last_event(stopped.stdout, "aborted")["url"]
    [upload] = tus_server.uploads.values()
    assert 0 < len(upload.data) < source.stat().st_size

    resumed = run_tus_js({"uploadUrl": url, "file": source, "retryDelays": []}, timeout=60)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert last_event(resumed.stdout, "success")["url"] == url
    assert bytes(upload.data) == source.read_bytes()
