"""The guard: no request that announces a partial or resumable upload reaches the legacy
server, which would take its body for a whole file (or, for a PATCH, write it into one).

Two rules, both pure:

- `announced` names every upload field a request carries, in any form a protocol here
  knows. A protocol that takes a request must handle each of them (`Protocol.understands`);
  the addon refuses the request (400) when it carries one the protocol does not, so a request
  that two protocols match goes to the first one asked, whole, or is refused: never on to
  the legacy server with another protocol's fields.
- `Guard`, asked last, refuses a request that announces an upload no enabled protocol took on
  its path (`guard.pass_through` lets an operator whose legacy server speaks Content-Range
  itself forward those instead). Everything else passes through, a complete
  `Upload-Complete: ?1` upload too (its body is the whole file, as URLSession sends ordinary
  uploads).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from shim import commands as c
from shim.errors import ShimError
from shim.model import Reply, Request
from shim.protocols import replies

_WITH_BODY = frozenset({"PUT", "POST", "PATCH"})
_BYTERANGES = frozenset({"message/byteranges", "multipart/byteranges"})
_RANGE_VALUE = re.compile(r"(?:[0-9]+-[0-9]+|\*)/(?:[0-9]+|\*)")
"""Seed 001's `?range=S-E/TOTAL`; another `range` parameter is the application's own."""

CONTENT_RANGE = "Content-Range"
UPLOAD_OFFSET = "Upload-Offset"
UPLOAD_COMPLETE = "Upload-Complete: ?0 (or Upload-Incomplete: ?1)"
TUS_LENGTH = "Tus-Resumable with Upload-Length (or Upload-Defer-Length)"
BYTERANGES = "a byteranges Content-Type"
RANGE_QUERY = "a range=S-E/TOTAL query parameter"
EXPECT_RANGE = "Expect: Range"


def announced(request: Request) -> list[str]:
    """The upload fields of `request`, named for a person: the forms of seeds 000-004, tus,
    the IETF draft and Google's sessions that make a body a part of a file. The method is
    the request's own and the one X-HTTP-Method-Override names, if any: frameworks such as
    Rails and Express honour the override, so a GET overridden to PUT is a PUT to the legacy
    server; one that does not sees a PATCH overridden to DELETE as the PATCH it is."""
    override = (request.header("x-http-method-override") or "").strip().upper()
    methods = {request.method.upper(), override}
    body = bool(methods & _WITH_BODY)
    found = []
    if body and request.header("content-range") is not None:
        found.append(CONTENT_RANGE)
    if body and request.header("upload-offset") is not None:
        found.append(UPLOAD_OFFSET)
    if body and _partial_ietf(request):
        found.append(UPLOAD_COMPLETE)
    if request.header("tus-resumable") is not None and (
            request.header("upload-length") is not None
            or request.header("upload-defer-length") is not None):
        found.append(TUS_LENGTH)
    media_type = (request.header("content-type") or "").split(";")[0].strip().lower()
    if "PATCH" in methods and media_type in _BYTERANGES:
        found.append(BYTERANGES)
    if any(name == "range" and _RANGE_VALUE.fullmatch(value.strip())
           for name, value in parse_qsl(request.query, keep_blank_values=True)):
        found.append(RANGE_QUERY)
    expectations = (request.header("expect") or "").lower().split(",")
    if any(e.strip() == "range" for e in expectations):
        found.append(EXPECT_RANGE)
    return found


def _partial_ietf(request: Request) -> bool:
    complete = (request.header("upload-complete") or "").split(";")[0].strip()
    incomplete = (request.header("upload-incomplete") or "").split(";")[0].strip()
    return complete == "?0" or incomplete == "?1"


def foreign(request: Request, understood: frozenset[str]) -> ShimError | None:
    """The refusal of a request a protocol took that carries upload fields it does not
    handle; None when it handles them all."""
    others = [name for name in announced(request) if name not in understood]
    if not others:
        return None
    return ShimError("foreign-fields", f"this request carries {', '.join(others)}, which the "
                     "protocol that takes it here does not use; nothing was stored or "
                     "forwarded", 400)


class Guard:
    name = "guard"
    understands: frozenset[str] = frozenset()

    def __init__(self, pass_through: bool = False) -> None:
        self.pass_through = pass_through

    def parse(self, request: Request, owner: str) -> c.Command | None:
        found = announced(request)
        if not found or self.pass_through:
            return None
        return c.Refuse(ShimError("not-resumable-here", f"this request carries "
                                  f"{', '.join(found)}, but no resumable upload protocol "
                                  "enabled here accepts it; nothing was forwarded", 400))

    def render(self, request: Request, command: c.Command, outcome: c.Outcome) -> Reply:
        error = outcome.error
        assert error is not None
        return replies.refusal(error)
