"""The IETF "Resumable Uploads for HTTP" draft (httpwg/http-extensions,
draft-ietf-httpbis-resumable-upload), interop versions 3, 5, 6, 7, 8 and 9.

The draft's upgrade model is the shim's: a client adds `Upload-Complete` to an ordinary POST
or PUT to the legacy server's URL; the shim answers `104` with the upload resource's
`Location` before reading the body, keeps the body on disk, and once all bytes are in sends
ONE request to that URL and answers with the legacy server's own response. What differs
between versions lives in `VERSIONS`, one row each; sections cited are of the draft revision
named in the row.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from http_sfv.dictionary import Dictionary
from http_sfv.item import Item

from shim import commands as c
from shim import errors, targets
from shim.config import IetfConfig
from shim.engine import Checksum, NewUpload, new_upload_id
from shim.errors import ShimError
from shim.model import Answer, Reply, Request, Target, Upload
from shim.protocols import guard, replies
from shim.wire import as_bytes, path_allowed

PARTIAL_UPLOAD = "application/partial-upload"
PROBLEM_TYPES = "https://iana.org/assignments/http-problem-types#"
VERSION_FIELD = "Upload-Draft-Interop-Version"
DEFAULT_INTEROP = 8
"""The rules for a request on an upload resource that names no interop version, for OPTIONS
of one, and recorded for an upload whose creating request named a version the shim does not
speak. Deliberately not the newest: draft clients must send the field (Appendix "Draft
Version Identification"), so a request without it comes from no draft in particular, and it
keeps the rules such requests have always had here."""


@dataclass(frozen=True)
class Interop:
    """One interop version: the fields and statuses where the drafts differ."""

    version: int
    drafts: str
    inverted: bool
    """Completeness is `Upload-Incomplete` (?1 = more follows) instead of `Upload-Complete`."""
    patch_type: str | None
    """The media type a PATCH must carry (from -04)."""
    append_status: int
    """A non-final append: 201 up to -05, a 2xx (the drafts' examples: 204) from -06."""
    limit_age_key: str | None
    """The Upload-Limit key for the lifetime: `expires` (-04/-05), `max-age` (-06 on)."""
    final_complete: bool
    """The final response carries `Upload-Complete: ?1` (-06 on)."""
    accept_patch: bool
    """OPTIONS carries `Accept-Patch: application/partial-upload` (-10 and -11; -12 dropped
    it again, "Limits": OPTIONS announces `Upload-Limit` only)."""
    get_offset: bool = False
    """GET on the upload resource retrieves the offset as HEAD does (-12 "Offset
    Retrieval"); before, GET there is 405."""
    answered: bool = False
    """`Upload-Complete` in a response says whether it is the target resource's own answer
    (in a HEAD or GET response: whether that answer was produced), no longer whether every
    byte is in (-12 "Completeness"). So everything the shim answers itself to a creation or
    an append says ?0, a 409 included (-12 "Upload Append": MUST), and so does HEAD until the
    legacy server has answered: the client then completes again (an empty PATCH with ?1) and
    gets that answer."""
    completed_problem: bool = True
    """Bytes appended to a completed upload are the `completed-upload` problem (-04..-11).
    -12 removed that type and its 410/404 rules: the bytes would take the offset past the
    length, which is an inconsistent length (400, -12 "Length"); a valid retry of the
    completing request gets the recorded answer (-12 "Upload Append" allows the replay)."""
    limit_refusals: bool = False
    """A request refused for the announced `max-size` gets 413 with `Upload-Limit` (-12
    "Limits": "SHOULD include the Upload-Limit header field"), and a body that goes past the
    upload's own length is the inconsistent-length 400 on creation as on append (-12
    "Length"). Before, both were `inconsistent-upload-length`: 400 on PATCH, 413 otherwise.
    -12 also makes `min-append-size`/`max-append-size` apply to creation requests; the shim
    announces neither, so no creation is refused for them in any version."""

    @property
    def complete_field(self) -> str:
        return "Upload-Incomplete" if self.inverted else "Upload-Complete"

    def completeness(self, complete: bool) -> tuple[str, str]:
        return self.complete_field, _sf_bool(complete != self.inverted)


VERSIONS = {
    3: Interop(3, "-01", True, None, 201, None, False, False),
    5: Interop(5, "-03", False, None, 201, None, False, False),
    6: Interop(6, "-04/-05", False, PARTIAL_UPLOAD, 201, "expires", False, False),
    7: Interop(7, "-06..-08", False, PARTIAL_UPLOAD, 204, "max-age", True, False),
    8: Interop(8, "-09..-11", False, PARTIAL_UPLOAD, 204, "max-age", True, True),
    9: Interop(9, "-12", False, PARTIAL_UPLOAD, 204, "max-age", True, False, get_offset=True,
               answered=True, completed_problem=False, limit_refusals=True),
}
_DIGESTS = {"sha-256": "sha256", "sha-512": "sha512"}


class Ietf:
    name = "ietf"
    understands = frozenset({guard.UPLOAD_OFFSET, guard.UPLOAD_COMPLETE})
    """The upload fields this protocol handles (`shim.protocols.guard.announced`)."""

    def __init__(self, config: IetfConfig) -> None:
        self.config = config
        self.versions = {v: VERSIONS[v] for v in config.versions}

    # --- parsing --------------------------------------------------------------------------

    def parse(self, request: Request, owner: str) -> c.Command | None:
        on_resource = request.path.startswith(self.config.prefix)
        version_text = request.header(VERSION_FIELD)
        if not on_resource and not self._upgrades(request, version_text):
            return None
        try:
            interop = self._interop(version_text, on_resource)
            if on_resource:
                return self._on_resource(request, owner, interop)
            if request.method == "OPTIONS":
                return c.Immediate(self._options(interop))
            return self._create(request, owner, interop)
        except ShimError as exc:
            return c.Refuse(exc)

    def _upgrades(self, request: Request, version_text: str | None) -> bool:
        """A request to a target URL is ours when it carries the completeness field (or is an
        OPTIONS naming an interop version) on a path the config allows."""
        if not path_allowed(request.path, self.config.paths):
            return False
        if request.method == "OPTIONS":
            return version_text is not None
        has_completeness = request.header("upload-complete") is not None or \
            request.header("upload-incomplete") is not None
        return request.method in ("POST", "PUT") and has_completeness

    def _interop(self, version_text: str | None, on_resource: bool) -> Interop | None:
        """The request's interop version; None for an unknown one (Appendix "Draft Version
        Identification": no 104 is sent then)."""
        if version_text is None:
            return None if not on_resource else self.versions.get(DEFAULT_INTEROP)
        try:
            version = _sf_integer(version_text, VERSION_FIELD)
        except ShimError:
            return None
        return self.versions.get(version)

    def _create(self, request: Request, owner: str, interop: Interop | None) -> c.Command:
        """"Upload Creation": the request's own body is the first (or only) part."""
        complete = _completeness(request, interop)
        if interop is None and not complete:
            raise ShimError("version", f"{VERSION_FIELD} must be one of "
                            f"{sorted(self.versions)} to upload in parts", 400)
        if request.header("upload-offset") not in (None, "0"):
            raise errors.bad_request("a creation request starts at Upload-Offset 0")
        length = _length(request, 0, complete)
        upload_id = new_upload_id()
        new = NewUpload(
            id=upload_id, protocol=self.name, owner=owner, length=length,
            metadata={"interop": str(interop.version if interop else DEFAULT_INTEROP)},
            target=_target(request), max_size=self.config.max_size,
            expiration=self.config.expiration, digests=_repr_digests(request),
        )
        interim = self._interim(request, interop, upload_id) if interop else None
        return c.Open(new, with_body=request.has_body, checksum=_content_digest(request),
                      complete_at_end=complete and length is None, interim=interim)

    def _on_resource(self, request: Request, owner: str, interop: Interop | None) -> c.Command:
        upload_id = request.path[len(self.config.prefix):]
        if not upload_id or "/" in upload_id:
            raise errors.not_found()
        retrieval = request.method == "HEAD" or (
            request.method == "GET" and interop is not None and interop.get_offset)
        if (retrieval or request.method == "DELETE") and _carries_upload_fields(request):
            raise errors.bad_request(f"{request.method} must not carry Upload-* fields")
        if retrieval:
            return c.Inspect(upload_id, owner, take_over=True)  # "Concurrency"
        if request.method == "DELETE":
            return c.Cancel(upload_id, owner)
        if request.method == "OPTIONS":
            return c.Immediate(self._options(interop))
        if request.method == "PATCH":
            return self._append(request, owner, upload_id, interop)
        raise ShimError("method", f"{request.method} is not allowed on an upload resource", 405)

    def _append(self, request: Request, owner: str, upload_id: str,
                interop: Interop | None) -> c.Command:
        """"Upload Append": PATCH with Upload-Offset (and application/partial-upload from -04)."""
        if interop is not None and interop.patch_type is not None:
            media_type = (request.header("content-type") or "").split(";")[0].strip().lower()
            if media_type != interop.patch_type:
                raise ShimError("content-type", f"an append must be {interop.patch_type}", 415)
        offset_text = request.header("upload-offset")
        if offset_text is None:
            raise errors.bad_request("Upload-Offset is missing")
        offset = _sf_integer(offset_text, "Upload-Offset")
        if offset < 0:
            raise errors.bad_request("Upload-Offset must not be negative")
        complete = _completeness(request, interop, default=True)
        length = _length(request, offset, complete)
        return c.Append(upload_id, owner, offset, checksum=_content_digest(request),
                        declared_length=length, max_size=self.config.max_size,
                        complete_at_end=complete and length is None,
                        digests=_repr_digests(request))

    # --- rendering ------------------------------------------------------------------------

    def render(self, request: Request, command: c.Command, outcome: c.Outcome) -> Reply:
        if isinstance(command, c.Immediate):
            return command.reply
        interop = self._reply_interop(request, outcome.upload)
        base = [(VERSION_FIELD, str(interop.version))]
        if outcome.error is not None:
            if isinstance(command, c.Open) and outcome.upload is not None:
                base.append(("Location", self._location(request, outcome.upload)))
            limit = self._limit(interop) if interop.limit_refusals and \
                self._over_limit(outcome.error, command, outcome.upload) else None
            return _problem(outcome.error, interop, base, request, outcome.upload, limit)
        upload = outcome.upload
        if isinstance(command, c.Cancel) or upload is None:
            return Reply(204, tuple(base))
        progress = [("Upload-Offset", str(outcome.offset))]
        delivery = outcome.delivery
        if delivery is not None and delivery.answer is None:
            return _problem_reply(delivery.status, "", delivery.message, interop,
                                  base + progress + _not_answered(interop) + list(delivery.fields),
                                  {})
        answer = delivery.answer if delivery is not None else upload.answer
        location = [("Location", self._location(request, upload))] \
            if isinstance(command, c.Open) else []
        if answer is not None and not isinstance(command, c.Inspect):
            if any(k.lower() == "location" for k, _ in answer.headers):
                location = []  # Location is one field: the target resource's own wins (-10)
            return _final(answer, interop, base + location + progress)
        status_fields = [*progress, interop.completeness(_says_complete(upload, interop))]
        if isinstance(command, c.Inspect):
            return Reply(204, (*base, *status_fields, *self._status(upload, interop)))
        status = 201 if isinstance(command, c.Open) else interop.append_status
        return Reply(status, (*base, *location, *status_fields, *self._limit(interop)))

    def _status(self, upload: Upload, interop: Interop) -> list[tuple[str, str]]:
        """"Offset Retrieval": Upload-Length when known (-05 on), Upload-Limit, no-store."""
        fields = [("Cache-Control", "no-store")]
        if upload.length is not None:
            fields.append(("Upload-Length", str(upload.length)))
        return fields + self._limit(interop)

    def _reply_interop(self, request: Request, upload: Upload | None) -> Interop:
        interop = self._interop(request.header(VERSION_FIELD), False)
        if interop is None and upload is not None:
            interop = VERSIONS.get(int(upload.metadata.get("interop", DEFAULT_INTEROP)))
        return interop or VERSIONS[DEFAULT_INTEROP]

    def _over_limit(self, error: ShimError, command: c.Command, upload: Upload | None) -> bool:
        """Whether a 413 refuses the request for `max-size` (-12 "Limits") rather than for a
        body longer than the upload's own length (-12 "Length"): no length is known (the
        record's, or the one this request declares), or the known one is past the limit."""
        if error.code != "too-large":
            return False
        length = upload.length if upload is not None else None
        if length is None and isinstance(command, c.Open):
            length = command.new.length
        if length is None and isinstance(command, c.Append):
            length = command.declared_length
        return length is None or (bool(self.config.max_size) and length > self.config.max_size)

    def _location(self, request: Request, upload: Upload) -> str:
        """The same absolute URL in the 104 and the final response (-10, "Upload Creation")."""
        return request.absolute(self.config.prefix + upload.id)

    def _interim(self, request: Request, interop: Interop, upload_id: str) -> Reply:
        """104 (Upload Resumption Supported): Location and the interop version, echoed as the
        draft requires, and Upload-Limit from -04 (a MUST from -09)."""
        location = request.absolute(self.config.prefix + upload_id)
        fields = [("Location", location), (VERSION_FIELD, str(interop.version))]
        return Reply(104, (*fields, *self._limit(interop)), b"", "Upload Resumption Supported")

    def _limit(self, interop: Interop) -> list[tuple[str, str]]:
        """Upload-Limit (-04 on): `min-size=0` when no limit applies (-05 "OPTIONS")."""
        if interop.limit_age_key is None:
            return []
        limits = Dictionary()
        if self.config.max_size:
            limits["max-size"] = Item(self.config.max_size)
        if self.config.expiration:
            limits[interop.limit_age_key] = Item(self.config.expiration)
        if not len(limits):
            limits["min-size"] = Item(0)
        return [("Upload-Limit", str(limits))]

    def _options(self, interop: Interop | None) -> Reply:
        interop = interop or VERSIONS[DEFAULT_INTEROP]
        fields = [(VERSION_FIELD, str(interop.version)), *self._limit(interop)]
        if interop.accept_patch:
            fields.append(("Accept-Patch", PARTIAL_UPLOAD))
        return Reply(200, tuple(fields))


def _completeness(request: Request, interop: Interop | None, default: bool = False) -> bool:
    """Whether this request ends the upload: `Upload-Complete: ?1`, or for interop 3
    `Upload-Incomplete: ?0` (-01 "Upload-Incomplete")."""
    inverted = interop.inverted if interop else request.header("upload-complete") is None
    value = request.header("upload-incomplete" if inverted else "upload-complete")
    if value is None:
        return default  # -03..-05: a PATCH without the field is final
    flag = _sf_boolean(value, "Upload-Incomplete" if inverted else "Upload-Complete")
    return flag != inverted


def _length(request: Request, offset: int, complete: bool) -> int | None:
    """The upload's length: Upload-Length (-05 on), or offset + Content-Length of a request
    that completes it; when both are given they must agree (400, -05 "Upload-Length")."""
    declared_text = request.header("upload-length")
    declared = _sf_integer(declared_text, "Upload-Length") if declared_text is not None else None
    implied = offset + request.body_length if complete and request.body_length is not None else None
    if declared is not None and declared < 0:
        raise errors.bad_request("Upload-Length must not be negative")
    if declared is not None and implied is not None and declared != implied:
        raise ShimError("inconsistent-length", f"Upload-Length {declared} disagrees with the "
                        f"{implied} bytes this request completes", 400)
    return declared if declared is not None else implied


def _carries_upload_fields(request: Request) -> bool:
    return any(request.header(name) is not None for name in
               ("upload-offset", "upload-complete", "upload-incomplete", "upload-length"))


def _target(request: Request) -> Target:
    """The legacy server gets the original method, URL and fields, minus the protocol's."""
    media_type = request.header("content-type")
    if media_type is not None and media_type.split(";")[0].strip().lower() == PARTIAL_UPLOAD:
        media_type = None  # tus-js-client's ietf-draft-05 mode labels the creation body so
    return targets.target(request.method, request.target, request.fields,
                          content_type=media_type)


def _repr_digests(request: Request) -> dict[str, str]:
    """Repr-Digest (RFC 9530): digests of the whole file, checked before delivery."""
    return {name: base64.b64encode(digest).decode()
            for name, digest in _digest_field(request.header("repr-digest")).items()}


def _content_digest(request: Request) -> Checksum | None:
    """Content-Digest (RFC 9530) of this request's body: a mismatch keeps nothing of it."""
    digests = _digest_field(request.header("content-digest"))
    name = next(iter(digests), None)
    return Checksum(name, digests[name]) if name else None


def _digest_field(value: str | None) -> dict[str, bytes]:
    if value is None:
        return {}
    parsed = Dictionary()
    try:
        parsed.parse(as_bytes(value))
    except ValueError as exc:
        raise errors.bad_request(f"malformed digest field {value!r}") from exc
    found = {}
    for algorithm, member in parsed.items():
        name = _DIGESTS.get(algorithm)
        if name is not None and isinstance(member.value, bytes):
            found[name] = member.value
    return found


def _sf_boolean(value: str, name: str) -> bool:
    item = _sf_item(value, name)
    if not isinstance(item, bool):
        raise errors.bad_request(f"{name} must be a structured boolean (?0 or ?1), not {value!r}")
    return item


def _sf_integer(value: str, name: str) -> int:
    item = _sf_item(value, name)
    if isinstance(item, bool) or not isinstance(item, int):
        raise errors.bad_request(f"{name} must be a structured integer, not {value!r}")
    return item


def _sf_item(value: str, name: str) -> object:
    item = Item()
    try:
        item.parse(as_bytes(value))
    except ValueError as exc:
        raise errors.bad_request(f"{name}: malformed structured field {value!r}") from exc
    return item.value


def _sf_bool(flag: bool) -> str:
    return "?1" if flag else "?0"


def _final(answer: Answer, interop: Interop, fields: list[tuple[str, str]]) -> Reply:
    """The target resource's own response, with what clients need to see it is complete:
    Upload-Offset (tus-js-client), Upload-Complete: ?1 (-06 on)."""
    extra = [interop.completeness(True)] if interop.final_complete else []
    return replies.legacy(answer, (*fields, *extra))


_PROBLEMS = {
    "digest-mismatch": "digest-mismatch",
    "offset-mismatch": "mismatching-upload-offset",
    "completed": "completed-upload",
    "too-large": "inconsistent-upload-length",
    "inconsistent-length": "inconsistent-upload-length",
}


def _problem(error: ShimError, interop: Interop, base: list[tuple[str, str]],
             request: Request, upload: Upload | None,
             limit: list[tuple[str, str]] | None = None) -> Reply:
    """Errors as RFC 9457 problem documents, with the draft's problem types (-04 on). `limit`:
    the request is refused for an announced limit, which these `Upload-Limit` fields name
    (-12 "Limits"; the draft has no problem type for it)."""
    kind = "" if limit is not None else _problem_kind(error.code, interop)
    status = error.status
    appending = request.method == "PATCH"
    if error.code == "checksum-mismatch" or (
            appending and kind in ("completed-upload", "inconsistent-upload-length")):
        status = 400  # -05 "Upload Append" and RFC 9530: not tus's 403/413/460
    elif interop.limit_refusals and kind == "inconsistent-upload-length":
        status = 400  # -12 "Length": a creation's body past its own length, too
    extra = [("Upload-Offset", str(error.details["expected-offset"]))] \
        if "expected-offset" in error.details else []
    if interop.answered:
        if request.method not in ("HEAD", "GET", "DELETE"):
            extra += _not_answered(interop)  # -12 "Completeness": not the target's answer
    elif upload is not None and (kind or upload.complete):
        extra.append(interop.completeness(upload.complete))
    elif appending and interop.final_complete:
        extra.append(interop.completeness(False))  # -06..-09: "any response, successful or not"
    details = {k: v for k, v in error.details.items() if not k[0].isupper()}
    extra += limit or []
    return _problem_reply(status, kind, error.message, interop, [*base, *extra, *error.fields],
                          details)


def _problem_kind(code: str, interop: Interop) -> str:
    """The draft's problem type for an error code ("" for none)."""
    if code == "completed" and not interop.completed_problem:
        return "inconsistent-upload-length"  # -12: no completed-upload type; see Interop
    return _PROBLEMS.get(code, "")


def _says_complete(upload: Upload, interop: Interop) -> bool:
    """What `Upload-Complete` says of an upload in a status or progress response: every byte
    is in, or (-12 "Offset Retrieval", see `Interop.answered`) the target resource's answer
    was produced."""
    return upload.answer is not None if interop.answered else upload.complete


def _not_answered(interop: Interop) -> list[tuple[str, str]]:
    """`Upload-Complete: ?0` on an answer the shim makes itself, where the version says that
    this marks it as not the target resource's (-12 "Completeness")."""
    return [interop.completeness(False)] if interop.answered else []


def _problem_reply(status: int, kind: str, detail: str, interop: Interop,
                   fields: list[tuple[str, str]], extra: dict[str, int | str]) -> Reply:
    document: dict[str, int | str] = {
        "type": PROBLEM_TYPES + kind if kind and kind != "digest-mismatch" else "about:blank",
        "title": kind.replace("-", " ") if kind else "request refused",
        "status": status, "detail": detail, **extra,
    }
    body = json.dumps(document).encode()
    return Reply(status, (*fields, ("Content-Type", "application/problem+json")), body)
