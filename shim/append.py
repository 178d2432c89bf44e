"""One request body being written to an upload: the bytes it appends, the stored bytes it
is compared with, and what makes it fail. Runs in mitmproxy's stream callback (no awaits
there); the engine opens and ends it."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from shim import errors
from shim.errors import ShimError
from shim.model import Upload
from shim.store import ChunkWriter


@dataclass(frozen=True)
class Checksum:
    algorithm: str
    digest: bytes


class BodyFilter(Protocol):
    """What a protocol does to a body as it streams in (S3: aws-chunked decoding, digests).
    A filtered body is kept whole or not at all."""

    def feed(self, data: bytes) -> bytes:
        """The bytes to store for `data` (raises ShimError when the body is malformed)."""

    def end(self) -> dict[str, str]:
        """The body ended: judge it whole (raises ShimError), and return facts about it to
        keep in the upload's metadata (S3: its ETag)."""


_REFUSALS = frozenset({"too-large", "bad-request", "gap", "range", "conflict"})


class Append:
    """One request body being written to an upload under a write lease. `feed` runs on the
    event loop (mitmproxy's stream callback cannot await)."""

    def __init__(self, upload: Upload, writer: ChunkWriter, room: int | None,
                 checksum: Checksum | None, holder: str) -> None:
        self.upload = upload
        self.writer = writer
        self.room = room
        """How many bytes past `writer.start` fit; None: no limit."""
        self.checksum = checksum
        self.hasher = hashlib.new(checksum.algorithm) if checksum else None
        self.holder = holder
        """Who holds the write lease (one per request)."""
        self.failure: ShimError | None = None
        self.compare = 0
        """Bytes at the start of the body that are stored already: compared, not written."""
        self.replaces = False
        """The body starts at 0: if it differs from what is stored it is a new file."""
        self.interrupt: Callable[[], object] | None = None
        """Ends the request that carries this body; set by whoever owns the connection."""
        self.released = asyncio.Event()
        self.ended = False
        self.on_rewind: Callable[[int], Awaitable[None]] | None = None
        """Puts the start of a new file (a body from 0 that differs) on record."""
        self.rewinding: asyncio.Future[None] | None = None
        self.held: list[bytes] = []
        self.floor: int | None = None
        """Where a new file began: what HEAD reports until the body is committed."""
        self.verify_only = False
        """Only compare the body with the stored bytes (see Engine.begin_check)."""
        self.digests: dict[str, str] = dict(upload.digests)
        """Digests of the whole file to save once this body is accepted (RFC 9530)."""
        self.declared_length: int | None = None
        """A deferred length this request declares (tus creation-defer-length): saved with
        the offset once the body is accepted, never by a refused request."""
        self.expected: int | None = None
        """The body's size by its headers (a Content-Range), when they say; see `check_size`."""
        self.received = 0
        """Body bytes fed so far, compared ones included."""
        self.filter: BodyFilter | None = None
        """Decodes and judges the body (see BodyFilter); None: stored as it comes."""

    def feed(self, data: bytes) -> None:
        if self.failure is not None or not data or self.ended:
            return
        self.received += len(data)
        if self.expected is not None and self.received > self.expected:
            self.failure = errors.bad_request(f"the body is longer than the {self.expected} "
                                              "bytes its headers announced")
            return
        if self.rewinding is not None and not self.rewinding.done():
            self.held.append(data)  # until the new file's start is on record
            return
        if self.filter is not None:
            try:
                data = self.filter.feed(data)
            except ShimError as exc:
                self.failure = exc
                return
        if self.compare:
            data = self._compare(data)
            if not data:
                return
        self._write(data)

    def _write(self, data: bytes) -> None:
        if self.room is not None and self.writer.written + len(data) > self.room:
            self.failure = errors.too_large("the body goes past the upload's length")
            return
        try:
            self.writer.write(data)
        except OSError as exc:
            self.failure = errors.insufficient_storage(f"cannot store the body: {exc.strerror}")
            return
        if self.hasher is not None:
            self.hasher.update(data)

    def _compare(self, data: bytes) -> bytes:
        """Check the part of `data` that overlaps stored bytes; return what is left to write.

        Equal bytes are skipped. Different ones: a body from 0 is a new file that replaces
        the stored one from the first difference on; a later start is refused (409)."""
        size = min(self.compare, len(data))
        position = self.writer.position - self.compare
        stored = self.writer.read_back_at(position, size)
        if stored == data[:size]:
            self.compare -= size
            return data[size:]
        if not self.replaces or self.on_rewind is None:
            self.failure = ShimError("conflict", "the bytes sent differ from the bytes stored "
                                     "at the same offsets", 409)
            return b""
        differs = next(i for i, (a, b) in enumerate(zip(stored, data[:size], strict=False))
                       if a != b) if len(stored) == size else len(stored)
        self.compare = 0
        self.floor = position + differs
        self.held = [data[differs:]]
        self.rewinding = asyncio.ensure_future(self._rewind(self.on_rewind, self.floor))
        return b""

    async def _rewind(self, on_rewind: Callable[[int], Awaitable[None]], position: int) -> None:
        """A new file from `position` on: put that on record first (a crash then keeps only
        the bytes both files share, never a splice), then write what arrived meanwhile."""
        try:
            await on_rewind(position)
        except ShimError as exc:
            self.failure = exc
            return
        self.writer.rewind(position)
        held, self.held = self.held, []
        for data in held:
            if self.failure is None:
                self._write(data)

    def seek(self, start: int) -> None:
        """The next bytes belong at `start` (a body with several ranges): at or before the
        end written so far; what is stored already is compared, not written again."""
        position = self.writer.position
        if start > position:
            self.failure = ShimError("gap", f"a range starts at {start}, after the {position} "
                                     "bytes stored", 416)
        else:
            self.compare = self.writer.position - start

    def check_size(self) -> None:
        """The body ended: one shorter than its headers announced is refused like a longer
        one (a chunked body's end is its own; nothing framed it to the range)."""
        if self.failure is None and self.expected is not None and self.received != self.expected:
            self.failure = errors.bad_request(f"the body has {self.received} bytes; its "
                                              f"headers announced {self.expected}")

    @property
    def all_or_nothing(self) -> bool:
        """A checksummed chunk, a filtered body, or a body refused for what it says, is kept
        whole or not at all; only a body cut off or failed by the disk keeps what arrived."""
        return self.checksum is not None or self.filter is not None or (
            self.failure is not None and self.failure.code in _REFUSALS)
