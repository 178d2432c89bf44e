"""tus core on the target URL itself (seed 003's proposal; PROTOCOLS.md section 1, last
bullet): the file is created by the ordinary `PUT <url>` carrying `Tus-Resumable`; a dropped
PUT keeps its bytes; `HEAD <url>` gives `Upload-Offset`; `PATCH <url>` appends. No creation
extension, no upload ids: the URL names the upload (per owner). When the announced length is
reached, ONE `PUT <url>` goes to the legacy server and its answer is the answer.
"""

from __future__ import annotations

from shim import commands as c
from shim import errors, targets
from shim.config import TusTargetConfig
from shim.engine import NewUpload, new_upload_id
from shim.errors import ShimError
from shim.model import Reply, Request, Upload
from shim.protocols import guard, replies
from shim.protocols.tus import CHUNK_TYPE, VERSION, check_chunk_type, check_version, parse_checksum
from shim.wire import parse_length, path_allowed


class TusTarget:
    name = "tus-target"
    understands = frozenset({guard.UPLOAD_OFFSET, guard.TUS_LENGTH})
    """The upload fields this protocol handles (`shim.protocols.guard.announced`)."""

    def __init__(self, config: TusTargetConfig, tus_endpoint: str) -> None:
        self.config = config
        self.tus_endpoint = tus_endpoint

    def parse(self, request: Request, owner: str) -> c.Command | None:
        if request.header("tus-resumable") is None or not self._eligible(request.path):
            return None
        key = f"{self.name}:{owner}:{request.target}"
        try:
            check_version(request)
            if request.method == "PUT":
                return self._create(request, owner, key)
            if request.method == "HEAD":
                return c.Inspect(None, owner, key=key)
            if request.method == "PATCH":
                check_chunk_type(request)
                offset = request.header("upload-offset")
                if offset is None:
                    raise errors.bad_request("Upload-Offset is missing")
                return c.Append(None, owner, parse_length(offset, "Upload-Offset"),
                                checksum=parse_checksum(request), key=key,
                                max_size=self.config.max_size)
            if request.method == "DELETE":
                return c.Cancel(None, owner, key=key)
        except ShimError as exc:
            return c.Refuse(exc)
        return None

    def _eligible(self, path: str) -> bool:
        if path.startswith(self.tus_endpoint):
            return False  # the tus endpoint's own requests are the tus module's
        return path_allowed(path, self.config.paths)

    def _create(self, request: Request, owner: str, key: str) -> c.Command:
        """The PUT announces the whole length: Upload-Length, else its Content-Length."""
        length_text = request.header("upload-length")
        length = parse_length(length_text, "Upload-Length") if length_text else request.body_length
        if length is None:
            raise errors.bad_request("a chunked PUT needs Upload-Length")
        if self.config.max_size and length > self.config.max_size:
            raise errors.too_large(f"{length} bytes is more than the limit of {self.config.max_size}")
        target = targets.target("PUT", request.target, request.fields,
                                content_type=_file_type(request.header("content-type")))
        new = NewUpload(id=new_upload_id(), protocol=self.name, owner=owner, length=length,
                        metadata={}, target=target, max_size=self.config.max_size,
                        expiration=self.config.expiration)
        return c.WriteRange(owner, new, key=key, start=0, total=length, restart=True,
                            max_size=self.config.max_size)

    def render(self, request: Request, command: c.Command, outcome: c.Outcome) -> Reply:
        base = [("Tus-Resumable", VERSION)]
        if outcome.error is not None:
            return replies.refusal(outcome.error, tuple(base))
        upload = outcome.upload
        if isinstance(command, c.Cancel) or upload is None:
            return Reply(204, tuple(base))
        offset = [("Upload-Offset", str(outcome.offset))]
        if isinstance(command, c.Inspect):
            return Reply(200, (*base, *offset, *_length(upload), ("Cache-Control", "no-store")))
        return replies.final(outcome, (*base, *offset)) or Reply(204, (*base, *offset))


def _file_type(content_type: str | None) -> str | None:
    """The file's own media type: tus's chunk label says nothing about the file."""
    label = (content_type or "").split(";")[0].strip().lower()
    return None if label == CHUNK_TYPE else content_type


def _length(upload: Upload) -> list[tuple[str, str]]:
    return [("Upload-Length", str(upload.length))] if upload.length is not None else []
