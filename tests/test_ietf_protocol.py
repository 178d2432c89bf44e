"""Pure tests of the IETF draft module, per interop version (table-driven, no I/O)."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import replace

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



# --- interop 9 (draft -12): what differs from 8 ----------------------------------------

VERSION = "Upload-Draft-Interop-Version"
PARTIAL = ("Content-Type", "application/partial-upload")
DONE = Upload(id="abc", protocol="ietf", owner="", length=10, offset=10, metadata={"interop": "9"})
ANSWERED = replace(DONE, answer=Answer(201, "Created", (("Location", "/api/files/1"),), b"stored"))
LIMIT = "max-size=100, max-age=86400"


def answer(request: Request, command: c.Command, outcome: c.Outcome,
           max_size: int = 100) -> tuple[int, dict[str, str], bytes]:
    """What `request` is answered, rendered with `max_size` (render() is for PATCHes)."""
    reply = proto(max_size=max_size).render(request, command, outcome)
    return reply.status, dict(reply.headers), reply.body


def creation(*fields: tuple[str, str], body: int | None = 10) -> Request:
    return req("POST", "/api/files", version(9), *fields, body=body)


def test_interop_9_fetches_the_offset_with_get_as_with_head() -> None:
    """-12 "Offset Retrieval": HEAD or GET; a GET ends a request still writing, as HEAD does.
    Interop 8 keeps GET refused (405), and a GET must not carry Upload-* fields either."""
    for method in ("HEAD", "GET"):
        assert proto().parse(req(method, PREFIX + "abc", version(9)), "o") == \
            c.Inspect("abc", "o", take_over=True)
    old = proto().parse(req("GET", PREFIX + "abc", version(8)), "o")
    assert isinstance(old, c.Refuse) and old.error.status == 405
    bad = proto().parse(req("GET", PREFIX + "abc", version(9), ("Upload-Offset", "1")), "o")
    assert isinstance(bad, c.Refuse) and bad.error.status == 400
    status, headers, body = answer(req("GET", PREFIX + "abc", version(9)), c.Inspect("abc", ""),
                                   c.Outcome(UPLOAD, 4))
    assert (status, body, headers["Upload-Offset"], headers["Upload-Length"]) == (204, b"", "4", "10")
    assert (headers["Upload-Complete"], headers["Cache-Control"]) == ("?0", "no-store")
    assert headers["Upload-Limit"] == LIMIT


def test_interop_9_options_announce_upload_limit_without_accept_patch() -> None:
    """-12 "Limits": OPTIONS MUST carry Upload-Limit, `min-size=0` when nothing is limited;
    Accept-Patch (-10, -11) is no longer asked for."""
    for config, limit in (({}, "max-size=10737418240, max-age=86400"),
                          ({"max_size": 0, "expiration": 0}, "min-size=0")):
        command = proto(**config).parse(req("OPTIONS", "/api/files", version(9)), "")
        assert isinstance(command, c.Immediate) and command.reply.status == 200
        headers = dict(command.reply.headers)
        assert (headers["Upload-Limit"], headers[VERSION]) == (limit, "9")
        assert "Accept-Patch" not in headers


@pytest.mark.parametrize("upload", [UPLOAD, DONE], ids=["incomplete", "complete"])
def test_interop_9_offset_mismatch_says_upload_complete_false(upload: Upload) -> None:
    """-12 "Upload Append": a 409 MUST carry `Upload-Complete: ?0`, also on a completed
    upload (interop 8 says ?1 there: every byte is in)."""
    error = ShimError("offset-mismatch", "no", 409,
                      {"expected-offset": upload.offset, "provided-offset": 2})
    status, headers, body = render(9, c.Append("abc", "", 2), c.Outcome(upload, error=error))
    assert (status, headers["Upload-Complete"], headers["Upload-Offset"]) == (
        409, "?0", str(upload.offset))
    assert json.loads(body)["type"].endswith("#mismatching-upload-offset")
    old = render(8, c.Append("abc", "", 2), c.Outcome(upload, error=error))[1]
    assert old["Upload-Complete"] == ("?1" if upload is DONE else "?0")


def test_interop_9_has_no_completed_upload_problem() -> None:
    """-12 dropped the completed-upload type and its 410/404 rules: bytes appended to a
    completed upload go past its length, an inconsistent length (400, -12 "Length"), and the
    answer says ?0 (not the target resource's). Interop 8 keeps completed-upload."""
    error = ShimError("completed", "done", 403)
    status, headers, body = render(9, c.Append("abc", "", 10), c.Outcome(DONE, error=error))
    assert (status, headers["Upload-Complete"]) == (400, "?0")
    assert json.loads(body)["type"].endswith("#inconsistent-upload-length")
    _, _, old = render(8, c.Append("abc", "", 10), c.Outcome(DONE, error=error))
    assert json.loads(old)["type"].endswith("#completed-upload")


def test_interop_9_a_valid_append_to_a_completed_upload_gets_the_recorded_answer() -> None:
    """-12 "Upload Append": the server can replay the final response to a valid append to a
    completed upload (a client whose answer was lost): the legacy server's own, with ?1."""
    status, headers, body = render(9, c.Append("abc", "", 10), c.Outcome(ANSWERED, 10))
    assert (status, body, headers["Upload-Complete"], headers["Upload-Offset"]) == (
        201, b"stored", "?1", "10")


def test_interop_9_head_says_complete_once_the_answer_was_produced() -> None:
    """-12 "Offset Retrieval": Upload-Complete tells whether a final response was produced
    from the representation. Every byte in but the legacy server not asked yet: ?0, so the
    client completes again and gets the answer; interop 8 says ?1 once the bytes are in."""
    for v, upload, flag in ((9, DONE, "?0"), (9, ANSWERED, "?1"), (8, DONE, "?1")):
        status, headers, _ = render(v, c.Inspect("abc", ""), c.Outcome(upload, 10))
        assert (status, headers["Upload-Complete"], headers["Upload-Offset"]) == (204, flag, "10")


def test_interop_9_answers_of_the_shim_itself_say_upload_complete_false() -> None:
    """-12 "Completeness": what the shim answers itself to a creation or an append says ?0:
    a creation (201), a non-final append (204), a completed upload whose delivery has no
    answer yet (503; interop 8 has no field there); the target resource's answer alone ?1."""
    request = creation(complete(9, False))
    opened = proto().parse(request, "")
    assert isinstance(opened, c.Open)
    status, headers, _ = answer(request, opened, c.Outcome(replace(UPLOAD, length=None), 0))
    assert (status, headers["Upload-Complete"]) == (201, "?0")
    status, headers, _ = render(9, c.Append("abc", "", 0), c.Outcome(UPLOAD, 4))
    assert (status, headers["Upload-Complete"]) == (204, "?0")
    pending = Delivery(None, "the legacy server is slow", "pending", retry_after=5)
    status, headers, _ = render(9, c.Append("abc", "", 4), c.Outcome(DONE, 10, pending))
    assert (status, headers["Upload-Complete"], headers["Retry-After"]) == (503, "?0", "5")
    assert "Upload-Complete" not in render(8, c.Append("abc", "", 4), c.Outcome(DONE, 10, pending))[1]


def test_interop_9_complete_fixes_the_length_without_content_length() -> None:
    """-12 "Length": `Upload-Complete: ?1` makes the request's content the rest of the
    representation; with Content-Length the length is known at once, without it (chunked,
    or HTTP/2 without the field) once the body ends."""
    fields = (version(9), ("Upload-Offset", "4"), complete(9, True), PARTIAL)
    known = proto().parse(req("PATCH", PREFIX + "abc", *fields, body=6), "o")
    assert isinstance(known, c.Append) and (known.declared_length, known.complete_at_end) == (10, False)
    chunked = proto().parse(req("PATCH", PREFIX + "abc", *fields, body=None), "o")
    assert isinstance(chunked, c.Append)
    assert (chunked.declared_length, chunked.complete_at_end) == (None, True)
    created = proto().parse(creation(complete(9, True), body=None), "")
    assert isinstance(created, c.Open) and created.complete_at_end and created.new.length is None


def test_interop_9_append_size_limits_do_not_refuse_creations() -> None:
    """-12 "Limits": min-append-size and max-append-size apply to creation requests too. The
    shim announces neither, so a creation of any size (no content, one byte, 5 MiB) with
    more to follow is taken as it is."""
    for body in (0, 1, 5 * 1024 * 1024):
        command = proto().parse(creation(complete(9, False), body=body), "")
        assert isinstance(command, c.Open) and command.interim is not None
        assert "append-size" not in dict(command.interim.headers)["Upload-Limit"]


def test_interop_9_a_refusal_for_a_limit_carries_upload_limit() -> None:
    """-12 "Limits": a 413 for max-size SHOULD carry Upload-Limit, so the client learns what
    to stay under; it is no inconsistent length (no problem type). A body past the upload's
    own length is the inconsistent-length 400 ("Length"), on creation as on append."""
    too_large = ShimError("too-large", "too big", 413)
    request = creation(complete(9, True), body=500)
    opened = proto(max_size=100).parse(request, "")
    assert isinstance(opened, c.Open) and opened.new.length == 500
    status, headers, body = answer(request, opened, c.Outcome(error=too_large))
    assert (status, headers["Upload-Limit"], headers["Upload-Complete"]) == (413, LIMIT, "?0")
    assert json.loads(body)["type"] == "about:blank"
    unknown = replace(UPLOAD, length=None, offset=90)  # an append past max-size, length unknown
    status, headers, _ = render(9, c.Append("abc", "", 90), c.Outcome(unknown, error=too_large))
    assert (status, headers["Upload-Limit"]) == (413, LIMIT)
    declared = c.Open(replace(opened.new, length=10))
    for request, command, upload in (
            (req("PATCH", PREFIX + "abc", version(9)), c.Append("abc", "", 4), UPLOAD),
            (creation(("Upload-Length", "10"), complete(9, False), body=20), declared,
             replace(UPLOAD, offset=0))):
        status, headers, body = answer(request, command, c.Outcome(upload, error=too_large))
        assert (status, "Upload-Limit" in headers) == (400, False)
        assert json.loads(body)["type"].endswith("#inconsistent-upload-length")
    old = answer(req("POST", "/api/files", version(8), complete(8, True), body=500), opened,
                 c.Outcome(error=too_large))
    assert (old[0], "Upload-Limit" in old[1]) == (413, False)  # interop 8: as before
