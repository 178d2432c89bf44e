"""PATCH with message/byteranges or multipart/byteranges (seed 004:
draft-wright-http-partial-upload), on the legacy server's own URL.

`message/byteranges` carries one range: a header block with `Content-Range: bytes S-E/TOTAL`,
a blank line, the bytes. `multipart/byteranges` carries several, each part the same. Ranges
must start at or before the stored end ("Security Considerations": no gap is ever filled with
anything but bytes the client sent) and, within one body, follow each other without overlap.
An incomplete upload is answered `202 Accepted`; the range that completes it gets the legacy
server's own answer to ONE `PUT <url>` of the whole file.

`HEAD <url>` while an upload is in progress is answered by the shim: `200 OK` with
`Content-Length` and `Upload-Offset` both the number of bytes uploaded. The draft names
"200 (OK) or 2__ (Incomplete Content)" and a HEAD's Content-Length is the length of the
representation, which here is the part uploaded so far; no upload in progress: the HEAD goes
to the legacy server.
"""

from __future__ import annotations

import re

from shim import commands as c
from shim import errors, targets
from shim.config import ByterangesConfig
from shim.engine import NewUpload, new_upload_id
from shim.errors import ShimError
from shim.model import Reply, Request
from shim.protocols import guard, replies
from shim.wire import ContentRange, as_bytes, parse_content_range, path_allowed

MAX_HEADER_BLOCK = 16 * 1024
_BOUNDARY = re.compile(r'boundary="?([^";]{1,70})"?', re.IGNORECASE)


class Byteranges:
    name = "byteranges"
    understands = frozenset({guard.BYTERANGES})
    """The upload fields this protocol handles (`shim.protocols.guard.announced`)."""

    def __init__(self, config: ByterangesConfig) -> None:
        self.config = config

    def parse(self, request: Request, owner: str) -> c.Command | None:
        if not path_allowed(request.path, self.config.paths):
            return None
        key = f"{self.name}:{owner}:{request.target}"
        if request.method == "HEAD":
            return c.Inspect(None, owner, key=key, pass_if_missing=True)
        media_type = (request.header("content-type") or "").split(";")[0].strip().lower()
        if request.method != "PATCH" or media_type not in ("message/byteranges",
                                                            "multipart/byteranges"):
            return None
        try:
            decoder = _decoder(media_type, request.header("content-type") or "")
        except ShimError as exc:
            return c.Refuse(exc)
        try:
            target = targets.target("PUT", request.target, request.fields,
                                    protocol_names=frozenset({"if-none-match"}))
        except ShimError as exc:
            return c.Refuse(exc)
        new = NewUpload(id=new_upload_id(), protocol=self.name, owner=owner, length=None,
                        metadata={}, target=target,
                        max_size=self.config.max_size, expiration=self.config.expiration)
        return c.WriteSegments(owner, new, key, decoder, max_size=self.config.max_size,
                               if_none_match=(request.header("if-none-match") or "").strip() == "*")

    def render(self, request: Request, command: c.Command, outcome: c.Outcome) -> Reply:
        if outcome.error is not None:
            return replies.refusal(outcome.error)
        if outcome.upload is None:
            return Reply(202)
        if isinstance(command, c.Inspect):
            uploaded = str(outcome.offset)
            return Reply(200, (("Content-Length", uploaded), ("Upload-Offset", uploaded)))
        return replies.final(outcome) or Reply(202, (("Upload-Offset", str(outcome.offset)),))


def _decoder(media_type: str, content_type: str) -> c.BodyDecoder:
    if media_type == "message/byteranges":
        return MessageDecoder()
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise errors.bad_request("multipart/byteranges needs a boundary parameter")
    return MultipartDecoder(as_bytes(match.group(1)))


def parse_part_head(block: bytes) -> ContentRange:
    """A part's header block: it must carry a complete `Content-Range: bytes S-E/TOTAL`."""
    try:
        text = block.decode("ascii")
    except UnicodeDecodeError as exc:
        raise errors.bad_request("a range's header block is not ASCII") from exc
    fields = {}
    for line in text.split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon or not name.strip() or name != name.strip():
            raise errors.bad_request(f"malformed header line in a range: {line!r}")
        fields[name.lower()] = value.strip()
    if "content-range" not in fields:
        raise errors.bad_request("a range has no Content-Range")
    chunk = parse_content_range(fields["content-range"])
    if chunk.start is None:
        raise errors.bad_request("a range must name its bytes, not bytes */N")
    return chunk


class _Reader:
    """Byte bookkeeping shared by both decoders: a header block, then exactly N data bytes."""

    def __init__(self) -> None:
        self.pending = bytearray()
        self.remaining = 0
        self.previous_end = -1

    def take_data(self, events: list[c.RangeStart | bytes]) -> None:
        taken = bytes(self.pending[: self.remaining])
        del self.pending[: len(taken)]
        self.remaining -= len(taken)
        if taken:
            events.append(taken)

    def take_head(self, terminator: bytes) -> bytes | None:
        end = self.pending.find(terminator)
        # The same limit whether the block arrived in one chunk or in many.
        if (end if end >= 0 else len(self.pending)) > MAX_HEADER_BLOCK:
            raise errors.bad_request("a range's header block is too long")
        if end < 0:
            return None
        block = bytes(self.pending[:end])
        del self.pending[: end + len(terminator)]
        return block

    def start(self, chunk: ContentRange, events: list[c.RangeStart | bytes]) -> None:
        assert chunk.start is not None
        if chunk.start <= self.previous_end:
            raise errors.bad_request("ranges in one body must be in order and must not overlap")
        self.previous_end = chunk.end if chunk.end is not None else chunk.start
        self.remaining = chunk.size
        events.append(c.RangeStart(chunk))


class MessageDecoder(_Reader):
    """message/byteranges: one header block, a blank line, then exactly the range's bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.state = "head"

    def feed(self, data: bytes) -> list[c.RangeStart | bytes]:
        self.pending += data
        events: list[c.RangeStart | bytes] = []
        if self.state == "head":
            block = self.take_head(b"\r\n\r\n")
            if block is None:
                return events
            self.start(parse_part_head(block), events)
            self.state = "data"
        self.take_data(events)
        if self.remaining == 0 and self.pending.strip():
            raise errors.bad_request("bytes after the end of the range")
        self.pending.clear()
        return events

    def end(self) -> None:
        if self.state == "head" or self.remaining:
            raise errors.bad_request("the body ended inside the range")


class MultipartDecoder(_Reader):
    """multipart/byteranges (RFC 9110 section 14.6): parts delimited by `--boundary`, each a
    header block and exactly the bytes its Content-Range names (so no boundary is searched
    for inside data), closed by `--boundary--`."""

    def __init__(self, boundary: bytes) -> None:
        super().__init__()
        self.delimiter = b"--" + boundary
        self.state = "preamble"
        self.parts = 0

    def feed(self, data: bytes) -> list[c.RangeStart | bytes]:
        self.pending += data
        events: list[c.RangeStart | bytes] = []
        while self._step(events):
            pass
        return events

    def _step(self, events: list[c.RangeStart | bytes]) -> bool:
        """Advance one state if the bytes at hand allow it."""
        if self.state == "preamble":
            return self._after_delimiter(self.pending.find(self.delimiter))
        if self.state == "head":
            block = self.take_head(b"\r\n\r\n")
            if block is None:
                return False
            self.start(parse_part_head(block), events)
            self.parts += 1
            self.state = "data"
            return True
        if self.state == "data":
            self.take_data(events)
            if self.remaining:
                return False
            self.state = "delimiter"
            return True
        if self.state == "delimiter":
            expected = b"\r\n" + self.delimiter
            if len(self.pending) < len(expected):
                return False
            if not self.pending.startswith(expected):
                raise errors.bad_request("a part is longer than its Content-Range")
            return self._after_delimiter(2)
        if self.state == "epilogue":
            self.pending.clear()
        return False

    def _after_delimiter(self, at: int) -> bool:
        """After `--boundary`: `--` closes the body, CRLF (after optional padding) opens a part."""
        if at < 0:
            if len(self.pending) > MAX_HEADER_BLOCK:
                raise errors.bad_request("no multipart boundary found")
            return False
        rest = self.pending[at + len(self.delimiter):]
        line_end = rest.find(b"\r\n")
        if rest.startswith(b"--"):
            self.state = "epilogue"
            self.pending.clear()
            return False
        if line_end < 0:
            return False
        if rest[:line_end].strip(b" \t"):
            raise errors.bad_request("malformed multipart boundary line")
        del self.pending[: at + len(self.delimiter) + line_end + 2]
        self.state = "head"
        return True

    def end(self) -> None:
        if self.state != "epilogue" or self.parts == 0:
            raise errors.bad_request("the multipart body ended before its closing boundary")
