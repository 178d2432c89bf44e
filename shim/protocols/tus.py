"""tus 1.0.0 (tus/tus-resumable-upload-protocol, protocol.md) at a configured endpoint.

Core protocol plus the extensions creation, creation-with-upload, creation-defer-length,
expiration, checksum, termination, concatenation and concatenation-unfinished. Section names
in docstrings refer to protocol.md.
"""

from __future__ import annotations

import base64
import hashlib
import re
import string
from urllib.parse import urlsplit

from shim import commands as c
from shim import errors, targets
from shim.config import TusConfig
from shim.engine import CHECKSUM_ALGORITHMS, Checksum, NewUpload, new_upload_id
from shim.errors import ShimError
from shim.model import HeaderList, Reply, Request, Target, Upload
from shim.protocols import guard
from shim.wire import as_bytes, http_date, parse_length

VERSION = "1.0.0"
EXTENSIONS = (
    "creation", "creation-with-upload", "creation-defer-length", "expiration", "checksum",
    "termination", "concatenation", "concatenation-unfinished",
)
CHUNK_TYPE = "application/offset+octet-stream"
_METADATA_KEY = re.compile(r"[^\s,]+")


class Tus:
    name = "tus"
    understands = frozenset({guard.UPLOAD_OFFSET, guard.TUS_LENGTH})
    """The upload fields this protocol handles (`shim.protocols.guard.announced`)."""

    def __init__(self, config: TusConfig) -> None:
        self.config = config

    # --- parsing --------------------------------------------------------------------------

    def parse(self, request: Request, owner: str) -> c.Command | None:
        """Map a tus request under the endpoint to a command; None for anything else."""
        upload_id = self._upload_id(request.path)
        method = _method(request)
        if upload_id is None or not _speaks_tus(request, method, upload_id):
            return None
        try:
            if method == "OPTIONS":
                return c.Immediate(self._options())
            check_version(request)
            return self._command(method, upload_id, request, owner)
        except ShimError as exc:
            return c.Refuse(exc)

    def _upload_id(self, path: str) -> str | None:
        """'' for the endpoint itself, the id for endpoint/<id>, None for anything else."""
        endpoint = self.config.endpoint
        if path == endpoint.rstrip("/"):
            return ""
        if not path.startswith(endpoint):
            return None
        rest = path[len(endpoint):]
        return rest if "/" not in rest else None

    def _command(self, method: str, upload_id: str, request: Request, owner: str) -> c.Command:
        if upload_id == "":
            if method != "POST":
                raise ShimError("method", f"{method} is not allowed on the endpoint", 405)
            return self._create(request, owner)
        if method == "HEAD":
            return c.Inspect(upload_id, owner)
        if method == "PATCH":
            return self._append(upload_id, request, owner)
        if method == "DELETE":
            return c.Cancel(upload_id, owner)
        raise ShimError("method", f"{method} is not allowed on an upload", 405)

    def _create(self, request: Request, owner: str) -> c.Command:
        """Sections "Creation", "Creation With Upload", "Concatenation"."""
        metadata = parse_metadata(request.header("upload-metadata"))
        concat = request.header("upload-concat")
        if concat is not None and concat.startswith("final"):
            if request.has_body:  # concatenation: "the Server MUST respond with 403"
                raise ShimError("forbidden", "a final concatenation carries no body", 403)
            if request.header("upload-length") is not None:
                raise errors.bad_request("a final concatenation has no Upload-Length: its "
                                         "length is the sum of its parts")
            parts = self._parse_final(concat)
            return c.Concatenate(self._new(request, owner, None, metadata, parts=parts))
        if concat is not None and concat != "partial":
            raise errors.bad_request(f"Upload-Concat must be 'partial' or 'final;...', not {concat!r}")
        length = _declared_length(request)
        new = self._new(request, owner, length, metadata, partial=concat == "partial")
        with_body = request.has_body
        if with_body:
            check_chunk_type(request)
        return c.Open(new, with_body=with_body, checksum=parse_checksum(request))

    def _new(self, request: Request, owner: str, length: int | None, metadata: dict[str, str],
             partial: bool = False, parts: tuple[str, ...] = ()) -> NewUpload:
        upload_id = new_upload_id()
        target = None if partial else self.target(request, upload_id, metadata)
        asks = self._part_target(request, upload_id, metadata) if partial else None
        return NewUpload(
            id=upload_id, protocol=self.name, owner=owner, length=length, metadata=metadata, target=target,
            max_size=self.config.max_size, expiration=self.config.expiration, parts=parts,
            asks=asks,
        )

    def _part_target(self, request: Request, upload_id: str, metadata: dict[str, str]) -> Target:
        """What a partial upload's preflight asks about: the delivery a final upload of it
        would be, with the part's own id for any placeholder its metadata lacks."""
        names = {name for _, name, _, _ in string.Formatter().parse(self.config.forward.path)
                 if name}
        return self.target(request, upload_id, {name: upload_id for name in names} | metadata)

    def target(self, request: Request, upload_id: str, metadata: dict[str, str]) -> Target:
        """The delivery request (tus.forward.*) with the creating request's own headers."""
        forward = self.config.forward
        return targets.target(
            forward.method, targets.template_path(forward.path, upload_id, metadata),
            request.fields,
            content_type=metadata.get("filetype") or metadata.get("contentType"),
            content_type_name=f"the {'filetype' if metadata.get('filetype') else 'contentType'} "
                              "metadata", body=forward.body, field=forward.field,
            filename=metadata.get("filename") or metadata.get("name"))

    def _parse_final(self, value: str) -> tuple[str, ...]:
        """`final;<url> <url>`: the partial uploads' URLs, absolute or relative."""
        _, _, urls = value.partition(";")
        ids = []
        for url in urls.split():
            try:
                upload_id = self._upload_id(urlsplit(url).path)
            except ValueError:  # urlsplit: "Invalid IPv6 URL" and the like
                upload_id = None
            if not upload_id:
                raise errors.bad_request(f"Upload-Concat names {url!r}, which is not an upload here")
            ids.append(upload_id)
        if not ids:
            raise errors.bad_request("Upload-Concat: final names no partial uploads")
        return tuple(ids)

    def _append(self, upload_id: str, request: Request, owner: str) -> c.Command:
        """Core "PATCH"; a deferred length may be given here (creation-defer-length)."""
        check_chunk_type(request)
        offset_text = request.header("upload-offset")
        if offset_text is None:
            raise errors.bad_request("Upload-Offset is missing")
        length_text = request.header("upload-length")
        return c.Append(
            upload_id, owner, parse_length(offset_text, "Upload-Offset"),
            checksum=parse_checksum(request),
            declared_length=parse_length(length_text, "Upload-Length") if length_text else None,
            max_size=self.config.max_size,
        )

    # --- rendering ------------------------------------------------------------------------

    def render(self, request: Request, command: c.Command, outcome: c.Outcome) -> Reply:
        if isinstance(command, c.Immediate):
            return command.reply
        if outcome.error is not None:
            return _error_reply(outcome.error, self._location(outcome.upload))
        if outcome.delivery is not None and not outcome.delivery.accepted:
            return _delivery_failed(outcome, self._progress_headers(command, outcome))
        headers = list(_delivery_headers(outcome))
        upload = outcome.upload
        if isinstance(command, c.Cancel) or upload is None:
            return _reply(204, headers)
        if isinstance(command, c.Inspect):
            return _reply(200, headers + _status_headers(upload, outcome.offset))
        headers += _expiry(upload)
        if isinstance(command, c.Append):
            return _reply(204, [("Upload-Offset", str(upload.offset)), *headers])
        headers.append(("Location", self._location(upload) or ""))
        if isinstance(command, c.Open) and command.with_body:
            headers.append(("Upload-Offset", str(upload.offset)))
        return _reply(201, headers)

    def _progress_headers(self, command: c.Command, outcome: c.Outcome) -> list[tuple[str, str]]:
        """What a client still needs to know when the delivery failed: where the upload is,
        and that all of it is stored."""
        upload = outcome.upload
        if upload is None:
            return []
        if isinstance(command, c.Inspect):
            return _status_headers(upload, outcome.offset)
        if isinstance(command, c.Open | c.Concatenate):
            return [("Location", self._location(upload) or ""), ("Upload-Offset", str(upload.offset))]
        return [("Upload-Offset", str(upload.offset))]

    def _location(self, upload: Upload | None) -> str | None:
        return self.config.endpoint + upload.id if upload is not None else None

    def _options(self) -> Reply:
        """Core "OPTIONS": what this server speaks."""
        headers = [
            ("Tus-Version", VERSION),
            ("Tus-Extension", ",".join(EXTENSIONS)),
            ("Tus-Checksum-Algorithm", ",".join(CHECKSUM_ALGORITHMS)),
        ]
        if self.config.max_size:
            headers.append(("Tus-Max-Size", str(self.config.max_size)))
        return _reply(204, headers)


def _speaks_tus(request: Request, method: str, upload_id: str) -> bool:
    """Whether a request under the endpoint is tus at all. Others (a browser's GET of a file
    whose path happens to lie under the endpoint) belong to the legacy server. A request with
    tus fields but a missing Tus-Resumable is tus, and gets its 412; so is one that overrides
    its method (only tus gives X-HTTP-Method-Override a meaning here)."""
    if request.header("x-http-method-override") is not None:
        return True
    if method == "OPTIONS":
        return upload_id == "" or request.header("tus-resumable") is not None
    if method == "PATCH":
        return True
    return any(name.lower().startswith(("tus-", "upload-")) for name, _ in request.fields)


def _method(request: Request) -> str:
    """The method, honouring X-HTTP-Method-Override (core, "Headers": it "MUST be
    interpreted as the request's method", whatever method carried it)."""
    override = request.header("x-http-method-override")
    return override.strip().upper() if override and override.strip() else request.method


def check_version(request: Request) -> None:
    """Core "Tus-Resumable": every request but OPTIONS names the version; else 412."""
    version = request.header("tus-resumable")
    if version != VERSION:
        raise ShimError("version", f"Tus-Resumable must be {VERSION}, not {version!r}", 412,
                        {"Tus-Version": VERSION})


def check_chunk_type(request: Request) -> None:
    content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
    if content_type != CHUNK_TYPE:
        raise ShimError("content-type", f"Content-Type must be {CHUNK_TYPE}", 415)


def _declared_length(request: Request) -> int | None:
    """Upload-Length, or None with Upload-Defer-Length: 1 (creation-defer-length)."""
    length = request.header("upload-length")
    defer = request.header("upload-defer-length")
    if length is not None and defer is not None:
        raise errors.bad_request("Upload-Length and Upload-Defer-Length exclude each other")
    if length is not None:
        return parse_length(length, "Upload-Length")
    if defer is None:
        raise errors.bad_request("Upload-Length or Upload-Defer-Length: 1 is required")
    if defer.strip() != "1":
        raise errors.bad_request("Upload-Defer-Length must be 1")
    return None


def parse_metadata(value: str | None) -> dict[str, str]:
    """Upload-Metadata (creation): `key base64,key`; keys unique, values UTF-8 here."""
    metadata: dict[str, str] = {}
    if value is None or not value.strip():
        return metadata
    for pair in value.split(","):
        words = pair.strip().split(" ")
        key = words[0]
        if not _METADATA_KEY.fullmatch(key) or len(words) > 2 or key in metadata:
            raise errors.bad_request(f"Upload-Metadata: malformed or repeated pair {pair.strip()!r}")
        try:
            raw = base64.b64decode(words[1], validate=True) if len(words) == 2 else b""
            metadata[key] = raw.decode("utf-8")
        except ValueError as exc:  # binascii.Error, UnicodeDecodeError, non-ASCII input
            raise errors.bad_request(
                f"Upload-Metadata: the value of {key!r} is not base64 of UTF-8 text") from exc
    return metadata


def format_metadata(metadata: dict[str, str]) -> str:
    return ",".join(
        f"{key} {base64.b64encode(value.encode()).decode()}" if value else key
        for key, value in metadata.items()
    )


def parse_checksum(request: Request) -> Checksum | None:
    """Upload-Checksum (checksum): `<algorithm> <base64 digest>`; unknown algorithm is 400."""
    value = request.header("upload-checksum")
    if value is None:
        return None
    algorithm, _, encoded = value.strip().partition(" ")
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise errors.bad_request(f"Upload-Checksum: unsupported algorithm {algorithm!r}")
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII input
        raise errors.bad_request("Upload-Checksum: the digest is not base64") from exc
    if len(digest) != hashlib.new(algorithm).digest_size:
        raise errors.bad_request(f"Upload-Checksum: not a {algorithm} digest")
    return Checksum(algorithm, digest)


def _status_headers(upload: Upload, offset: int) -> list[tuple[str, str]]:
    """Core "HEAD"; for an unfinished concatenation the offset is left out (concatenation)."""
    headers = [("Cache-Control", "no-store")]
    if not (upload.parts and not upload.complete):
        headers.append(("Upload-Offset", str(offset)))
    if upload.length is not None:
        headers.append(("Upload-Length", str(upload.length)))
    elif not upload.parts:
        headers.append(("Upload-Defer-Length", "1"))
    if upload.metadata:
        headers.append(("Upload-Metadata", format_metadata(upload.metadata)))
    if upload.parts:
        headers.append(("Upload-Concat", "final;" + " ".join(upload.parts)))
    elif upload.target is None:
        headers.append(("Upload-Concat", "partial"))
    return headers


def _expiry(upload: Upload) -> list[tuple[str, str]]:
    return [("Upload-Expires", http_date(upload.expires))] if upload.expires else []


def _delivery_headers(outcome: c.Outcome) -> HeaderList:
    """The legacy server's status and Location, for a client that wants to know."""
    delivery = outcome.delivery
    if delivery is None and outcome.upload is not None and outcome.upload.answer is not None:
        answer = outcome.upload.answer
    elif delivery is not None and delivery.answer is not None:
        answer = delivery.answer
    else:
        return ()
    headers = [("Shim-Upstream-Status", str(answer.status))]
    location = next((v for k, v in answer.headers if k.lower() == "location"), None)
    if location:
        headers.append(("Shim-Upstream-Location", location))
    return tuple(headers)


def _delivery_failed(outcome: c.Outcome, progress: list[tuple[str, str]]) -> Reply:
    """The file is complete but the legacy server refused it or could not be reached.

    A 4xx refusal is passed on (retrying will not help); another answer is 502; no answer
    yet is the delivery's own status (503 + Retry-After while it goes on), so that tus
    clients retry, and a retried PATCH or HEAD gets the outcome."""
    delivery = outcome.delivery
    assert delivery is not None
    answer = delivery.answer
    headers = [*_delivery_headers(outcome), *progress]
    if answer is not None and 400 <= answer.status < 500:
        message = f"the legacy server refused the file: {answer.status} {answer.reason}\n"
        return _reply(answer.status, headers, message.encode() + answer.body[:4096])
    if answer is None:
        return _reply(delivery.status, [*headers, *delivery.fields], f"{delivery.message}\n".encode())
    message = f"the upload is complete but was not delivered: the legacy server answered {answer.status}"
    return _reply(502, headers, f"{message}\n".encode())


def _error_reply(error: ShimError, location: str | None) -> Reply:
    headers = list(error.fields)
    if error.code == "checksum-mismatch":
        return _reply(460, headers, as_bytes(f"{error.message}\n"), reason="Checksum Mismatch")
    return _reply(error.status, headers, as_bytes(f"{error.message}\n"))


def _reply(status: int, headers: list[tuple[str, str]] | HeaderList, body: bytes = b"",
           reason: str | None = None) -> Reply:
    base = [("Tus-Resumable", VERSION)]
    if body:
        base.append(("Content-Type", "text/plain; charset=utf-8"))
    return Reply(status, (*base, *headers), body, reason)
