"""Pure tests of the S3 protocol module (shim/protocols/s3/protocol.py): a request in, the
command it asks for; a command and its outcome in, the S3 answer out. No process, no socket.

Requests are signed by botocore's own S3 signer (`S3SigV4Auth.add_auth` on an `AWSRequest`)
at a fixed time, and the protocol's clock reads that time. Answers are read back with the
standard library's XML parser (Amazon S3 API Reference: the response syntax of each
operation, and "Error responses").
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any
from unittest import mock
from urllib.parse import quote, urlsplit

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from shim import commands as c
from shim.config import S3Config, S3Credential, S3ForwardConfig
from shim.engine import Delivery, NewUpload
from shim.errors import ShimError, too_many
from shim.lifecycle import State
from shim.model import Answer, Reply, Request, Target, Upload
from shim.protocols.s3 import documents, sigv4
from shim.protocols.s3 import protocol as p

ONE, SECRET_ONE = "AKIDSHIMONE", "one/secret+KEY"
TWO, SECRET_TWO = "AKIDSHIMTWO", "two-secret"
OWNER_ONE = "s3:" + hashlib.sha256(ONE.encode()).hexdigest()
OWNER_TWO = "s3:" + hashlib.sha256(TWO.encode()).hexdigest()
SIGNED_AT = datetime(2026, 3, 4, 5, 6, 7)  # naive UTC, as botocore's clock gives it
NOW = float(calendar.timegm(SIGNED_AT.timetuple()))
ORIGIN = "http://shim.test:8080"
NS = {"s3": documents.NAMESPACE}
CONFIG = S3Config(
    paths=("/s3/", "/objects/"),
    credentials=(S3Credential(ONE, SECRET_ONE, {"Authorization": "Bearer legacy-one",
                                                "X-Tenant": "one"}),
                 S3Credential(TWO, SECRET_TWO)),
    min_part_size=7, max_size=123_456, expiration=3600,
    forward=S3ForwardConfig(path="/in/{bucket}/{key}"))
MD5 = [hashlib.md5(data).hexdigest() for data in (b"first", b"second", b"third")]


def s3(**changes: Any) -> p.S3:
    """The protocol with CONFIG (changed), its clock at the signing time."""
    return p.S3(replace(CONFIG, **changes), clock=lambda: NOW)


class _Signer(S3SigV4Auth):  # type: ignore[misc]
    """botocore's S3 signer; `payload` replaces the body's SHA-256 (UNSIGNED-PAYLOAD, the
    STREAMING-* values) as a client that sends such a body signs it."""

    def __init__(self, key: str, secret: str, payload: str | None) -> None:
        super().__init__(Credentials(key, secret), "s3", "us-east-1")
        self._fixed = payload

    def payload(self, request: Any) -> str:
        return self._fixed if self._fixed is not None else str(super().payload(request))


def signed(method: str, target: str, *fields: tuple[str, str], body: bytes = b"",
           key: str = ONE, secret: str = SECRET_ONE, payload: str | None = None,
           length: int | None = -1) -> Request:
    """A request as the shim receives it, signed by botocore at SIGNED_AT. `target` is the
    path and query as sent (percent-encoded); `length` the Content-Length (-1: the body's)."""
    request = AWSRequest(method=method, url=f"{ORIGIN}{target}", headers=dict(fields), data=body)
    with mock.patch("botocore.auth.get_current_datetime", return_value=SIGNED_AT):
        _Signer(key, secret, payload).add_auth(request)
    url = urlsplit(request.url)
    headers = [(k, v.decode() if isinstance(v, bytes) else v) for k, v in request.headers.items()]
    return Request(method, url.path, url.query, (("Host", url.netloc), *headers),
                   len(body) if length == -1 else length, origin=ORIGIN)


def plain(method: str, target: str, *fields: tuple[str, str], length: int | None = 0,
          body: bytes | None = None) -> Request:
    """An unsigned request (for `auth: none`, and for rendering, which reads no signature)."""
    path, _, query = target.partition("?")
    return Request(method, path, query, (("Host", "shim.test:8080"), *fields), length, body,
                   origin=ORIGIN)


def refused(command: c.Command | None) -> ShimError:
    assert isinstance(command, c.Refuse), command
    return command.error


def opened(command: c.Command | None) -> c.Open:
    assert isinstance(command, c.Open), command
    return command


def xml(reply: Reply) -> ET.Element:
    assert ("Content-Type", "application/xml") in reply.headers
    assert reply.body.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n')
    return ET.fromstring(reply.body)


def found(root: ET.Element, path: str) -> str | None:
    return root.findtext(path, namespaces=NS)


def error_of(reply: Reply) -> dict[str, str]:
    """An S3 error document's elements (no namespace, as S3 sends it)."""
    root = xml(reply)
    assert root.tag == "Error"
    return {child.tag: child.text or "" for child in root}


def header(reply: Reply, name: str) -> str | None:
    return next((v for k, v in reply.headers if k.lower() == name.lower()), None)


def part(number: int, md5: str, size: int, updated: float = NOW, length: int | None = -1,
         upload_id: str = "U") -> tuple[str, Upload]:
    """A part as the engine lists it: (its key, its upload)."""
    return (f"s3part:{upload_id}:{number:05d}",
            Upload(f"id{number}", "s3", OWNER_ONE, size if length == -1 else length, offset=size,
                   metadata={"etag": md5}, updated=updated))


def multipart(key: str, upload_id: str, created: float = NOW,
              parts: tuple[str, ...] = ()) -> tuple[str, Upload]:
    """A multipart upload in progress as the engine lists it."""
    return (f"s3up:{OWNER_ONE}:bkt/{key}\n{upload_id}",
            Upload(upload_id, "s3", OWNER_ONE, None, metadata={"bucket": "bkt", "key": key},
                   created=created, parts=parts))


def complete_body(parts: Sequence[tuple[int, str]], namespace: bool = True) -> bytes:
    """A CompleteMultipartUpload request body, as botocore writes it."""
    root = ET.Element("CompleteMultipartUpload",
                      {"xmlns": documents.NAMESPACE} if namespace else {})
    for number, etag in parts:
        element = ET.SubElement(root, "Part")
        ET.SubElement(element, "ETag").text = etag
        ET.SubElement(element, "PartNumber").text = str(number)
    return ET.tostring(root)


def accepted(status: int = 201, body: bytes = b"stored") -> Answer:
    return Answer(status, "Created", (), body)


# --- which operation -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/s3", "/S3/b/k", "/other/s3/bkt/k", "/objects", "/files/b"])
def test_paths_outside_the_prefixes_are_not_s3(path: str) -> None:
    request = signed("PUT", path, body=b"x")
    assert s3().operation(request) is None
    assert s3().parse(request, "anyone") is None


@pytest.mark.parametrize("method, target, fields, expected", [
    ("POST", "/s3/bkt/dir/k.bin?uploads", (), ("CreateMultipartUpload", "", 0)),
    ("POST", "/s3/bkt/k?uploads&uploadId=U", (), ("CreateMultipartUpload", "U", 0)),
    ("PUT", "/s3/bkt/k?partNumber=7&uploadId=U", (), ("UploadPart", "U", 7)),
    ("PUT", "/s3/bkt/k?uploadId=U&partNumber=7", (("x-amz-copy-source", "/b/o"),), ("CopyPart", "U", 7)),
    ("GET", "/s3/bkt/k?uploadId=U", (), ("ListParts", "U", 0)),
    ("POST", "/s3/bkt/k?uploadId=U", (), ("CompleteMultipartUpload", "U", 0)),
    ("DELETE", "/s3/bkt/k?uploadId=U", (), ("AbortMultipartUpload", "U", 0)),
    ("HEAD", "/s3/bkt/k?uploadId=U", (), ("Unknown", "U", 0)),
    ("PUT", "/s3/bkt/k?uploadId=U", (), ("Unknown", "U", 0)),
    ("PUT", "/s3/bkt/k?partNumber=2", (), ("Unknown", "", 2)),
    ("GET", "/s3/bkt?uploads", (), ("ListMultipartUploads", "", 0)),
    ("GET", "/s3/bkt/?uploads", (), ("ListMultipartUploads", "", 0)),
    ("POST", "/s3/bkt?uploads", (), ("Bucket", "", 0)),
    ("GET", "/s3/bkt", (), ("Bucket", "", 0)),
    ("DELETE", "/s3/bkt", (), ("Bucket", "", 0)),
    ("HEAD", "/s3/bkt", (), ("HeadBucket", "", 0)),
    ("HEAD", "/s3/bkt/", (), ("HeadBucket", "", 0)),
    ("PUT", "/s3/bkt/", (), ("CreateBucket", "", 0)),
    ("PUT", "/s3/bkt?acl", (), ("Bucket", "", 0)),
    ("HEAD", "/s3/bkt?location", (), ("Bucket", "", 0)),
    ("PUT", "/s3/bkt/dir/k.bin", (), ("PutObject", "", 0)),
    ("PUT", "/s3/bkt/k", (("X-Amz-Copy-Source", "/b/o"),), ("CopyObject", "", 0)),
    ("PUT", "/s3/bkt/k?tagging", (), ("Unknown", "", 0)),
    ("GET", "/s3/bkt/k", (), ("Unknown", "", 0)),
    ("HEAD", "/s3/bkt/k", (), ("HeadObject", "", 0)),
    ("HEAD", "/s3/bkt/k?versionId=1", (), ("Unknown", "", 0)),
    ("DELETE", "/s3/bkt/k", (), ("Unknown", "", 0)),
    ("POST", "/s3/bkt/k", (), ("Unknown", "", 0)),
])
def test_the_operation_is_told_by_method_path_and_query(
        method: str, target: str, fields: tuple[tuple[str, str], ...],
        expected: tuple[str, str, int]) -> None:
    operation = s3().operation(plain(method, target, *fields))
    assert operation is not None
    name, upload_id, number = expected
    assert (operation.name, operation.upload_id) == (name, upload_id)
    assert operation.part == (number or -1)
    assert operation.bucket == "bkt"


def test_bucket_and_key_are_percent_decoded_below_either_prefix() -> None:
    operation = s3().operation(plain("PUT", "/objects/my%2Ebucket/dir/a%2Fb%20%C3%BC%25.txt"))
    assert operation is not None
    assert (operation.name, operation.bucket, operation.key) == (
        "PutObject", "my.bucket", "dir/a/b ü%.txt")


@pytest.mark.parametrize("text, number", [
    ("1", 1), ("10000", 10000), ("000007", 7), ("123456789", 123456789), ("1234567890", -1),
    ("abc", -1), ("", -1), ("-1", -1), ("%2B1", -1), ("1.0", -1), ("%201", -1), ("%C2%B2", -1),
    ("%D9%A1", -1), ("%EF%BC%91", -1)])
def test_the_part_number_is_read_as_up_to_nine_ascii_digits(text: str, number: int) -> None:
    operation = s3().operation(plain("PUT", f"/s3/bkt/k?uploadId=U&partNumber={text}"))
    assert operation is not None and operation.part == number


def test_a_query_parameter_reads_its_first_value_or_the_default() -> None:
    operation = s3().operation(plain("GET", "/s3/bkt?uploads&prefix=a&prefix=b&empty="))
    assert operation is not None
    assert operation.param("prefix") == "a"
    assert operation.param("empty", "d") == ""
    assert operation.param("missing") == ""
    assert operation.param("missing", "d") == "d"
    assert p.Operation("X", "b", "k").param("any", "d") == "d"


# --- who sends it -------------------------------------------------------------------------------


def test_an_unsigned_request_is_access_denied() -> None:
    request = plain("POST", "/s3/bkt/k?uploads")
    error = refused(s3().parse(request, "anyone"))
    assert (error.code, error.status) == ("AccessDenied", 403)
    reply = s3().render(request, c.Refuse(error), c.Outcome(error=error))
    document = error_of(reply)
    assert reply.status == 403 and document["Code"] == "AccessDenied"
    assert document["Resource"] == "/s3/bkt/k"
    assert re.fullmatch(r"[0-9A-F]{16}", document["RequestId"])
    assert "UploadId" not in document


def test_an_unknown_access_key_or_a_wrong_secret_is_refused() -> None:
    error = refused(s3().parse(signed("POST", "/s3/bkt/k?uploads", key="AKIDNOBODY"), ""))
    assert (error.code, error.status) == ("InvalidAccessKeyId", 403)
    error = refused(s3().parse(signed("POST", "/s3/bkt/k?uploads", secret="not-it"), ""))
    assert (error.code, error.status) == ("SignatureDoesNotMatch", 403)


def test_the_signature_is_checked_against_the_protocols_clock() -> None:
    request = signed("POST", "/s3/bkt/k?uploads")
    late = p.S3(CONFIG, clock=lambda: NOW + 901)
    error = refused(late.parse(request, ""))
    assert (error.code, error.status) == ("RequestTimeTooSkewed", 403)
    assert isinstance(p.S3(CONFIG, clock=lambda: NOW + 899).parse(request, ""), c.Open)


def test_each_access_key_is_an_owner_of_its_own_whatever_owner_is_passed() -> None:
    first = opened(s3().parse(signed("POST", "/s3/bkt/k?uploads"), "header-owner"))
    second = opened(s3().parse(signed("POST", "/s3/bkt/k?uploads", key=TWO, secret=SECRET_TWO),
                               "header-owner"))
    assert (first.new.owner, second.new.owner) == (OWNER_ONE, OWNER_TWO)
    assert first.key == f"s3up:{OWNER_ONE}:bkt/k\n{first.new.id}"
    assert second.key == f"s3up:{OWNER_TWO}:bkt/k\n{second.new.id}"
    listing = s3().parse(signed("GET", "/s3/bkt?uploads", key=TWO, secret=SECRET_TWO), "")
    assert listing == c.Report(OWNER_TWO, f"s3up:{OWNER_TWO}:bkt/")


GOOD_AUTH = (f"AWS4-HMAC-SHA256 Credential={ONE}/20260304/us-east-1/s3/aws4_request, "
             "SignedHeaders=host;x-amz-date, Signature=" + "0" * 64)


def test_auth_none_takes_unsigned_requests_and_names_owners_by_the_key_id() -> None:
    none = s3(auth="none")
    anonymous = opened(none.parse(plain("POST", "/s3/bkt/k?uploads"), "header-owner"))
    assert anonymous.new.owner == "s3:"
    assert anonymous.new.target is not None and anonymous.new.target.headers == ()
    known = opened(none.parse(plain("POST", "/s3/bkt/k?uploads", ("Authorization", GOOD_AUTH)), ""))
    assert known.new.owner == OWNER_ONE
    assert known.new.target is not None
    assert known.new.target.headers == (("Authorization", "Bearer legacy-one"), ("X-Tenant", "one"))
    other = GOOD_AUTH.replace(ONE, "AKIDSTRANGER")
    stranger = opened(none.parse(plain("POST", "/s3/bkt/k?uploads", ("Authorization", other)), ""))
    assert stranger.new.owner == "s3:" + hashlib.sha256(b"AKIDSTRANGER").hexdigest()
    assert stranger.new.target is not None and stranger.new.target.headers == ()
    unreadable = opened(none.parse(plain("POST", "/s3/bkt/k?uploads", ("Authorization", "Bearer x")),
                                   ""))
    assert unreadable.new.owner == "s3:"


def test_auth_none_decodes_signed_chunks_without_checking_them() -> None:
    request = plain("PUT", "/s3/bkt/k?partNumber=1&uploadId=U", ("Authorization", GOOD_AUTH),
                    ("x-amz-content-sha256", sigv4.STREAMING_PAYLOAD),
                    ("Content-Encoding", "aws-chunked"), ("x-amz-decoded-content-length", "3"),
                    length=None)
    body = opened(s3(auth="none").parse(request, "")).body_filter
    assert isinstance(body, p.S3Body) and body.decoder is not None
    assert body.decoder.signer is None
    assert body.feed(b"3;chunk-signature=" + b"0" * 64 + b"\r\nabc\r\n0;chunk-signature="
                     + b"1" * 64 + b"\r\n\r\n") == b"abc"
    assert body.end() == {"etag": hashlib.md5(b"abc").hexdigest()}


# --- CreateMultipartUpload ----------------------------------------------------------------------


def test_create_opens_an_upload_with_no_bytes_named_by_owner_bucket_and_key() -> None:
    request = signed("POST", "/s3/bkt/dir/k.bin?uploads", ("Content-Type", "image/png"))
    command = opened(s3().parse(request, ""))
    new = command.new
    assert (new.protocol, new.owner, new.length) == ("s3", OWNER_ONE, None)
    assert new.metadata == {"bucket": "bkt", "key": "dir/k.bin", "family": f"s3part:{new.id}:"}
    assert (new.max_size, new.expiration, new.exclusive_parts) == (123_456, 3600, True)
    assert (command.with_body, command.body_filter, command.within) == (False, None, None)
    assert command.key == f"s3up:{OWNER_ONE}:bkt/dir/k.bin\n{new.id}"
    assert new.target is not None
    assert (new.target.method, new.target.path, new.target.body, new.target.field) == (
        "PUT", "/in/bkt/dir/k.bin", "raw", "file")
    assert (new.target.filename, new.target.content_type) == ("k.bin", "image/png")
    again = opened(s3().parse(request, ""))
    assert again.new.id != new.id and len(new.id) >= 20


def test_create_answers_the_bucket_key_and_upload_id() -> None:
    request = signed("POST", "/s3/bkt/dir/a%20%26%20b.bin?uploads")
    command = opened(s3().parse(request, ""))
    upload = Upload("UPLOAD-1", "s3", OWNER_ONE, None)
    reply = s3().render(request, command, c.Outcome(upload=upload))
    root = xml(reply)
    assert reply.status == 200
    assert root.tag == f"{{{documents.NAMESPACE}}}InitiateMultipartUploadResult"
    assert [found(root, f"s3:{name}") for name in ("Bucket", "Key", "UploadId")] == [
        "bkt", "dir/a & b.bin", "UPLOAD-1"]


@pytest.mark.parametrize("template, key, path", [
    ("/in/{bucket}/{key}", "a b.txt", "/in/bkt/a%20b.txt"),
    ("/in/{bucket}/{key}", "dir/sub/ü.bin", "/in/bkt/dir/sub/%C3%BC.bin"),
    ("/in/{bucket}/{key}", "100%25.txt", "/in/bkt/100%25.txt"),
    ("/in/{bucket}/{key}", "a%2Bb+c;d", "/in/bkt/a%2Bb%2Bc%3Bd"),
    ("/in/{bucket}/{key}", "x%3Fy%23z", "/in/bkt/x%3Fy%23z"),
    ("/in/{bucket}/{key}", "dir%2Fsub/f", "/in/bkt/dir/sub/f"),
    ("/in/{key}.upload", "d/f", "/in/d/f.upload"),
    ("/in/{id}/{key}", "d/f", "/in/{id}/d/f"),
    ("/in/{id}", "../..", "/in/{id}"),
])
def test_the_delivery_path_fills_the_template_keeping_the_keys_slashes(
        template: str, key: str, path: str) -> None:
    command = opened(s3(forward=S3ForwardConfig(path=template)).parse(
        signed("POST", f"/s3/bkt/{key}?uploads"), ""))
    assert command.new.target is not None
    assert command.new.target.path == path.replace("{id}", command.new.id)


@pytest.mark.parametrize("key", ["..", "a/../b", "%2E%2E/b", "a/%2e%2e", ".", "a/./b", "a//b", "dir/"])
def test_a_key_that_would_climb_or_name_no_file_is_refused(key: str) -> None:
    request = signed("POST", f"/s3/bkt/{key}?uploads")
    error = refused(s3().parse(request, ""))
    assert (error.code, error.status) == ("bad-request", 400)
    reply = s3().render(request, c.Refuse(error), c.Outcome(error=error))
    assert (reply.status, error_of(reply)["Code"]) == (400, "InvalidRequest")


@pytest.mark.parametrize("target", ["/s3/bkt/a%01b?uploads", "/s3/bkt/a%EF%BF%BEb?uploads"])
def test_a_key_or_bucket_xml_cannot_carry_is_refused(target: str) -> None:
    error = refused(s3().parse(signed("POST", target), ""))
    assert (error.code, error.status) == ("InvalidArgument", 400)
    assert error.message == "the key has characters an S3 answer (XML) cannot carry"


@pytest.mark.parametrize("bucket", ["", "a", ".hidden", "-dash", "a..b", "a%20b", "a%0Bb", "%C3%BCber",
                                    "b" * 256])
def test_a_bucket_name_s3_would_not_take_is_refused(bucket: str) -> None:
    for request in (signed("POST", f"/s3/{bucket}/k?uploads"), signed("PUT", f"/s3/{bucket}/k")):
        error = refused(s3().parse(request, ""))
        assert (error.code, error.status, error.message) == (
            "InvalidBucketName", 400, "The specified bucket is not valid.")


@pytest.mark.parametrize("bucket", ["ab", "my.bucket-1", "Legacy_Name", "b" * 255])
def test_s3_and_legacy_bucket_names_are_taken(bucket: str) -> None:
    assert opened(s3().parse(signed("POST", f"/s3/{bucket}/k?uploads"), "")).new.metadata[
        "bucket"] == bucket


def test_a_key_of_more_than_1024_bytes_is_refused() -> None:
    assert isinstance(s3().parse(signed("POST", f"/s3/bkt/{'k' * 1024}?uploads"), ""), c.Open)
    assert isinstance(s3().parse(signed("POST", f"/s3/bkt/{'%C3%BC' * 512}?uploads"), ""), c.Open)
    for key in ("k" * 1025, "%C3%BC" * 512 + "k"):
        error = refused(s3().parse(signed("POST", f"/s3/bkt/{key}?uploads"), ""))
        assert (error.code, error.status, error.message) == (
            "KeyTooLongError", 400, "Your key is too long")


def test_only_x_amz_meta_fields_and_the_keys_own_fields_are_forwarded() -> None:
    request = signed("POST", "/s3/bkt/k?uploads", ("x-amz-meta-who", "me"),
                     ("X-Amz-Meta-Case", "Kept"), ("x-amz-storage-class", "STANDARD"),
                     ("X-Custom", "no"), ("Cookie", "session=1"), ("Content-Type", "text/plain"),
                     ("x-amz-tagging", "a=b"))
    command = opened(s3().parse(request, ""))
    assert command.new.target is not None
    assert command.new.target.headers == (
        ("x-amz-meta-who", "me"), ("X-Amz-Meta-Case", "Kept"),
        ("Authorization", "Bearer legacy-one"), ("X-Tenant", "one"))
    assert command.new.target.content_type == "text/plain"
    second = opened(s3().parse(signed("POST", "/s3/bkt/k?uploads", ("x-amz-meta-who", "me"),
                                      key=TWO, secret=SECRET_TWO), ""))
    assert second.new.target is not None
    assert second.new.target.headers == (("x-amz-meta-who", "me"),)
    without = opened(s3(forward=S3ForwardConfig(metadata=False)).parse(request, ""))
    assert without.new.target is not None
    assert without.new.target.headers == (("Authorization", "Bearer legacy-one"),
                                          ("X-Tenant", "one"))


def test_the_clients_signature_never_reaches_the_legacy_server() -> None:
    none = s3(auth="none", credentials=())
    request = plain("POST", "/s3/bkt/k?uploads", ("Authorization", GOOD_AUTH),
                    ("x-amz-date", "20260304T050607Z"), ("x-amz-meta-a", "1"))
    command = opened(none.parse(request, ""))
    assert command.new.target is not None and command.new.target.headers == (("x-amz-meta-a", "1"),)


def test_the_forward_settings_shape_the_delivery() -> None:
    forward = S3ForwardConfig(method="POST", path="/up/{key}", body="multipart", field="upload")
    command = opened(s3(forward=forward).parse(signed("POST", "/s3/bkt/d/e/f.txt?uploads"), ""))
    target = command.new.target
    assert target is not None
    assert (target.method, target.path, target.body, target.field, target.filename) == (
        "POST", "/up/d/e/f.txt", "multipart", "upload", "f.txt")


def test_a_content_type_that_is_no_media_type_is_refused() -> None:
    error = refused(s3().parse(signed("POST", "/s3/bkt/k?uploads", ("Content-Type", "no type")), ""))
    assert (error.code, error.status) == ("bad-request", 400)


# --- UploadPart ---------------------------------------------------------------------------------


def test_upload_part_opens_a_part_named_by_upload_id_and_number() -> None:
    body = b"part seven"
    request = signed("PUT", "/s3/bkt/k?partNumber=7&uploadId=U-1", body=body)
    command = opened(s3().parse(request, ""))
    new = command.new
    assert (new.protocol, new.owner, new.length, new.metadata, new.target) == (
        "s3", OWNER_ONE, len(body), {}, None)
    assert (new.max_size, new.expiration, new.exclusive_parts) == (p.MAX_PART_SIZE, 3600, False)
    assert new.part_of == "U-1"
    assert isinstance(new.id, str) and len(new.id) >= 20
    assert (command.with_body, command.key, command.within) == (True, "s3part:U-1:00007", "U-1")
    assert isinstance(command.body_filter, p.S3Body)
    assert command.body_filter.decoder is None
    assert command.body_filter.digests.sha256_expected == hashlib.sha256(body).hexdigest()
    assert command.body_filter.feed(body) == body
    assert command.body_filter.end() == {"etag": hashlib.md5(body).hexdigest()}


def test_a_part_body_that_is_not_what_was_signed_is_refused_at_its_end() -> None:
    command = opened(s3().parse(signed("PUT", "/s3/bkt/k?partNumber=1&uploadId=U", body=b"abc"), ""))
    assert command.body_filter is not None
    command.body_filter.feed(b"abd")
    with pytest.raises(ShimError) as raised:
        command.body_filter.end()
    assert raised.value.code == "XAmzContentSHA256Mismatch"


def test_a_content_md5_is_checked() -> None:
    digest = base64.b64encode(hashlib.md5(b"abc").digest()).decode()
    command = opened(s3().parse(signed("PUT", "/s3/bkt/k?partNumber=1&uploadId=U",
                                       ("Content-MD5", digest), body=b"abc",
                                       payload=sigv4.UNSIGNED_PAYLOAD), ""))
    assert command.body_filter is not None
    assert command.body_filter.feed(b"abc") == b"abc"
    assert command.body_filter.end() == {"etag": hashlib.md5(b"abc").hexdigest()}
    command = opened(s3().parse(signed("PUT", "/s3/bkt/k?partNumber=1&uploadId=U",
                                       ("Content-MD5", digest), body=b"abd",
                                       payload=sigv4.UNSIGNED_PAYLOAD), ""))
    assert command.body_filter is not None
    command.body_filter.feed(b"abd")
    with pytest.raises(ShimError) as raised:
        command.body_filter.end()
    assert raised.value.code == "BadDigest"


@pytest.mark.parametrize("number", ["1", "10000", "00001"])
def test_part_numbers_from_1_to_10000_are_taken(number: str) -> None:
    command = opened(s3().parse(signed("PUT", f"/s3/bkt/k?partNumber={number}&uploadId=U",
                                       body=b"x"), ""))
    assert command.key == f"s3part:U:{int(number):05d}"


@pytest.mark.parametrize("number", ["0", "10001", "999999", "1234567", "abc", "", "-3"])
def test_a_part_number_out_of_range_is_invalid_argument(number: str) -> None:
    request = signed("PUT", f"/s3/bkt/k?partNumber={number}&uploadId=U", body=b"x")
    error = refused(s3().parse(request, ""))
    assert (error.code, error.status) == ("InvalidArgument", 400)
    assert error.message == "Part number must be an integer between 1 and 10000, inclusive"
    reply = s3().render(request, c.Refuse(error), c.Outcome(error=error))
    document = error_of(reply)
    assert (reply.status, document["Code"], document["UploadId"]) == (400, "InvalidArgument", "U")


def test_a_body_without_a_length_is_refused_411() -> None:
    error = refused(s3().parse(signed("PUT", "/s3/bkt/k?partNumber=1&uploadId=U", body=b"x",
                                      length=None), ""))
    assert (error.code, error.status) == ("MissingContentLength", 411)
    assert error.message == "You must provide the Content-Length HTTP header."
    error = refused(s3().parse(signed("PUT", "/s3/bkt/k", body=b"x", length=None), ""))
    assert (error.code, error.status) == ("MissingContentLength", 411)


@pytest.mark.parametrize("fields", [
    (("Content-Encoding", "aws-chunked"),),
    (("Content-Encoding", "gzip, AWS-Chunked"), ("x-amz-decoded-content-length", "1.5")),
    (("x-amz-decoded-content-length", "-1"),),
    (("x-amz-decoded-content-length", ""),),
    (("x-amz-decoded-content-length", "²"),),
    (("x-amz-decoded-content-length", "1" * 16),),
])
def test_an_aws_chunked_body_needs_its_decoded_length(fields: tuple[tuple[str, str], ...]) -> None:
    payload = sigv4.STREAMING_UNSIGNED_TRAILER
    for target in ("/s3/bkt/k?partNumber=1&uploadId=U", "/s3/bkt/k"):
        error = refused(s3().parse(signed("PUT", target, *fields, payload=payload, length=100), ""))
        assert (error.code, error.status) == ("MissingContentLength", 411)
        assert error.message == "an aws-chunked body needs x-amz-decoded-content-length"


def test_an_aws_chunked_body_is_as_long_as_its_decoded_length() -> None:
    request = signed("PUT", "/s3/bkt/k?partNumber=2&uploadId=U", ("Content-Encoding", "aws-chunked"),
                     ("x-amz-decoded-content-length", " 3 "), payload=sigv4.UNSIGNED_PAYLOAD,
                     length=None)
    command = opened(s3().parse(request, ""))
    assert command.new.length == 3
    body = command.body_filter
    assert isinstance(body, p.S3Body) and body.decoder is not None
    assert (body.decoder.signer, body.decoder.decoded_length) == (None, 3)
    assert body.feed(b"3\r\nabc\r\n0\r\n\r\n") == b"abc"
    assert body.end() == {"etag": hashlib.md5(b"abc").hexdigest()}


def test_a_part_of_more_than_5_gib_is_entity_too_large() -> None:
    def part_of(length: int) -> c.Command | None:
        return s3().parse(signed("PUT", "/s3/bkt/k?partNumber=1&uploadId=U", length=length,
                                 payload=sigv4.UNSIGNED_PAYLOAD), "")

    assert opened(part_of(p.MAX_PART_SIZE)).new.length == 5 * 1024**3
    error = refused(part_of(p.MAX_PART_SIZE + 1))
    assert (error.code, error.status, error.message) == (
        "EntityTooLarge", 400, "a part is at most 5 GiB")


def _chunked(signer: sigv4.ChunkSigner | None, chunks: Sequence[bytes],
             trailers: Sequence[tuple[str, str]] = ()) -> bytes:
    """An aws-chunked body, each chunk signed when `signer` is given."""
    out = b""
    for data in [*chunks, b""]:
        extension = b""
        if signer is not None:
            signature = signer.chunk_signature(hashlib.sha256(data).hexdigest())
            signer.previous = signature
            extension = b";chunk-signature=" + signature.encode()
        out += b"%x" % len(data) + extension + b"\r\n" + data + (b"\r\n" if data else b"")
    lines = [f"{name}:{value}\r\n".encode() for name, value in trailers]
    if signer is not None and signer.trailer_signed:
        lines.append(f"x-amz-trailer-signature:{signer.trailer_signature(trailers)}\r\n".encode())
    return out + b"".join(lines) + b"\r\n"


@pytest.mark.parametrize("target", ["/s3/bkt/k?partNumber=3&uploadId=U", "/s3/bkt/k"])
@pytest.mark.parametrize("payload", [sigv4.STREAMING_PAYLOAD, sigv4.STREAMING_PAYLOAD_TRAILER])
def test_signed_chunks_are_verified_with_the_requests_signature(payload: str, target: str) -> None:
    trailer = payload == sigv4.STREAMING_PAYLOAD_TRAILER
    data = b"hello, chunked world"
    crc = base64.b64encode(hashlib.sha256(data).digest()).decode()
    extra = (("x-amz-trailer", "x-amz-checksum-sha256"),) if trailer else ()
    request = signed("PUT", target, ("Content-Encoding", "aws-chunked"),
                     ("x-amz-decoded-content-length", str(len(data))), *extra, payload=payload,
                     length=None)
    command = opened(s3().parse(request, ""))
    assert command.new.length == len(data)
    body = command.body_filter
    assert isinstance(body, p.S3Body) and body.decoder is not None
    signer = body.decoder.signer
    assert signer is not None and signer.signed.access_key == ONE
    assert signer.signed.payload == payload
    own = sigv4.ChunkSigner(signer.signed)
    encoded = _chunked(own, [data[:5], data[5:]],
                       [("x-amz-checksum-sha256", crc)] if trailer else [])
    assert body.feed(encoded) == data
    assert body.end() == {"etag": hashlib.md5(data).hexdigest()}

    tampered = opened(s3().parse(request, "")).body_filter
    assert tampered is not None
    with pytest.raises(ShimError) as raised:
        tampered.feed(encoded.replace(b"hello", b"HELLO"))
        tampered.end()
    assert raised.value.code == "SignatureDoesNotMatch"


def test_an_unsigned_trailer_checksum_is_checked() -> None:
    data = b"trailing"
    good = base64.b64encode(hashlib.sha256(data).digest()).decode()
    request = signed("PUT", "/s3/bkt/k", ("Content-Encoding", "aws-chunked"),
                     ("x-amz-decoded-content-length", str(len(data))),
                     ("x-amz-trailer", "x-amz-checksum-sha256"),
                     payload=sigv4.STREAMING_UNSIGNED_TRAILER, length=None)
    command = opened(s3().parse(request, ""))
    body = command.body_filter
    assert isinstance(body, p.S3Body) and body.decoder is not None and body.decoder.signer is None
    assert body.feed(_chunked(None, [data], [("x-amz-checksum-sha256", good)])) == data
    assert body.end() == {"etag": hashlib.md5(data).hexdigest()}
    bad = opened(s3().parse(request, "")).body_filter
    assert bad is not None
    bad.feed(_chunked(None, [data], [("x-amz-checksum-sha256", base64.b64encode(b"0" * 32).decode())]))
    with pytest.raises(ShimError) as raised:
        bad.end()
    assert raised.value.code == "BadDigest"


def test_a_trailer_announced_for_a_plain_body_is_refused() -> None:
    for target in ("/s3/bkt/k?partNumber=1&uploadId=U", "/s3/bkt/k"):
        error = refused(s3().parse(signed("PUT", target, ("x-amz-trailer", "x-amz-checksum-crc32"),
                                          body=b"x"), ""))
        assert (error.code, error.status, error.message) == (
            "InvalidRequest", 400, "x-amz-trailer needs an aws-chunked body.")


def test_upload_part_answers_the_parts_etag() -> None:
    request = signed("PUT", "/s3/bkt/k?partNumber=1&uploadId=U", body=b"first")
    command = opened(s3().parse(request, ""))
    upload = Upload("P1", "s3", OWNER_ONE, 5, 5, metadata={"etag": MD5[0]})
    assert s3().render(request, command, c.Outcome(upload=upload)) == Reply(
        200, (("ETag", f'"{MD5[0]}"'),))


def test_copy_part_and_copy_object_are_not_implemented() -> None:
    for target in ("/s3/bkt/k?partNumber=1&uploadId=U", "/s3/bkt/k"):
        request = signed("PUT", target, ("x-amz-copy-source", "/b/other"))
        error = refused(s3().parse(request, ""))
        assert (error.code, error.status) == ("NotImplemented", 501)
        reply = s3().render(request, c.Refuse(error), c.Outcome(error=error))
        assert (reply.status, error_of(reply)["Code"]) == (501, "NotImplemented")


# --- ListParts ----------------------------------------------------------------------------------


def test_list_parts_reports_the_uploads_parts_while_it_is_in_progress() -> None:
    command = s3().parse(signed("GET", "/s3/bkt/k?uploadId=U-1"), "")
    assert command == c.Report(OWNER_ONE, "s3part:U-1:", within="U-1")


def test_list_parts_lists_complete_parts_in_order() -> None:
    request = plain("GET", "/s3/bkt/dir/k?uploadId=U")
    listing = (part(3, MD5[2], 30, updated=1795444704.25), part(1, MD5[0], 10),
               part(2, MD5[1], 5, length=20))  # part 2 is still being written
    root = xml(s3().render(request, c.Report(OWNER_ONE, "s3part:U:", within="U"),
                           c.Outcome(listing=listing)))
    assert root.tag == f"{{{documents.NAMESPACE}}}ListPartsResult"
    assert [found(root, f"s3:{name}") for name in ("Bucket", "Key", "UploadId")] == [
        "bkt", "dir/k", "U"]
    assert found(root, "s3:Owner/s3:ID") == OWNER_ONE
    assert found(root, "s3:Initiator/s3:ID") == OWNER_ONE
    assert (found(root, "s3:PartNumberMarker"), found(root, "s3:NextPartNumberMarker")) == ("0", "3")
    assert (found(root, "s3:MaxParts"), found(root, "s3:IsTruncated")) == ("1000", "false")
    parts = [(found(e, "s3:PartNumber"), found(e, "s3:ETag"), found(e, "s3:Size"),
              found(e, "s3:LastModified")) for e in root.findall("s3:Part", NS)]
    assert parts == [("1", f'"{MD5[0]}"', "10", documents.timestamp(NOW)),
                     ("3", f'"{MD5[2]}"', "30", "2026-11-23T14:38:24.250Z")]


def test_list_parts_of_one_part_names_its_owner() -> None:
    root = xml(s3().render(plain("GET", "/s3/bkt/k?uploadId=U"), c.Report(OWNER_ONE, "s3part:U:"),
                           c.Outcome(listing=(part(1, MD5[0], 10),))))
    assert found(root, "s3:Owner/s3:ID") == OWNER_ONE
    assert [e.findtext("s3:PartNumber", namespaces=NS) for e in root.findall("s3:Part", NS)] == ["1"]


def test_list_parts_with_no_parts_is_an_empty_page() -> None:
    root = xml(s3().render(plain("GET", "/s3/bkt/k?uploadId=U"), c.Report(OWNER_ONE, "s3part:U:"),
                           c.Outcome()))
    assert root.findall("s3:Part", NS) == []
    assert found(root, "s3:NextPartNumberMarker") is None
    assert found(root, "s3:Owner/s3:ID") is None or found(root, "s3:Owner/s3:ID") == ""
    assert found(root, "s3:IsTruncated") == "false"


@pytest.mark.parametrize("query, numbers, next_marker, truncated, max_parts", [
    ("max-parts=2", ["1", "2"], "2", "true", "2"),
    ("max-parts=2&part-number-marker=2", ["3", "4"], "4", "true", "2"),
    ("max-parts=2&part-number-marker=3", ["4", "5"], "5", "false", "2"),
    ("part-number-marker=4", ["5"], "5", "false", "1000"),
    ("part-number-marker=5", [], None, "false", "1000"),
    ("max-parts=5", ["1", "2", "3", "4", "5"], "5", "false", "5"),
    ("max-parts=4", ["1", "2", "3", "4"], "4", "true", "4"),
    ("max-parts=5000", ["1", "2", "3", "4", "5"], "5", "false", "1000"),
    ("max-parts=", ["1", "2", "3", "4", "5"], "5", "false", "1000"),
    ("max-parts=123456789", ["1", "2", "3", "4", "5"], "5", "false", "1000"),
])
def test_list_parts_pages_by_marker_and_max_parts(query: str, numbers: list[str],
                                                  next_marker: str | None, truncated: str,
                                                  max_parts: str) -> None:
    listing = tuple(part(n, MD5[0], 10) for n in (5, 3, 1, 4, 2))
    root = xml(s3().render(plain("GET", f"/s3/bkt/k?uploadId=U&{query}"),
                           c.Report(OWNER_ONE, "s3part:U:"), c.Outcome(listing=listing)))
    assert [e.findtext("s3:PartNumber", namespaces=NS) for e in root.findall("s3:Part", NS)] == numbers
    marker = re.search(r"part-number-marker=(\d+)", query)
    assert found(root, "s3:PartNumberMarker") == (marker.group(1) if marker else "0")
    assert found(root, "s3:NextPartNumberMarker") == next_marker
    assert (found(root, "s3:IsTruncated"), found(root, "s3:MaxParts")) == (truncated, max_parts)


def test_list_parts_of_many_parts_stops_at_1000() -> None:
    listing = tuple(part(n, MD5[0], 10) for n in range(1, 1003))
    root = xml(s3().render(plain("GET", "/s3/bkt/k?uploadId=U"), c.Report(OWNER_ONE, "s3part:U:"),
                           c.Outcome(listing=listing)))
    assert len(root.findall("s3:Part", NS)) == 1000
    assert (found(root, "s3:NextPartNumberMarker"), found(root, "s3:IsTruncated")) == ("1000", "true")


@pytest.mark.parametrize("query", ["max-parts=abc", "max-parts=-1", "part-number-marker=1.5",
                                   "max-parts=1234567890", "max-uploads=%C2%B2", "max-uploads=x"])
def test_an_unreadable_paging_parameter_is_invalid_argument(query: str) -> None:
    for target in (f"/s3/bkt/k?uploadId=U&{query}", f"/s3/bkt?uploads&{query}"):
        error = refused(s3().parse(signed("GET", target), ""))
        assert (error.code, error.status) == ("InvalidArgument", 400)
        assert error.message == f"{query.partition('=')[0]} must be a non-negative integer"


def test_list_parts_of_an_upload_no_longer_in_progress_is_no_such_upload() -> None:
    request = plain("GET", "/s3/bkt/k?uploadId=U")
    error = ShimError("not-found", "the upload was completed or aborted", 404)
    reply = s3().render(request, c.Report(OWNER_ONE, "s3part:U:", within="U"), c.Outcome(error=error))
    document = error_of(reply)
    assert reply.status == 404
    assert (document["Code"], document["Message"], document["UploadId"]) == (
        "NoSuchUpload", "the upload was completed or aborted", "U")


# --- CompleteMultipartUpload --------------------------------------------------------------------


def test_complete_asks_for_its_body_first() -> None:
    command = s3().parse(signed("POST", "/s3/bkt/k?uploadId=U"), "")
    assert command == c.NeedBody(documents.COMPLETE_BODY_LIMIT)


def test_complete_assembles_the_listed_parts_in_order() -> None:
    body = complete_body([(1, f'"{MD5[0]}"'), (2, MD5[1]), (5, f' "{MD5[2]}" ')])
    request = replace(signed("POST", "/s3/bkt/k?uploadId=U-1", body=body), body=body)
    command = s3().parse(request, "")
    etag = hashlib.md5(b"".join(bytes.fromhex(m) for m in MD5)).hexdigest() + "-3"
    assert command == c.Assemble("U-1", OWNER_ONE, (("s3part:U-1:00001", MD5[0]),
                                                    ("s3part:U-1:00002", MD5[1]),
                                                    ("s3part:U-1:00005", MD5[2])),
                                 7, "s3part:U-1:", key=f"s3obj:{OWNER_ONE}:bkt/k",
                                 facts={"etag": etag})


@pytest.mark.parametrize("length", [None, documents.COMPLETE_BODY_LIMIT + 1])
def test_a_part_list_of_unknown_or_excessive_size_is_refused_before_it_is_read(
        length: int | None) -> None:
    error = refused(s3().parse(signed("POST", "/s3/bkt/k?uploadId=U", length=length), ""))
    assert (error.code, error.status) == ("MaxMessageLengthExceeded", 400)
    assert error.message == ("the part list needs a Content-Length of at most "
                             f"{documents.COMPLETE_BODY_LIMIT} bytes")
    assert s3().parse(signed("POST", "/s3/bkt/k?uploadId=U", length=documents.COMPLETE_BODY_LIMIT),
                      "") == c.NeedBody(documents.COMPLETE_BODY_LIMIT)


@pytest.mark.parametrize("etag", ['"not-hex"', "abc", "0" * 31, "0" * 33, '"' + "g" * 32 + '"',
                                  MD5[0] + "-2"])
def test_a_listed_etag_that_is_no_md5_is_invalid_part(etag: str) -> None:
    body = complete_body([(1, MD5[0]), (2, etag)])
    error = refused(s3(auth="none").parse(replace(plain("POST", "/s3/bkt/k?uploadId=U"), body=body),
                                          ""))
    assert (error.code, error.status, error.message) == (
        "InvalidPart", 400, "One or more of the specified parts could not be found. The part may "
        "not have been uploaded, or the specified entity tag may not match the part's entity tag.")


def test_listed_etags_are_read_in_lower_case() -> None:
    body = complete_body([(1, f'"{MD5[0].upper()}"')])
    command = _assembled(replace(plain("POST", "/s3/bkt/k?uploadId=U"), body=body))
    assert command.parts == (("s3part:U:00001", MD5[0]),)
    assert command.facts == {"etag": hashlib.md5(bytes.fromhex(MD5[0])).hexdigest() + "-1"}


@pytest.mark.parametrize("numbers", [[2, 1], [1, 1], [1, 3, 2]])
def test_parts_out_of_order_are_invalid_part_order(numbers: list[int]) -> None:
    body = complete_body([(n, MD5[0]) for n in numbers], namespace=False)
    request = replace(plain("POST", "/s3/bkt/k?uploadId=U"), body=body)
    error = refused(s3(auth="none").parse(request, ""))
    assert (error.code, error.status) == ("InvalidPartOrder", 400)
    assert error.message == ("The list of parts was not in ascending order. Parts must be ordered "
                             "by part number.")
    document = error_of(s3().render(request, c.Refuse(error), c.Outcome(error=error)))
    assert (document["Code"], document["UploadId"]) == ("InvalidPartOrder", "U")


@pytest.mark.parametrize("body", [b"", b"not xml", b"<CompleteMultipartUpload/>",
                                  b"<Other><Part/></Other>"])
def test_a_part_list_that_is_not_one_is_malformed_xml(body: bytes) -> None:
    request = replace(plain("POST", "/s3/bkt/k?uploadId=U"), body=body)
    error = refused(s3(auth="none").parse(request, ""))
    reply = s3().render(request, c.Refuse(error), c.Outcome(error=error))
    assert (reply.status, error_of(reply)["Code"]) == (400, "MalformedXML")


def _assembled(request: Request) -> c.Assemble:
    command = s3(auth="none").parse(request, "")
    assert isinstance(command, c.Assemble), command
    return command


def complete_request(etags: Sequence[str] = MD5) -> Request:
    body = complete_body(list(enumerate(etags, 1)))
    return replace(plain("POST", "/s3/bkt/dir/a%20b.bin?uploadId=U"), body=body)


def test_a_delivered_multipart_upload_answers_location_and_multipart_etag() -> None:
    request = complete_request([f'"{MD5[0]}"', MD5[1], MD5[2]])
    command = _assembled(request)
    upload = Upload("U", "s3", OWNER_ONE, 16, 16)
    reply = s3().render(request, command, c.Outcome(upload=upload, delivery=Delivery(accepted())))
    root = xml(reply)
    assert reply.status == 200 and header(reply, "Shim-Upstream-Status") == "201"
    assert root.tag == f"{{{documents.NAMESPACE}}}CompleteMultipartUploadResult"
    expected = hashlib.md5(b"".join(bytes.fromhex(m) for m in MD5)).hexdigest() + "-3"
    assert [found(root, f"s3:{name}") for name in ("Location", "Bucket", "Key", "ETag")] == [
        f"{ORIGIN}/s3/bkt/dir/a%20b.bin", "bkt", "dir/a b.bin", f'"{expected}"']


def test_a_retried_complete_answers_from_the_recorded_answer() -> None:
    request = complete_request()
    upload = Upload("U", "s3", OWNER_ONE, 16, 16, answer=accepted(204))
    reply = s3().render(request, _assembled(request), c.Outcome(upload=upload))
    assert reply.status == 200 and header(reply, "Shim-Upstream-Status") == "204"
    assert found(xml(reply), "s3:Bucket") == "bkt"


@pytest.mark.parametrize("status", [300, 400, 422, 500])
def test_a_file_the_legacy_server_refused_is_an_error_with_its_status(status: int) -> None:
    request = complete_request()
    answer = Answer(status, "Nope", (), b"\xffno thanks " + b"x" * 2000)
    reply = s3().render(request, _assembled(request),
                        c.Outcome(upload=Upload("U", "s3", OWNER_ONE, 1, 1),
                                  delivery=Delivery(answer)))
    document = error_of(reply)
    assert reply.status == status and header(reply, "Shim-Upstream-Status") == str(status)
    assert (document["Code"], document["UploadId"]) == ("LegacyServerRefused", "U")
    assert document["Message"] == (f"the legacy server answered {status} Nope: \ufffdno thanks "
                                   + "x" * 1013)


@pytest.mark.parametrize("delivery, retry_after, message", [
    (Delivery(None, "the legacy server is down", "pending", 7), "7",
     "the upload is complete but not delivered: the legacy server is down"),
    (Delivery(None, "busy", "pending", 0), "1", "the upload is complete but not delivered: busy"),
    (None, "1", "the file is not complete"),
])
def test_a_file_without_the_legacy_servers_word_yet_is_503_retry_after(
        delivery: Delivery | None, retry_after: str, message: str) -> None:
    for request in (complete_request(), plain("PUT", "/s3/bkt/k", length=3)):
        command: c.Command | None = _assembled(request) if request.body else \
            s3(auth="none").parse(request, "")
        assert command is not None
        reply = s3().render(request, command, c.Outcome(
            upload=Upload("U", "s3", OWNER_ONE, 3, 3), delivery=delivery))
        document = error_of(reply)
        assert reply.status == 503 and header(reply, "Retry-After") == retry_after
        assert (document["Code"], document["Message"]) == ("ServiceUnavailable", message)
        assert header(reply, "Shim-Upstream-Status") is None
    reply = s3().render(complete_request(), _assembled(complete_request()), c.Outcome())
    assert (reply.status, error_of(reply)["Message"]) == (503, "the file is not complete")


@pytest.mark.parametrize("delivery, status, code, retry_after", [
    (Delivery(None, "the legacy server went away", "failed"), 502, "DeliveryFailed", None),
    (Delivery(None, "gone", ""), 502, "DeliveryFailed", None),
    (Delivery(None, "the answer is not stored yet", "unrecorded", 5), 507, "ServiceUnavailable", "5"),
    (Delivery(None, "the file is not what was announced", "digest-mismatch"), 400, "BadDigest", None),
])
def test_a_file_that_will_not_be_delivered_says_so(delivery: Delivery, status: int, code: str,
                                                   retry_after: str | None) -> None:
    for request in (complete_request(), plain("PUT", "/s3/bkt/k", length=3)):
        command: c.Command | None = _assembled(request) if request.body else \
            s3(auth="none").parse(request, "")
        assert command is not None
        reply = s3().render(request, command, c.Outcome(upload=Upload("U", "s3", OWNER_ONE, 3, 3),
                                                        delivery=delivery))
        document = error_of(reply)
        assert (reply.status, document["Code"], header(reply, "Retry-After")) == (
            status, code, retry_after)
        assert document["Message"] == f"the upload is complete but not delivered: {delivery.problem}"


def test_a_complete_refused_by_the_engine_is_its_s3_error() -> None:
    request = complete_request()
    error = ShimError("too-small", "part 1 of the list has 3 bytes", 400, {"part": "s3part:U:1"})
    reply = s3().render(request, _assembled(request), c.Outcome(error=error))
    document = error_of(reply)
    assert reply.status == 400
    assert (document["Code"], document["Message"], document["UploadId"]) == (
        "EntityTooSmall", "part 1 of the list has 3 bytes", "U")
    assert header(reply, "part") is None


# --- AbortMultipartUpload -----------------------------------------------------------------------


def test_abort_cancels_the_upload_and_its_parts() -> None:
    request = signed("DELETE", "/s3/bkt/k?uploadId=U-1")
    command = s3().parse(request, "")
    assert command == c.Cancel("U-1", OWNER_ONE, family="s3part:U-1:")
    assert s3().render(request, command, c.Outcome()) == Reply(204)
    error = ShimError("gone", "the upload was terminated or has expired", 410)
    reply = s3().render(request, command, c.Outcome(error=error))
    assert (reply.status, error_of(reply)["Code"], error_of(reply)["UploadId"]) == (
        404, "NoSuchUpload", "U-1")


# --- ListMultipartUploads -----------------------------------------------------------------------


def test_list_uploads_reports_the_owners_uploads_in_the_bucket_under_the_prefix() -> None:
    assert s3().parse(signed("GET", "/s3/bkt?uploads"), "") == c.Report(OWNER_ONE, f"s3up:{OWNER_ONE}:bkt/")
    assert s3().parse(signed("GET", "/s3/bkt?uploads&prefix=dir%2Fa"), "") == c.Report(
        OWNER_ONE, f"s3up:{OWNER_ONE}:bkt/dir/a")
    for prefix in ("a ", "aX", "a\t"):
        command = s3().parse(signed("GET", f"/s3/bkt?uploads&prefix={quote(prefix)}"), "")
        assert command == c.Report(OWNER_ONE, f"s3up:{OWNER_ONE}:bkt/{prefix}")


UPLOADS = (multipart("b/two", "Z2", created=NOW + 1), multipart("a", "Y1"),
           multipart("b/two", "A9"), multipart("c", "C1"),
           multipart("assembled", "D1", parts=("p1",)))


def uploads_page(query: str = "", listing: tuple[tuple[str, Upload], ...] = UPLOADS
                 ) -> ET.Element:
    request = plain("GET", f"/s3/bkt?uploads{'&' + query if query else ''}")
    return xml(s3().render(request, c.Report(OWNER_ONE, "x"), c.Outcome(listing=listing)))


def listed(root: ET.Element) -> list[tuple[str | None, str | None]]:
    return [(found(e, "s3:Key"), found(e, "s3:UploadId")) for e in root.findall("s3:Upload", NS)]


def test_list_uploads_lists_uploads_in_progress_by_key_then_id() -> None:
    root = uploads_page()
    assert root.tag == f"{{{documents.NAMESPACE}}}ListMultipartUploadsResult"
    assert listed(root) == [("a", "Y1"), ("b/two", "A9"), ("b/two", "Z2"), ("c", "C1")]
    first = root.findall("s3:Upload", NS)[0]
    assert found(first, "s3:Initiated") == documents.timestamp(NOW)
    assert found(first, "s3:Owner/s3:ID") == OWNER_ONE
    assert found(root.findall("s3:Upload", NS)[2], "s3:Initiated") == documents.timestamp(NOW + 1)
    assert [found(root, f"s3:{name}") for name in (
        "Bucket", "KeyMarker", "UploadIdMarker", "Prefix", "MaxUploads", "IsTruncated")] == [
        "bkt", "", "", "", "1000", "false"]
    assert found(root, "s3:NextKeyMarker") is None and found(root, "s3:NextUploadIdMarker") is None
    assert found(root, "s3:EncodingType") is None


def test_list_uploads_pages_with_both_markers() -> None:
    first = uploads_page("max-uploads=2")
    assert listed(first) == [("a", "Y1"), ("b/two", "A9")]
    assert (found(first, "s3:IsTruncated"), found(first, "s3:MaxUploads")) == ("true", "2")
    assert (found(first, "s3:NextKeyMarker"), found(first, "s3:NextUploadIdMarker")) == ("b/two", "A9")
    second = uploads_page("max-uploads=2&key-marker=b%2Ftwo&upload-id-marker=A9")
    assert listed(second) == [("b/two", "Z2"), ("c", "C1")]
    assert (found(second, "s3:KeyMarker"), found(second, "s3:UploadIdMarker")) == ("b/two", "A9")
    assert found(second, "s3:IsTruncated") == "false"
    assert found(second, "s3:NextKeyMarker") is None
    exact = uploads_page("max-uploads=4")
    assert len(listed(exact)) == 4 and found(exact, "s3:IsTruncated") == "false"
    assert found(uploads_page("max-uploads=5000"), "s3:MaxUploads") == "1000"


def test_list_uploads_of_many_stops_at_1000() -> None:
    listing = tuple(multipart(f"k{n:04d}", "U") for n in range(1001))
    root = uploads_page("", listing)
    assert len(listed(root)) == 1000 and found(root, "s3:IsTruncated") == "true"
    assert found(root, "s3:NextKeyMarker") == "k0999"


def test_list_uploads_with_an_upload_id_marker_and_no_key_marker_lists_all() -> None:
    assert listed(uploads_page("upload-id-marker=ZZ")) == listed(uploads_page())


def test_a_key_marker_alone_lists_only_keys_after_it() -> None:
    """Amazon S3 API Reference, ListMultipartUploads, key-marker and upload-id-marker."""
    assert listed(uploads_page("key-marker=b%2Ftwo")) == [("c", "C1")]
    assert listed(uploads_page("key-marker=b%2Ftwo&upload-id-marker=A0")) == [
        ("b/two", "A9"), ("b/two", "Z2"), ("c", "C1")]
    assert listed(uploads_page("key-marker=b")) == [("b/two", "A9"), ("b/two", "Z2"), ("c", "C1")]


def test_list_uploads_spells_keys_url_encoded_when_asked() -> None:
    listing = (multipart("dir/a b+ü", "U1"), multipart("dir/a z", "U2"), multipart("dir/z", "U3"))
    root = uploads_page("encoding-type=url&prefix=dir%2Fa%20&key-marker=dir%2Fa&max-uploads=1",
                        listing)
    assert found(root, "s3:EncodingType") == "url"
    assert listed(root) == [("dir/a%20b%2B%C3%BC", "U1")]
    assert (found(root, "s3:Prefix"), found(root, "s3:KeyMarker")) == ("dir/a%20", "dir/a")
    assert found(root, "s3:NextKeyMarker") == "dir/a%20b%2B%C3%BC"
    plain_root = uploads_page("prefix=dir%2Fa%20&max-uploads=1", listing)
    assert listed(plain_root) == [("dir/a b+ü", "U1")]
    assert found(plain_root, "s3:Prefix") == "dir/a "
    assert found(plain_root, "s3:NextKeyMarker") == "dir/a b+ü"
    assert found(uploads_page("encoding-type=other", listing), "s3:EncodingType") is None


def test_list_uploads_lists_only_keys_under_the_prefix() -> None:
    """A prefix ending in the character that separates a key from its upload id in the
    store's names still lists only the keys that start with it."""
    listing = (multipart("a", "U1"), multipart("ab", "U2"), multipart("a\nb", "U3"))
    assert listed(uploads_page("prefix=a%0A", listing)) == [("a\nb", "U3")]
    assert [key for key, _ in listed(uploads_page("prefix=a", listing))] == ["a", "a\nb", "ab"]


def test_render_still_refuses_an_unreadable_max_uploads() -> None:
    with pytest.raises(ShimError) as raised:
        uploads_page("max-uploads=-2")
    assert (raised.value.code, raised.value.message) == (
        "InvalidArgument", "max-uploads must be a non-negative integer")


# --- PutObject ----------------------------------------------------------------------------------


def test_put_object_opens_a_whole_upload_with_its_body() -> None:
    body = b"the whole object"
    request = signed("PUT", "/s3/bkt/dir/o.txt", ("Content-Type", "text/plain"),
                     ("x-amz-meta-k", "v"), body=body)
    command = opened(s3().parse(request, ""))
    new = command.new
    assert (new.protocol, new.owner, new.length) == ("s3", OWNER_ONE, len(body))
    assert new.metadata == {"bucket": "bkt", "key": "dir/o.txt", "family": f"s3part:{new.id}:"}
    assert (new.max_size, new.expiration, new.exclusive_parts) == (123_456, 3600, True)
    assert (command.with_body, command.key, command.within) == (
        True, f"s3obj:{OWNER_ONE}:bkt/dir/o.txt", None)
    assert new.target is not None
    assert (new.target.path, new.target.filename, new.target.content_type) == (
        "/in/bkt/dir/o.txt", "o.txt", "text/plain")
    assert new.target.headers == (("x-amz-meta-k", "v"), ("Authorization", "Bearer legacy-one"),
                                  ("X-Tenant", "one"))
    assert isinstance(new.id, str) and len(new.id) >= 20
    assert isinstance(command.body_filter, p.S3Body)
    assert command.body_filter.feed(body) == body
    assert command.body_filter.end() == {"etag": hashlib.md5(body).hexdigest()}


def test_a_delivered_object_answers_its_etag_and_the_legacy_status() -> None:
    request = signed("PUT", "/s3/bkt/o", body=b"first")
    command = opened(s3().parse(request, ""))
    upload = Upload("O", "s3", OWNER_ONE, 5, 5, metadata={"etag": MD5[0]})
    reply = s3().render(request, command, c.Outcome(upload=upload, delivery=Delivery(accepted(200))))
    assert reply == Reply(200, (("ETag", f'"{MD5[0]}"'), ("Shim-Upstream-Status", "200")))
    refused_reply = s3().render(request, command, c.Outcome(
        upload=upload, delivery=Delivery(Answer(413, "Too Big", (), b"no"))))
    document = error_of(refused_reply)
    assert refused_reply.status == 413 and "UploadId" not in document
    assert document["Message"] == "the legacy server answered 413 Too Big: no"
    assert ("Shim-Upstream-Status", "413") in refused_reply.headers


def test_render_without_what_it_needs_is_an_internal_error() -> None:
    for request in (plain("POST", "/s3/bkt/k?uploads"), plain("PUT", "/s3/bkt/k?partNumber=1&uploadId=U")):
        reply = s3().render(request, c.NeedBody(1), c.Outcome())
        document = error_of(reply)
        assert (reply.status, document["Code"], document["Message"]) == (
            500, "InternalError", "no answer for this request")


# --- HeadObject, HeadBucket, CreateBucket --------------------------------------------------------


def test_head_object_looks_up_the_owners_object_without_settling_it() -> None:
    command = s3().parse(signed("HEAD", "/s3/bkt/dir/a%20b.txt"), "")
    assert command == c.Inspect(None, OWNER_ONE, key=f"s3obj:{OWNER_ONE}:bkt/dir/a b.txt",
                                settle=False)
    other = s3().parse(signed("HEAD", "/s3/bkt/dir/a%20b.txt", key=TWO, secret=SECRET_TWO), "")
    assert isinstance(other, c.Inspect) and other.key == f"s3obj:{OWNER_TWO}:bkt/dir/a b.txt"


def _delivered_object(state: State = State.DELIVERED, content_type: str | None = "text/plain",
                      target: bool = True) -> Upload:
    headers = (("x-amz-meta-who", "me"), ("Authorization", "Bearer legacy-one"),
               ("X-Amz-Meta-Case", "Kept"))
    return Upload("O", "s3", OWNER_ONE, 16, 16, metadata={"etag": MD5[0]},
                  target=Target("PUT", "/in/bkt/k", headers, content_type=content_type)
                  if target else None, updated=1795444704.25, state=state)


def test_head_object_describes_a_delivered_object() -> None:
    request = plain("HEAD", "/s3/bkt/k")
    command = c.Inspect(None, OWNER_ONE, key="s3obj:x", settle=False)
    reply = s3().render(request, command, c.Outcome(upload=_delivered_object()))
    assert reply == Reply(200, (("Content-Length", "16"), ("ETag", f'"{MD5[0]}"'),
                                ("Last-Modified", "Mon, 23 Nov 2026 14:38:24 GMT"),
                                ("x-amz-meta-who", "me"), ("X-Amz-Meta-Case", "Kept"),
                                ("Content-Type", "text/plain")))
    untyped = s3().render(request, command, c.Outcome(upload=_delivered_object(content_type=None)))
    assert header(untyped, "Content-Type") is None and untyped.status == 200


def test_head_object_of_an_empty_object_is_zero_long() -> None:
    empty = replace(_delivered_object(), length=0, offset=0)
    reply = s3().render(plain("HEAD", "/s3/bkt/k"), c.Inspect(None, OWNER_ONE, settle=False),
                        c.Outcome(upload=empty))
    assert (reply.status, header(reply, "Content-Length")) == (200, "0")


@pytest.mark.parametrize("outcome", [
    c.Outcome(),
    c.Outcome(upload=_delivered_object(State.RECEIVING)),
    c.Outcome(upload=_delivered_object(State.REFUSED)),
    c.Outcome(upload=_delivered_object(target=False)),
    c.Outcome(error=ShimError("not-found", "no such upload", 404)),
    c.Outcome(error=ShimError("gone", "expired", 410)),
])
def test_head_object_of_anything_else_is_404_without_a_body(outcome: c.Outcome) -> None:
    reply = s3().render(plain("HEAD", "/s3/bkt/k"), c.Inspect(None, OWNER_ONE, settle=False), outcome)
    assert reply == Reply(404, (("x-amz-error-code", "NoSuchKey"),))


def test_head_object_refused_otherwise_is_an_error() -> None:
    reply = s3().render(plain("HEAD", "/s3/bkt/k"), c.Inspect(None, OWNER_ONE, settle=False),
                        c.Outcome(error=ShimError("locked", "busy", 423)))
    assert (reply.status, error_of(reply)["Code"]) == (409, "OperationAborted")


def test_any_bucket_exists_and_can_be_created() -> None:
    head = signed("HEAD", "/s3/photos")
    command = s3().parse(head, "")
    assert command == c.Immediate(Reply(200))
    assert s3().render(head, command, c.Outcome()) == Reply(200)
    create = signed("PUT", "/s3/photos/", body=b"<CreateBucketConfiguration/>")
    command = s3().parse(create, "")
    assert command == c.Immediate(Reply(200, (("Location", "/photos"),)))
    assert s3().render(create, command, c.Outcome()) == Reply(200, (("Location", "/photos"),))
    assert refused(s3().parse(plain("HEAD", "/s3/photos"), "")).code == "AccessDenied"
    for bad in ("/s3/a..b/", "/s3/a%2Fb", "/s3/-x"):  # the rules PutObject applies, too
        assert refused(s3().parse(signed("PUT", bad), "")).code == "InvalidBucketName"


# --- what is not implemented --------------------------------------------------------------------


@pytest.mark.parametrize("method, target", [
    ("GET", "/s3/bkt/k"), ("DELETE", "/s3/bkt/k"), ("POST", "/s3/bkt/k"), ("GET", "/s3/bkt"),
    ("PUT", "/s3/bkt?acl"), ("DELETE", "/s3/bkt"), ("PUT", "/s3/bkt/k?tagging"),
    ("HEAD", "/s3/bkt/k?uploadId=U"), ("PUT", "/s3/bkt/k?uploadId=U"), ("HEAD", "/s3/bkt/k?versionId=1"),
])
def test_other_s3_operations_are_not_implemented(method: str, target: str) -> None:
    request = signed(method, target)
    error = refused(s3().parse(request, ""))
    assert (error.code, error.status) == ("NotImplemented", 501)
    assert error.message.endswith(" is not something this S3 endpoint does; it takes multipart "
                                  "uploads and PutObject")
    reply = s3().render(request, c.Refuse(error), c.Outcome(error=error))
    assert (reply.status, error_of(reply)["Code"]) == (501, "NotImplemented")


def test_a_not_implemented_operation_must_still_be_signed() -> None:
    assert refused(s3().parse(plain("GET", "/s3/bkt/k"), "")).code == "AccessDenied"


# --- the engine's refusals as S3 errors ---------------------------------------------------------


@pytest.mark.parametrize("code, status, s3_code, s3_status", [
    *[(code, 499, s3_code, s3_status) for code, (s3_code, s3_status) in p._ENGINE_CODES.items()],
    ("gap", 409, "InvalidRequest", 409),
    ("forbidden", 403, "InvalidRequest", 403),
    ("EntityTooSmall", 400, "EntityTooSmall", 400),
    ("AccessDenied", 403, "AccessDenied", 403),
])
def test_engine_errors_map_to_s3_codes(code: str, status: int, s3_code: str, s3_status: int) -> None:
    request = plain("PUT", "/s3/bkt/k?partNumber=1&uploadId=U")
    error = ShimError(code, "what happened", status)
    cases: list[tuple[c.Command, c.Outcome]] = [
        (c.Refuse(error), c.Outcome()),
        (c.Open(NewUpload("n", "s3", "", 1, {}, None)), c.Outcome(error=error))]
    for command, outcome in cases:
        reply = s3().render(request, command, outcome)
        document = error_of(reply)
        assert (reply.status, document["Code"]) == (s3_status, s3_code)
        assert (document["Message"], document["UploadId"]) == ("what happened", "U")


def test_the_engine_codes_are_s3s() -> None:
    assert p._ENGINE_CODES == {
        "not-found": ("NoSuchUpload", 404), "gone": ("NoSuchUpload", 404),
        "invalid-part": ("InvalidPart", 400), "too-small": ("EntityTooSmall", 400),
        "too-large": ("EntityTooLarge", 400), "too-many-uploads": ("SlowDown", 503),
        "insufficient-storage": ("ServiceUnavailable", 503), "locked": ("OperationAborted", 409),
        "completed": ("InvalidRequest", 400), "bad-request": ("InvalidRequest", 400)}


def test_not_found_without_an_upload_id_is_no_such_key() -> None:
    reply = s3().render(plain("PUT", "/s3/bkt/k"), c.Open(NewUpload("n", "s3", "", 1, {}, None)),
                        c.Outcome(error=ShimError("not-found", "no such upload", 404)))
    document = error_of(reply)
    assert (reply.status, document["Code"], document["Resource"]) == (404, "NoSuchKey", "/s3/bkt/k")
    assert "UploadId" not in document


def test_an_errors_response_fields_are_sent_and_request_ids_differ() -> None:
    error = ShimError("insufficient-storage", "disk full", 507, {"Retry-After": 30, "quiet": 1})
    request = plain("POST", "/s3/bkt/k?uploads")
    replies = [s3().render(request, c.Refuse(error), c.Outcome()) for _ in range(2)]
    assert replies[0].status == 503
    assert replies[0].headers == (("Content-Type", "application/xml"), ("Retry-After", "30"))
    assert error_of(replies[0])["RequestId"] != error_of(replies[1])["RequestId"]
    assert list(error_of(replies[0])) == ["Code", "Message", "Resource", "RequestId"]


def test_a_cap_on_uploads_in_progress_is_slow_down() -> None:
    reply = s3().render(plain("POST", "/s3/bkt/k?uploads"), c.Refuse(too_many("too many", 60)),
                        c.Outcome())
    assert (reply.status, error_of(reply)["Code"], header(reply, "Retry-After")) == (
        503, "SlowDown", "60")


@pytest.mark.parametrize("target, fields, code", [
    ("/s3/bkt/k?partNumber=%C2%B2&uploadId=U", (), "InvalidArgument"),
    ("/s3/bkt/k", (("Content-Encoding", "aws-chunked"), ("x-amz-decoded-content-length", "²")),
     "MissingContentLength"),
])
def test_a_non_ascii_digit_is_refused_not_raised(target: str, fields: tuple[tuple[str, str], ...],
                                                 code: str) -> None:
    assert refused(s3(auth="none").parse(plain("PUT", target, *fields, length=1), "")).code == code

