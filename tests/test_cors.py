"""CORS for browser uploads from another origin: the shim's own answers carry the fields a
page needs, preflights for uploads are answered by the shim, the rest is the legacy
server's (shim/cors.py, through a real shim process for the end-to-end part)."""

from __future__ import annotations

import base64

import pytest
import requests

from shim.config import CorsConfig
from shim.cors import Cors
from shim.demo_server import WholeFileServer
from shim.model import Request
from tests.harness import ShimLauncher

APP = "https://app.example"
TIMEOUT = 30


def preflight(path: str, origin: str = APP, method: str = "POST",
              headers: str = "tus-resumable,upload-length") -> Request:
    return Request("OPTIONS", path, "", (("Origin", origin), ("Access-Control-Request-Method",
                                                             method),
                                         ("Access-Control-Request-Headers", headers)))


CORS = Cors(CorsConfig(origins=(APP,), max_age=99), ("/files/",))


def test_a_preflight_for_an_upload_is_answered_with_what_the_page_may_send() -> None:
    reply = CORS.preflight(preflight("/files/abc", method="PATCH",
                                     headers="tus-resumable,upload-offset,content-type"))
    assert reply is not None and reply.status == 204
    fields = dict(reply.headers)
    assert fields["Access-Control-Allow-Origin"] == APP and fields["Vary"] == "Origin"
    assert "PATCH" in fields["Access-Control-Allow-Methods"]
    assert fields["Access-Control-Allow-Headers"] == "tus-resumable,upload-offset,content-type"
    assert fields["Access-Control-Max-Age"] == "99"
    assert "Access-Control-Allow-Credentials" not in fields


def test_a_preflight_carrying_upload_fields_on_any_path_is_the_shims() -> None:
    reply = CORS.preflight(preflight("/api/put-here", method="PUT",
                                     headers="content-range"))
    assert reply is not None and reply.status == 204


@pytest.mark.parametrize("request_", [
    preflight("/api/report", method="GET", headers="authorization"),  # the legacy server's
    Request("OPTIONS", "/files/", "", (("Origin", APP),)),  # no preflight: tus OPTIONS
    Request("POST", "/files/", "", (("Origin", APP),)),
])
def test_other_requests_are_no_preflight_of_the_shims(request_: Request) -> None:
    assert CORS.preflight(request_) is None


def test_an_origin_not_allowed_gets_403_and_no_allow_origin() -> None:
    reply = CORS.preflight(preflight("/files/", origin="https://evil.example"))
    assert reply is not None and reply.status == 403
    assert "Access-Control-Allow-Origin" not in dict(reply.headers)
    assert CORS.fields(Request("POST", "/files/", "", (("Origin", "https://evil.example"),))) == ()


def test_cors_off_touches_nothing() -> None:
    off = Cors(CorsConfig(), ("/files/",))
    assert off.preflight(preflight("/files/")) is None
    assert off.fields(Request("POST", "/files/", "", (("Origin", APP),))) == ()


def test_star_and_credentials() -> None:
    star = Cors(CorsConfig(origins=("*",)), ())
    assert dict(star.fields(Request("GET", "/", "", (("Origin", APP),))))[
        "Access-Control-Allow-Origin"] == "*"
    with_credentials = Cors(CorsConfig(origins=("*",), credentials=True), ())
    fields = dict(with_credentials.fields(Request("GET", "/", "", (("Origin", APP),))))
    assert fields["Access-Control-Allow-Origin"] == APP  # "*" is not allowed with credentials
    assert fields["Access-Control-Allow-Credentials"] == "true"
    exposed = fields["Access-Control-Expose-Headers"]
    for name in ("Location", "Upload-Offset", "Tus-Resumable", "Range", "Shim-Upstream-Status"):
        assert name in exposed


def test_a_page_on_another_origin_uploads_through_the_shim(
        shim: ShimLauncher, legacy: WholeFileServer) -> None:
    """What a browser does, step by step: preflight, creation, preflight, PATCH, each with
    Origin; the answers carry what the page needs to read Location and Upload-Offset. A
    request the shim passes through gets nothing from the shim."""
    proc = shim({"cors": {"origins": [APP]}})
    origin = {"Origin": APP}
    asked = requests.options(f"{proc.url}/files/", timeout=TIMEOUT, headers={
        **origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "tus-resumable,upload-length,upload-metadata"})
    assert asked.status_code == 204, asked.text
    assert asked.headers["Access-Control-Allow-Origin"] == APP
    data = b"from a page" * 100
    name = base64.b64encode(b"page.txt").decode()
    created = requests.post(f"{proc.url}/files/", timeout=TIMEOUT, headers={
        **origin, "Tus-Resumable": "1.0.0", "Upload-Length": str(len(data)),
        "Upload-Metadata": f"filename {name}"})
    assert created.status_code == 201
    assert created.headers["Access-Control-Allow-Origin"] == APP
    assert "Location" in created.headers["Access-Control-Expose-Headers"]
    location = created.headers["Location"]
    asked = requests.options(f"{proc.url}{location}", timeout=TIMEOUT, headers={
        **origin, "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "tus-resumable,upload-offset,content-type"})
    assert asked.status_code == 204 and "PATCH" in asked.headers["Access-Control-Allow-Methods"]
    patched = requests.patch(f"{proc.url}{location}", data=data, timeout=TIMEOUT, headers={
        **origin, "Tus-Resumable": "1.0.0", "Upload-Offset": "0",
        "Content-Type": "application/offset+octet-stream"})
    assert patched.status_code == 204, patched.text
    assert patched.headers["Access-Control-Allow-Origin"] == APP
    assert "Upload-Offset" in patched.headers["Access-Control-Expose-Headers"]
    [received] = legacy.wait_for(1, TIMEOUT)
    assert received.size == len(data)
    passed = requests.get(f"{proc.url}/somewhere-else", headers=origin, timeout=TIMEOUT)
    assert "Access-Control-Allow-Origin" not in passed.headers  # the legacy server's answer
