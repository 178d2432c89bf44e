"""End to end in a real browser: a page on one origin uploads through the shim on another.

Headless Chromium (Debian's ``chromium`` package, driven by playwright-core, which downloads
no browser) opens a page served here on its own port, picks a file in its file input, and
the page uploads it with Uppy's Tus plugin, or with tus-js-client speaking the IETF draft.
The shim listens on another port, so every request is cross-origin and needs the shim's
CORS answers. Between the browser and the shim a `CuttingProxy` drops the connection that
carries every 8th MiB the browser sends, so every upload is cut mid-body and must resume.

What a user would notice is asserted: the page reports success, the legacy server got the
file once, byte-exact, with no protocol field; the page made one upload and went on from
where each cut left it (the shim's event log says so; Chromium itself re-sends a cut PATCH
from its start once, which the shim refuses with 409 from the head); a page on an origin the
shim does not allow cannot upload at all. The pages live in tests/js/browser/ and are bundled by esbuild.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from shim.demo_server import WholeFileServer
from tests.harness import (
    JS_DIR,
    PayloadFactory,
    ShimLauncher,
    in_ci,
    require_node,
    sha256_of,
    subprocess_env,
    tus_js_events,
)
from tests.links import MakeProxy

pytestmark = pytest.mark.timeout(180)

MIB = 1024 * 1024
FILE_SIZE = 20 * MIB
CUT_EVERY = 8 * MIB
"""The link drops the connection carrying every 8th MiB: two cuts in a 20 MiB upload."""
BROWSER_TIMEOUT = 120.0
CHROMIUM = os.environ.get("SHIM_TEST_CHROMIUM", "/usr/bin/chromium")
PROTOCOL_PREFIXES = ("upload-", "tus-", "x-upload-")


def browser_problem() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    for package in ("playwright-core", "esbuild", "@uppy/core", "@uppy/tus"):
        if not (JS_DIR / "node_modules" / package / "package.json").is_file():
            return f"tests/js/node_modules/{package} is missing (run: cd tests/js && npm ci)"
    return None


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The origin (``http://127.0.0.1:<port>``) of a static site serving the bundled pages."""
    require_node()
    problem = browser_problem()
    if problem is not None:
        if in_ci():
            pytest.fail(f"browser tests cannot run under CI: {problem}", pytrace=False)
        pytest.skip(problem)
    site = tmp_path_factory.mktemp("pages")
    node = shutil.which("node") or "node"
    subprocess.run([node, str(JS_DIR / "browser" / "build.mjs"), str(site)], check=True,
                   timeout=60, env=subprocess_env())
    handler = partial(QuietHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    """A static file handler that keeps the test output free of access lines."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def upload_in_browser(page_url: str, file: Path) -> tuple[int, list[dict[str, Any]]]:
    """Run the browser driver on ``page_url`` picking ``file``: its exit code and events."""
    node = shutil.which("node") or "node"
    args = {"page": page_url, "file": str(file), "chromium": CHROMIUM,
            "timeout": int(BROWSER_TIMEOUT * 1000)}
    done = subprocess.run([node, str(JS_DIR / "browser_upload.mjs"), json.dumps(args)],
                          capture_output=True, text=True, timeout=BROWSER_TIMEOUT + 30,
                          env=subprocess_env(), check=False)
    print(done.stdout[-4000:], done.stderr[-4000:])
    return done.returncode, tus_js_events(done.stdout)




def upload_events(log: str, name: str) -> list[int]:
    """The offsets (`bytes=`) of the shim's `upload event=<name>` log lines, in order."""
    pattern = re.compile(rf"upload event={name} .*? bytes=(\d+)")
    return [int(match.group(1)) for match in pattern.finditer(log)]


def assert_delivered_once(legacy: WholeFileServer, file: Path, path_prefix: str) -> None:
    """The legacy server got ``file`` once, whole and byte-exact, with no protocol field."""
    assert len(legacy.received) == 1, [(r.method, r.path, r.size) for r in legacy.received]
    delivery = legacy.received[0]
    assert delivery.complete and delivery.size == file.stat().st_size
    assert delivery.sha256 == sha256_of(file)
    assert delivery.path.startswith(path_prefix), delivery.path
    leaked = [name for name, _ in delivery.headers if name.lower().startswith(PROTOCOL_PREFIXES)]
    assert leaked == []


@pytest.mark.parametrize(("page", "endpoint", "delivered_under"), [
    ("uppy_page", "/files/", "/uploads/"),
    ("tus_ietf_page", "/api/reports/site-photos.bin", "/api/reports/site-photos.bin"),
])
def test_a_page_on_another_origin_uploads_through_a_dropping_link_and_resumes(
    pages: str, shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory,
    cutting_proxy: MakeProxy, page: str, endpoint: str, delivered_under: str,
) -> None:
    file = payload(FILE_SIZE, name="site-photos.bin")
    proc = shim({"cors": {"origins": [pages]}})
    proxy = cutting_proxy(proc.port, cut_every=CUT_EVERY)

    code, events = upload_in_browser(f"{pages}/{page}.html?endpoint={proxy.url}{endpoint}", file)

    assert code == 0 and events[-1]["event"] == "success", events[-5:]
    assert proxy.cuts >= 2, "the link did not drop mid-upload"
    assert any(event["event"] == "retry" for event in events)
    assert upload_events(proc.output(), "created") == [0], "the page started over"
    resumed_at = upload_events(proc.output(), "resumed")
    assert len(resumed_at) >= 2 and all(0 < at < FILE_SIZE for at in resumed_at), resumed_at
    assert_delivered_once(legacy, file, delivered_under)


def test_a_page_on_an_origin_not_allowed_cannot_upload(
    pages: str, shim: ShimLauncher, legacy: WholeFileServer, payload: PayloadFactory,
) -> None:
    file = payload(64 * 1024)
    proc = shim({"cors": {"origins": ["https://app.example"]}})

    code, events = upload_in_browser(f"{pages}/uppy_page.html?endpoint={proc.url}/files/", file)

    assert code == 1 and events[-1]["event"] == "error", events[-5:]
    assert legacy.received == []
