"""PUT/POST with Content-Range and 308 Resume Incomplete (seed 000), including Google Cloud
Storage's resumable sessions (PROTOCOLS.md section 3).

Without a session, an upload is named by method, URL and owner: the client PUTs chunks to the
legacy server's own URL. With a session (`POST ?uploadType=resumable` or `x-goog-resumable:
start`) the client gets a session URI on the shim and sends its chunks there; the session URI
is the capability, as at Google, so chunks need no credentials of their own.
"""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import parse_qsl, urlencode

from shim import commands as c
from shim import errors, targets
from shim.config import ContentRangeConfig
from shim.engine import NewUpload, new_upload_id
from shim.errors import ShimError
from shim.model import Reply, Request, Target
from shim.protocols import guard, replies
from shim.wire import ContentRange, format_range, parse_content_range, parse_length, path_allowed

RESUME_INCOMPLETE = "Resume Incomplete"
SESSION_PARAM = "upload_id"


class ContentRangeProtocol:
    name = "content-range"
    understands = frozenset({guard.CONTENT_RANGE})
    """The upload fields this protocol handles (`shim.protocols.guard.announced`)."""

    def __init__(self, config: ContentRangeConfig) -> None:
        self.config = config

    def parse(self, request: Request, owner: str) -> c.Command | None:
        params = parse_qsl(request.query, keep_blank_values=True)
        try:
            if not self._eligible(request.path):
                return None
            session_id = _session_id(params) if self.config.sessions else None
            if session_id and request.method in ("PUT", "POST", "DELETE"):
                return self._session_request(request, session_id)
            if self.config.sessions and request.method == "POST" and _opens_session(request, params):
                return self._open_session(request, owner, params)
            range_field = request.header("content-range")
            if request.method in ("PUT", "POST") and range_field is not None:
                return self._keyed_range(request, owner, range_field)
        except ShimError as exc:
            return c.Refuse(exc)
        return None

    def _eligible(self, path: str) -> bool:
        return path_allowed(path, self.config.paths)

    # --- plain Content-Range on the legacy server's URL -----------------------------------

    def _keyed_range(self, request: Request, owner: str, range_field: str) -> c.Command:
        chunk = _chunk(request, range_field)
        key = f"content-range:{owner}:{request.method} {request.target}"
        new = self._new(request, owner, chunk.total, _target(request, request.method))
        return c.WriteRange(owner, new, key=key, start=chunk.start, total=chunk.total,
                            max_size=self.config.max_size, size=chunk.size)

    # --- Google-style sessions ------------------------------------------------------------

    def _open_session(self, request: Request, owner: str,
                      params: list[tuple[str, str]]) -> c.Command:
        """Initiation: the file will go to the same URL without `uploadType`."""
        length_field = request.header("x-upload-content-length")
        length = parse_length(length_field, "X-Upload-Content-Length") if length_field else None
        kept = [(k, v) for k, v in params if k != "uploadType"]
        target = _target(request, "POST", path=_with_query(request.path, kept),
                         content_type=request.header("x-upload-content-type"))
        # The session URI is the capability (as at Google): no owner is checked on it; its
        # creator's credentials still count it against their cap on uploads in progress.
        new = replace(self._new(request, "", length, target), account=owner)
        return c.Open(new)

    def _session_request(self, request: Request, session_id: str) -> c.Command:
        if request.method == "DELETE":
            return c.Cancel(session_id, "")
        range_field = request.header("content-range")
        if range_field is None:
            if request.body_length is None:
                raise errors.bad_request("a chunk needs Content-Range or Content-Length")
            range_field = f"bytes 0-{request.body_length - 1}/{request.body_length}" \
                if request.body_length else "bytes */0"
        chunk = _chunk(request, range_field)
        return c.WriteRange("", upload_id=session_id, start=chunk.start, total=chunk.total,
                            max_size=self.config.max_size, size=chunk.size)

    def _new(self, request: Request, owner: str, length: int | None, target: Target) -> NewUpload:
        if self.config.max_size and length is not None and length > self.config.max_size:
            raise errors.too_large(f"{length} bytes is more than the limit of {self.config.max_size}")
        return NewUpload(id=new_upload_id(), protocol=self.name, owner=owner, length=length,
                         metadata={}, target=target, max_size=self.config.max_size,
                         expiration=self.config.expiration)

    # --- rendering ------------------------------------------------------------------------

    def render(self, request: Request, command: c.Command, outcome: c.Outcome) -> Reply:
        if isinstance(command, c.Immediate):
            return command.reply
        if outcome.error is not None:
            return _error(outcome.error, outcome.upload.offset if outcome.upload else 0)
        if isinstance(command, c.Cancel):
            return Reply(499, (), b"", "Client Closed Request")  # what GCS answers (section 3)
        upload = outcome.upload
        if isinstance(command, c.Open) and upload is not None:
            params = [(k, v) for k, v in parse_qsl(request.query, keep_blank_values=True)
                      if k != "uploadType"]
            session_query = [("uploadType", "resumable"), *params, (SESSION_PARAM, upload.id)]
            location = request.absolute(_with_query(request.path, session_query))
            return Reply(200, (("Location", location), ("Content-Length", "0")))
        # GCS clients accept only 200 as a session's final status: a 2xx is given as 200.
        session = isinstance(command, c.WriteRange) and command.upload_id is not None
        return replies.final(outcome, accepted_status=200 if session else None) or \
            _resume_incomplete(outcome.offset if upload is not None else 0)


def _session_id(params: list[tuple[str, str]]) -> str | None:
    """A session URI the shim handed out carries both `uploadType=resumable` and
    `upload_id`; a legacy URL that merely has an `upload_id` parameter is not one."""
    found = dict(params)
    return found.get(SESSION_PARAM) if found.get("uploadType") == "resumable" else None


def _opens_session(request: Request, params: list[tuple[str, str]]) -> bool:
    return ("uploadType", "resumable") in params or \
        (request.header("x-goog-resumable") or "").strip().lower() == "start"


def _chunk(request: Request, range_field: str) -> ContentRange:
    """A chunk's range must match its body: Content-Length = END - START + 1 (RFC 9110 14.4)."""
    chunk = parse_content_range(range_field)
    body = request.body_length
    if chunk.start is None and body:
        raise errors.bad_request("an inquiry (Content-Range: bytes */N) must have no body")
    if chunk.start is not None and body is not None and body != chunk.size:
        raise errors.bad_request(f"Content-Range announces {chunk.size} bytes, the body has {body}")
    return chunk


def _target(request: Request, method: str, path: str | None = None,
            content_type: str | None = None) -> Target:
    return targets.target(method, path or request.target, request.fields,
                          protocol_prefixes=("x-goog-", "x-guploader-"),
                          content_type=content_type or request.header("content-type"))


def _with_query(path: str, params: list[tuple[str, str]]) -> str:
    return f"{path}?{urlencode(params)}" if params else path


def _resume_incomplete(stored: int) -> Reply:
    """308 with `Range: bytes=0-LAST`, or without Range when nothing is stored (section 3)."""
    stored_range = format_range(stored)
    headers = (("Range", stored_range),) if stored_range else ()
    return Reply(308, (*headers, ("Content-Length", "0")), b"", RESUME_INCOMPLETE)


def _error(error: ShimError, stored: int) -> Reply:
    # A session that was cancelled, failed or expired is simply unknown, as at Google (404).
    status = 404 if error.code == "gone" else error.status
    reply = replies.text(status, error.message, error.fields)
    if error.code == "gap":
        stored_range = format_range(stored)
        extra = (("Range", stored_range),) if stored_range else ()
        return Reply(reply.status, (*reply.headers, *extra), reply.body)
    return reply

