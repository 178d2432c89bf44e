"""Two small variants from seed 001, each off by default (PROTOCOLS.md section 6):

- URI query parameter: `PUT <url>?range=S-E/TOTAL` writes that range; the parameter is
  removed before the file is forwarded. `range=S-E/*` while the total is unknown,
  `range=*/TOTAL` with an empty body asks what is stored.
- `Expect: Range` with `Range: bytes S-E/TOTAL` on a PUT: a server that does not know the
  expectation refuses it (417), so a client can never overwrite a file with a part of it.

An incomplete upload is answered `202 Accepted` with `Range: bytes=0-LAST` (what is stored);
the request that completes it gets the legacy server's own answer.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from shim import commands as c
from shim import targets
from shim.config import Seed001Config
from shim.engine import NewUpload, new_upload_id
from shim.errors import ShimError
from shim.model import Reply, Request
from shim.protocols import guard, replies
from shim.wire import ContentRange, format_range, parse_content_range, path_allowed

RANGE_PARAM = "range"


class Seed001:
    name = "seed001"
    understands = frozenset({guard.RANGE_QUERY, guard.EXPECT_RANGE})
    """The upload fields this protocol handles (`shim.protocols.guard.announced`)."""

    def __init__(self, config: Seed001Config) -> None:
        self.config = config

    def parse(self, request: Request, owner: str) -> c.Command | None:
        if request.method != "PUT" or not self._eligible(request.path):
            return None
        params = parse_qsl(request.query, keep_blank_values=True)
        in_query = dict(params).get(RANGE_PARAM)
        try:
            if self.config.query_range and in_query is not None:
                kept = "&".join(p for p in request.query.split("&")
                                if p.split("=", 1)[0] != RANGE_PARAM)
                url = f"{request.path}?{kept}" if kept else request.path  # the rest as sent
                return self._write(request, owner, parse_content_range(f"bytes {in_query}"), url)
            if self.config.expect_range and _expects_range(request):
                chunk = parse_content_range(request.header("range") or "")
                return self._write(request, owner, chunk, request.target)
        except ShimError as exc:
            return c.Refuse(exc)
        return None

    def _eligible(self, path: str) -> bool:
        return path_allowed(path, self.config.paths)

    def _write(self, request: Request, owner: str, chunk: ContentRange, url: str) -> c.Command:
        if chunk.start is not None and request.body_length not in (None, chunk.size):
            raise ShimError("bad-request", f"the range announces {chunk.size} bytes, the body "
                            f"has {request.body_length}", 400)
        target = targets.target("PUT", url, request.fields, protocol_names=frozenset({"range"}),
                                content_type=request.header("content-type"))
        new = NewUpload(id=new_upload_id(), protocol=self.name, owner=owner, length=chunk.total,
                        metadata={}, target=target, max_size=self.config.max_size,
                        expiration=self.config.expiration)
        return c.WriteRange(owner, new, key=f"{self.name}:{owner}:{url}", start=chunk.start,
                            total=chunk.total, max_size=self.config.max_size,
                            size=chunk.size if chunk.start is not None else None)

    def render(self, request: Request, command: c.Command, outcome: c.Outcome) -> Reply:
        stored = outcome.upload.offset if outcome.upload is not None else 0
        stored_range = format_range(outcome.offset if outcome.error is None else stored)
        range_field = (("Range", stored_range),) if stored_range else ()
        if outcome.error is not None:
            return replies.refusal(outcome.error, range_field)
        return replies.final(outcome) or Reply(202, range_field)


def _expects_range(request: Request) -> bool:
    expectations = [e.strip().lower() for e in (request.header("expect") or "").split(",")]
    return "range" in expectations and request.header("range") is not None
