"""The last protocol asked: a request that no enabled protocol took, but that announces
itself as part of a file, is refused instead of forwarded, so the legacy server never sees a
partial body (a legacy server that applies PATCH would write it into the file).

Partial by construction: a PATCH with `Upload-Offset` (tus, IETF appends), or a POST/PUT
with `Upload-Complete: ?0` or `Upload-Incomplete: ?1` (an IETF upload in parts). Everything
else passes through, a complete `Upload-Complete: ?1` upload too (its body is the whole file,
as URLSession sends ordinary uploads).
"""

from __future__ import annotations

from shim import commands as c
from shim.errors import ShimError
from shim.model import Reply, Request
from shim.protocols import replies


class Guard:
    name = "guard"

    def parse(self, request: Request, owner: str) -> c.Command | None:
        reason = _partial(request)
        if reason is None:
            return None
        return c.Refuse(ShimError("not-resumable-here", f"{reason}, but no resumable upload "
                                  "protocol enabled here accepts it; nothing was forwarded", 400))

    def render(self, request: Request, command: c.Command, outcome: c.Outcome) -> Reply:
        error = outcome.error
        assert error is not None
        return replies.refusal(error)


def _partial(request: Request) -> str | None:
    if request.method == "PATCH" and request.header("upload-offset") is not None:
        return "this PATCH appends to an upload (Upload-Offset)"
    if request.method in ("POST", "PUT"):
        complete = (request.header("upload-complete") or "").split(";")[0].strip()
        incomplete = (request.header("upload-incomplete") or "").split(";")[0].strip()
        if complete == "?0" or incomplete == "?1":
            return "this request is one part of an upload"
    return None
