"""The S3 multipart upload API, path-style, under the operator's prefixes (`s3.paths`).

Seed 003 weighs S3's multipart uploads against tus: parts go to their own resource under an
upload id, in any order and in parallel, and one request lists them and completes the file.
Every S3 SDK and tool speaks it. The shim keeps each part as an upload of its own (whole or
absent, named `s3part:<upload id>:<number>`), and the multipart upload as an upload with no
bytes of its own that CompleteMultipartUpload assembles from the parts it lists, delivered
ONCE to the legacy server. A PutObject is one whole body, delivered the same way.

Operations (Amazon S3 API Reference; sections named after them):
- CreateMultipartUpload  POST   /<bucket>/<key>?uploads
- UploadPart             PUT    /<bucket>/<key>?partNumber=N&uploadId=ID
- ListParts              GET    /<bucket>/<key>?uploadId=ID
- CompleteMultipartUpload POST  /<bucket>/<key>?uploadId=ID   (XML part list)
- AbortMultipartUpload   DELETE /<bucket>/<key>?uploadId=ID
- ListMultipartUploads   GET    /<bucket>?uploads
- PutObject              PUT    /<bucket>/<key>
- HeadObject             HEAD   /<bucket>/<key>   (an object the shim delivered; else 404)
- HeadBucket, CreateBucket  HEAD, PUT /<bucket>   (200: any bucket name takes uploads)
Anything else under the prefixes is answered NotImplemented: it is S3's, not the legacy
server's, and carries the client's S3 signature.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from urllib.parse import parse_qs, quote, unquote

from shim import commands as c
from shim import targets
from shim.config import S3Config, S3Credential
from shim.engine import FAMILY, NewUpload, new_upload_id
from shim.errors import ShimError
from shim.lifecycle import State
from shim.model import Reply, Request, Upload
from shim.outbox import Delivery
from shim.protocols.s3 import documents, sigv4
from shim.protocols.s3.body import AwsChunkedDecoder, BodyDigests
from shim.wire import as_bytes

MAX_KEY_BYTES = 1024
"""An object key is at most 1,024 bytes of UTF-8 (Amazon S3 User Guide, "Object keys")."""
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
"""A bucket name: S3's rules (3 to 63 of a-z, 0-9, '.', '-') widened to the legacy names
us-east-1 still takes (upper case, '_', up to 255); never a '/' nor a dot segment."""
_NUMBER = re.compile(r"[0-9]{1,9}")
"""A number in a query or field: ASCII digits only (str.isdigit also takes superscripts
and full-width digits)."""
_MD5_HEX = re.compile(r"[0-9a-f]{32}")
"""A part's ETag: the hex MD5 of its bytes."""
MAX_PARTS = 10_000
"""Part numbers run from 1 to 10,000 (UploadPart, "partNumber")."""
MAX_PART_SIZE = 5 * 1024**3
"""A part is at most 5 GiB (Amazon S3 multipart upload limits)."""
LIST_LIMIT = 1000
"""The default and largest page of ListParts and ListMultipartUploads."""
XML = (("Content-Type", "application/xml"),)

_ENGINE_CODES: dict[str, tuple[str, int]] = {
    "not-found": ("NoSuchUpload", 404),
    "gone": ("NoSuchUpload", 404),
    "invalid-part": ("InvalidPart", 400),
    "too-small": ("EntityTooSmall", 400),
    "too-large": ("EntityTooLarge", 400),
    "too-many-uploads": ("SlowDown", 503),
    "insufficient-storage": ("ServiceUnavailable", 503),
    "locked": ("OperationAborted", 409),
    "completed": ("InvalidRequest", 400),
    "bad-request": ("InvalidRequest", 400),
}
"""The engine's refusals as S3 error codes (Amazon S3 API Reference, "Error responses"):
503 SlowDown is what the SDKs back off and retry on."""


@dataclass(frozen=True)
class Operation:
    """One S3 request, as far as the path and query tell."""

    name: str
    bucket: str
    key: str
    upload_id: str = ""
    part: int = 0
    query: Mapping[str, list[str]] | None = None

    def param(self, name: str, default: str = "") -> str:
        values = (self.query or {}).get(name)
        return values[0] if values else default


class S3Body:
    """A part's or object's body: aws-chunked decoded when it is, every digest its fields
    announce checked, its MD5 (the ETag) kept (`shim.append.BodyFilter`)."""

    def __init__(self, decoder: AwsChunkedDecoder | None, digests: BodyDigests) -> None:
        self.decoder = decoder
        self.digests = digests

    def feed(self, data: bytes) -> bytes:
        payload = self.decoder.feed(data) if self.decoder is not None else data
        self.digests.update(payload)
        return payload

    def end(self) -> dict[str, str]:
        trailers = self.decoder.end() if self.decoder is not None else {}
        return {"etag": self.digests.end(trailers)}


class S3:
    name = "s3"
    understands: frozenset[str] = frozenset()

    def __init__(self, config: S3Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.credentials = {cred.access_key: cred for cred in config.credentials}

    # --- parse ----------------------------------------------------------------------------

    def parse(self, request: Request, owner: str) -> c.Command | None:
        operation = self.operation(request)
        if operation is None:
            return None
        try:
            credential, signed = self._authenticate(request)
            return self._command(request, operation, _owner(credential, signed), credential,
                                 signed)
        except ShimError as exc:
            return c.Refuse(exc)

    def operation(self, request: Request) -> Operation | None:
        """Which S3 operation a request is, or None when it is not under `s3.paths`."""
        prefix = next((p for p in self.config.paths if request.path.startswith(p)), None)
        if prefix is None:
            return None
        bucket, _, key = request.path[len(prefix):].partition("/")
        query = parse_qs(request.query, keep_blank_values=True)
        bucket, key = unquote(bucket), unquote(key)
        upload_id = query.get("uploadId", [""])[0]
        method = request.method
        if not key:
            name = "ListMultipartUploads" if method == "GET" and "uploads" in query else \
                {"HEAD": "HeadBucket", "PUT": "CreateBucket"}.get(method, "Bucket")
            if query and name != "ListMultipartUploads":
                name = "Bucket"  # ?acl, ?versioning, ...: not a bucket the shim keeps
        elif method == "POST" and "uploads" in query:
            name = "CreateMultipartUpload"
        elif upload_id and method == "PUT" and "partNumber" in query:
            name = "CopyPart" if request.header("x-amz-copy-source") else "UploadPart"
        elif upload_id:
            name = {"GET": "ListParts", "POST": "CompleteMultipartUpload",
                    "DELETE": "AbortMultipartUpload"}.get(method, "Unknown")
        elif method == "PUT" and not query:
            name = "CopyObject" if request.header("x-amz-copy-source") else "PutObject"
        elif method == "HEAD" and not query:
            name = "HeadObject"
        else:
            name = "Unknown"
        return Operation(name, bucket, key, upload_id, _part_number(query), query)

    def _authenticate(self, request: Request) -> tuple[S3Credential | None, sigv4.Signed | None]:
        """Who sends the request: a verified signature (sigv4), or for `auth: none` the
        access key id it names, unverified."""
        if self.config.auth == "none":
            key = sigv4.access_key_of(request.fields)
            return (self.credentials.get(key or "") or S3Credential(access_key=key or "")), None
        signed = sigv4.verify(request.method, request.path, request.query, request.fields,
                              {k: cred.secret for k, cred in self.credentials.items()},
                              self.clock())
        return self.credentials[signed.access_key], signed

    def _command(self, request: Request, op: Operation, owner: str,
                 credential: S3Credential | None, signed: sigv4.Signed | None) -> c.Command:
        if op.name == "CreateMultipartUpload":
            new = self._new(request, op, owner, credential, new_upload_id())
            return c.Open(new, key=_upload_key(owner, op.bucket, op.key, new.id))
        if op.name == "UploadPart":
            return self._upload_part(request, op, owner, signed)
        if op.name in ("ListParts", "ListMultipartUploads"):
            for name in ("max-parts", "part-number-marker", "max-uploads"):
                _int_param(op, name, 0)  # refused now, not when the answer is written
        if op.name == "ListParts":
            return c.Report(owner, _part_family(op.upload_id), within=op.upload_id)
        if op.name == "CompleteMultipartUpload":
            return self._complete(request, op, owner)
        if op.name == "AbortMultipartUpload":
            return c.Cancel(op.upload_id, owner, family=_part_family(op.upload_id))
        if op.name == "ListMultipartUploads":
            prefix = _upload_key(owner, op.bucket, op.param("prefix"), "")
            return c.Report(owner, prefix.rstrip("\n"))
        if op.name == "PutObject":
            new = self._new(request, op, owner, credential, new_upload_id(),
                            length=_payload_length(request))
            return c.Open(new, with_body=True, body_filter=_body(request, signed),
                          key=_object_key(owner, op.bucket, op.key))
        if op.name == "HeadObject":
            return c.Inspect(None, owner, key=_object_key(owner, op.bucket, op.key), settle=False)
        if op.name in ("HeadBucket", "CreateBucket"):
            _check_bucket(op.bucket)
            return c.Immediate(Reply(200, (("Location", f"/{op.bucket}"),)
                                     if op.name == "CreateBucket" else ()))
        raise ShimError("NotImplemented", f"{op.name} is not something this S3 endpoint does; "
                        "it takes multipart uploads and PutObject", 501)

    def _new(self, request: Request, op: Operation, owner: str,
             credential: S3Credential | None, upload_id: str,
             length: int | None = None) -> NewUpload:
        _check_bucket(op.bucket)
        if len(op.key.encode("utf-8", "surrogateescape")) > MAX_KEY_BYTES:
            raise ShimError("KeyTooLongError", "Your key is too long", 400)
        if not documents.xml_safe(op.key):  # (a bucket name is ASCII by _BUCKET)
            raise ShimError("InvalidArgument", "the key has characters an S3 answer (XML) "
                            "cannot carry", 400)
        forward = self.config.forward
        path = targets.template_path(forward.path, upload_id, {"bucket": op.bucket, "key": op.key},
                                     keep_slashes=frozenset({"key"}))
        fields = [(k, v) for k, v in request.fields
                  if forward.metadata and k.lower().startswith("x-amz-meta-")]
        fields += (credential.forward_headers.items() if credential is not None else ())
        target = targets.target(forward.method, path, tuple(fields),
                                content_type=request.header("content-type"),
                                body=forward.body, field=forward.field,
                                filename=op.key.rsplit("/", 1)[-1])
        return NewUpload(upload_id, self.name, owner, length,
                         {"bucket": op.bucket, "key": op.key, FAMILY: _part_family(upload_id)},
                         target,
                         max_size=self.config.max_size, expiration=self.config.expiration,
                         exclusive_parts=True)

    def _upload_part(self, request: Request, op: Operation, owner: str,
                     signed: sigv4.Signed | None) -> c.Command:
        if not 1 <= op.part <= MAX_PARTS:
            raise ShimError("InvalidArgument", f"Part number must be an integer between 1 and "
                            f"{MAX_PARTS}, inclusive", 400)
        length = _payload_length(request)
        if length > MAX_PART_SIZE:
            raise ShimError("EntityTooLarge", "a part is at most 5 GiB", 400)
        new = NewUpload(new_upload_id(), self.name, owner, length, {}, None,
                        max_size=MAX_PART_SIZE, expiration=self.config.expiration,
                        part_of=op.upload_id)
        return c.Open(new, with_body=True, body_filter=_body(request, signed),
                      key=_part_key(op.upload_id, op.part), within=op.upload_id)

    def _complete(self, request: Request, op: Operation, owner: str) -> c.Command:
        if request.body is None:  # read into memory: only a body of a known, small size
            if request.body_length is None or request.body_length > documents.COMPLETE_BODY_LIMIT:
                raise ShimError("MaxMessageLengthExceeded", "the part list needs a Content-Length "
                                f"of at most {documents.COMPLETE_BODY_LIMIT} bytes", 400)
            return c.NeedBody(documents.COMPLETE_BODY_LIMIT)
        listed = documents.parse_complete_request(request.body)
        numbers = [number for number, _ in listed]
        if numbers != sorted(set(numbers)):
            raise ShimError("InvalidPartOrder", "The list of parts was not in ascending order. "
                            "Parts must be ordered by part number.", 400)
        parts = tuple((_part_key(op.upload_id, number), _unquoted(etag).lower())
                      for number, etag in listed)
        if any(not _MD5_HEX.fullmatch(tag) for _, tag in parts):  # no part has such an ETag
            raise ShimError("InvalidPart", "One or more of the specified parts could not be "
                            "found. The part may not have been uploaded, or the specified entity "
                            "tag may not match the part's entity tag.", 400)
        etag = documents.multipart_etag([tag for _, tag in parts])
        return c.Assemble(op.upload_id, owner, parts, self.config.min_part_size,
                          _part_family(op.upload_id), key=_object_key(owner, op.bucket, op.key),
                          facts={"etag": etag.strip('"')})

    # --- render ---------------------------------------------------------------------------

    def render(self, request: Request, command: c.Command, outcome: c.Outcome) -> Reply:
        op = self.operation(request)
        assert op is not None
        if isinstance(command, c.Refuse):
            return _error(command.error, op, request)
        if outcome.error is not None:
            if op.name == "HeadObject" and outcome.error.status in (404, 410):
                return _head(None)
            return _error(outcome.error, op, request)
        if op.name == "CreateMultipartUpload" and outcome.upload is not None:
            return _xml(documents.initiate_result(op.bucket, op.key, outcome.upload.id))
        if op.name == "UploadPart" and outcome.upload is not None:
            return Reply(200, (("ETag", _etag_of(outcome.upload)),))
        if op.name == "ListParts":
            return _xml(self._parts_listing(op, outcome))
        if op.name == "ListMultipartUploads":
            return _xml(self._uploads_listing(op, outcome))
        if op.name == "AbortMultipartUpload":
            return Reply(204)
        if op.name == "HeadObject":
            return _head(outcome.upload)
        if isinstance(command, c.Immediate):
            return command.reply
        if op.name in ("CompleteMultipartUpload", "PutObject"):
            return self._delivered(request, op, command, outcome)
        return _error(ShimError("InternalError", "no answer for this request", 500), op, request)

    def _delivered(self, request: Request, op: Operation, command: c.Command,
                   outcome: c.Outcome) -> Reply:
        """The legacy server's word on the file: accepted, S3's success answer (and the
        legacy server's status in `Shim-Upstream-Status`); refused, an error document that
        carries its status and text; no word yet, 503 with Retry-After (the SDKs retry)."""
        delivery = outcome.delivery
        upload = outcome.upload
        answer = delivery.answer if delivery is not None else (
            upload.answer if upload is not None else None)
        if answer is None:
            return _error(_no_answer(delivery), op, request)
        upstream = (("Shim-Upstream-Status", str(answer.status)),)
        if not answer.accepted:
            text = answer.body[:1024].decode("utf-8", "replace")
            return _error(ShimError("LegacyServerRefused", f"the legacy server answered "
                                    f"{answer.status} {answer.reason}: {text}", answer.status),
                          op, request, upstream)
        if isinstance(command, c.Assemble):
            location = request.absolute(request.path)
            etag = documents.s3_etag(command.facts["etag"])
            return _xml(documents.complete_result(location, op.bucket, op.key, etag), upstream)
        assert upload is not None
        return Reply(200, (("ETag", _etag_of(upload)), *upstream))

    def _parts_listing(self, op: Operation, outcome: c.Outcome) -> bytes:
        marker = _int_param(op, "part-number-marker", 0)
        limit = min(_int_param(op, "max-parts", LIST_LIMIT), LIST_LIMIT)
        parts = sorted((documents.PartInfo(int(key.rsplit(":", 1)[1]), _etag_of(part),
                                           part.offset, part.updated)
                        for key, part in outcome.listing if part.complete),
                       key=lambda info: info.number)
        after = [info for info in parts if info.number > marker]
        page, truncated = after[:limit], len(after) > limit
        return documents.list_parts_result(
            op.bucket, op.key, op.upload_id, page, marker=marker, max_parts=limit,
            next_marker=page[-1].number if page else None, truncated=truncated,
            owner_id=_owner_id(outcome))

    def _uploads_listing(self, op: Operation, outcome: c.Outcome) -> bytes:
        limit = min(_int_param(op, "max-uploads", LIST_LIMIT), LIST_LIMIT)
        prefix = op.param("prefix")
        uploads = sorted((documents.UploadInfo(upload.metadata.get("key", ""), upload.id,
                                               upload.created)
                          for _, upload in outcome.listing if not upload.parts),
                         key=lambda info: (info.key, info.upload_id))
        uploads = [info for info in uploads if info.key.startswith(prefix)]
        key_marker, id_marker = op.param("key-marker"), op.param("upload-id-marker")
        # ListMultipartUploads: after key-marker alone come the keys after it; with an
        # upload-id-marker, that key's later uploads too
        after = [info for info in uploads if info.key > key_marker or (
            id_marker and info.key == key_marker and info.upload_id > id_marker)]
        page, truncated = after[:limit], len(after) > limit
        encode = op.param("encoding-type") == "url"

        def spelled(text: str) -> str:  # "encoding-type=url": keys as the client decodes them
            return quote(text, safe="/") if encode else text

        last = page[-1] if page and truncated else None
        return documents.list_uploads_result(
            op.bucket, [documents.UploadInfo(spelled(i.key), i.upload_id, i.initiated) for i in page],
            prefix=spelled(op.param("prefix")), key_marker=spelled(key_marker),
            upload_id_marker=id_marker, next_key_marker=spelled(last.key) if last else None,
            next_upload_id_marker=last.upload_id if last else None, max_uploads=limit,
            truncated=truncated, owner_id=_owner_id(outcome),
            encoding_type="url" if encode else None)


# --- the pieces ---------------------------------------------------------------------------


def _no_answer(delivery: Delivery | None) -> ShimError:
    """Why a complete file has no answer from the legacy server to give: pending (503 with
    Retry-After: the SDKs retry, and a retry gets the answer once it came), failed for good
    (502: held for an operator), or not recorded yet (507), as the other protocols say."""
    if delivery is None:
        return ShimError("ServiceUnavailable", "the file is not complete", 503, {"Retry-After": 1})
    if delivery.code == "pending":
        return ShimError("ServiceUnavailable", delivery.message, 503,
                         {"Retry-After": delivery.retry_after or 1})
    code = {"unrecorded": "ServiceUnavailable", "digest-mismatch": "BadDigest"}.get(
        delivery.code, "DeliveryFailed")
    return ShimError(code, delivery.message, delivery.status, dict(delivery.fields))


def _owner(credential: S3Credential | None, signed: sigv4.Signed | None) -> str:
    """Who may touch an upload: a digest of the access key id that made it."""
    key = signed.access_key if signed is not None else (credential.access_key if credential else "")
    return "s3:" + hashlib.sha256(as_bytes(key)).hexdigest() if key else "s3:"


def _upload_key(owner: str, bucket: str, key: str, upload_id: str) -> str:
    """The name of a multipart upload in the store: by owner and bucket, then key, so that
    ListMultipartUploads is a prefix lookup."""
    return f"s3up:{owner}:{bucket}/{key}\n{upload_id}" if upload_id else \
        f"s3up:{owner}:{bucket}/{key}"


def _check_bucket(bucket: str) -> None:
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ShimError("InvalidBucketName", "The specified bucket is not valid.", 400)


def _object_key(owner: str, bucket: str, key: str) -> str:
    """The name of the object last uploaded under `key`, for HeadObject."""
    return f"s3obj:{owner}:{bucket}/{key}"


def _head(upload: Upload | None) -> Reply:
    """HeadObject: an object the shim delivered (and still remembers, until its record
    expires) is described as S3 would, so a tool that checks its upload (rclone) finds it;
    anything else is 404 with no body (RFC 9110 section 9.3.2: HEAD has none)."""
    if upload is None or upload.state is not State.DELIVERED or upload.target is None:
        return Reply(404, (("x-amz-error-code", "NoSuchKey"),))
    meta = tuple((k, v) for k, v in upload.target.headers if k.lower().startswith("x-amz-meta-"))
    fields = [("Content-Length", str(upload.length or 0)), ("ETag", _etag_of(upload)),
              ("Last-Modified", formatdate(upload.updated, usegmt=True)), *meta]
    if upload.target.content_type:
        fields.append(("Content-Type", upload.target.content_type))
    return Reply(200, tuple(fields))


def _part_family(upload_id: str) -> str:
    return f"s3part:{upload_id}:"


def _part_key(upload_id: str, number: int) -> str:
    return f"{_part_family(upload_id)}{number:05d}"


def _part_number(query: Mapping[str, list[str]]) -> int:
    text = query.get("partNumber", [""])[0]
    return int(text) if _NUMBER.fullmatch(text) else -1


def _int_param(op: Operation, name: str, default: int) -> int:
    text = op.param(name)
    if not text:
        return default
    if not _NUMBER.fullmatch(text):
        raise ShimError("InvalidArgument", f"{name} must be a non-negative integer", 400)
    return int(text)


def _payload_length(request: Request) -> int:
    """The payload's size: `x-amz-decoded-content-length` for an aws-chunked body, else
    Content-Length (S3 requires one of them: 411 MissingContentLength)."""
    decoded = request.header("x-amz-decoded-content-length")
    if _aws_chunked(request):
        if decoded is None or not re.fullmatch(r"[0-9]{1,15}", decoded.strip()):
            raise ShimError("MissingContentLength", "an aws-chunked body needs "
                            "x-amz-decoded-content-length", 411)
        return int(decoded)
    if request.body_length is None:
        raise ShimError("MissingContentLength", "You must provide the Content-Length HTTP "
                        "header.", 411)
    return request.body_length


def _aws_chunked(request: Request) -> bool:
    encodings = (request.header("content-encoding") or "").lower()
    payload = request.header("x-amz-content-sha256") or ""
    return "aws-chunked" in encodings or payload.startswith("STREAMING-")


def _body(request: Request, signed: sigv4.Signed | None) -> S3Body:
    """How a body is decoded and checked, by the fields the SDK sent with it."""
    chunked = _aws_chunked(request)
    signer = None
    payload = request.header("x-amz-content-sha256") or ""
    if chunked and signed is not None and payload.startswith("STREAMING-AWS4-HMAC-SHA256"):
        signer = sigv4.ChunkSigner(signed)
    decoder = AwsChunkedDecoder(signer, _payload_length(request)) if chunked else None
    return S3Body(decoder, BodyDigests.from_fields(request.fields, trailers_expected=chunked))


def _etag_of(upload: Upload) -> str:
    return documents.s3_etag(upload.metadata.get("etag", ""))


def _unquoted(etag: str) -> str:
    return etag.strip().strip('"')


def _owner_id(outcome: c.Outcome) -> str:
    return outcome.listing[0][1].owner if outcome.listing else ""


def _xml(document: bytes, extra: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(200, (*XML, *extra), document)


def _error(error: ShimError, op: Operation, request: Request,
           extra: tuple[tuple[str, str], ...] = ()) -> Reply:
    """An S3 error document (Amazon S3 API Reference, "Error responses")."""
    code, status = (error.code, error.status) if error.code[:1].isupper() else \
        _ENGINE_CODES.get(error.code, ("InvalidRequest", error.status))
    if error.code == "not-found" and not op.upload_id:
        code = "NoSuchKey"
    info = {"UploadId": op.upload_id} if op.upload_id else {}
    document = documents.error_document(code, error.message, request.path,
                                        uuid.uuid4().hex[:16].upper(), info)
    return Reply(status, (*XML, *error.fields, *extra), document)
