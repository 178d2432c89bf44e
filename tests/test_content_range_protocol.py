"""Pure tests of the Content-Range/Range parsers and the content_range protocol module."""

from __future__ import annotations

import pytest

from shim import commands as c
from shim.config import ContentRangeConfig
from shim.engine import Delivery
from shim.errors import ShimError
from shim.model import Answer, Request, Upload
from shim.protocols.content_range import ContentRangeProtocol
from shim.wire import ContentRange, format_range, parse_content_range


@pytest.mark.parametrize("value, expected", [
    ("bytes 0-524287/25000000", ContentRange(0, 524287, 25000000)),
    ("bytes 524288-1048575/*", ContentRange(524288, 1048575, None)),
    ("bytes */2000000", ContentRange(None, None, 2000000)),
    ("bytes */*", ContentRange(None, None, None)),
    ("bytes 0-0/1", ContentRange(0, 0, 1)),
    ("  bytes 3-4/5 ", ContentRange(3, 4, 5)),
])
def test_content_range_forms(value: str, expected: ContentRange) -> None:
    assert parse_content_range(value) == expected


@pytest.mark.parametrize("value, status", [
    ("", 400), ("bytes", 400), ("bytes 0-1", 400), ("items 0-1/2", 400), ("bytes 0-/10", 400),
    ("bytes -1-5/10", 400), ("bytes 0-5/abc", 400), ("bytes 0-5/-1", 400), ("bytes 1-2-3/9", 400),
    ("bytes 0x1-2/9", 400), ("bytes 0-1/2, 3-4/5", 400), ("bytes 5-1/10", 400),
    ("bytes 99999999999999999999-1/2", 400), ("bytes 0-10/10", 416), ("bytes 10-10/10", 416),
])
def test_malformed_content_ranges_are_refused(value: str, status: int) -> None:
    with pytest.raises(ShimError) as caught:
        parse_content_range(value)
    assert caught.value.status == status
    assert repr(value.strip()) in caught.value.message  # the value, for the person who sent it
    assert caught.value.code == ("range" if status == 416 else "bad-request")


@pytest.mark.parametrize("value", ["bytes=0-4/5", "bytes  0-4/5", "Bytes 0-4/5", "bytes\t0-4/5",
                                   "bytes=*/5", "bytes 0-4/5/6"])
def test_only_rfc_9110_content_range_syntax_is_taken(value: str) -> None:
    """RFC 9110 section 14.4: `bytes SP first-last/complete`, nothing looser."""
    with pytest.raises(ShimError) as caught:
        parse_content_range(value)
    assert caught.value.status == 400 and "malformed Content-Range" in caught.value.message


@pytest.mark.parametrize("stored, expected", [(0, None), (1, "bytes=0-0"), (524288, "bytes=0-524287")])
def test_resume_range(stored: int, expected: str | None) -> None:
    assert format_range(stored) == expected


def proto(**config: object) -> ContentRangeProtocol:
    return ContentRangeProtocol(ContentRangeConfig(**config))  # type: ignore[arg-type]


def req(method: str, path: str, query: str = "", *fields: tuple[str, str],
        body: int | None = 0) -> Request:
    return Request(method, path, query, tuple(fields), body)


def test_a_chunk_is_keyed_by_owner_method_and_url_and_forwards_its_headers() -> None:
    request = req("PUT", "/api/upload", "file=abc.zip", ("Content-Range", "bytes 0-9/20"),
                  ("Content-Type", "application/zip"), ("Authorization", "Bearer a"),
                  ("X-Upload-Content-Length", "20"), body=10)
    command = proto().parse(request, "alice")
    assert isinstance(command, c.WriteRange) and command.new is not None
    assert (command.start, command.total) == (0, 20)
    assert command.key == "content-range:alice:PUT /api/upload?file=abc.zip"
    target = command.new.target
    assert target is not None
    assert (target.method, target.path, target.content_type) == ("PUT", "/api/upload?file=abc.zip",
                                                                 "application/zip")
    names = {name.lower() for name, _ in target.headers}
    assert "authorization" in names and "content-range" not in names
    assert "x-upload-content-length" not in names


@pytest.mark.parametrize("fields, body, status", [
    ((("Content-Range", "bytes 0-9/20"),), 5, 400),
    ((("Content-Range", "bytes */20"),), 5, 400),
    ((("Content-Range", "bytes 0-9/5"),), 10, 416),
])
def test_a_chunk_that_contradicts_itself_is_refused(fields: tuple[tuple[str, str], ...], body: int,
                                                     status: int) -> None:
    command = proto().parse(req("PUT", "/x", "", *fields, body=body), "")
    assert isinstance(command, c.Refuse) and command.error.status == status


@pytest.mark.parametrize("method, path, fields", [
    ("PUT", "/plain", ()), ("GET", "/x", (("Content-Range", "bytes 0-1/2"),)),
    ("PUT", "/other/x", (("Content-Range", "bytes 0-1/2"),)),
])
def test_other_requests_pass_through(method: str, path: str,
                                     fields: tuple[tuple[str, str], ...]) -> None:
    assert proto(paths=("/api/",)).parse(req(method, path, "", *fields, body=2), "") is None


def test_sessions_open_on_upload_type_or_goog_header_and_are_capabilities() -> None:
    json_api = proto().parse(req("POST", "/upload/b/o", "uploadType=resumable&name=x",
                                 ("X-Upload-Content-Type", "image/png"),
                                 ("X-Upload-Content-Length", "7"), ("Authorization", "t")), "alice")
    assert isinstance(json_api, c.Open)
    assert json_api.new.owner == "" and json_api.new.length == 7
    assert json_api.new.target is not None
    assert json_api.new.target.path == "/upload/b/o?name=x"
    assert json_api.new.target.content_type == "image/png"
    xml_api = proto().parse(req("POST", "/bucket/o", "", ("x-goog-resumable", "start")), "")
    assert isinstance(xml_api, c.Open)
    chunk = proto().parse(req("PUT", "/upload/b/o", "uploadType=resumable&upload_id=abc",
                              ("Content-Range", "bytes 0-3/*"), body=4), "alice")
    assert isinstance(chunk, c.WriteRange)
    assert (chunk.upload_id, chunk.owner, chunk.start, chunk.total) == ("abc", "", 0, None)
    cancel = proto().parse(req("DELETE", "/upload/b/o", "uploadType=resumable&upload_id=abc"), "")
    assert cancel == c.Cancel("abc", "")


UPLOAD = Upload(id="u1", protocol="content-range", owner="", length=20, offset=10)


def render(command: c.Command, outcome: c.Outcome, query: str = "") -> tuple[int, dict[str, str]]:
    reply = proto().render(req("PUT", "/x", query), command, outcome)
    return reply.status, dict(reply.headers)


def test_an_incomplete_upload_is_308_resume_incomplete_with_the_stored_range() -> None:
    status, headers = render(c.WriteRange(""), c.Outcome(UPLOAD, 10))
    assert (status, headers["Range"]) == (308, "bytes=0-9")
    status, headers = render(c.WriteRange(""), c.Outcome())
    assert status == 308 and "Range" not in headers


def test_the_final_chunk_gets_the_legacy_answer_as_200_in_a_session() -> None:
    answer = Answer(201, "Created", (("Location", "/o/x"), ("Content-Length", "2")), b"ok")
    done = c.Outcome(UPLOAD, 20, Delivery(answer))
    assert render(c.WriteRange("", key="k"), done)[0] == 201
    status, headers = render(c.WriteRange("", upload_id="u1"), done)
    assert (status, headers["Location"]) == (200, "/o/x")
    refused = c.Outcome(UPLOAD, 20, Delivery(Answer(500, "Oops", (), b"")))
    assert render(c.WriteRange("", upload_id="u1"), refused)[0] == 500
    assert render(c.WriteRange("", key="k"), c.Outcome(UPLOAD, 20, Delivery(None, "down")))[0] == 502


def test_a_gap_is_416_with_the_range_to_resume_from() -> None:
    error = ShimError("gap", "gap", 416)
    status, headers = render(c.WriteRange("", key="k"), c.Outcome(UPLOAD, error=error))
    assert (status, headers["Range"]) == (416, "bytes=0-9")


def test_session_open_and_cancel_replies() -> None:
    status, headers = render(c.Open(None), c.Outcome(UPLOAD), "uploadType=resumable")  # type: ignore[arg-type]
    assert status == 200 and headers["Location"] == "/x?uploadType=resumable&upload_id=u1"
    assert render(c.Cancel("u1", ""), c.Outcome())[0] == 499
