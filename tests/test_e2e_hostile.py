"""End to end, issue 9: what a hostile client sends can never choose the legacy path, leak a
partial file or a protocol field to the legacy server, exhaust the shim, or touch someone
else's upload.

One test (family) per bullet under "Why" in the issue, with variants: other metadata keys,
other protocols, other sizes. Each request goes through a real ``mitmdump`` shim to
``tests.legacy_servers.LegacyServer``, which records every request it gets (method, path,
headers, body digest), so each test asserts what the legacy server received (nothing, for a
hostile request; exactly one whole file, for an accepted one) and what the client got. The
raw client in ``tests.hostile_cases`` sends bytes no ordinary client library would (CR, LF,
NUL, obs-text, a Host that is no host); the cases are tables there, counted by kind
(``python -m tests.hostile_cases``).

A shim per configuration is shared by a module's tests (starting mitmdump is most of a test's
time); tests use their own paths and owners, and look only at what the legacy server got
since they started (``Stack.mark``/``Stack.since``): a worker runs one test at a time.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pytest

from tests import hostile_cases as hc
from tests.harness import wait_until
from tests.hostile_cases import (
    INTEROP,
    TUS_CHUNK,
    Case,
    Field,
    RawResponse,
    Stack,
    b64,
    cases,
    chunked,
    closes_after,
    creation,
    exchange,
    send,
    sha256,
    unique,
)
from tests.legacy_servers import Received

pytestmark = pytest.mark.timeout(60)

TUS = ("Tus-Resumable", "1.0.0")
PARTIAL_UPLOAD = "application/partial-upload"
PUBLIC_URL = "https://up.example.com"
PROTOCOL_FIELD_PREFIXES = ("tus-", "upload-", "x-upload-", "x-goog-", "x-http-method-override")
PROTOCOL_FIELD_NAMES = ("content-range", "range", "expect", "repr-digest", "content-digest")
EARLY = 3.0
"""Seconds within which a refusal decided from the head must come, without the body."""

STD_CONFIG: dict[str, Any] = {
    "tus": {"max_size": 1000},
    "webdav": {"paths": ["/dav/"]},
    "seed001": {"query_range": True, "expect_range": True},
    "delivery": {"wait": 10.0},
}
"""Every protocol on, paths unrestricted; tus uploads go to /uploads/{id}, at most 1000 bytes."""
TEMPLATE_CONFIG: dict[str, Any] = {
    "tus": {"forward": {"path": "/uploads/{user}/{filename}", "body": "multipart"}},
}
ONLY = ["/only/"]
RESTRICTED_CONFIG: dict[str, Any] = {
    "content_range": {"paths": ONLY},
    "ietf": {"paths": ONLY},
    "tus_target": {"paths": ONLY},
    "byteranges": {"paths": ONLY},
    "seed001": {"query_range": True, "expect_range": True, "paths": ONLY},
}
PASS_THROUGH_CONFIG: dict[str, Any] = {**RESTRICTED_CONFIG, "guard": {"pass_through": True}}
LIMITS_CONFIG: dict[str, Any] = {
    "limits": {"uploads_per_owner": 3, "uploads_total": 5, "client_timeout": 2},
    "webdav": {"paths": ["/dav/"]},
    "seed001": {"query_range": True, "expect_range": True},
}
NO_SPACE_CONFIG: dict[str, Any] = {
    "storage": {"min_free_bytes": 10**18},
    "webdav": {"paths": ["/dav/"]},
    "seed001": {"query_range": True, "expect_range": True},
}
PUBLIC_URL_CONFIG: dict[str, Any] = {"public_url": PUBLIC_URL}


# --- shims shared by the tests of this module -------------------------------------------------


@pytest.fixture(scope="module")
def std(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Every protocol on (STD_CONFIG)."""
    yield from hc.stack(tmp_path_factory, "hostile-std", STD_CONFIG)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """tus delivering to /uploads/{user}/{filename} as multipart (TEMPLATE_CONFIG)."""
    yield from hc.stack(tmp_path_factory, "hostile-template", TEMPLATE_CONFIG)


@pytest.fixture(scope="module")
def restricted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Every protocol on the target URL limited to /only/ (RESTRICTED_CONFIG)."""
    yield from hc.stack(tmp_path_factory, "hostile-restricted", RESTRICTED_CONFIG)


@pytest.fixture(scope="module")
def pass_through(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """RESTRICTED_CONFIG with guard.pass_through: true."""
    yield from hc.stack(tmp_path_factory, "hostile-pass-through", PASS_THROUGH_CONFIG)


@pytest.fixture(scope="module")
def limits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Caps of 3 incomplete uploads per owner, 5 in all; clients idle 2 s are closed."""
    yield from hc.stack(tmp_path_factory, "hostile-limits", LIMITS_CONFIG)


@pytest.fixture(scope="module")
def no_space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """storage.min_free_bytes far above any disk's free space."""
    yield from hc.stack(tmp_path_factory, "hostile-no-space", NO_SPACE_CONFIG)


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """public_url: https://up.example.com."""
    yield from hc.stack(tmp_path_factory, "hostile-public-url", PUBLIC_URL_CONFIG)


# --- what the legacy server got ---------------------------------------------------------------


def show(received: Sequence[Received]) -> str:
    """Requests the legacy server got, for assertion messages."""
    def fields(r: Received) -> str:
        return ", ".join(f"{k}: {v[:60]}{'...' if len(v) > 60 else ''}" for k, v in r.headers)

    return "; ".join(f"{r.method} {r.path} [{fields(r)}] ({r.size} bytes)" for r in received)


def assert_nothing_reached(stack: Stack, mark: int, response: RawResponse | None = None) -> None:
    """The legacy server got no request since ``mark``."""
    got = stack.since(mark)
    assert got == [], f"the legacy server got {show(got)}; the client got {response}"


def protocol_fields(received: Received) -> list[str]:
    """The resumable-upload fields a request to the legacy server carried (none allowed)."""
    return [name for name, _ in received.headers
            if name.lower().startswith(PROTOCOL_FIELD_PREFIXES)
            or name.lower() in PROTOCOL_FIELD_NAMES]


def delivered_once(stack: Stack, mark: int, path: str, data: bytes | None,
                   method: str | None = None) -> Received:
    """Since ``mark`` the legacy server got exactly one request, for ``path``: the whole file
    (``data``; None when the body is a multipart wrapping), no protocol field."""
    got = stack.since(mark)
    assert [r.path for r in got] == [path], show(got)
    [delivery] = got
    assert delivery.complete and delivery.status == 201, show(got)
    if method is not None:
        assert delivery.method == method, show(got)
    assert protocol_fields(delivery) == [], show(got)
    if data is not None:
        assert (delivery.size, delivery.sha256) == (len(data), sha256(data)), show(got)
    return delivery


def assert_no_dot_segments(received: Sequence[Received]) -> None:
    """No path the legacy server got has a `.` or `..` segment, encoded or not."""
    for request in received:
        segments = urlsplit(request.path).path.split("/")[1:]
        assert all(unquote(s) not in (".", "..") for s in segments), request.path
        assert all(s for s in segments), f"empty segment in {request.path}"


# --- small request helpers --------------------------------------------------------------------


def bearer(name: str) -> Field:
    """An Authorization field naming an owner no other test uses."""
    return ("Authorization", f"Bearer {unique(name)}")


def tus_create(stack: Stack, length: int | None, data: bytes = b"",
               fields: Sequence[Field] = ()) -> RawResponse:
    """A tus creation (with upload if ``data``); Upload-Defer-Length when ``length`` is None."""
    sized: Field = ("Upload-Length", str(length)) if length is not None else ("Upload-Defer-Length", "1")
    extra: list[Field] = [("Content-Type", TUS_CHUNK)] if data else []
    return exchange(stack.port, "POST", "/files/", [TUS, sized, *extra, *fields], data)


def tus_location(response: RawResponse) -> str:
    """The path of a tus upload just created (201 required)."""
    assert response.status == 201, response
    location = response.header("Location")
    assert location, response
    return urlsplit(location).path


def tus_patch(stack: Stack, path: str, offset: int, data: bytes,
              fields: Sequence[Field] = ()) -> RawResponse:
    """A tus PATCH; ``fields`` replace the defaults of the same name."""
    return exchange(stack.port, "PATCH", path,
                    merge([TUS, ("Upload-Offset", str(offset)), ("Content-Type", TUS_CHUNK)], fields),
                    data)


def tus_head(stack: Stack, path: str, fields: Sequence[Field] = ()) -> RawResponse:
    """A tus HEAD."""
    return exchange(stack.port, "HEAD", path, [TUS, *fields], length=False)


def merge(base: Sequence[Field], extra: Sequence[Field]) -> list[Field]:
    """``base`` with the fields of ``extra`` replacing those of the same name."""
    names = {name.lower() for name, _ in extra}
    return [*(f for f in base if f[0].lower() not in names), *extra]


def ietf_create(stack: Stack, path: str, data: bytes, complete: bool,
                fields: Sequence[Field] = ()) -> RawResponse:
    """An IETF creation (interop 8) on ``path``."""
    return exchange(stack.port, "POST", path,
                    [(INTEROP, "8"), ("Upload-Complete", "?1" if complete else "?0"), *fields], data)


def ietf_resource(response: RawResponse) -> str:
    """The path of the upload resource an IETF creation announced (104 and 201 required)."""
    assert response.status == 201 and response.interim, response
    assert response.interim[0].status == 104, response
    location = response.header("Location")
    assert location, response
    return urlsplit(location).path


def ietf_patch(stack: Stack, resource: str, offset: int, data: bytes, complete: bool,
               fields: Sequence[Field] = ()) -> RawResponse:
    """An IETF append; ``fields`` replace the defaults of the same name."""
    base: list[Field] = [(INTEROP, "8"), ("Upload-Offset", str(offset)),
                         ("Upload-Complete", "?1" if complete else "?0"),
                         ("Content-Type", PARTIAL_UPLOAD)]
    return exchange(stack.port, "PATCH", resource, merge(base, fields), data)


def ietf_head(stack: Stack, resource: str, fields: Sequence[Field] = ()) -> RawResponse:
    """An IETF offset retrieval."""
    return exchange(stack.port, "HEAD", resource, [(INTEROP, "8"), *fields], length=False)


def missing_tus_upload() -> str:
    """A tus upload URL that was never created (the shim's ids: 22+ URL-safe characters)."""
    return "/files/" + secrets.token_urlsafe(16)


def sf_binary(digest: bytes) -> str:
    """An RFC 8941 byte sequence."""
    return ":" + base64.b64encode(digest).decode() + ":"


# === 1. "The client picks the legacy path" ====================================================


@pytest.mark.parametrize("case", cases(hc.DOT_SEGMENTS))
def test_metadata_value_cannot_climb_the_template(template: Stack, case: Case) -> None:
    """A {user} or {filename} value that is empty, `.` or `..` (also percent-encoded) would make
    a dot segment in /uploads/{user}/{filename}: the creation is refused with 400 naming the
    key, and nothing reaches the legacy server (not even when the body completes the file)."""
    mark = template.mark()
    values: dict[str, str | None] = {"user": unique("u"), "filename": "f.bin"}
    values[case.params["key"]] = case.params["value"]
    metadata = ",".join(key if value is None else f"{key} {b64(value)}" for key, value in values.items())
    response = tus_create(template, 5, b"hello", [("Upload-Metadata", metadata)])
    assert_nothing_reached(template, mark, response)
    assert response.status == 400, response
    assert case.params["key"] in response.text, response


@pytest.mark.parametrize("filename", ["a/../../etc", "x y?#z", "..x", "%2e%2e%2fetc", "\u00e9t\u00e9.txt"])
def test_metadata_values_are_percent_encoded_whole(template: Stack, filename: str) -> None:
    """Values that are no dot segment themselves are delivered percent-encoded as one
    segment (`/` included), so the legacy server sees no dot segment and no extra level."""
    mark = template.mark()
    user = unique("u")
    metadata = f"user {b64(user)},filename {b64(filename)}"
    response = tus_create(template, 5, b"hello", [("Upload-Metadata", metadata)])
    assert response.status == 201, response
    delivery = delivered_once(template, mark, f"/uploads/{user}/{quote(filename, safe='')}", None)
    assert_no_dot_segments([delivery])


@pytest.mark.parametrize("case", cases(hc.ID_OVERRIDE))
def test_metadata_id_cannot_override_the_shim_id(std: Stack, case: Case) -> None:
    """`{id}` in tus.forward.path is always the shim's own id: a metadata key `id` is either
    refused or ignored, never the delivery path."""
    mark = std.mark()
    value = case.params["value"]
    pair = f"id {b64(value)}" if value else "id"
    response = tus_create(std, 5, b"hello", [("Upload-Metadata", f"{pair},filename {b64('f.bin')}")])
    if response.status == 400:
        assert_nothing_reached(std, mark, response)
        return
    assert response.status == 201, response
    shim_id = tus_location(response).rsplit("/", 1)[-1]
    delivered_once(std, mark, f"/uploads/{shim_id}", b"hello", "PUT")


# === 2. "Accepted, then undeliverable" ========================================================


@pytest.mark.parametrize("case", cases(hc.BAD_FIELDS))
def test_creating_field_that_is_no_field_value_is_refused(std: Stack, case: Case) -> None:
    """A creating request whose field value holds CR, LF, NUL or another control character
    (RFC 9110 section 5.5) could never be delivered: 400 at creation, nothing forwarded, in
    every protocol (the body here completes the file at once)."""
    mark = std.mark()
    made = creation(case.params["protocol"], b"hello", owner=unique("o"),
                    extra=[("X-Note", case.params["value"])])
    response = send(std.port, made)
    assert_nothing_reached(std, mark, response)
    assert response.status == 400, response


@pytest.mark.parametrize("case", cases(hc.BAD_MEDIA_TYPES))
def test_filetype_must_be_a_media_type(template: Stack, case: Case) -> None:
    """`filetype`/`contentType` becomes a Content-Type (of the request, or of the multipart
    part): a value that is no media type, CR/LF included, is refused at creation."""
    mark = template.mark()
    key, value = case.params["key"], case.params["value"]
    metadata = f"user {b64(unique('u'))},filename {b64('f.bin')},{key} {b64(value)}"
    response = tus_create(template, 5, b"hello", [("Upload-Metadata", metadata)])
    assert_nothing_reached(template, mark, response)
    assert response.status == 400, response
    assert "media type" in response.text, response


@pytest.mark.parametrize("key", ["filetype", "contentType"])
def test_valid_filetype_is_the_delivered_content_type(std: Stack, key: str) -> None:
    """The control for the refusals above: a real media type with a parameter is accepted and
    delivered as the Content-Type."""
    mark = std.mark()
    media_type = 'text/plain; charset="utf-8"'
    response = tus_create(std, 5, b"hello", [("Upload-Metadata", f"{key} {b64(media_type)}")])
    shim_id = tus_location(response).rsplit("/", 1)[-1]
    delivery = delivered_once(std, mark, f"/uploads/{shim_id}", b"hello")
    assert delivery.header("Content-Type") == media_type


@pytest.mark.parametrize("case", cases(hc.OBS_TEXT))
def test_obs_text_field_is_delivered_byte_for_byte(std: Stack, case: Case) -> None:
    """A field value with obs-text (bytes 0x80-0xFF, RFC 9110 section 5.5) is valid: it reaches
    the legacy server exactly as the client sent it, once, with the whole file."""
    mark = std.mark()
    raw: bytes = case.params["value"]
    data = b"obs-text " + secrets.token_bytes(16)
    made = creation(case.params["protocol"], data, owner=unique("o"), extra=[("X-Name", raw)])
    response = send(std.port, made)
    assert 200 <= response.status < 300, response
    delivery = delivered_once(std, mark, made.delivered_path(response), data)
    value = delivery.header("X-Name")
    assert value is not None and value.encode("latin-1") == raw, delivery.headers


# === 3. "Partial files and protocol fields reach the legacy server" ===========================


@pytest.mark.parametrize("case", cases(hc.TWO_PROTOCOLS))
def test_request_two_protocols_match_never_reaches_legacy_partial(std: Stack, case: Case) -> None:
    """A request that two protocols both recognise (tus on the target URL and Content-Range;
    a WebDAV path and IETF `Upload-Complete: ?0`; ...) goes to one of them, which handles every
    upload field on it or refuses it: the 5 bytes of a longer file never reach the legacy
    server as if they were the file."""
    mark = std.mark()
    path = f"/{'dav' if case.params['dav'] else 'two'}/{unique('f')}"
    target = f"{path}?{case.params['query']}" if case.params.get("query") else path
    fields = [*case.params["fields"], bearer("o")]
    response = exchange(std.port, case.params["method"], target, fields, b"01234")
    assert_nothing_reached(std, mark, response)
    assert response.status < 500, response


@pytest.mark.parametrize("case", cases(hc.OUTSIDE_PATHS))
def test_partial_upload_outside_the_protocols_paths_is_refused(restricted: Stack, case: Case) -> None:
    """With every protocol limited to /only/, a request elsewhere that still announces a part
    of an upload gets 400 naming the field, and the legacy server gets nothing."""
    mark = restricted.mark()
    path = f"/other/{unique('f')}"
    target = f"{path}?{case.params['query']}" if case.params.get("query") else path
    body = b"01234"
    if case.params.get("body") == "message":
        body = b"Content-Range: bytes 0-4/10\r\n\r\n01234"
    elif case.params.get("body") == "multipart":
        body = b"--B\r\nContent-Range: bytes 0-4/10\r\n\r\n01234\r\n--B--\r\n"
    response = exchange(restricted.port, case.params["method"], target,
                        [*case.params["fields"], bearer("o")], body)
    assert_nothing_reached(restricted, mark, response)
    assert response.status == 400, response
    named = response.text.lower()
    assert any(name in named for name in case.params["names"]), response


def test_plain_request_outside_the_paths_passes_through(restricted: Stack) -> None:
    """The control: an ordinary PUT outside the paths reaches the legacy server untouched."""
    mark = restricted.mark()
    path = f"/other/{unique('plain')}"
    response = exchange(restricted.port, "PUT", path, [bearer("o")], b"whole file")
    assert response.status == 201, response
    delivered_once(restricted, mark, path, b"whole file", "PUT")


def test_content_range_inside_the_paths_is_resumable(restricted: Stack) -> None:
    """The control: under /only/ Content-Range chunks are taken, and the file goes out once."""
    mark = restricted.mark()
    path = f"/only/{unique('cr')}"
    owner = bearer("o")
    first = exchange(restricted.port, "PUT", path, [("Content-Range", "bytes 0-4/10"), owner], b"01234")
    assert first.status == 308, first
    last = exchange(restricted.port, "PUT", path, [("Content-Range", "bytes 5-9/10"), owner], b"56789")
    assert last.status == 201, last
    delivered_once(restricted, mark, path, b"0123456789", "PUT")


def test_pass_through_forwards_content_range_outside_the_paths(pass_through: Stack) -> None:
    """`guard.pass_through: true` is for a legacy server that understands Content-Range
    itself: a Content-Range PUT outside the paths reaches it as sent."""
    mark = pass_through.mark()
    path = f"/other/{unique('cr')}"
    response = exchange(pass_through.port, "PUT", path, [("Content-Range", "bytes 0-4/10")], b"01234")
    assert response.status == 201, response
    got = pass_through.since(mark)
    assert [(r.method, r.path) for r in got] == [("PUT", path)], show(got)
    assert got[0].header("Content-Range") == "bytes 0-4/10", show(got)


def _longer_body_request(case: Case) -> tuple[str, str, list[Field]]:
    """Method, target and fields announcing ``announced`` of ``total`` bytes in a protocol."""
    announced, total, protocol = case.params["announced"], case.params["total"], case.params["protocol"]
    span = f"0-{announced - 1}/{total}"
    name = unique("long")
    if protocol == "content-range-put":
        return "PUT", f"/cr/{name}", [("Content-Range", f"bytes {span}")]
    if protocol == "content-range-post":
        return "POST", f"/cr/{name}", [("Content-Range", f"bytes {span}")]
    if protocol == "webdav":
        return "PUT", f"/dav/{name}", [("Content-Range", f"bytes {span}")]
    if protocol == "query-range":
        return "PUT", f"/qr/{name}?range={span}", []
    return "PUT", f"/er/{name}", [("Expect", "Range"), ("Range", f"bytes {span}")]


@pytest.mark.parametrize("case", cases(hc.LONGER_BODIES))
def test_chunked_body_not_the_announced_length_is_refused(std: Stack, case: Case) -> None:
    """A chunked body whose length differs from its range (Content-Range, `?range=`, Range
    with `Expect: Range`) is refused with 400, and nothing is delivered: neither the range
    nor the longer body is the file. Nothing of it is kept either (an inquiry finds no
    bytes stored)."""
    mark = std.mark()
    method, target, fields = _longer_body_request(case)
    owner = bearer("o")
    body = secrets.token_bytes(case.params["sent"])
    response = exchange(std.port, method, target, [*fields, ("Transfer-Encoding", "chunked"), owner],
                        raw_body=chunked(body, 3))
    assert_nothing_reached(std, mark, response)
    assert response.status == 400, response
    if case.params["protocol"].startswith("content-range"):
        inquiry = exchange(std.port, method, target,
                           [("Content-Range", f"bytes */{case.params['total']}"), owner])
        assert (inquiry.status, inquiry.header("Range")) == (308, None), inquiry
        assert_nothing_reached(std, mark, inquiry)


def _malformed_range_request(stack: Stack, case: Case) -> tuple[str, str, list[Field], bytes]:
    """Method, target, fields and body carrying the malformed range in a protocol."""
    value, protocol = case.params["value"], case.params["protocol"]
    name = unique("range")
    if protocol == "content-range":
        return "PUT", f"/cr/{name}", [("Content-Range", value)], b"01234"
    if protocol == "webdav":
        return "PUT", f"/dav/{name}", [("Content-Range", value)], b"01234"
    if protocol == "expect-range":
        return "PUT", f"/er/{name}", [("Expect", "Range"), ("Range", value)], b"01234"
    if protocol == "byteranges":
        body = f"Content-Range: {value}\r\n\r\n".encode() + b"01234"
        return "PATCH", f"/br/{name}", [("Content-Type", "message/byteranges")], body
    opened = exchange(stack.port, "POST", f"/gs/{name}?uploadType=resumable",
                      [("X-Upload-Content-Length", "5")])
    assert opened.status == 200, opened
    session = urlsplit(opened.header("Location") or "")
    return "PUT", f"{session.path}?{session.query}", [("Content-Range", value)], b"01234"


@pytest.mark.parametrize("case", cases(hc.MALFORMED_RANGES))
def test_malformed_content_range_is_refused(std: Stack, case: Case) -> None:
    """Content-Range is `bytes SP first-last/complete` (RFC 9110 section 14.4) and nothing
    else: `bytes=0-4/5` and its relatives get 400 in every protocol that reads a range."""
    mark = std.mark()
    method, target, fields, body = _malformed_range_request(std, case)
    response = exchange(std.port, method, target, [*fields, bearer("o")], body)
    assert_nothing_reached(std, mark, response)
    assert response.status == 400, response


# === 4. "Refused requests change state" =======================================================


@pytest.mark.parametrize("case", cases(hc.REFUSED_TUS_PATCHES))
def test_refused_tus_patch_does_not_fix_a_deferred_length(std: Stack, case: Case) -> None:
    """A PATCH refused (409 wrong offset, 415, 412, 460) that carries `Upload-Length` on a
    deferred-length upload changes nothing: HEAD still shows `Upload-Defer-Length: 1` and the
    offset, and the upload can still be finished with another length, delivered once."""
    mark = std.mark()
    owner = bearer("o")
    upload = tus_location(tus_create(std, None, fields=[owner]))
    first = tus_patch(std, upload, 0, b"abc", [owner])
    assert (first.status, first.header("Upload-Offset")) == (204, "3"), first
    refused = tus_patch(std, upload, case.params["offset"], b"de",
                        [owner, ("Upload-Length", "10"), *case.params["fields"]])
    assert refused.status == case.params["status"], refused
    status = tus_head(std, upload, [owner])
    assert status.status == 200, status
    assert status.header("Upload-Defer-Length") == "1", status
    assert status.header("Upload-Length") is None, status
    assert status.header("Upload-Offset") == "3", status
    last = tus_patch(std, upload, 3, b"def", [owner, ("Upload-Length", "6")])
    assert last.status == 204, last
    delivered_once(std, mark, "/uploads/" + upload.rsplit("/", 1)[-1], b"abcdef", "PUT")


@pytest.mark.parametrize("case", cases(hc.REFUSED_IETF_PATCHES))
def test_refused_ietf_patch_does_not_truncate(std: Stack, case: Case) -> None:
    """An IETF append refused (409 offset mismatch, 415) leaves the upload as it was: HEAD
    shows the same offset, still incomplete, no length fixed by the refused request; the rest
    then completes the same file, delivered once."""
    mark = std.mark()
    owner = bearer("o")
    path = f"/ietf/{unique('trunc')}"
    resource = ietf_resource(ietf_create(std, path, b"01234", False, [owner]))
    refused = ietf_patch(std, resource, case.params["offset"], b"xyz", case.params["complete"],
                         [owner, *case.params["fields"]])
    assert refused.status == case.params["status"], refused
    status = ietf_head(std, resource, [owner])
    assert status.status == 204, status
    assert (status.header("Upload-Offset"), status.header("Upload-Complete")) == ("5", "?0"), status
    assert status.header("Upload-Length") is None, status
    last = ietf_patch(std, resource, 5, b"56789", True, [owner])
    assert last.status == 201, last
    delivered_once(std, mark, path, b"0123456789", "POST")


@pytest.mark.parametrize("case", cases(hc.REFUSED_DIGESTS))
def test_refused_patch_digest_is_not_kept(std: Stack, case: Case) -> None:
    """A refused append's `Repr-Digest` (refused for its offset, its media type, or for
    contradicting the digest given at creation) is not recorded: it cannot later fail the
    digest check and destroy 30 acknowledged bytes; the upload completes, delivered
    byte-exact."""
    mark = std.mark()
    owner = bearer("o")
    data = secrets.token_bytes(40)
    path = f"/ietf/{unique('digest')}"
    good = [("Repr-Digest", f"sha-256={sf_binary(hashlib.sha256(data).digest())}")] \
        if case.params["first_digest"] else []
    resource = ietf_resource(ietf_create(std, path, data[:30], False, [owner, *good]))
    bogus = ("Repr-Digest", f"sha-256={sf_binary(bytes(32))}")
    if case.params["refusal"] == "offset":
        refused = ietf_patch(std, resource, 12, data[12:20], False, [owner, bogus])
    else:
        refused = ietf_patch(std, resource, 30, data[30:], True,
                             [owner, bogus, ("Content-Type", "application/octet-stream")])
    assert 400 <= refused.status < 500, refused
    status = ietf_head(std, resource, [owner])
    assert status.header("Upload-Offset") == "30", status
    last = ietf_patch(std, resource, 30, data[30:], True, [owner])
    assert last.status == 201, last
    delivered_once(std, mark, path, data, "POST")


# === 5. "Exhaustion" ==========================================================================


def _is_accepted(response: RawResponse) -> bool:
    """Whether a creation was accepted (any 2xx, or 308 Resume Incomplete)."""
    return 200 <= response.status < 300 or response.status == 308


def _capped(stack: Stack, phase: str, owner: str | None) -> tuple[list[str], list[str]]:
    """Try every protocol's creation of the cap ``phase``: the ids accepted, and the answers
    that are not 429 with a Retry-After."""
    accepted: list[str] = []
    wrong: list[str] = []
    for case in hc.CAPPED_PROTOCOLS:
        if case.params["owner"] != phase:
            continue
        made = creation(case.params["protocol"], b"01234", complete=False, owner=owner)
        response = send(stack.port, made)
        if _is_accepted(response):
            accepted.append(case.id)
        if response.status != 429 or not (response.header("Retry-After") or "").isdigit():
            wrong.append(f"{case.id}: {response}")
    return accepted, wrong


def test_creation_caps_per_owner_and_in_all(limits: Stack) -> None:
    """Past 3 incomplete uploads for one owner, or 5 in all, every protocol's creation gets
    429 with Retry-After: creations accepted after the caps must be 0. A DELETE frees a slot."""
    mark = limits.mark()
    owner_a, owner_b = ("Authorization", f"Bearer {unique('cap-a')}"), \
        ("Authorization", f"Bearer {unique('cap-b')}")
    made = [tus_create(limits, 10, fields=[owner_a]) for _ in range(3)]
    assert [r.status for r in made] == [201, 201, 201], [str(r) for r in made]
    accepted, wrong = _capped(limits, "owner", owner_a[1].removeprefix("Bearer "))
    assert accepted == [], f"accepted past the per-owner cap: {accepted}"
    assert wrong == [], "\n".join(wrong)
    others = [tus_create(limits, 10, fields=[owner_b]) for _ in range(2)]
    assert [r.status for r in others] == [201, 201], [str(r) for r in others]
    accepted, wrong = _capped(limits, "total", None)
    assert accepted == [], f"accepted past the total cap: {accepted}"
    assert wrong == [], "\n".join(wrong)
    assert_nothing_reached(limits, mark)
    freed = exchange(limits.port, "DELETE", tus_location(made[0]), [TUS, owner_a])
    assert freed.status == 204, freed
    again = tus_create(limits, 10, fields=[owner_a])
    assert again.status == 201, again


@pytest.mark.parametrize("case", cases(hc.NO_SPACE))
def test_creation_refused_below_min_free_bytes(no_space: Stack, case: Case) -> None:
    """Below storage.min_free_bytes a creation stores nothing: 507, in every protocol."""
    mark = no_space.mark()
    made = creation(case.params["protocol"], b"01234", complete=False, owner=unique("o"))
    response = send(no_space.port, made)
    assert_nothing_reached(no_space, mark, response)
    assert response.status == 507, response


def test_tus_creation_without_body_refused_below_min_free_bytes(no_space: Stack) -> None:
    """The creation of an empty upload announces what it will store: 507 too."""
    response = tus_create(no_space, 10, fields=[bearer("o")])
    assert response.status == 507, response


def test_plain_request_passes_below_min_free_bytes(no_space: Stack) -> None:
    """The control: what the shim does not store is not its business."""
    mark = no_space.mark()
    path = f"/plain/{unique('f')}"
    response = exchange(no_space.port, "PUT", path, [], b"whole")
    assert response.status == 201, response
    delivered_once(no_space, mark, path, b"whole", "PUT")


def _flood_request(case: Case) -> tuple[str, str, list[Field], bytes]:
    pad: list[Field] = [(f"X-Pad-{i}", "p" * case.params["size"]) for i in range(case.params["count"])]
    target = case.params["target"]
    if target == "tus":
        return "POST", "/files/", [TUS, ("Upload-Length", "5"), ("Content-Type", TUS_CHUNK), *pad], b"hello"
    if target == "ietf":
        return "POST", f"/ietf/{unique('flood')}", [(INTEROP, "8"), ("Upload-Complete", "?1"), *pad], b"hello"
    return "GET", f"/plain/{unique('flood')}", pad, b""


@pytest.mark.parametrize("case", cases(hc.HEADER_FLOODS))
def test_head_past_header_bytes_is_431(std: Stack, case: Case) -> None:
    """A request head past limits.header_bytes (64 KiB by default) gets 431, claimed or not,
    and nothing is stored with an upload or forwarded."""
    mark = std.mark()
    files_before = len(std.stored_files())
    method, target, fields, body = _flood_request(case)
    response = exchange(std.port, method, target, fields, body, length=method != "GET")
    assert_nothing_reached(std, mark, response)
    assert response.status == 431, response
    assert len(std.stored_files()) == files_before


@pytest.mark.parametrize(("protocol", "size"), [("tus", 20_000), ("tus", 60_000), ("ietf", 40_000),
                                                ("content-range", 30_000)])
def test_head_under_header_bytes_is_accepted(std: Stack, protocol: str, size: int) -> None:
    """Every part of the shim takes heads up to the limit (mitmproxy's in-process sink once
    refused those past 16 KiB with 502): the upload is accepted and delivered once, the long
    field with it."""
    mark = std.mark()
    data = b"big head " + secrets.token_bytes(8)
    made = creation(protocol, data, owner=unique("o"), extra=[("X-Pad", "p" * size)])
    response = send(std.port, made)
    assert 200 <= response.status < 300, response
    delivery = delivered_once(std, mark, made.delivered_path(response), data)
    assert delivery.header("X-Pad") == "p" * size


def _early_refusal(stack: Stack, name: str, owner: Field) -> tuple[str, str, list[Field], int]:
    """Method, target and fields of a request refused from its head; the status expected."""
    if name == "tus-unknown-id-404":
        return "PATCH", missing_tus_upload(), [TUS, ("Upload-Offset", "0"), ("Content-Type", TUS_CHUNK)], 404
    if name == "tus-too-large-413":
        return "POST", "/files/", [TUS, ("Upload-Length", "2000"), ("Content-Type", TUS_CHUNK), owner], 413
    if name == "tus-completed-403":
        upload = tus_location(tus_create(stack, 3, b"abc", [owner]))
        return "PATCH", upload, [TUS, ("Upload-Offset", "3"), ("Content-Type", TUS_CHUNK), owner], 403
    upload = tus_location(tus_create(stack, 100, fields=[owner]))
    if name == "tus-wrong-offset-409":
        return "PATCH", upload, [TUS, ("Upload-Offset", "50"), ("Content-Type", TUS_CHUNK), owner], 409
    return "PATCH", upload, [("Tus-Resumable", "0.2.2"), ("Upload-Offset", "0"),
                             ("Content-Type", TUS_CHUNK), owner], 412


@pytest.mark.parametrize("case", cases(hc.EARLY_REFUSALS))
def test_refusal_from_the_head_comes_without_the_body(std: Stack, case: Case) -> None:
    """A refusal the head decides (404, 409, 412, 413, 403) is answered at once and the
    connection closed, without waiting for the 1 MiB body the head announces."""
    owner = bearer("o")
    method, target, fields, status = _early_refusal(std, case.params["refusal"], owner)
    mark = std.mark()
    response, closed = closes_after(std.port, method, target, fields, 1 << 20, EARLY)
    assert_nothing_reached(std, mark, response)
    assert response.status == status, response
    assert closed, f"the connection stayed open after {response}"


@pytest.mark.parametrize("sent", [b"", b"PUT /plain/x HTTP/1.1\r\nHost: a\r\n",
                                  b"PUT /plain/x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123"],
                         ids=["nothing", "half-a-head", "head-and-part-of-the-body"])
def test_silent_client_is_closed_after_client_timeout(limits: Stack, sent: bytes) -> None:
    """A client that stops sending (before its head, in it, or in its body) is closed after
    limits.client_timeout (2 s here), not held for mitmproxy's default of 10 minutes."""
    with socket.create_connection(("127.0.0.1", limits.port), timeout=10) as sock:
        sock.sendall(sent)
        started = time.monotonic()
        sock.settimeout(10)
        try:
            while sock.recv(65536):
                pass
        except TimeoutError:
            pytest.fail("the shim kept a silent client for 10 s; its log ends:\n"
                        + limits.shim.output()[-3000:])
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 10


# === 6. "Leaks and reflection" ================================================================


def _other_owner_requests(stack: Stack, protocol: str, method: str, upload: str,
                          stranger: Field) -> RawResponse:
    if protocol == "tus":
        if method == "PATCH":
            return tus_patch(stack, upload, 3, b"de", [stranger])
        if method == "HEAD":
            return tus_head(stack, upload, [stranger])
        return exchange(stack.port, "DELETE", upload, [TUS, stranger])
    if method == "PATCH":
        return ietf_patch(stack, upload, 5, b"56789", True, [stranger])
    if method == "HEAD":
        return ietf_head(stack, upload, [stranger])
    return exchange(stack.port, "DELETE", upload, [(INTEROP, "8"), stranger])


@pytest.mark.parametrize("case", cases(hc.OTHER_OWNER))
def test_other_owners_upload_answers_as_a_missing_one(std: Stack, case: Case) -> None:
    """Another owner's request on an upload gets exactly what a request on an upload that
    does not exist gets (404, same body): nothing tells that the id exists, and the upload
    is untouched."""
    mark = std.mark()
    owner, stranger = bearer("owner"), bearer("stranger")
    protocol, method = case.params["protocol"], case.params["method"]
    if protocol == "tus":
        upload = tus_location(tus_create(std, 10, b"abc", [owner]))
        missing = missing_tus_upload()
    else:
        upload = ietf_resource(ietf_create(std, f"/ietf/{unique('leak')}", b"01234", False, [owner]))
        missing = upload.rsplit("/", 1)[0] + "/" + secrets.token_urlsafe(16)
    theirs = _other_owner_requests(std, protocol, method, upload, stranger)
    nobodys = _other_owner_requests(std, protocol, method, missing, stranger)
    assert (theirs.status, theirs.body) == (nobodys.status, nobodys.body), f"{theirs} vs {nobodys}"
    assert theirs.status == 404, theirs
    assert theirs.header("Content-Type") == nobodys.header("Content-Type"), f"{theirs} vs {nobodys}"
    if protocol == "tus":
        still = tus_head(std, upload, [owner])
        assert (still.status, still.header("Upload-Offset")) == (200, "3"), still
    else:
        still = ietf_head(std, upload, [owner])
        assert (still.status, still.header("Upload-Offset")) == (204, "5"), still
    assert_nothing_reached(std, mark)


def _host_request(protocol: str) -> tuple[str, str, list[Field], bytes]:
    """A creation whose answer carries an absolute URL the shim writes (IETF: 104 and 201 of
    an incomplete upload; Google session: 200), or a tus one (a relative Location)."""
    name = unique("host")
    if protocol == "ietf":
        return "POST", f"/ietf/{name}", [(INTEROP, "8"), ("Upload-Complete", "?0")], b"hello"
    if protocol == "session":
        return "POST", f"/gs/{name}?uploadType=resumable", [("X-Upload-Content-Length", "5")], b""
    return "POST", "/files/", [TUS, ("Upload-Length", "5"), ("Content-Type", TUS_CHUNK)], b"hello"


@pytest.mark.parametrize("case", cases(hc.BAD_HOSTS))
def test_host_that_is_no_host_is_refused_not_echoed(std: Stack, case: Case) -> None:
    """Without public_url, a claimed request whose Host is not `host[:port]` is refused
    (400); its value is never written into a Location (IETF 104/201, Google session URI)."""
    mark = std.mark()
    method, target, fields, body = _host_request(case.params["protocol"])
    response = exchange(std.port, method, target, [*fields, bearer("o")], body, host=case.params["host"])
    assert_nothing_reached(std, mark, response)
    assert not [loc for loc in response.locations() if "evil" in loc], response
    assert response.status == 400, response


@pytest.mark.parametrize("host", [None, "a@evil", "evil:1/p?x="], ids=["own-host", "userinfo", "path-query"])
@pytest.mark.parametrize("protocol", ["ietf", "session"])
def test_public_url_sets_every_absolute_url(public: Stack, protocol: str, host: str | None) -> None:
    """With public_url, every absolute URL the shim writes starts with it, whatever Host the
    client sent (a hostile Host may also be refused with 400)."""
    mark = public.mark()
    method, target, fields, body = _host_request(protocol)
    response = exchange(public.port, method, target, fields, body, host=host)
    if host is not None and response.status == 400:
        assert_nothing_reached(public, mark, response)
        return
    locations = response.locations()
    assert locations, response
    assert all(loc.startswith(PUBLIC_URL + "/") for loc in locations), response
    if protocol == "ietf":
        assert response.interim and response.interim[0].status == 104, response


# === 7. "tus conformance" =====================================================================


@pytest.mark.parametrize("case", cases(hc.METHOD_OVERRIDES))
def test_method_override_is_honoured_on_every_method(std: Stack, case: Case) -> None:
    """X-HTTP-Method-Override MUST be interpreted as the method (tus core, "Headers"), on any
    method: a GET overridden to OPTIONS is tus OPTIONS, and never reaches the legacy server."""
    owner = bearer("o")
    override = case.params["override"]
    if case.params["on"] == "endpoint":
        path = "/files/"
        fields: list[Field] = [("X-HTTP-Method-Override", override)]
    else:
        path = tus_location(tus_create(std, 10, b"abc", [owner]))
        fields = [("X-HTTP-Method-Override", override), owner]
    if case.params["tus"]:
        fields.append(TUS)
    mark = std.mark()
    response = exchange(std.port, case.params["method"], path, fields, b"")
    assert_nothing_reached(std, mark, response)
    if override == "OPTIONS":
        assert response.status in (200, 204), response
        assert response.header("Tus-Version") == "1.0.0", response
    elif override == "HEAD":
        assert (response.status, response.header("Upload-Offset")) == (200, "3"), response
        assert response.header("Upload-Length") == "10", response
    else:
        assert response.status == 204, response
        gone = tus_head(std, path, [owner])
        assert gone.status in (404, 410), gone


def _partials(stack: Stack, owner: Field, sizes: Sequence[int], sent: int | None = None) -> list[str]:
    """tus partial uploads of ``sizes`` bytes, each sent whole (or only ``sent`` bytes)."""
    paths = []
    for size in sizes:
        data = secrets.token_bytes(size if sent is None else sent)
        response = tus_create(stack, size, data, [("Upload-Concat", "partial"), owner])
        paths.append(tus_location(response))
    return paths


@pytest.mark.parametrize("case", cases(hc.BAD_FINALS))
def test_bad_final_concatenation_is_refused(std: Stack, case: Case) -> None:
    """A final concatenation has no body of its own (403 with one) and no Upload-Length
    (400); longer than tus.max_size (1000 here) it is 413 at creation, its parts finished or
    not. Nothing reaches the legacy server."""
    owner = bearer("o")
    extra = case.params["extra"]
    if extra == "big":
        parts = _partials(std, owner, [600, 600])
    elif extra == "big-unfinished":
        parts = _partials(std, owner, [600, 600], sent=5)
    else:
        parts = _partials(std, owner, [5, 5])
    mark = std.mark()
    fields: list[Field] = [TUS, ("Upload-Concat", "final;" + " ".join(parts)), owner]
    body = b""
    if extra in ("body", "both"):
        fields.append(("Content-Type", TUS_CHUNK))
        body = b"xyz"
    if extra in ("length", "both"):
        fields.append(("Upload-Length", "10"))
    response = exchange(std.port, "POST", "/files/", fields, body)
    expected = case.params["status"]
    assert_nothing_reached(std, mark, response)
    assert response.status in (expected if isinstance(expected, tuple) else (expected,)), response


def test_final_concatenation_is_delivered_once(std: Stack) -> None:
    """The control: a proper final concatenation is the parts' bytes, delivered once."""
    owner = bearer("o")
    parts = []
    for piece in (b"hello ", b"world"):
        parts.append(tus_location(tus_create(std, len(piece), piece, [("Upload-Concat", "partial"), owner])))
    mark = std.mark()
    response = exchange(std.port, "POST", "/files/",
                        [TUS, ("Upload-Concat", "final;" + " ".join(parts)), owner])
    shim_id = tus_location(response).rsplit("/", 1)[-1]
    wait_until(lambda: len(std.since(mark)) >= 1, 10.0, "the delivery of the final upload")
    delivered_once(std, mark, f"/uploads/{shim_id}", b"hello world", "PUT")


# === the tables themselves ====================================================================


def test_hostile_cases_are_counted_by_kind() -> None:
    """The closing note reports the cases tried by kind: every table is counted, ids are
    unique, and every kind of the issue has cases."""
    ids = [case.id for found in hc.CASES.values() for case in found]
    assert len(ids) == len(set(ids))
    counted = hc.counts()
    assert set(counted) == {"path", "field", "partial", "state", "exhaustion", "leak", "tus"}
    assert all(number > 0 for number in counted.values())
    assert sum(counted.values()) == len(ids) >= 150

