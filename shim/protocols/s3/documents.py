"""The XML documents of S3's multipart upload API, built and read with the standard library.

Amazon S3 API Reference, API version 2006-03-01: the response syntax of
CreateMultipartUpload (InitiateMultipartUploadResult), CompleteMultipartUpload (its request,
CompleteMultipartUpload, and its result), ListParts (ListPartsResult), ListMultipartUploads
(ListMultipartUploadsResult), and "Error responses" (Error, which S3 sends without a
namespace). Results carry S3's namespace; element order is S3's. Requests are parsed with
defusedxml: no DTD, no entity, no external reference is ever read.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import defusedxml.ElementTree as safe_xml
from defusedxml import DefusedXmlException

from shim.errors import ShimError

NAMESPACE: Final = "http://s3.amazonaws.com/doc/2006-03-01/"
COMPLETE_BODY_LIMIT: Final = 4 * 1024 * 1024
"""The largest CompleteMultipartUpload body read. 10,000 parts as botocore writes them take
about 90 bytes each, 170 with a SHA-256 checksum, 225 with a SHA-512 one (2.3 MB): 1 MiB would
refuse a legitimate list."""
MAX_PART_NUMBER: Final = 10_000
STORAGE_CLASS: Final = "STANDARD"
_DECLARATION: Final = b'<?xml version="1.0" encoding="UTF-8"?>\n'

# XML 1.0 section 2.2, "Char": what a document may carry at all, escaped or not.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_DIGITS = re.compile(r"[0-9]{1,5}")
_PART_MEMBERS: Final = frozenset({"PartNumber", "ETag"})


@dataclass(frozen=True)
class PartInfo:
    """One part in a ListParts answer."""

    number: int
    etag: str
    """Quoted, as S3 shows it: '"<md5 hex>"'."""
    size: int
    last_modified: float
    """Seconds since the epoch."""


@dataclass(frozen=True)
class UploadInfo:
    """One multipart upload in progress, in a ListMultipartUploads answer."""

    key: str
    upload_id: str
    initiated: float
    """Seconds since the epoch."""


def initiate_result(bucket: str, key: str, upload_id: str) -> bytes:
    """CreateMultipartUpload's answer: InitiateMultipartUploadResult."""
    root = _result("InitiateMultipartUploadResult")
    _children(root, [("Bucket", bucket), ("Key", key), ("UploadId", upload_id)])
    return _document(root)


def complete_result(location: str, bucket: str, key: str, etag: str) -> bytes:
    """CompleteMultipartUpload's answer: CompleteMultipartUploadResult. `etag` comes quoted
    (`multipart_etag`)."""
    root = _result("CompleteMultipartUploadResult")
    _children(root, [("Location", location), ("Bucket", bucket), ("Key", key), ("ETag", etag)])
    return _document(root)


def list_parts_result(bucket: str, key: str, upload_id: str, parts: Sequence[PartInfo], *,
                      marker: int, max_parts: int, next_marker: int | None, truncated: bool,
                      owner_id: str) -> bytes:
    """ListParts's answer: ListPartsResult, parts in the order given (ascending numbers)."""
    root = _result("ListPartsResult")
    _children(root, [("Bucket", bucket), ("Key", key), ("UploadId", upload_id)])
    _person(root, "Initiator", owner_id)
    _person(root, "Owner", owner_id)
    _children(root, [("StorageClass", STORAGE_CLASS), ("PartNumberMarker", str(marker))])
    if next_marker is not None:
        _children(root, [("NextPartNumberMarker", str(next_marker))])
    _children(root, [("MaxParts", str(max_parts)), ("IsTruncated", _boolean(truncated))])
    for part in parts:
        element = ET.SubElement(root, "Part")
        _children(element, [("PartNumber", str(part.number)),
                            ("LastModified", timestamp(part.last_modified)),
                            ("ETag", part.etag), ("Size", str(part.size))])
    return _document(root)


def list_uploads_result(bucket: str, uploads: Sequence[UploadInfo], *, prefix: str,
                        key_marker: str, upload_id_marker: str, next_key_marker: str | None,
                        next_upload_id_marker: str | None, max_uploads: int, truncated: bool,
                        owner_id: str, encoding_type: str | None = None) -> bytes:
    """ListMultipartUploads's answer: ListMultipartUploadsResult. `prefix`, the markers and
    every key are written as given: when the client asked for `encoding-type=url` the caller
    URL-encodes them and passes `encoding_type="url"`, which the answer names (EncodingType)
    so that the client decodes them."""
    root = _result("ListMultipartUploadsResult")
    _children(root, [("Bucket", bucket), ("KeyMarker", key_marker),
                     ("UploadIdMarker", upload_id_marker)])
    if next_key_marker is not None:
        _children(root, [("NextKeyMarker", next_key_marker)])
    if next_upload_id_marker is not None:
        _children(root, [("NextUploadIdMarker", next_upload_id_marker)])
    _children(root, [("Prefix", prefix), ("MaxUploads", str(max_uploads)),
                     ("IsTruncated", _boolean(truncated))])
    if encoding_type is not None:
        _children(root, [("EncodingType", encoding_type)])
    for upload in uploads:
        element = ET.SubElement(root, "Upload")
        _children(element, [("Key", upload.key), ("UploadId", upload.upload_id)])
        _person(element, "Initiator", owner_id)
        _person(element, "Owner", owner_id)
        _children(element, [("StorageClass", STORAGE_CLASS),
                            ("Initiated", timestamp(upload.initiated))])
    return _document(root)


def error_document(code: str, message: str, resource: str, request_id: str,
                   extra: Mapping[str, str] | None = None) -> bytes:
    """An S3 error ("Error responses"): Code, Message, then the elements particular to the
    error (UploadId, PartNumber, ETag, ...), Resource and RequestId. No namespace, as S3."""
    root = ET.Element("Error")
    _children(root, [("Code", code), ("Message", message)])
    _children(root, list((extra or {}).items()))
    _children(root, [("Resource", resource), ("RequestId", request_id)])
    return _document(root)


def parse_complete_request(body: bytes) -> list[tuple[int, str]]:
    """CompleteMultipartUpload's request body -> [(PartNumber, '"ETag"')] in document order.

    `<CompleteMultipartUpload [xmlns="http://s3.amazonaws.com/doc/2006-03-01/"]>
    <Part><PartNumber>1</PartNumber><ETag>"..."</ETag>[<ChecksumCRC32>...]</Part>...`
    (botocore writes the namespace; others may not). ETags are returned quoted whether the
    client quoted them or not. Order and duplicates are the caller's to judge (S3 answers
    InvalidPartOrder); anything malformed is MalformedXML (400), as S3 answers it."""
    if len(body) > COMPLETE_BODY_LIMIT:
        raise _malformed(f"the part list is larger than {COMPLETE_BODY_LIMIT} bytes")
    try:
        root = safe_xml.fromstring(body, forbid_dtd=True)
    except (DefusedXmlException, ET.ParseError, ValueError) as exc:
        raise _malformed(f"the body is not acceptable XML ({exc})") from exc
    namespace = _namespace_of(root)
    if _local(root.tag) != "CompleteMultipartUpload" or namespace not in ("", NAMESPACE):
        raise _malformed("the root element is not CompleteMultipartUpload")
    parts = [_part(element, namespace) for element in root]
    if not parts:
        raise _malformed("the part list names no part")
    return parts


def s3_etag(md5_hex: str) -> str:
    """A single-part object's or a part's ETag: its MD5, quoted."""
    return f'"{md5_hex}"'


def multipart_etag(part_md5_hexes: Iterable[str]) -> str:
    """A multipart object's ETag: the MD5 of the parts' binary MD5s, `-` and the number of
    parts, quoted. This is how S3 has always computed it and how the tools (rclone, s3cmd)
    check it; S3 documents only that it is not the object's MD5 ("Checking object integrity").
    The parts' ETags may come quoted or bare."""
    digests = [bytes.fromhex(etag.strip().strip('"')) for etag in part_md5_hexes]
    return f'"{hashlib.md5(b"".join(digests)).hexdigest()}-{len(digests)}"'


def timestamp(seconds: float) -> str:
    """ISO 8601 in UTC with milliseconds and Z, as S3 writes its timestamps
    ("2026-11-27T14:38:24.000Z")."""
    when = datetime.fromtimestamp(seconds, UTC)
    return f"{when:%Y-%m-%dT%H:%M:%S}.{when.microsecond // 1000:03d}Z"


def xml_safe(text: str) -> bool:
    """Whether XML 1.0 can carry `text` at all (not every Unicode character is an XML
    character, escaped or not): a key that is not can only be listed URL-encoded."""
    return _NOT_XML_CHAR.search(text) is None


# --- building -------------------------------------------------------------------------------


def _result(name: str) -> ET.Element:
    return ET.Element(name, xmlns=NAMESPACE)


def _children(parent: ET.Element, items: Iterable[tuple[str, str]]) -> None:
    for name, text in items:
        if not xml_safe(text):
            raise ValueError(f"{name} holds characters XML 1.0 cannot carry: {text!r}")
        ET.SubElement(parent, name).text = text


def _person(parent: ET.Element, name: str, owner_id: str) -> None:
    """Initiator and Owner: the shim has no display names, the owner's id is both."""
    element = ET.SubElement(parent, name)
    _children(element, [("ID", owner_id), ("DisplayName", owner_id)])


def _boolean(value: bool) -> str:
    return "true" if value else "false"


def _document(root: ET.Element) -> bytes:
    return _DECLARATION + ET.tostring(root, encoding="unicode").encode("utf-8")


# --- parsing ----------------------------------------------------------------------------------


def _part(element: ET.Element, namespace: str) -> tuple[int, str]:
    """One Part: PartNumber and ETag once each; the checksums S3 accepts beside them (each
    named Checksum<ALGORITHM>) are allowed and not read here."""
    if element.tag != _qualified("Part", namespace):
        raise _malformed(f"unexpected element {_local(element.tag)} in the part list")
    members: dict[str, str] = {}
    for child in element:
        name = _local(child.tag)
        if child.tag != _qualified(name, namespace) or not (
                name in _PART_MEMBERS or name.startswith("Checksum")):
            raise _malformed(f"unexpected element {name} in a Part")
        if name in members or len(child):
            raise _malformed(f"a Part has a malformed {name}")
        members[name] = child.text or ""
    if "PartNumber" not in members or "ETag" not in members:
        raise _malformed("a Part lacks its PartNumber or its ETag")
    return _part_number(members["PartNumber"]), _quoted_etag(members["ETag"])


def _part_number(text: str) -> int:
    text = text.strip()
    number = int(text) if _DIGITS.fullmatch(text) else 0
    if not 1 <= number <= MAX_PART_NUMBER:
        raise _malformed(f"PartNumber {text!r} is not an integer from 1 to {MAX_PART_NUMBER}")
    return number


def _quoted_etag(text: str) -> str:
    inner = text.strip()
    if len(inner) >= 2 and inner.startswith('"') and inner.endswith('"'):
        inner = inner[1:-1]
    if not inner or '"' in inner:
        raise _malformed(f"ETag {text!r} is not an entity tag")
    return f'"{inner}"'


def _namespace_of(element: ET.Element) -> str:
    return element.tag[1:].partition("}")[0] if element.tag.startswith("{") else ""


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _qualified(name: str, namespace: str) -> str:
    return f"{{{namespace}}}{name}" if namespace else name


def _malformed(detail: str) -> ShimError:
    return ShimError("MalformedXML", "The XML you provided was not well-formed or did not "
                     f"validate against our published schema: {detail}.", 400)
