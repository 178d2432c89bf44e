"""The store interface: what the engine and the delivery worker know of persistence.

In the manner of tusd's `DataStore` + `Locker` and httpx's transports: one small async
interface, and backends behind it (`shim.local_store.LocalStore` is the embedded default).
Nothing here touches a disk; a backend must not block the event loop.

- Records are `Upload`s saved with compare-and-set on `Upload.version`.
- Secondary keys name uploads for protocols that find them by URL; looked up by prefix.
- The expiry index and the outbox are derived from the records a backend saves
  (`Upload.expires`; `state` in COMPLETE/DELIVERING with `next_attempt`).
- Leases have a name, a holder and an expiry, so that a crashed holder's lease lapses.
- Bytes: append at an offset through a `ChunkWriter`, ranges of open files to send or hash,
  sync, truncate, delete.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, Protocol

from shim.lifecycle import Event, State, advance
from shim.model import Upload


class Conflict(Exception):
    """The record changed (or vanished) since it was read: nothing was written."""


class StoreError(Exception):
    """The store could not do what was asked (a full disk, a broken database)."""


@dataclass(frozen=True)
class Caps:
    """Caps on incomplete uploads (see `Store.incomplete`) a new record must stay under."""

    account: str
    per_account: int = 0
    """For `account`; 0: no cap."""
    total: int = 0
    """For everyone; 0: no cap."""


class CapReached(Exception):
    """A new record was not saved: a cap is reached (`per_account` or `total`)."""

    def __init__(self, cap: str) -> None:
        super().__init__(f"the {cap} cap on uploads in progress is reached")
        self.cap = cap


async def transition(store: Store, upload: Upload, event: Event | None = None, *,
                     update: Callable[[Upload], dict[str, Any]] | None = None,
                     retries: int = 64, **changes: Any) -> Upload:
    """Save `upload` with `changes` (and those `update` computes from it), its state moved by
    `event` (`shim.lifecycle`).

    On a conflict the record is read again and the change applied to the newer record
    (`update` recomputed from it), so a concurrent change is never overwritten;
    IllegalTransition when the newer state does not allow `event`, Conflict when the upload
    vanished or kept changing."""
    for _ in range(retries):
        state = advance(upload.state, event) if event is not None else upload.state
        computed = update(upload) if update is not None else {}
        try:
            return await store.save(replace(upload, state=state, **changes, **computed))
        except Conflict:
            fresh = await store.load(upload.id)
            if fresh is None:
                raise
            upload = fresh
    raise Conflict(f"upload {upload.id} kept changing")


def cap_account(upload: Upload) -> str | None:
    """The account an upload counts against on the caps (`Store.incomplete`): while it is
    still receiving and short of its length; None once it does not count."""
    if upload.state is not State.RECEIVING or upload.complete:
        return None
    return upload.account if upload.account is not None else upload.owner


def key_bytes(key: str) -> bytes:
    """A secondary key as bytes: a request path may hold bytes that are not UTF-8 (mitmproxy
    passes them on as surrogate escapes), which a database's text cannot hold."""
    return key.encode("utf-8", "surrogateescape")


def successor(prefix: bytes) -> bytes | None:
    """The least byte string above every string that starts with `prefix` (None: no bound):
    where a prefix lookup in key order stops."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class ChunkWriter:
    """Writes a body to an upload's data file as it arrives, through an unbuffered file.

    `write` runs on the event loop, inside mitmproxy's stream callback, which cannot await:
    each call is one `write(2)` into the page cache. Every byte counted in `written` has
    therefore reached the OS and survives a crash of the process, so an offset reported from
    it never goes back. `sync` (fsync) and `close` are the store's, run off the loop.

    With `flush_every`, each time that many bytes were written a `fdatasync` starts on a
    worker thread (one at a time), so the disk writes while the body still arrives: the final
    sync waits only for the rest, and dirty pages stay few enough that `write` is not
    throttled by the kernel on the loop."""

    def __init__(self, fd: int, start: int, flush_every: int = 0) -> None:
        self.fd = fd
        self.start = start
        """Where this body's first byte went."""
        self.written = 0
        """Bytes written since `start`."""
        self.flush_every = flush_every
        self._unflushed = 0
        self._flushing: asyncio.Future[None] | None = None

    @property
    def position(self) -> int:
        return self.start + self.written

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, self.position)
            self.written += done
            view = view[done:]
        if self.flush_every:
            self._unflushed += len(data)
            if self._unflushed >= self.flush_every and (
                    self._flushing is None or self._flushing.done()):
                self._unflushed = 0
                self._flushing = asyncio.get_running_loop().run_in_executor(
                    None, os.fdatasync, self.fd)

    async def flushed(self) -> None:
        """Wait for the background flush, if one runs: the file must not be closed under it.
        Raises its OSError: the kernel reports a failed write-back once, and the final sync
        must not then say the bytes are safe."""
        if self._flushing is not None:
            flushing, self._flushing = self._flushing, None
            await flushing

    def read_back_at(self, position: int, size: int) -> bytes:
        """`size` stored bytes at `position`, to compare a retried range with (a page-cache
        read, in the same callback as `write`)."""
        return os.pread(self.fd, size, position)

    def rewind(self, position: int) -> None:
        """Write the next bytes at `position`, an earlier point: what lies past it is
        dropped when the body is committed."""
        self.written = position - self.start


@dataclass(frozen=True)
class FileRange:
    """`count` bytes of an open data file from `offset`: a piece of a body sent with
    sendfile(2), so the bytes never pass through Python (`len` is its size, as h11 wants
    for a body it does not see)."""

    file: BinaryIO
    offset: int
    count: int

    def __len__(self) -> int:
        return self.count

    def split(self, tail: int) -> tuple[FileRange, ...]:
        """The range as (the bytes before its last `tail` bytes, those last bytes)."""
        if not 0 < tail < self.count:
            return (self,)
        cut = self.count - tail
        return FileRange(self.file, self.offset, cut), FileRange(self.file, self.offset + cut, tail)

    def hash_into(self, *hashers: Hasher) -> None:
        """Feed the range's bytes to `hashers` (on a worker thread: it reads the disk)."""
        position, end = self.offset, self.offset + self.count
        while position < end:
            data = os.pread(self.file.fileno(), min(HASH_READ, end - position), position)
            if not data:
                raise OSError("the data file is shorter than recorded")
            for hasher in hashers:
                hasher.update(data)
            position += len(data)


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


HASH_READ = 1024 * 1024
"""Bytes read at a time to hash a FileRange."""


class Store(Protocol):
    # --- records --------------------------------------------------------------------------

    async def load(self, upload_id: str) -> Upload | None: ...

    async def save(self, upload: Upload) -> Upload:
        """Write `upload` if the stored version is `upload.version` (0: none stored yet);
        return it with the new version. Conflict otherwise."""

    async def create(self, upload: Upload, caps: Caps | None = None) -> Upload:
        """Save a new record (`upload.version` 0) unless `caps` are reached (CapReached): the
        count and the save are one step, so concurrent creations cannot pass a cap together."""

    async def remove(self, upload: Upload) -> None:
        """Forget an upload (record, bytes, index entries and the keys naming it) if the
        stored version is `upload.version`; Conflict otherwise."""

    async def ids(self) -> list[str]:
        """Every stored upload id: for recovery at start-up only."""

    # --- secondary keys -------------------------------------------------------------------

    async def link(self, key: str, upload_id: str) -> None: ...

    async def resolve(self, key: str) -> str | None: ...

    async def unlink(self, key: str, upload_id: str) -> None:
        """Drop `key` if it still names `upload_id`."""

    async def links(self, prefix: str, limit: int = 1000) -> list[tuple[str, str]]:
        """(key, upload id) for keys that start with `prefix`, from an index, in key order."""

    # --- indexes derived from the records -------------------------------------------------

    async def expired(self, now: float, limit: int = 500) -> list[str]:
        """Ids of uploads whose `expires` is before `now` (a hint: re-check the record)."""

    async def due(self, now: float, limit: int = 100) -> list[str]:
        """Ids of uploads awaiting delivery whose next attempt is due (a hint, likewise)."""

    async def forget(self, upload_id: str) -> None:
        """Drop the index entries of an upload that has no record (hints a failed write left)."""

    async def next_due(self) -> float | None:
        """When the earliest delivery in the outbox is due; None when it is empty."""

    async def incomplete(self, owner: str | None = None) -> int:
        """How many uploads are still receiving and short of their length (of `owner`, or
        in all): what the caps on uploads in progress count. May over-count by the uploads
        a failed write left behind, until the sweep forgets them."""

    # --- leases ---------------------------------------------------------------------------

    async def acquire(self, name: str, holder: str, ttl: float) -> bool:
        """Take the lease `name` for `ttl` seconds unless another holder has it unexpired."""

    async def renew(self, name: str, holder: str, ttl: float) -> bool:
        """Extend the lease by `ttl` from now if `holder` still has it (never re-takes one
        that was released)."""

    async def release(self, name: str, holder: str) -> None:
        """Give the lease up if `holder` still has it."""

    async def holder(self, name: str) -> str | None:
        """Who has the lease now, if anyone."""

    # --- bytes ----------------------------------------------------------------------------

    async def open_writer(self, upload_id: str, offset: int, create: bool = True) -> ChunkWriter:
        """Open the data file for writing at `offset` (FileNotFoundError if it is missing and
        not `create`); bytes stored past it stay until the writer is closed with the size to
        keep."""

    async def close_writer(self, upload_id: str, writer: ChunkWriter, keep: int | None,
                           sync: bool) -> int:
        """Flush (and with `sync` fsync) what was written, keep the first `keep` bytes of the
        file (None: all of it), close it; return the size stored."""

    def ranges(self, upload_ids: Sequence[str], limits: Sequence[int]) -> AsyncIterator[FileRange]:
        """The bytes of several uploads back to back, `limits[i]` bytes of the i-th, as
        ranges of their open data files (OSError when a file is shorter than its limit); each
        range is valid until the next one is asked for."""

    # (A range may be a whole file: FileRange.split cuts one, Upstream sends it in slices.)

    async def size(self, upload_id: str) -> int: ...

    async def truncate(self, upload_id: str, size: int) -> None: ...

    async def discard(self, upload_id: str) -> None:
        """Delete an upload's bytes (the record stays)."""

    async def free_bytes(self) -> int: ...

    async def health(self) -> str | None:
        """Why the store cannot take uploads now (None: it can), for /readyz."""

    async def close(self) -> None: ...


async def pieces(store: Store, upload: Upload) -> tuple[list[str], list[int]]:
    """The data files a finished upload is made of, with how many bytes of each are its."""
    if not upload.parts:
        return [upload.id], [upload.offset]
    parts = [await store.load(part_id) for part_id in upload.parts]
    return list(upload.parts), [part.offset if part else 0 for part in parts]
