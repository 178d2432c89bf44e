"""Pure tests of the tus module: requests in, commands and replies out, no I/O."""

from __future__ import annotations

import base64
import hashlib

import pytest

from shim import commands as c
from shim.config import ForwardConfig, TusConfig
from shim.engine import Delivery
from shim.errors import ShimError
from shim.model import Answer, Request, Upload
from shim.protocols import tus

TUS = (("Tus-Resumable", "1.0.0"),)
CHUNK = (("Content-Type", "application/offset+octet-stream"),)


def proto(**forward: str) -> tus.Tus:
    return tus.Tus(TusConfig(max_size=1000, forward=ForwardConfig(**forward)))  # type: ignore[arg-type]


def req(method: str, path: str, *fields: tuple[str, str], body: int | None = 0) -> Request:
    return Request(method, path, "", tuple(fields), body)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def refused(command: c.Command | None) -> ShimError:
    assert isinstance(command, c.Refuse), command
    return command.error


@pytest.mark.parametrize("path", ["/", "/other", "/filesX", "/files/a/b", "/file"])
def test_paths_outside_the_endpoint_are_not_claimed(path: str) -> None:
    assert proto().parse(req("POST", path, *TUS), "") is None


@pytest.mark.parametrize("method, path", [
    ("GET", "/files/report.pdf"), ("PUT", "/files"), ("HEAD", "/files/x"), ("DELETE", "/files/x"),
    ("OPTIONS", "/files/x"), ("POST", "/files/"),
])
def test_requests_without_tus_fields_belong_to_the_legacy_server(method: str, path: str) -> None:
    assert proto().parse(req(method, path, ("Content-Type", "text/plain")), "") is None


def test_options_advertises_version_extensions_and_limits() -> None:
    command = proto().parse(req("OPTIONS", "/files/"), "")
    assert isinstance(command, c.Immediate)
    headers = dict(command.reply.headers)
    assert command.reply.status == 204
    assert headers["Tus-Version"] == "1.0.0"
    assert "concatenation-unfinished" in headers["Tus-Extension"].split(",")
    assert headers["Tus-Max-Size"] == "1000"
    assert "sha1" in headers["Tus-Checksum-Algorithm"].split(",")


@pytest.mark.parametrize("version", [None, "0.2.2", "1.0", ""])
def test_wrong_or_missing_version_is_412_with_tus_version(version: str | None) -> None:
    fields = [("Tus-Resumable", version)] if version is not None else []
    error = refused(proto().parse(req("HEAD", "/files/abc", ("Upload-Offset", "0"), *fields), ""))
    assert error.status == 412
    reply = proto().render(req("HEAD", "/files/abc"), c.Refuse(error), c.Outcome(error=error))
    assert ("Tus-Version", "1.0.0") in reply.headers


def test_create_with_length_and_metadata_builds_the_delivery_target() -> None:
    request = req("POST", "/files/", *TUS, ("Upload-Length", "10"), ("Authorization", "Bearer x"),
                  ("Upload-Metadata", f"filename {b64('a b/ü.txt')},filetype {b64('text/plain')},empty"))
    command = proto(path="/in/{filename}").parse(request, "owner")
    assert isinstance(command, c.Open)
    new = command.new
    assert (new.length, new.owner, new.metadata["empty"]) == (10, "owner", "")
    assert new.target is not None
    assert new.target.path == "/in/a%20b%2F%C3%BC.txt"
    assert new.target.content_type == "text/plain"
    assert new.target.filename == "a b/ü.txt"
    assert ("Authorization", "Bearer x") in new.target.headers
    assert not any(k.lower().startswith(("tus-", "upload-")) for k, _ in new.target.headers)
    assert not command.with_body


def test_default_target_path_uses_the_upload_id() -> None:
    command = proto().parse(req("POST", "/files/", *TUS, ("Upload-Length", "1")), "")
    assert isinstance(command, c.Open) and command.new.target is not None
    assert command.new.target.path == f"/uploads/{command.new.id}"
    assert len(base64.urlsafe_b64decode(command.new.id)) * 8 >= 128


def test_a_template_key_missing_from_metadata_is_refused_at_creation() -> None:
    error = refused(proto(path="/in/{filename}").parse(
        req("POST", "/files/", *TUS, ("Upload-Length", "1")), ""))
    assert error.status == 400 and "filename" in error.message


@pytest.mark.parametrize("fields, status", [
    ((), 400),
    ((("Upload-Length", "-1"),), 400),
    ((("Upload-Length", "1e3"),), 400),
    ((("Upload-Length", "ten"),), 400),
    ((("Upload-Length", "5"), ("Upload-Defer-Length", "1")), 400),
    ((("Upload-Defer-Length", "2"),), 400),
    ((("Upload-Length", "5"), ("Upload-Metadata", "key !!notbase64")), 400),
    ((("Upload-Length", "5"), ("Upload-Metadata", "k YQ==,k YQ==")), 400),
    ((("Upload-Length", "5"), ("Upload-Metadata", "k YQ== extra")), 400),
    ((("Upload-Length", "5"), ("Upload-Metadata", f"k {base64.b64encode(b'\xff').decode()}")), 400),
    ((("Upload-Length", "5"), ("Upload-Concat", "whole")), 400),
    ((("Upload-Concat", "final;"),), 400),
    ((("Upload-Concat", "final;/elsewhere/a"),), 400),
])
def test_malformed_creation_is_refused(fields: tuple[tuple[str, str], ...], status: int) -> None:
    assert refused(proto().parse(req("POST", "/files/", *TUS, *fields), "")).status == status


def test_creation_with_upload_needs_the_chunk_content_type() -> None:
    request = req("POST", "/files/", *TUS, ("Upload-Length", "5"), ("Content-Type", "text/plain"),
                  body=5)
    assert refused(proto().parse(request, "")).status == 415
    ok = proto().parse(req("POST", "/files/", *TUS, *CHUNK, ("Upload-Length", "5"), body=5), "")
    assert isinstance(ok, c.Open) and ok.with_body


def test_deferred_length_and_partial_and_final_concatenation() -> None:
    deferred = proto().parse(req("POST", "/files/", *TUS, ("Upload-Defer-Length", "1")), "")
    assert isinstance(deferred, c.Open) and deferred.new.length is None
    partial = proto().parse(req("POST", "/files/", *TUS, ("Upload-Length", "3"),
                                ("Upload-Concat", "partial")), "")
    assert isinstance(partial, c.Open) and partial.new.target is None
    final = proto().parse(req("POST", "/files/", *TUS, (
        "Upload-Concat", "final;/files/a http://shim.example/files/b")), "")
    assert isinstance(final, c.Concatenate)
    assert final.new.parts == ("a", "b") and final.new.target is not None


@pytest.mark.parametrize("fields, status", [
    ((("Upload-Offset", "0"),), 415),
    ((*CHUNK,), 400),
    ((*CHUNK, ("Upload-Offset", "-3")), 400),
    ((*CHUNK, ("Upload-Offset", "0x10")), 400),
    ((*CHUNK, ("Upload-Offset", "0"), ("Upload-Checksum", "crc32 AAAA")), 400),
    ((*CHUNK, ("Upload-Offset", "0"), ("Upload-Checksum", "sha1 ***")), 400),
    ((*CHUNK, ("Upload-Offset", "0"), ("Upload-Checksum", "sha1 YQ==")), 400),
])
def test_malformed_patch_is_refused(fields: tuple[tuple[str, str], ...], status: int) -> None:
    assert refused(proto().parse(req("PATCH", "/files/abc", *TUS, *fields), "")).status == status


def test_patch_with_checksum_and_deferred_length() -> None:
    digest = base64.b64encode(hashlib.sha1(b"hello").digest()).decode()
    command = proto().parse(req("PATCH", "/files/abc", *TUS, *CHUNK, ("Upload-Offset", "7"),
                                ("Upload-Checksum", f"sha1 {digest}"), ("Upload-Length", "12"),
                                body=5), "")
    assert isinstance(command, c.Append)
    assert (command.upload_id, command.offset, command.declared_length) == ("abc", 7, 12)
    assert command.checksum is not None and command.checksum.digest == hashlib.sha1(b"hello").digest()


def test_method_override_turns_a_post_into_a_patch() -> None:
    command = proto().parse(req("POST", "/files/abc", *TUS, *CHUNK, ("Upload-Offset", "0"),
                                ("X-HTTP-Method-Override", "PATCH")), "")
    assert isinstance(command, c.Append)


@pytest.mark.parametrize("method, path", [("GET", "/files/abc"), ("PUT", "/files/"),
                                          ("PATCH", "/files/")])
def test_other_methods_are_405(method: str, path: str) -> None:
    assert refused(proto().parse(req(method, path, *TUS), "")).status == 405


UPLOAD = Upload(id="abc", protocol="tus", owner="", length=10, offset=4,
                metadata={"filename": "x"}, created=100.0, updated=100.0, expires_after=100)


def test_head_reply_carries_offset_length_metadata_and_no_store() -> None:
    reply = proto().render(req("HEAD", "/files/abc"), c.Inspect("abc", ""), c.Outcome(UPLOAD, 6))
    headers = dict(reply.headers)
    assert reply.status == 200
    assert (headers["Upload-Offset"], headers["Upload-Length"]) == ("6", "10")
    assert headers["Cache-Control"] == "no-store"
    assert tus.parse_metadata(headers["Upload-Metadata"]) == {"filename": "x"}


def test_patch_reply_has_the_new_offset_and_expiry() -> None:
    reply = proto().render(req("PATCH", "/files/abc"), c.Append("abc", "", 0), c.Outcome(UPLOAD, 4))
    headers = dict(reply.headers)
    assert reply.status == 204 and headers["Upload-Offset"] == "4"
    assert headers["Upload-Expires"].endswith("GMT")


def test_checksum_mismatch_renders_as_460() -> None:
    error = ShimError("checksum-mismatch", "no", 460)
    reply = proto().render(req("PATCH", "/files/abc"), c.Append("abc", "", 0), c.Outcome(error=error))
    assert reply.status == 460


ACCEPTED = Answer(201, "Created", (("Location", "/in/x"),), b"ok")


@pytest.mark.parametrize("delivery, status", [
    (Delivery(ACCEPTED), 204),
    (Delivery(Answer(403, "Forbidden", (), b"no")), 403),
    (Delivery(Answer(500, "Oops", (), b"")), 502),
    (Delivery(None, "connection refused"), 502),
])
def test_final_patch_reports_the_legacy_servers_answer(delivery: Delivery, status: int) -> None:
    reply = proto().render(req("PATCH", "/files/abc"), c.Append("abc", "", 4),
                           c.Outcome(UPLOAD, 10, delivery))
    headers = dict(reply.headers)
    assert reply.status == status
    if delivery.answer is not None:
        assert headers["Shim-Upstream-Status"] == str(delivery.answer.status)
    if delivery.accepted:
        assert headers["Shim-Upstream-Location"] == "/in/x"
