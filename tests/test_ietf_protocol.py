"""Pure tests of the IETF draft module, per interop version (table-driven, no I/O)."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from shim import commands as c
from shim.config import IetfConfig
from shim.engine import Delivery
from shim.errors import ShimError
from shim.model import Answer, Request, Upload
from shim.protocols.ietf import VERSIONS, Ietf

PREFIX = "/.well-known/resumable-uploads/"
ALL = sorted(VERSIONS)


def proto(**config: object) -> Ietf:
    return Ietf(IetfConfig(**config))  # type: ignore[arg-type]


def req(method: str, path: str, *fields: tuple[str, str], body: int | None = 0) -> Request:
    return Request(method, path, "", tuple(fields), body)


def complete(version: int, flag: bool) -> tuple[str, str]:
    """The completeness field as each version spells it."""
    if version == 3:
        return ("Upload-Incomplete", "?0" if flag else "?1")
    return ("Upload-Complete", "?1" if flag else "?0")


def version(v: int) -> tuple[str, str]:
    return ("Upload-Draft-Interop-Version", str(v))


@pytest.mark.parametrize("v", ALL)
def test_an_upgraded_creation_announces_the_resource_in_a_104(v: int) -> None:
    command = proto().parse(req("POST", "/api/files", version(v), complete(v, False),
                                ("Content-Type", "image/png"), ("Authorization", "t"), body=10),
                            "alice")
    assert isinstance(command, c.Open) and command.interim is not None
    interim = dict(command.interim.headers)
    assert command.interim.status == 104
    assert interim["Location"] == PREFIX + command.new.id
    assert interim["Upload-Draft-Interop-Version"] == str(v)
    assert ("Upload-Limit" in interim) == (v >= 6)
    assert command.with_body and command.new.length is None
    target = command.new.target
    assert target is not None and (target.method, target.path) == ("POST", "/api/files")
    assert target.content_type == "image/png"
    assert ("Authorization", "t") in target.headers
    assert not any(k.lower().startswith("upload-") for k, _ in target.headers)


@pytest.mark.parametrize("v", ALL)
def test_a_complete_creation_knows_its_length_from_content_length(v: int) -> None:
    command = proto().parse(req("PUT", "/doc", version(v), complete(v, True), body=7), "")
    assert isinstance(command, c.Open) and command.new.length == 7
    chunked = proto().parse(req("PUT", "/doc", version(v), complete(v, True), body=None), "")
    assert isinstance(chunked, c.Open) and chunked.complete_at_end


def test_unknown_versions_get_no_104_and_cannot_upload_in_parts() -> None:
    whole = proto().parse(req("POST", "/x", version(99), ("Upload-Complete", "?1"), body=3), "")
    assert isinstance(whole, c.Open) and whole.interim is None
    parts = proto().parse(req("POST", "/x", version(99), ("Upload-Complete", "?0"), body=3), "")
    assert isinstance(parts, c.Refuse) and parts.error.status == 400
    narrowed = proto(versions=(8,)).parse(req("POST", "/x", version(6), ("Upload-Complete", "?0")), "")
    assert isinstance(narrowed, c.Refuse)


@pytest.mark.parametrize("fields", [
    (("Content-Type", "text/plain"),), (("Upload-Draft-Interop-Version", "8"),),
])
def test_requests_without_completeness_pass_through(fields: tuple[tuple[str, str], ...]) -> None:
    assert proto().parse(req("POST", "/api/files", *fields, body=3), "") is None
    assert proto(paths=("/api/",)).parse(
        req("POST", "/other", version(8), ("Upload-Complete", "?1"), body=3), "") is None


@pytest.mark.parametrize("fields, status", [
    ((version(8), ("Upload-Complete", "yes")), 400),
    ((version(8), ("Upload-Complete", "1")), 400),
    ((version(8), ("Upload-Complete", "?1"), ("Upload-Length", "-1")), 400),
    ((version(8), ("Upload-Complete", "?1"), ("Upload-Length", "9")), 400),
    ((version(8), ("Upload-Complete", "?0"), ("Upload-Offset", "5")), 400),
    ((version(8), ("Upload-Complete", "?0"), ("Repr-Digest", "sha-256=:not base64")), 400),
])
def test_malformed_creations_are_refused(fields: tuple[tuple[str, str], ...], status: int) -> None:
    command = proto().parse(req("POST", "/x", *fields, body=3), "")
    assert isinstance(command, c.Refuse) and command.error.status == status


@pytest.mark.parametrize("v", ALL)
def test_appends_need_offset_and_from_interop_6_the_partial_upload_type(v: int) -> None:
    fields = (version(v), ("Upload-Offset", "4"), complete(v, False))
    plain = proto().parse(req("PATCH", PREFIX + "abc", *fields, body=3), "o")
    if v >= 6:
        assert isinstance(plain, c.Refuse) and plain.error.status == 415
    else:
        assert isinstance(plain, c.Append)
    typed = proto().parse(req("PATCH", PREFIX + "abc", *fields,
                              ("Content-Type", "application/partial-upload"), body=3), "o")
    assert isinstance(typed, c.Append)
    assert (typed.upload_id, typed.owner, typed.offset, typed.declared_length) == ("abc", "o", 4, None)
    last = proto().parse(req("PATCH", PREFIX + "abc", version(v), ("Upload-Offset", "4"),
                             complete(v, True), ("Content-Type", "application/partial-upload"),
                             body=3), "o")
    assert isinstance(last, c.Append) and last.declared_length == 7


@pytest.mark.parametrize("method, fields, expected", [
    ("HEAD", (), c.Inspect("abc", "o", take_over=True)),
    ("DELETE", (), c.Cancel("abc", "o")),
])
def test_offset_retrieval_and_cancellation(method: str, fields: tuple[tuple[str, str], ...],
                                           expected: c.Command) -> None:
    assert proto().parse(req(method, PREFIX + "abc", version(8), *fields), "o") == expected
    bad = proto().parse(req(method, PREFIX + "abc", version(8), ("Upload-Offset", "1")), "o")
    assert isinstance(bad, c.Refuse) and bad.error.status == 400


def test_digests_become_a_checksum_per_append_and_expected_file_digests() -> None:
    digest = hashlib.sha256(b"abc").digest()
    field = f"sha-256=:{base64.b64encode(digest).decode()}:, md5=:AAAA:"
    command = proto().parse(req("PATCH", PREFIX + "abc", version(5), ("Upload-Offset", "0"),
                                ("Content-Digest", field), ("Repr-Digest", field), body=3), "")
    assert isinstance(command, c.Append) and command.checksum is not None
    assert (command.checksum.algorithm, command.checksum.digest) == ("sha256", digest)
    assert command.digests == {"sha256": base64.b64encode(digest).decode()}


UPLOAD = Upload(id="abc", protocol="ietf", owner="", length=10, offset=4, metadata={"interop": "8"})


def render(v: int, command: c.Command, outcome: c.Outcome) -> tuple[int, dict[str, str], bytes]:
    reply = proto(max_size=100).render(req("PATCH", PREFIX + "abc", version(v)), command, outcome)
    return reply.status, dict(reply.headers), reply.body


@pytest.mark.parametrize("v, status", [(3, 201), (5, 201), (6, 201), (7, 204), (8, 204)])
def test_a_non_final_append_status_differs_by_version(v: int, status: int) -> None:
    got, headers, _ = render(v, c.Append("abc", "", 0), c.Outcome(UPLOAD, 4))
    assert got == status and headers["Upload-Offset"] == "4"
    field, value = complete(v, False)
    assert headers[field] == value


@pytest.mark.parametrize("v", ALL)
def test_head_reports_offset_completeness_length_and_no_store(v: int) -> None:
    status, headers, _ = render(v, c.Inspect("abc", ""), c.Outcome(UPLOAD, 4))
    assert status == 204
    assert (headers["Upload-Offset"], headers["Upload-Length"]) == ("4", "10")
    assert headers["Cache-Control"] == "no-store"
    assert headers[complete(v, False)[0]] == complete(v, False)[1]
    limit = headers.get("Upload-Limit")
    assert (limit is not None) == (v >= 6)
    if v >= 7:
        assert limit is not None and "max-age=86400" in limit and "max-size=100" in limit
    if v == 6:
        assert limit is not None and "expires=86400" in limit


@pytest.mark.parametrize("v", ALL)
def test_the_final_answer_is_the_legacy_servers_with_upload_offset(v: int) -> None:
    answer = Answer(201, "Created", (("Location", "/api/files/1"),), b"stored")
    status, headers, body = render(v, c.Append("abc", "", 4), c.Outcome(UPLOAD, 10, Delivery(answer)))
    assert (status, body, headers["Location"], headers["Upload-Offset"]) == (
        201, b"stored", "/api/files/1", "10")
    assert (headers.get("Upload-Complete") == "?1") == (v >= 7)


def test_an_offset_mismatch_is_a_problem_document() -> None:
    error = ShimError("offset-mismatch", "no", 409, {"expected-offset": 4, "provided-offset": 2})
    status, headers, body = render(8, c.Append("abc", "", 2), c.Outcome(UPLOAD, error=error))
    document = json.loads(body)
    assert status == 409 and headers["Content-Type"] == "application/problem+json"
    assert document["type"].endswith("#mismatching-upload-offset")
    assert (document["expected-offset"], document["provided-offset"]) == (4, 2)
    assert headers["Upload-Offset"] == "4"


def test_appending_to_a_completed_upload_is_400_completed_upload() -> None:
    error = ShimError("completed", "done", 403)
    status, _, body = render(7, c.Append("abc", "", 10), c.Outcome(UPLOAD, error=error))
    assert status == 400 and json.loads(body)["type"].endswith("#completed-upload")


def test_a_repr_digest_mismatch_is_a_400_problem_and_no_answer() -> None:
    failed = Delivery(None, "the sha256 digest does not match", "digest-mismatch")
    status, headers, _ = render(8, c.Append("abc", "", 4), c.Outcome(UPLOAD, 10, failed))
    assert status == 400 and headers["Content-Type"] == "application/problem+json"


def test_options_advertise_limits_and_accept_patch_from_interop_8() -> None:
    for v, accept, limit in ((6, False, "max-size=10737418240, expires=86400"),
                             (8, True, "max-size=10737418240, max-age=86400")):
        command = proto().parse(req("OPTIONS", "/api/files", version(v)), "")
        assert isinstance(command, c.Immediate)
        headers = dict(command.reply.headers)
        assert headers["Upload-Limit"] == limit
        assert ("Accept-Patch" in headers) == accept
