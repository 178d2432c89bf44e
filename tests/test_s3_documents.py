"""Pure tests of the S3 XML documents (shim/protocols/s3/documents.py).

Documents are read back with the standard library's parser, and with botocore's own response
parser for the matching S3 operation (the SDKs' view of them is what counts); request bodies
come from botocore's serializer where one exists.
"""

from __future__ import annotations

import hashlib
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.exceptions import ClientError
from botocore.loaders import Loader
from botocore.model import ServiceModel
from botocore.parsers import RestXMLParser

from shim.errors import ShimError
from shim.protocols.s3 import documents as d

NS = {"s3": d.NAMESPACE}
WHEN = 1795444704.25  # 2026-11-23T14:38:24.250Z
MODEL = ServiceModel(Loader().load_service_model("s3", "service-2"), "s3")


def parsed(operation: str, body: bytes, status: int = 200) -> dict[str, Any]:
    """What botocore makes of an answer to `operation`."""
    response = {"status_code": status, "headers": {}, "body": body}
    result: dict[str, Any] = RestXMLParser().parse(response,
                                                   MODEL.operation_model(operation).output_shape)
    return result


def root_of(document: bytes) -> ET.Element:
    assert document.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    return ET.fromstring(document)


def text(element: ET.Element, path: str) -> str | None:
    return element.findtext(path, namespaces=NS)


# --- the results -------------------------------------------------------------------------


def test_initiate_result_names_bucket_key_and_upload_id() -> None:
    document = d.initiate_result("photos", "2026/a&b <c>.jpg", "u-1")
    root = root_of(document)
    assert root.tag == f"{{{d.NAMESPACE}}}InitiateMultipartUploadResult"
    assert [text(root, f"s3:{n}") for n in ("Bucket", "Key", "UploadId")] == \
        ["photos", "2026/a&b <c>.jpg", "u-1"]
    result = parsed("CreateMultipartUpload", document)
    assert (result["Bucket"], result["Key"], result["UploadId"]) == ("photos", "2026/a&b <c>.jpg",
                                                                     "u-1")


def test_complete_result_carries_the_quoted_multipart_etag() -> None:
    etag = d.multipart_etag(["0" * 32, "f" * 32])
    document = d.complete_result("http://shim/s3/b/k", "b", "k", etag)
    root = root_of(document)
    assert root.tag == f"{{{d.NAMESPACE}}}CompleteMultipartUploadResult"
    assert text(root, "s3:ETag") == etag and etag.startswith('"') and etag.endswith('-2"')
    result = parsed("CompleteMultipartUpload", document)
    assert (result["Location"], result["Bucket"], result["Key"], result["ETag"]) == (
        "http://shim/s3/b/k", "b", "k", etag)


def test_list_parts_result_lists_each_part_with_s3s_elements() -> None:
    parts = [d.PartInfo(1, '"' + "a" * 32 + '"', 5 * 1024 * 1024, WHEN),
             d.PartInfo(3, '"' + "b" * 32 + '"', 17, WHEN + 1)]
    document = d.list_parts_result("b", "dir/k", "u-9", parts, marker=0, max_parts=2,
                                   next_marker=3, truncated=True, owner_id="owner-1")
    root = root_of(document)
    assert root.tag == f"{{{d.NAMESPACE}}}ListPartsResult"
    assert text(root, "s3:StorageClass") == "STANDARD"
    assert text(root, "s3:Owner/s3:ID") == "owner-1"
    assert text(root, "s3:Initiator/s3:DisplayName") == "owner-1"
    listed = root.findall("s3:Part", NS)
    assert [text(p, "s3:PartNumber") for p in listed] == ["1", "3"]
    assert text(listed[0], "s3:LastModified") == "2026-11-23T14:38:24.250Z"
    result = parsed("ListParts", document)
    assert (result["Bucket"], result["Key"], result["UploadId"]) == ("b", "dir/k", "u-9")
    assert (result["PartNumberMarker"], result["NextPartNumberMarker"], result["MaxParts"],
            result["IsTruncated"]) == (0, 3, 2, True)
    assert [(p["PartNumber"], p["ETag"], p["Size"]) for p in result["Parts"]] == [
        (1, '"' + "a" * 32 + '"', 5 * 1024 * 1024), (3, '"' + "b" * 32 + '"', 17)]
    assert result["Parts"][0]["LastModified"].timestamp() == WHEN
    assert result["Owner"]["ID"] == result["Initiator"]["ID"] == "owner-1"
    assert result["StorageClass"] == "STANDARD"


def test_list_parts_result_without_parts_or_next_marker() -> None:
    document = d.list_parts_result("b", "k", "u", [], marker=7, max_parts=1000, next_marker=None,
                                   truncated=False, owner_id="o")
    root = root_of(document)
    assert root.find("s3:NextPartNumberMarker", NS) is None and not root.findall("s3:Part", NS)
    result = parsed("ListParts", document)
    assert result["IsTruncated"] is False and result["PartNumberMarker"] == 7
    assert "Parts" not in result


def test_list_uploads_result_lists_uploads_and_markers() -> None:
    uploads = [d.UploadInfo("a/1.bin", "u-1", WHEN), d.UploadInfo("a/2 ü.bin", "u-2", WHEN + 60)]
    document = d.list_uploads_result("b", uploads, prefix="a/", key_marker="", upload_id_marker="",
                                     next_key_marker="a/2 ü.bin", next_upload_id_marker="u-2",
                                     max_uploads=2, truncated=True, owner_id="o-1")
    root = root_of(document)
    assert root.tag == f"{{{d.NAMESPACE}}}ListMultipartUploadsResult"
    assert [text(u, "s3:Key") for u in root.findall("s3:Upload", NS)] == ["a/1.bin", "a/2 ü.bin"]
    assert text(root, "s3:Upload/s3:Initiated") == "2026-11-23T14:38:24.250Z"
    result = parsed("ListMultipartUploads", document)
    assert (result["Bucket"], result["Prefix"], result["MaxUploads"], result["IsTruncated"]) == (
        "b", "a/", 2, True)
    assert (result["NextKeyMarker"], result["NextUploadIdMarker"]) == ("a/2 ü.bin", "u-2")
    assert [(u["Key"], u["UploadId"], u["StorageClass"], u["Owner"]["ID"])
            for u in result["Uploads"]] == [("a/1.bin", "u-1", "STANDARD", "o-1"),
                                            ("a/2 ü.bin", "u-2", "STANDARD", "o-1")]
    assert result["Uploads"][1]["Initiated"].timestamp() == WHEN + 60
    assert [(u["Initiator"]["ID"], u["Initiator"]["DisplayName"]) for u in result["Uploads"]] == [
        ("o-1", "o-1"), ("o-1", "o-1")]


def test_list_uploads_result_names_the_url_encoding_it_was_asked_for() -> None:
    document = d.list_uploads_result("b", [d.UploadInfo("a%01b", "u", WHEN)], prefix="a%01",
                                     key_marker="", upload_id_marker="", next_key_marker=None,
                                     next_upload_id_marker=None, max_uploads=1000,
                                     truncated=False, owner_id="o", encoding_type="url")
    assert text(root_of(document), "s3:EncodingType") == "url"
    result = parsed("ListMultipartUploads", document)
    assert (result["EncodingType"], result["Uploads"][0]["Key"]) == ("url", "a%01b")


def test_list_uploads_result_when_nothing_is_in_progress() -> None:
    document = d.list_uploads_result("b", [], prefix="", key_marker="k", upload_id_marker="u",
                                     next_key_marker=None, next_upload_id_marker=None,
                                     max_uploads=1000, truncated=False, owner_id="o")
    root = root_of(document)
    assert root.find("s3:NextKeyMarker", NS) is None
    assert text(root, "s3:KeyMarker") == "k" and text(root, "s3:UploadIdMarker") == "u"
    result = parsed("ListMultipartUploads", document)
    assert result["IsTruncated"] is False and "Uploads" not in result


def test_error_document_has_no_namespace_and_carries_extra_elements() -> None:
    document = d.error_document("NoSuchUpload", "The specified upload does not exist.",
                                "/s3/b/k", "REQ1", {"UploadId": "u-1"})
    root = root_of(document)
    assert root.tag == "Error"
    assert [child.tag for child in root] == ["Code", "Message", "UploadId", "Resource", "RequestId"]
    assert root.findtext("UploadId") == "u-1"
    error = parsed("ListParts", document, status=404)["Error"]
    assert (error["Code"], error["Message"], error["UploadId"]) == (
        "NoSuchUpload", "The specified upload does not exist.", "u-1")


def test_documents_refuse_text_xml_cannot_carry() -> None:
    assert d.xml_safe("ünï/ç & <x>") and not d.xml_safe("a\x01b") and not d.xml_safe("\ufffe")
    with pytest.raises(ValueError, match="Key"):
        d.initiate_result("b", "a\x01b", "u")


# --- the SDK's view: a boto3 client reads the documents as S3's answers ---------------------


def client_answered(status: int, body: bytes) -> Any:
    """A boto3 S3 client whose every request gets (status, body), without any network."""
    client = boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                          aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret",
                          config=Config(s3={"addressing_style": "path"},
                                        retries={"max_attempts": 1, "mode": "standard"}))

    def answer(request: Any, **_: Any) -> AWSResponse:
        return AWSResponse(request.url, status, {"Content-Type": "application/xml"}, _Raw(body))

    client.meta.events.register("before-send.s3", answer)
    return client


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.body


def test_boto3_reads_the_initiate_and_complete_results() -> None:
    created = client_answered(200, d.initiate_result("b", "k", "up-1")).create_multipart_upload(
        Bucket="b", Key="k")
    assert created["UploadId"] == "up-1"
    etag = d.multipart_etag(["1" * 32])
    done = client_answered(200, d.complete_result("http://x/b/k", "b", "k", etag))\
        .complete_multipart_upload(Bucket="b", Key="k", UploadId="up-1",
                                   MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": "x"}]})
    assert done["ETag"] == etag


def test_boto3_raises_the_error_document_as_a_client_error() -> None:
    document = d.error_document("NoSuchUpload", "gone", "/b/k", "R", {"UploadId": "up-1"})
    with pytest.raises(ClientError) as raised:
        client_answered(404, document).list_parts(Bucket="b", Key="k", UploadId="up-1")
    assert raised.value.response["Error"]["Code"] == "NoSuchUpload"
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


# --- CompleteMultipartUpload's request -------------------------------------------------------


def botocore_complete_body(parts: list[dict[str, Any]]) -> bytes:
    """The body boto3 sends for CompleteMultipartUpload."""
    sent: list[bytes] = []
    client = client_answered(200, d.complete_result("l", "b", "k", '"x-1"'))

    def capture(request: Any, **_: Any) -> None:
        sent.append(request.body)

    client.meta.events.register_first("before-send.s3", capture)
    client.complete_multipart_upload(Bucket="b", Key="k", UploadId="u",
                                     MultipartUpload={"Parts": parts})
    return sent[0]


def test_the_part_list_boto3_sends_is_read_in_document_order() -> None:
    body = botocore_complete_body([
        {"PartNumber": 2, "ETag": '"' + "b" * 32 + '"', "ChecksumCRC32": "AAAAAA=="},
        {"PartNumber": 1, "ETag": "a" * 32}])
    assert b'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"' in body
    assert d.parse_complete_request(body) == [(2, '"' + "b" * 32 + '"'), (1, '"' + "a" * 32 + '"')]


@pytest.mark.parametrize("root", [
    "<CompleteMultipartUpload>",
    f'<CompleteMultipartUpload xmlns="{d.NAMESPACE}">',
])
def test_the_part_list_is_read_with_or_without_the_namespace(root: str) -> None:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>{root}'
            "<Part><ETag>&quot;abc&quot;</ETag><PartNumber> 10000 </PartNumber></Part>"
            "<Part><PartNumber>1</PartNumber><ETag>def</ETag><ChecksumSHA256>x</ChecksumSHA256></Part>"
            "</CompleteMultipartUpload>").encode()
    assert d.parse_complete_request(body) == [(10000, '"abc"'), (1, '"def"')]


def part(number: str = "1", etag: str = '"e"', extra: str = "") -> str:
    return f"<Part><PartNumber>{number}</PartNumber><ETag>{etag}</ETag>{extra}</Part>"


def complete(*parts: str, root: str = "CompleteMultipartUpload") -> bytes:
    return f"<{root}>{''.join(parts)}</{root}>".encode()


@pytest.mark.parametrize("body", [
    b"",
    b"not xml",
    b"<CompleteMultipartUpload><Part>",
    complete(part(), root="CompleteMultipartUploadX"),
    f'<CompleteMultipartUpload xmlns="urn:other">{part()}</CompleteMultipartUpload>'.encode(),
    complete(),
    complete("<Part><ETag>e</ETag></Part>"),
    complete("<Part><PartNumber>1</PartNumber></Part>"),
    complete(part(number="0")),
    complete(part(number="10001")),
    complete(part(number="-1")),
    complete(part(number="+1")),
    complete(part(number="1.5")),
    complete(part(number="abc")),
    complete(part(number="")),
    complete(part(number="\u0661")),  # ARABIC-INDIC DIGIT ONE: int() would take it
    complete(part(number="000001")),
    complete(part(etag="")),
    complete(part(etag='"a"b"')),
    complete(part(extra="<PartNumber>2</PartNumber>")),
    complete(part(extra="<Size>5</Size>")),
    complete(part(number="<n>1</n>")),
    complete(part(), "<Other/>"),
    f'<CompleteMultipartUpload xmlns="{d.NAMESPACE}"><Part xmlns=""><PartNumber>1</PartNumber>'
    "<ETag>e</ETag></Part></CompleteMultipartUpload>".encode(),
])
def test_a_malformed_part_list_is_malformed_xml(body: bytes) -> None:
    with pytest.raises(ShimError) as refused:
        d.parse_complete_request(body)
    assert (refused.value.code, refused.value.status) == ("MalformedXML", 400)


MALFORMED = ("The XML you provided was not well-formed or did not validate against our "
             "published schema: ")


@pytest.mark.parametrize(("body", "detail"), [
    (b"x" * (d.COMPLETE_BODY_LIMIT + 1), f"the part list is larger than {d.COMPLETE_BODY_LIMIT} bytes"),
    (b"<a>", "the body is not acceptable XML (no element found: line 1, column 3)"),
    (complete(part(), root="Other"), "the root element is not CompleteMultipartUpload"),
    (complete(), "the part list names no part"),
    (complete(part(), "<Other/>"), "unexpected element Other in the part list"),
    (complete(part(extra="<Size>5</Size>")), "unexpected element Size in a Part"),
    (complete(part(extra="<ETag>f</ETag>")), "a Part has a malformed ETag"),
    (complete(part(number="<n>1</n>")), "a Part has a malformed PartNumber"),
    (complete("<Part><ETag>e</ETag></Part>"), "a Part lacks its PartNumber or its ETag"),
    (complete(part(number="0")), "PartNumber '0' is not an integer from 1 to 10000"),
    (complete(part(etag='abc"')), "ETag 'abc\"' is not an entity tag"),
    (complete(part(etag='"abc')), "ETag '\"abc' is not an entity tag"),
    (complete(part(etag='"')), "ETag '\"' is not an entity tag"),
])
def test_a_malformed_part_list_says_what_is_wrong(body: bytes, detail: str) -> None:
    with pytest.raises(ShimError) as refused:
        d.parse_complete_request(body)
    assert (refused.value.code, refused.value.status) == ("MalformedXML", 400)
    assert refused.value.message == f"{MALFORMED}{detail}."


@pytest.mark.parametrize("body", [
    b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
    b"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>&b;</ETag></Part>"
    b"</CompleteMultipartUpload>",
    b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
    b"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>&e;</ETag></Part>"
    b"</CompleteMultipartUpload>",
    b'<?xml version="1.0"?><!DOCTYPE CompleteMultipartUpload SYSTEM "http://127.0.0.1:9/x.dtd">'
    + complete(part()),
])
def test_dtds_and_entities_are_refused_as_malformed_xml(body: bytes) -> None:
    with pytest.raises(ShimError) as refused:
        d.parse_complete_request(body)
    assert refused.value.code == "MalformedXML"


def test_a_part_list_over_the_limit_is_refused_before_parsing() -> None:
    fits = complete(part()) + b" " * (d.COMPLETE_BODY_LIMIT - len(complete(part())))
    assert d.parse_complete_request(fits) == [(1, '"e"')]
    with pytest.raises(ShimError) as refused:
        d.parse_complete_request(fits + b" ")
    assert refused.value.code == "MalformedXML"


def test_ten_thousand_parts_with_the_longest_checksums_fit_in_the_limit() -> None:
    body = botocore_complete_body([{"PartNumber": n, "ETag": '"' + "0" * 32 + '"',
                                    "ChecksumSHA512": "A" * 86 + "=="}
                                   for n in range(1, 10_001)])
    assert len(body) <= d.COMPLETE_BODY_LIMIT
    assert len(d.parse_complete_request(body)) == 10_000


# --- ETags and timestamps ---------------------------------------------------------------------


def test_etags_are_quoted_md5s_and_the_multipart_rule() -> None:
    first, second = hashlib.md5(b"one").hexdigest(), hashlib.md5(b"two").hexdigest()
    assert d.s3_etag(first) == f'"{first}"'
    expected = hashlib.md5(hashlib.md5(b"one").digest() + hashlib.md5(b"two").digest()).hexdigest()
    assert d.multipart_etag([first, second]) == f'"{expected}-2"'
    assert d.multipart_etag([f'"{first}"', f'"{second}"']) == f'"{expected}-2"'


@pytest.mark.parametrize(("seconds", "written"), [
    (0, "1970-01-01T00:00:00.000Z"),
    (1795444704, "2026-11-23T14:38:24.000Z"),
    (1795444704.9999, "2026-11-23T14:38:24.999Z"),
])
def test_timestamps_are_iso_8601_with_milliseconds(seconds: float, written: str) -> None:
    assert d.timestamp(seconds) == written


def test_timestamps_are_utc_whatever_the_local_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        assert d.timestamp(1795444704) == "2026-11-23T14:38:24.000Z"
    finally:
        monkeypatch.undo()
        time.tzset()
