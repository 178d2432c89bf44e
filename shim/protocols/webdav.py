"""WebDAV resumable upload, as IT Hit WebDAV servers do it (seed 002; PROTOCOLS.md section 5),
on the path prefixes in `webdav.paths` only.

- `OPTIONS`: the legacy server's answer, with `resumable-upload` added to its `DAV` classes.
- `PUT <file>` (with or without `Content-Range`) is spooled, so a client that breaks the
  connection ("pause") keeps what arrived; `PUT` with `Content-Range: bytes S-E/N` resumes.
- `REPORT <file or folder>` with `<i:upload-progress xmlns:i="ithit"/>`: 207 Multi-Status
  with `bytes-uploaded`, `last-chunk-saved`, `total-content-length` per upload in progress.
  Any other REPORT goes to the legacy server.
- `CANCELUPLOAD <file>`: 200, the partial data is removed.
- GET and PROPFIND of the file reach the legacy server (the old file) meanwhile.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element
from xml.sax.saxutils import escape

import defusedxml.ElementTree as safe_xml
from defusedxml import DefusedXmlException

from shim import commands as c
from shim import errors, targets
from shim.config import WebdavConfig
from shim.engine import NewUpload, new_upload_id
from shim.errors import ShimError
from shim.model import Reply, Request, Upload
from shim.protocols import guard, replies
from shim.wire import as_bytes, http_date, parse_content_range, path_allowed

ITHIT = "ithit"
MAX_REPORT_BODY = 64 * 1024


class Webdav:
    name = "webdav"
    understands = frozenset({guard.CONTENT_RANGE})
    """The upload fields this protocol handles (`shim.protocols.guard.announced`)."""

    def __init__(self, config: WebdavConfig) -> None:
        self.config = config

    def parse(self, request: Request, owner: str) -> c.Command | None:
        if not self.config.paths or not path_allowed(request.path, self.config.paths):
            return None
        try:
            if request.method == "OPTIONS":
                return c.Forward("DAV", "resumable-upload")
            if request.method == "PUT":
                return self._put(request, owner)
            if request.method == "REPORT":
                return self._report(request, owner)
            if request.method == "CANCELUPLOAD":
                return c.Cancel(None, owner, key=self._key(owner, request.path))
        except ShimError as exc:
            return c.Refuse(exc)
        return None

    def _key(self, owner: str, path: str) -> str:
        return f"{self.name}:{owner}:{path}"

    def _put(self, request: Request, owner: str) -> c.Command | None:
        """A whole file from 0 (a restart replaces an upload in progress), or a resumed range."""
        range_field = request.header("content-range")
        if range_field is None and request.body_length is None:
            return None  # chunked and unannounced: nothing to resume against; as without us
        if range_field is None:
            start, total, restart, size = 0, request.body_length, True, request.body_length
        else:
            chunk = parse_content_range(range_field)
            if chunk.start is None or (request.body_length not in (None, chunk.size)):
                raise errors.bad_request("Content-Range must name the bytes this PUT carries")
            start, total, restart, size = chunk.start, chunk.total, False, chunk.size
        target = targets.target("PUT", request.target, request.fields,
                                content_type=request.header("content-type"))
        new = NewUpload(id=new_upload_id(), protocol=self.name, owner=owner, length=total,
                        metadata={}, target=target, max_size=self.config.max_size,
                        expiration=self.config.expiration)
        return c.WriteRange(owner, new, key=self._key(owner, request.path), start=start,
                            total=total, restart=restart, max_size=self.config.max_size,
                            size=size)

    def _report(self, request: Request, owner: str) -> c.Command | None:
        """Only the upload-progress report is the shim's; the body decides."""
        if request.body is None:
            if request.body_length is None or request.body_length > MAX_REPORT_BODY:
                raise errors.too_large(f"a REPORT body over {MAX_REPORT_BODY} bytes is not read")
            return c.NeedBody(MAX_REPORT_BODY)
        if not _is_upload_progress(request.body):
            return None
        folder = request.path if request.path.endswith("/") else request.path + "/"
        return c.Report(owner, self._key(owner, folder), self._key(owner, request.path))

    def render(self, request: Request, command: c.Command, outcome: c.Outcome) -> Reply:
        if outcome.error is not None:
            return replies.refusal(outcome.error)
        if isinstance(command, c.Report):
            prefix = len(self._key(command.owner, ""))
            return _multistatus([(key[prefix:], upload) for key, upload in outcome.listing])
        if isinstance(command, c.Cancel):
            return Reply(200)
        return replies.final(outcome) or Reply(202)  # a part stored, the file not complete yet


def _is_upload_progress(body: bytes) -> bool:
    """Whether a REPORT asks for IT Hit's upload-progress. defusedxml refuses DTDs, entity
    expansion and external entities outright (400), so no entity is ever expanded."""
    try:
        root: Element = safe_xml.fromstring(body, forbid_dtd=True)
    except (DefusedXmlException, safe_xml.ParseError) as exc:
        raise errors.bad_request(f"the REPORT body is not acceptable XML: {exc}") from exc
    return bool(root.tag == f"{{{ITHIT}}}upload-progress")


def _multistatus(uploads: list[tuple[str, Upload]]) -> Reply:
    """207 Multi-Status (RFC 4918 section 13), one response per upload in progress."""
    responses = "".join(_response(path, upload) for path, upload in sorted(uploads))
    body = ('<?xml version="1.0" encoding="utf-8"?>\n'
            f'<D:multistatus xmlns:D="DAV:" xmlns:ithit="{ITHIT}">{responses}</D:multistatus>\n')
    return Reply(207, (("Content-Type", 'text/xml; charset="utf-8"'),), as_bytes(body),
                 "Multi-Status")


def _response(path: str, upload: Upload) -> str:
    """`path` is the request path as the client sent it, percent-encoded already."""
    total = str(upload.length) if upload.length is not None else ""
    return (
        f"<D:response><D:href>{escape(path)}</D:href><D:propstat><D:prop>"
        f"<ithit:bytes-uploaded>{upload.offset}</ithit:bytes-uploaded>"
        f"<ithit:last-chunk-saved>{http_date(upload.updated)}</ithit:last-chunk-saved>"
        f"<ithit:total-content-length>{total}</ithit:total-content-length>"
        "</D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>"
    )
