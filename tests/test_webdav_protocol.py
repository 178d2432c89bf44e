"""Pure tests of the WebDAV module: which requests it claims, and the 207 it renders."""

from __future__ import annotations

import pytest

from shim import commands as c
from shim.config import WebdavConfig
from shim.model import Request, Upload
from shim.protocols.webdav import Webdav

PROGRESS = b'<?xml version="1.0" encoding="utf-8"?><i:upload-progress xmlns:i="ithit" />'


def proto() -> Webdav:
    return Webdav(WebdavConfig(paths=("/dav/",)))


def req(method: str, path: str, *fields: tuple[str, str], body_length: int | None = 0,
        body: bytes | None = None) -> Request:
    return Request(method, path, "", tuple(fields), body_length, body)


def test_only_the_configured_prefixes_are_webdav() -> None:
    assert proto().parse(req("PUT", "/other/a.zip", body_length=3), "") is None
    assert Webdav(WebdavConfig()).parse(req("PUT", "/dav/a.zip", body_length=3), "") is None


def test_a_plain_put_is_a_whole_file_that_replaces_one_in_progress() -> None:
    command = proto().parse(req("PUT", "/dav/a.zip", ("Content-Type", "application/zip"),
                                body_length=10), "alice")
    assert isinstance(command, c.WriteRange)
    assert (command.start, command.total, command.restart) == (0, 10, True)
    assert command.key == "webdav:alice:/dav/a.zip"
    assert command.new is not None and command.new.target is not None
    assert command.new.target.content_type == "application/zip"


def test_a_put_with_content_range_resumes() -> None:
    command = proto().parse(req("PUT", "/dav/a.zip", ("Content-Range", "bytes 4-9/10"),
                                body_length=6), "")
    assert isinstance(command, c.WriteRange)
    assert (command.start, command.total, command.restart) == (4, 10, False)
    wrong = proto().parse(req("PUT", "/dav/a.zip", ("Content-Range", "bytes 4-9/10"),
                              body_length=5), "")
    assert isinstance(wrong, c.Refuse) and wrong.error.status == 400


def test_a_chunked_put_without_a_range_passes_through() -> None:
    assert proto().parse(req("PUT", "/dav/a.zip", body_length=None), "") is None


def test_report_is_decided_on_its_body() -> None:
    first = proto().parse(req("REPORT", "/dav/f/", body_length=len(PROGRESS)), "o")
    assert first == c.NeedBody(64 * 1024)
    second = proto().parse(req("REPORT", "/dav/f", body_length=len(PROGRESS), body=PROGRESS), "o")
    assert second == c.Report("o", "webdav:o:/dav/f/", "webdav:o:/dav/f")
    other = b'<D:version-tree xmlns:D="DAV:"/>'
    assert proto().parse(req("REPORT", "/dav/f", body_length=len(other), body=other), "o") is None


@pytest.mark.parametrize("body", [
    b"<not closed",
    b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
    b'<i:upload-progress xmlns:i="ithit">&b;</i:upload-progress>',
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    b'<i:upload-progress xmlns:i="ithit">&x;</i:upload-progress>',
])
def test_malformed_or_entity_bearing_xml_is_400(body: bytes) -> None:
    command = proto().parse(req("REPORT", "/dav/f", body_length=len(body), body=body), "")
    assert isinstance(command, c.Refuse) and command.error.status == 400


def test_a_huge_or_chunked_report_is_refused_unread() -> None:
    for length in (64 * 1024 + 1, None):
        command = proto().parse(req("REPORT", "/dav/f", body_length=length), "")
        assert isinstance(command, c.Refuse) and command.error.status == 413


def test_options_and_cancelupload() -> None:
    assert proto().parse(req("OPTIONS", "/dav/"), "") == c.Forward("DAV", "resumable-upload")
    assert proto().parse(req("CANCELUPLOAD", "/dav/a.zip"), "o") == c.Cancel(
        None, "o", key="webdav:o:/dav/a.zip")
    assert proto().parse(req("GET", "/dav/a.zip"), "o") is None
    assert proto().parse(req("PROPFIND", "/dav/a.zip"), "o") is None


def test_the_multistatus_lists_each_upload_in_progress() -> None:
    uploads = tuple(
        (f"webdav:o:{path}", Upload(id=path, protocol="webdav", owner="o", length=100,
                                    offset=offset, updated=1_700_000_000.0))
        for path, offset in (("/dav/f/b%20c.zip", 20), ("/dav/f/sub/a&b.zip", 47)))
    reply = proto().render(req("REPORT", "/dav/f/"), c.Report("o", "webdav:o:/dav/f/", ""),
                           c.Outcome(listing=uploads))
    body = reply.body.decode()
    assert reply.status == 207
    assert body.count("<D:response>") == 2
    assert "<D:href>/dav/f/b%20c.zip</D:href>" in body and "a&amp;b.zip" in body
    assert "<ithit:bytes-uploaded>47</ithit:bytes-uploaded>" in body
    assert "<ithit:total-content-length>100</ithit:total-content-length>" in body
    assert "Tue, 14 Nov 2023 22:13:20 GMT" in body
