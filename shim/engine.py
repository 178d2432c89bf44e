"""Protocol-agnostic upload logic: ownership, write leases, offsets, limits, completion.

Protocol modules decide *what* a request asks for; the engine does it through the `Store`
interface and hands finished files to the `Outbox`. It never looks at HTTP headers and
never touches a path on disk. Every change of a record is a compare-and-set save; every
change of state goes through `shim.lifecycle.advance`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from shim import errors
from shim.append import Append, BodyFilter, Checksum
from shim.errors import ShimError
from shim.lifecycle import AWAITING_DELIVERY, Event, IllegalTransition, State, advance
from shim.metrics import Metrics
from shim.model import Target, Upload
from shim.outbox import Delivery, Outbox
from shim.signals import RELEASED, TAKE_OVER, Signals
from shim.store import (
    CapReached,
    Caps,
    Conflict,
    Hasher,
    Store,
    StoreError,
    pieces,
    transition,
)

__all__ = ["Append", "BodyFilter", "Checksum", "Delivery", "Engine", "NewUpload", "ShimError",
           "new_upload_id"]

log = logging.getLogger("shim.engine")

CHECKSUM_ALGORITHMS = ("sha1", "md5", "sha256", "sha512")
REPORT_LIMIT = 10_000
"""Uploads in progress listed for one folder (WebDAV REPORT)."""
PARTS_ACCOUNT = "(parts)"
"""What parts count against: nobody's caps (their whole counts against its owner's)."""
FAMILY = "family"
"""The metadata key naming the key prefix of an upload's own parts (S3: s3part:<id>:); they
go when it goes."""
ASSEMBLED = "assembled-from"
"""The metadata key of an assembled upload's part list (a digest), to know a retry by."""
PART_TAG = "etag"
"""The metadata key under which a part keeps what its client names it by (S3's ETag)."""
WRITE_LEASE_TTL = 60.0
"""A write lease lapses this long after its last renewal (renewed every third of it), unless
the engine is given another `lease_ttl` (`storage.lease_ttl`)."""
RELEASE_LOOK = 0.25
"""Seconds between looks at a lease another instance was asked to give up (the signal that
it did is a hint: see shim.signals)."""
ASK_AGAIN = 1.0
"""Seconds after which another instance is asked again to end a write it still holds."""


def new_upload_id() -> str:
    """144 random bits, URL-safe: unguessable, so an upload URL works as a capability. Never
    with a leading '-', which a command line (`python -m shim retry ID`) takes for an option."""
    while (upload_id := secrets.token_urlsafe(18)).startswith("-"):
        pass
    return upload_id


@dataclass(frozen=True)
class NewUpload:
    """What a protocol asks the engine to create."""

    id: str
    protocol: str
    owner: str
    length: int | None
    metadata: dict[str, str]
    target: Target | None
    max_size: int = 0
    expiration: int = 0
    parts: tuple[str, ...] = ()
    digests: dict[str, str] = field(default_factory=dict)
    account: str | None = None
    """Whom it counts against for the caps when not `owner` (see Upload.account)."""
    asks: Target | None = None
    """For an upload with no delivery of its own (a tus partial upload): the delivery it may
    become part of, which `auth.preflight` asks the legacy server about."""
    exclusive_parts: bool = False
    """The parts it is assembled from are its alone (S3 multipart): they go with its bytes."""
    part_of: str | None = None
    """The upload in progress it is a part of (S3 UploadPart): it lives as long as that one
    does, and does not count against the caps, which that one counts against already."""


PAUSED_KEPT = 10_000
"""Uploads remembered as paused, for the "resumed" event (Engine.paused)."""


@dataclass(frozen=True)
class Limits:
    """Caps on uploads in progress, so that no one client exhausts the shim for the rest."""

    uploads_per_owner: int = 100
    uploads_total: int = 10_000
    retry_after: int = 60
    """Seconds a client refused by a cap is told to wait (Retry-After)."""


_NEEDS_PARTS = frozenset({State.RECEIVING, State.COMPLETE, State.DELIVERING, State.FAILED})
"""States of a final upload that still reads its parts' bytes."""

class Engine:
    def __init__(self, store: Store, outbox: Outbox, min_free_bytes: int = 0,
                 clock: Callable[[], float] = time.time, limits: Limits | None = None,
                 preflight: Callable[[Target, int | None], Awaitable[None]] | None = None,
                 metrics: Metrics | None = None, signals: Signals | None = None,
                 lease_ttl: float = WRITE_LEASE_TTL) -> None:
        self.store = store
        self.outbox = outbox
        self.min_free_bytes = min_free_bytes
        self.limits = limits or Limits()
        self.metrics = metrics or outbox.metrics
        self.preflight = preflight
        """Asks the legacy server whether it takes an upload before it is created (raises
        its refusal); None: no such check (`auth.preflight: none`)."""
        self.clock = clock
        self.instance = secrets.token_hex(8)
        """Names this process as a lease holder."""
        self._writers: dict[str, Append] = {}
        """The bodies this process is writing, by upload id: whose requests a take-over ends."""
        self.early_bytes = 0
        """Body bytes held in memory by requests that have not begun yet (shim.exchange)."""
        self._paused: OrderedDict[str, None] = OrderedDict()
        """Uploads whose client asked where to go on, or whose last body was cut off, since
        their last write: the next body there resumes the upload (see `_resuming`)."""
        self._tickets: dict[str, int] = {}
        """The newest take-over ticket of each upload written since start (see take_over)."""
        self._background: set[asyncio.Future[None]] = set()
        self._turns: dict[str, asyncio.Future[None]] = {}
        """The last request on each resource still beginning (see queue_begin)."""
        self.lease_ttl = lease_ttl
        self.signals = signals
        """How this instance reaches the others on a shared store; None: it is alone."""
        self._released: dict[str, asyncio.Event] = {}
        """Uploads whose write this instance asked another one to end, until it did."""
        self._ending: set[str] = set()
        """Uploads whose write here another instance asked to end, while it ends."""
        if signals is not None:
            signals.subscribe(TAKE_OVER, self._asked_to_end)
            signals.subscribe(RELEASED, self._ended_elsewhere)

    @property
    def shared(self) -> bool:
        """Other instances serve the same uploads (a shared store)."""
        return self.signals is not None

    # --- records --------------------------------------------------------------------------

    async def change(self, upload: Upload, event: Event | None = None, **changes: Any) -> Upload:
        """A compare-and-set save through the lifecycle (`shim.store.transition`); gone()
        when the upload vanished meanwhile."""
        try:
            return await transition(self.store, upload, event, **changes)
        except Conflict:
            raise errors.gone("the upload was removed meanwhile") from None

    async def _change_receiving(self, upload: Upload, **changes: Any) -> Upload:
        """A writer's change (offset, unverified bytes): only while the upload receives; a
        record another request completed meanwhile is left as it is (409)."""
        return await self.change(upload, update=_still_receiving, **changes)

    async def admit(self, new: NewUpload, replacing: bool = False) -> None:
        """Everything a creation must pass before anything changes, cheapest first: its
        size, room on disk, and before the legacy server is asked (`auth.preflight`) on the
        delivery it would be or become part of, the caps (not while it replaces an upload of
        the same account, whose place it takes). The caps hold in any case as it is saved."""
        if new.max_size and new.length is not None and new.length > new.max_size:
            raise errors.too_large(f"the upload is larger than the limit of {new.max_size} bytes")
        asked = new.target or new.asks
        asking = self.preflight is not None and asked is not None
        await self._check_room(_account(new), caps=asking and not replacing)
        if self.preflight is not None and asked is not None:
            await self.preflight(asked, new.length)

    async def create(self, new: NewUpload, key: str | None = None, previous: str | None = None,
                     admitted: bool = False, keyed: bool = False) -> Upload:
        """A new upload; `key` names it for protocols that find uploads by URL, not by id
        (`keyed`: a key will name it later). `admitted`: `admit` passed already (a restart
        checks before it ends the old upload). The caps are checked as the record is saved,
        in one step of the store's."""
        if not admitted:
            await self.admit(new, replacing=new.part_of is not None)
        now = self.clock()
        record = Upload(
            id=new.id, protocol=new.protocol, owner=new.owner, length=new.length,
            metadata=dict(new.metadata), target=new.target, parts=new.parts, created=now,
            updated=now, expires_after=new.expiration, digests=dict(new.digests),
            previous=previous, account=_account(new) if new.part_of else new.account,
            max_size=new.max_size, exclusive_parts=new.exclusive_parts,
            keyed=keyed or key is not None)
        try:  # a part counts as its whole, which the caps counted already
            upload = await self.store.create(
                record, None if new.part_of is not None else self._caps(_account(new)))
        except CapReached as reached:
            raise self._too_many(reached.cap) from None
        if key is not None:
            await self.store.link(key, upload.id)
        if new.part_of is not None:  # kept from expiring while its whole is alive (_in_use)
            await self.store.link(f"part-of:{upload.id}:{new.part_of}", new.part_of)
        self.metrics.record(upload, "created")
        return upload

    def _caps(self, account: str) -> Caps:
        return Caps(account, self.limits.uploads_per_owner, self.limits.uploads_total)

    def _too_many(self, cap: str) -> ShimError:
        """429 + Retry-After for a cap on uploads in progress (per account, or for all)."""
        limits = self.limits
        if cap == "per_account":
            return errors.too_many(f"these credentials have {limits.uploads_per_owner} uploads "
                                   "in progress already; finish or cancel one",
                                   limits.retry_after)
        return errors.too_many("the shim has as many uploads in progress as it takes",
                               limits.retry_after)

    async def _check_room(self, owner: str, caps: bool = True) -> None:
        """Refuse a creation the shim has no room for: too little disk (507), or a cap on
        uploads in progress reached (429 + Retry-After), for this owner or for everyone."""
        if self.min_free_bytes and await self.store.free_bytes() < self.min_free_bytes:
            raise errors.insufficient_storage("the shim's disk is too full to take new uploads")
        if not caps:
            return
        limits = self.limits
        if limits.uploads_per_owner and \
                await self.store.incomplete(owner) >= limits.uploads_per_owner:
            raise self._too_many("per_account")
        if limits.uploads_total and await self.store.incomplete() >= limits.uploads_total:
            raise self._too_many("total")

    async def find(self, key: str, owner: str) -> Upload | None:
        """The live upload last created under `key`, if any."""
        upload_id = await self.store.resolve(key)
        if upload_id is None:
            return None
        try:
            return await self.get(upload_id, owner)
        except ShimError:
            return None

    async def get(self, upload_id: str, owner: str, protocol: str | None = None) -> Upload:
        """The upload, if it exists, is alive, belongs to `owner` (and was made by
        `protocol`, when given)."""
        upload = await self.store.load(upload_id)
        if upload is None:
            raise errors.not_found()
        if upload.owner != owner or protocol not in (None, upload.protocol):
            raise errors.not_found()  # the same answer as a missing one: no id leaks
        if upload.gone:
            raise errors.gone(f"the upload was {upload.state}")
        if await self._expired(upload):
            with contextlib.suppress(Conflict, IllegalTransition):
                await self._expire(upload)
            raise errors.gone("the upload has expired")
        return upload

    async def _expired(self, upload: Upload) -> bool:
        """Past its expiry, and nothing keeps it: no running body, no queued delivery, no
        final upload that still needs its bytes."""
        expires = upload.expires
        return expires is not None and expires < self.clock() and upload.id not in self._writers \
            and upload.state not in AWAITING_DELIVERY and not await self._in_use(upload)

    async def in_progress(self, key_prefix: str, owner: str) -> list[tuple[str, Upload]]:
        """The live, unfinished uploads whose keys start with `key_prefix`, with their keys."""
        found = []
        for key, upload_id in await self.store.links(key_prefix, limit=REPORT_LIMIT):
            upload = await self.store.load(upload_id)
            if upload is None or upload.owner != owner or not upload.receiving:
                continue
            expires = upload.expires
            if expires is not None and expires < self.clock() and await self._expired(upload):
                continue  # (a part of a live upload lives as long as it does)
            found.append((key, upload))
        return found

    def offset_of(self, upload: Upload) -> int:
        """Bytes stored: the record's, or those a running body has already handed to the OS
        (they survive a crash, so the offset never goes back), unless that body is kept
        whole or not at all."""
        active = self._writers.get(upload.id)
        if active is None or active.all_or_nothing or active.compare:
            return upload.offset
        if active.floor is not None:
            return active.floor
        return active.writer.position

    async def terminate(self, upload: Upload) -> None:
        """End an upload for good (tus/IETF DELETE, a new file replacing it)."""
        if upload.id in self._writers:
            raise errors.locked()
        if await self._in_use(upload):
            raise ShimError("in-use", "a final upload made of this part is not delivered yet",
                            409)
        await self._terminate(upload)

    async def _terminate(self, upload: Upload) -> None:
        try:
            await self.change(upload, Event.TERMINATE, offset=0, updated=self.clock())
            self.metrics.record(upload, "terminated")
        except IllegalTransition:
            raise ShimError("delivering", "the upload is being delivered and cannot be "
                            "cancelled now", 409) from None
        if not upload.parts:
            await self.store.discard(upload.id)

    async def expect_digests(self, upload: Upload, digests: dict[str, str]) -> dict[str, str]:
        """Check digests of the whole file (RFC 9530 Repr-Digest) against known ones; the
        merged set, to be saved only once the request is accepted."""
        for algorithm, digest in digests.items():
            known = upload.digests.get(algorithm)
            if known is not None and known != digest:
                raise errors.bad_request(f"the {algorithm} digest of the upload changed")
        return {**upload.digests, **digests}

    async def declare_length(self, upload: Upload, length: int, max_size: int) -> Upload:
        """Fix a deferred length (tus creation-defer-length; IETF Upload-Length)."""
        check_length(upload, length, max_size)
        return upload if upload.length is not None else await self.change(upload, length=length)

    # --- writing --------------------------------------------------------------------------

    async def begin_append(self, upload: Upload, offset: int, body_length: int | None,
                           checksum: Checksum | None = None, max_size: int = 0,
                           digests: dict[str, str] | None = None,
                           declared_length: int | None = None,
                           body_filter: BodyFilter | None = None) -> Append:
        """Check an append before its body arrives, take the write lease, open the file.
        A length it declares (tus creation-defer-length) is fixed only once every check
        passed: a refused request changes nothing."""
        self._refuse_if_busy(upload)
        if offset != upload.offset:
            raise errors.offset_mismatch(upload.offset, offset)
        if not upload.receiving or upload.parts:
            raise ShimError("completed", "the upload is already complete", 403)
        if declared_length is not None:
            check_length(upload, declared_length, max_size)
        self._resuming(upload, offset)
        return await self._open(upload, upload.offset, body_length, checksum, max_size,
                                digests, declared_length, body_filter)

    def paused(self, upload: Upload) -> None:
        """The client asked for the upload's offset (or its body was cut off): a body that
        follows resumes it. Only the newest PAUSED_KEPT are kept: more only loses log lines."""
        self._paused[upload.id] = None
        self._paused.move_to_end(upload.id)
        if len(self._paused) > PAUSED_KEPT:
            self._paused.popitem(last=False)

    def _resuming(self, upload: Upload, start: int) -> None:
        """The "resumed" event, for a body that goes on after a pause (a chunk that simply
        follows the one before is not one: an upload in 1 MiB chunks is not resumed 1,000
        times)."""
        if upload.id in self._paused:
            del self._paused[upload.id]
            if start:
                self.metrics.record(upload, "resumed")

    async def begin_range(self, upload: Upload, start: int, body_length: int | None,
                          max_size: int = 0, declared_length: int | None = None) -> Append:
        """Write a body that starts at `start`, at or before the stored end: the stored bytes
        it overlaps are compared as they arrive (equal: skipped; different: a new file when
        `start` is 0, else 409); a start past the end would leave a gap and is refused
        (seed 000; draft-wright-http-partial-upload, "Security Considerations")."""
        self._refuse_if_busy(upload)
        if start > upload.offset:
            raise ShimError("gap", f"{upload.offset} bytes are stored; a range must start at or "
                            f"before {upload.offset}, not at {start}", 416)
        if not upload.receiving:
            raise ShimError("completed", "the upload is already complete", 403)
        if declared_length is not None:
            check_length(upload, declared_length, max_size)
        self._resuming(upload, start)
        overlap = upload.offset - start
        remaining = None if body_length is None else max(0, body_length - overlap)
        append = await self._open(upload, upload.offset, remaining, None, max_size, None,
                                  declared_length)
        append.compare = overlap
        append.replaces = start == 0
        append.on_rewind = partial(self._mark_new_file, append)
        return append

    async def _mark_new_file(self, append: Append, position: int) -> None:
        """Record that the bytes past `position` are being replaced: a crash now truncates
        the file there (as for an unverified chunk)."""
        try:
            append.upload = await self._change_receiving(append.upload, offset=position,
                                                         unverified_from=position)
        except StoreError as exc:
            raise errors.insufficient_storage(f"cannot record the new file: {exc}") from exc

    async def begin_check(self, upload: Upload, start: int, body_length: int | None
                          ) -> Append | None:
        """A body sent again once the file is complete (queued, being delivered, or held):
        compared with the stored bytes as it arrives and never written (no lease needed).
        Different bytes are refused with 409; more bytes than the file has with 413."""
        if start > upload.offset:
            raise ShimError("gap", f"the file has {upload.offset} bytes; a range must start "
                            f"at or before {upload.offset}, not at {start}", 416)
        try:
            writer = await self.store.open_writer(upload.id, upload.offset, create=False)
        except FileNotFoundError:
            return None  # delivered meanwhile: its bytes are gone, its answer is what counts
        append = Append(upload, writer, 0, None, holder="")
        append.compare = upload.offset - start
        append.verify_only = True
        return append

    async def _open(self, upload: Upload, offset: int, body_length: int | None,
                    checksum: Checksum | None, max_size: int,
                    digests: dict[str, str] | None, declared_length: int | None = None,
                    body_filter: BodyFilter | None = None) -> Append:
        length = upload.length if upload.length is not None else declared_length
        room = length - offset if length is not None else None
        if room is None and max_size:
            room = max_size - offset
        if room is not None and body_length is not None and body_length > room:
            raise errors.too_large(f"the body of {body_length} bytes goes past the upload's length")
        needed = self.min_free_bytes + (body_length or 0)
        if await self.store.free_bytes() < needed:
            raise errors.insufficient_storage("the shim's disk is too full to store more")
        holder = f"{self.instance}:{secrets.token_hex(4)}"
        if not await self.store.acquire(f"write:{upload.id}", holder, self.lease_ttl):
            raise errors.locked()
        try:
            if checksum is not None or body_filter is not None:  # a crash keeps none of it
                upload = await self.change(upload, unverified_from=offset)
            writer = await self.store.open_writer(upload.id, offset)
        except BaseException:
            await self.store.release(f"write:{upload.id}", holder)
            raise
        append = Append(upload, writer, room, checksum, holder)
        append.filter = body_filter
        append.digests = digests or upload.digests
        if upload.length is None:
            append.declared_length = declared_length
        self._writers[upload.id] = append
        return append

    async def finish_append(self, append: Append) -> Upload:
        """The body ended: verify it, make it durable, commit the new offset."""
        append.check_size()
        failure = append.failure
        if failure is None and append.checksum is not None:
            assert append.hasher is not None
            if append.hasher.digest() != append.checksum.digest:
                failure = errors.checksum_mismatch(append.checksum.algorithm)
        accepted: dict[str, Any] = {}
        if failure is None and append.filter is not None:
            try:
                accepted["metadata"] = {**append.upload.metadata, **append.filter.end()}
            except ShimError as exc:
                failure = exc
        if failure is None:  # what the request declares holds only once it is accepted
            accepted["digests"] = append.digests
            if append.declared_length is not None:
                accepted["length"] = append.declared_length
        upload = await self.end_write(append, failure is None or not append.all_or_nothing,
                                      **accepted)
        if failure is not None:
            raise failure
        return upload

    async def abort_append(self, append: Append) -> Upload:
        """The client went away mid-body: keep what arrived unless it must be all or nothing."""
        self.paused(append.upload)
        return await self.end_write(append, keep=not append.all_or_nothing)

    async def end_write(self, append: Append, keep: bool, **accepted: Any) -> Upload:
        """Commit (or drop) a body's bytes, save the offset, close the file and give the write
        lease up (`_release`, once), whatever raises on the way. If the offset cannot be
        saved (a full disk), the client gets 507 and the save is retried in the background
        with the lease held: until it succeeds, HEAD reports the writer's own position, so
        an offset once shown never goes back."""
        if append.ended:
            return append.upload
        append.ended = True
        if append.rewinding is not None:
            await asyncio.gather(append.rewinding, return_exceptions=True)
        if append.verify_only:
            await self.store.close_writer(append.upload.id, append.writer, None, sync=False)
            return await self.store.load(append.upload.id) or append.upload
        handed_off = False
        try:
            current = await self.store.load(append.upload.id)
            if current is None or not current.receiving:
                # Completed (or ended) by another request since this one began: its file is
                # not this body's to cut or extend.
                await self.store.close_writer(append.upload.id, append.writer, None, sync=False)
                raise ShimError("completed", "the upload was completed by another request", 409)
            if self.shared and not await self.store.renew(
                    f"write:{append.upload.id}", append.holder, self.lease_ttl):
                # This instance stalled past the lease: another request may be writing the
                # file now, so this one neither cuts it nor commits an offset.
                await self.store.close_writer(append.upload.id, append.writer, None, sync=False)
                raise ShimError("lease-lost", "the write lease lapsed; another request has "
                                "the upload now", 409)
            offset = await self._close_file(append, keep)
            try:
                upload = await self._change_receiving(append.upload, offset=offset,
                                                      unverified_from=None, updated=self.clock(),
                                                      **accepted)
                self.metrics.bytes_received.labels(protocol=upload.protocol).inc(
                    max(0, offset - append.writer.start))
            except StoreError as exc:
                handed_off = True
                self._spawn(self._commit_later(append, offset, accepted))
                raise errors.insufficient_storage(f"the offset could not be recorded: {exc}") from exc
            # Still under the lease: no other request can write to a file it just finished.
            return await self._settle(upload)
        finally:
            if not handed_off:
                await self._release(append)

    async def _close_file(self, append: Append, keep: bool) -> int:
        """Close the data file keeping the body (or not); the offset that is now stored."""
        size = append.writer.position if keep else append.writer.start
        if append.upload.length is not None:
            size = min(size, append.upload.length)
        try:
            stored = await self.store.close_writer(append.upload.id, append.writer, size, sync=keep)
        except OSError as exc:
            log.warning("upload %s: storing the body failed (%s); keeping what reached the disk",
                        append.upload.id, exc)
            append.failure = append.failure or errors.insufficient_storage(
                f"cannot store the body: {exc.strerror}")
            return append.writer.start
        return min(stored, size)

    async def _commit_later(self, append: Append, offset: int, accepted: dict[str, Any]) -> None:
        try:
            while True:
                await asyncio.sleep(1.0)
                try:
                    upload = await self._change_receiving(
                        append.upload, offset=offset, unverified_from=None, updated=self.clock(),
                        **accepted)
                except StoreError:
                    continue
                with contextlib.suppress(ShimError):
                    await self._settle(upload)
                return
        finally:
            await self._release(append)

    async def _release(self, append: Append) -> None:
        """The one release path of a write lease."""
        upload_id = append.upload.id
        # Only now: until the offset is saved, HEAD reports the writer's own position.
        if self._writers.get(upload_id) is append:
            del self._writers[upload_id]
        try:
            await self.store.release(f"write:{upload_id}", append.holder)
        finally:
            append.released.set()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def take_over(self, upload_id: str, timeout: float = 10.0,
                        here: bool = True) -> tuple[int, bool]:
        """End a body still arriving for this upload (in this process, or on a shared store
        in another instance), wait until its bytes are committed, and return this request's
        ticket, and whether a body was being written (its record is then newer than one read
        before): a request that began earlier but had not started writing yet sees, by
        `superseded`, that it must not write any more. With `here` False only a body at
        another instance is ended (a request that only reads on a shared store).

        A client that lost its connection often comes back before the shim has noticed; the
        IETF draft ("Concurrency") recommends that the new request end the earlier one."""
        ticket, writing = await self._take_over_here(upload_id, timeout) if here \
            else (self._tickets.get(upload_id, 0), upload_id in self._writers)
        if self.signals is not None and not writing:
            writing = await self._end_elsewhere(upload_id, timeout)
        return ticket, writing

    async def _take_over_here(self, upload_id: str, timeout: float) -> tuple[int, bool]:
        ticket = self._tickets[upload_id] = self._tickets.get(upload_id, 0) + 1
        active = self._writers.get(upload_id)
        if active is None or active.interrupt is None:
            return ticket, active is not None
        active.interrupt()
        self.metrics.record(active.upload, "taken over")
        try:
            await asyncio.wait_for(active.released.wait(), timeout)
        except TimeoutError:
            log.warning("upload %s: the earlier request did not end in %ss", upload_id, timeout)
        return ticket, True

    async def _end_elsewhere(self, upload_id: str, timeout: float) -> bool:
        """If another instance holds the upload's write lease, ask it to end that write and
        wait (up to `timeout`) until the lease is free; whether one was held."""
        lease = f"write:{upload_id}"
        holder = await self.store.holder(lease)
        if holder is None or holder.startswith(f"{self.instance}:"):
            return False
        assert self.signals is not None
        released = self._released.setdefault(upload_id, asyncio.Event())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        asked = 0.0
        while holder is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning("upload %s: the request writing it at another instance did not "
                            "end in %ss", upload_id, timeout)
                break
            if loop.time() - asked >= ASK_AGAIN:  # a signal may be lost (a Redis restart)
                asked = loop.time()
                await self.signals.publish(TAKE_OVER, upload_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(released.wait(), min(remaining, RELEASE_LOOK))
            holder = await self.store.holder(lease)
        if self._released.get(upload_id) is released:
            del self._released[upload_id]
        return True

    def _asked_to_end(self, upload_id: str) -> None:
        """Another instance took the upload over: end the write here, if it runs here (as a
        newer request here would), then say so."""
        if upload_id not in self._writers or upload_id in self._ending:
            return  # not written here, or being ended already (the signal came again)

        async def end() -> None:
            self._ending.add(upload_id)
            try:
                _, writing = await self._take_over_here(upload_id, timeout=10.0)
            finally:
                self._ending.discard(upload_id)
            if writing and self.signals is not None:
                await self.signals.publish(RELEASED, upload_id)

        self._spawn(end())

    def _ended_elsewhere(self, upload_id: str) -> None:
        released = self._released.get(upload_id)
        if released is not None:
            released.set()

    def queue_begin(self, resource: str) -> tuple[asyncio.Future[None] | None, asyncio.Future[None]]:
        """Requests on one resource (an upload id or a protocol's key) begin in the order they
        arrived: the begin to wait for (if any), and the future that ends this one's turn
        (`end_turn`). Called as a request's head arrives, before anything awaits."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        previous = self._turns.get(resource)
        self._turns[resource] = turn
        return previous, turn

    def end_turn(self, resource: str, turn: asyncio.Future[None]) -> None:
        if not turn.done():
            turn.set_result(None)
        if self._turns.get(resource) is turn:
            del self._turns[resource]

    def superseded(self, upload_id: str, ticket: int) -> bool:
        """A newer request took the upload over since `ticket` was handed out."""
        return self._tickets.get(upload_id) != ticket

    def _refuse_if_busy(self, upload: Upload) -> None:
        if upload.id in self._writers:
            raise errors.locked()

    async def renew_leases(self) -> None:
        """Keep the write leases of running bodies from lapsing. A body whose lease lapsed
        anyway (the loop or the store stalled longer than the lease) is ended: another
        request may hold it now."""
        for upload_id, append in list(self._writers.items()):
            if not await self.store.renew(f"write:{upload_id}", append.holder, self.lease_ttl) \
                    and self._writers.get(upload_id) is append and append.interrupt is not None:
                log.warning("upload %s: the write lease lapsed; ending the body", upload_id)
                append.interrupt()

    # --- concatenation (tus "concatenation"; several partial uploads make one file) ---------

    async def concatenate(self, new: NewUpload) -> Upload:
        """Create an upload made of `new.parts`, or return the one a same request made."""
        key = "concat:" + " ".join(new.parts)
        existing_id = await self.store.resolve(key)
        existing = await self.store.load(existing_id) if existing_id else None
        if existing is not None and existing.owner == new.owner and not existing.gone \
                and _same_request(existing, new):
            return existing  # the same final POST again: one file, one delivery
        parts = [await self.get(part_id, new.owner, new.protocol) for part_id in new.parts]
        if any(part.parts or part.target is not None for part in parts):
            raise errors.bad_request("only partial uploads can be concatenated")
        known = sum(part.length for part in parts if part.length is not None)
        if new.max_size and known > new.max_size:
            raise errors.too_large(f"the parts add up to {known} bytes, more than the limit "
                                   f"of {new.max_size}")
        upload = await self.create(replace(new, length=None), key)  # refresh() sums the parts
        for part in parts:
            await self.store.link(f"part-of:{part.id}:{upload.id}", upload.id)
        return await self.refresh(upload)

    async def refresh(self, upload: Upload) -> Upload:
        """Bring a concatenated upload's length and offset up to date with its parts."""
        if not upload.parts or not upload.receiving:
            return upload
        parts = [await self.store.load(part_id) for part_id in upload.parts]
        if any(part is None or part.gone for part in parts):
            raise errors.gone("a part of this upload was terminated or has expired")
        lengths = [part.length for part in parts if part is not None]
        known = sum(n for n in lengths if n is not None)
        if upload.max_size and known > upload.max_size:  # tus concatenation: 413
            raise errors.too_large(f"the parts add up to {known} bytes, more than the limit "
                                   f"of {upload.max_size}")
        length = known if None not in lengths else None
        offset = sum(part.offset for part in parts if part is not None)
        if (length, offset) != (upload.length, upload.offset):
            upload = await self.change(upload, length=length, offset=offset)
        return upload

    async def assemble(self, upload: Upload, parts: Sequence[tuple[str, str]],
                       min_part_size: int, family: str,
                       facts: dict[str, str] | None = None) -> Upload:
        """Make `upload`, which has no bytes of its own, out of the uploads named by the
        `(key, tag)` pairs, in order (S3 CompleteMultipartUpload). Each must be a complete
        upload of the same owner whose `PART_TAG` is `tag`, and all but the last at least
        `min_part_size` bytes. The other uploads under the key prefix `family` are dropped,
        as S3 drops the parts a completion leaves out. The same parts again: the same upload.
        `facts` join its metadata (S3: the object's ETag)."""
        listing = hashlib.sha256("\n".join(f"{key} {tag}" for key, tag in parts).encode()).hexdigest()
        if upload.parts:  # a retried completion: its parts may be delivered and gone by now
            if upload.metadata.get(ASSEMBLED) != listing:
                raise ShimError("completed", "the upload was completed with other parts", 409)
            return await self.refresh(upload)
        chosen = [await self._part(upload, key, tag) for key, tag in parts]
        ids = tuple(part.id for part in chosen)
        for number, part in enumerate(chosen[:-1], 1):
            if (part.length or 0) < min_part_size:
                raise ShimError("too-small", f"part {number} of the list has {part.length} bytes; "
                                f"every part but the last needs {min_part_size}", 400,
                                {"part": parts[number - 1][0]})
        try:
            upload = await self.change(upload, update=_not_assembled, parts=ids,
                                       updated=self.clock(),
                                       metadata={**upload.metadata, **(facts or {}),
                                                 ASSEMBLED: listing})
        except ShimError as exc:  # another completion got there first: the same one, or not
            first = await self.store.load(upload.id)
            if exc.code != "completed" or first is None or first.metadata.get(ASSEMBLED) != listing:
                raise
            return await self.refresh(first)
        for part in chosen:
            await self.store.link(f"part-of:{part.id}:{upload.id}", upload.id)
        await self.drop_family(family, upload.owner, keep=frozenset(ids))
        return await self.refresh(upload)

    async def _part(self, whole: Upload, key: str, tag: str) -> Upload:
        part_id = await self.store.resolve(key)
        part = await self.store.load(part_id) if part_id is not None else None
        if part is None or part.owner != whole.owner or part.gone or not part.complete \
                or part.metadata.get(PART_TAG) != tag:
            raise ShimError("invalid-part", "a part of the list was not uploaded, or its tag "
                            "does not match", 400, {"part": key})
        return part

    async def drop_family(self, family: str, owner: str, keep: frozenset[str] = frozenset()) -> None:
        """Remove the owner's uploads under keys that start with `family` (the parts of an S3
        multipart upload), but those in `keep`."""
        for _, part_id in await self.store.links(family, limit=REPORT_LIMIT):
            part = await self.store.load(part_id)
            if part is not None and part.owner == owner and part.id not in keep:
                await self.remove_part(part)

    async def remove_part(self, part: Upload) -> None:
        """Forget a part: its record, bytes and keys, and its links to the uploads it was
        part of."""
        with contextlib.suppress(Conflict):
            await self.store.remove(part)
        for key, whole_id in await self.store.links(f"part-of:{part.id}:"):
            await self.store.unlink(key, whole_id)

    async def wholes_of(self, part: Upload) -> list[Upload]:
        """The concatenated uploads `part` belongs to, brought up to date."""
        wholes = []
        for whole in await self._wholes(part):
            try:
                wholes.append(await self.refresh(whole))
            except ShimError as exc:
                if exc.code != "too-large":
                    raise  # a whole grown past its limit is left out: its own HEAD says 413
        return wholes

    async def _wholes(self, part: Upload) -> list[Upload]:
        wholes = []
        for _, whole_id in await self.store.links(f"part-of:{part.id}:"):
            whole = await self.store.load(whole_id)
            if whole is not None and not whole.gone:
                wholes.append(whole)
        return wholes

    async def assembled_in(self, part: Upload) -> bool:
        """Whether `part` is one of the parts an upload not yet delivered is made of."""
        return any(part.id in whole.parts and whole.state in _NEEDS_PARTS
                   for whole in await self._wholes(part))

    async def _in_use(self, upload: Upload) -> bool:
        """A partial upload that a final upload still needs: one not yet delivered, refused
        or ended (tus concatenation: the parts' bytes are the final upload's)."""
        if upload.target is not None or upload.parts:
            return False
        return any(whole.state in _NEEDS_PARTS for whole in await self._wholes(upload))

    # --- completion and delivery ----------------------------------------------------------

    async def settle(self, upload: Upload) -> Upload:
        """A complete upload that is still RECEIVING goes to the outbox (see _settle), unless
        a request is still writing to it: that one settles it as its lease ends."""
        if upload.id in self._writers:
            return upload
        return await self._settle(upload)

    async def _settle(self, upload: Upload) -> Upload:
        """Queue a complete RECEIVING upload for delivery: unless its digests do not match
        (it is terminated, never delivered) or it repeats the bytes of the file delivered
        just before under the same key (it takes that file's answer)."""
        if not upload.receiving or not upload.complete or upload.target is None:
            return upload
        mismatch = await self._digest_mismatch(upload)
        if mismatch:
            await self._terminate(upload)
            raise ShimError("digest-mismatch", mismatch, 400)
        duplicate = await self._duplicate_of(upload)
        if duplicate is not None:
            upload = await self.change(upload, Event.DUPLICATE, answer=duplicate.answer,
                                       sha256=duplicate.sha256, updated=self.clock())
            await self.store.discard(upload.id)
            return upload
        try:
            upload = await self.change(upload, Event.COMPLETE, next_attempt=self.clock(),
                                       updated=self.clock(), update=_still_complete)
        except (IllegalTransition, ShimError):  # another request settled or changed it first
            return await self.store.load(upload.id) or upload
        self.metrics.record(upload, "completed")
        self.outbox.kick()
        return upload

    async def await_delivery(self, upload: Upload) -> Delivery:
        """The legacy server's answer, or why there is none yet (never a second attempt)."""
        return await self.outbox.outcome(upload.id)

    async def _duplicate_of(self, upload: Upload) -> Upload | None:
        if upload.previous is None:
            return None
        previous = await self.store.load(upload.previous)
        if previous is None or previous.state is not State.DELIVERED or \
                previous.sha256 is None or previous.length != upload.length:
            return None
        digest = hashlib.sha256()
        await self._hash(upload, digest)
        return previous if digest.hexdigest() == previous.sha256 else None

    async def _hash(self, upload: Upload, *hashers: Hasher) -> None:
        """Feed the stored file to `hashers`, on worker threads (never on the loop)."""
        ids, sizes = await self.pieces(upload)
        async for piece in self.store.ranges(ids, sizes):
            await asyncio.to_thread(piece.hash_into, *hashers)

    async def _digest_mismatch(self, upload: Upload) -> str:
        """Check the expected digests over the stored file; an empty string when they match."""
        if not upload.digests:
            return ""
        hashers = {name: hashlib.new(name) for name in upload.digests}
        await self._hash(upload, *hashers.values())
        for name, hasher in hashers.items():
            if base64.b64encode(hasher.digest()).decode() != upload.digests[name]:
                log.warning("upload %s: %s digest mismatch; not delivered", upload.id, name)
                return f"the {name} digest of the uploaded file does not match the one announced"
        return ""

    async def pieces(self, upload: Upload) -> tuple[list[str], list[int]]:
        return await pieces(self.store, upload)

    # --- housekeeping ---------------------------------------------------------------------

    async def recover(self) -> int:
        """At start-up: commit bytes that reached the disk, drop unverified ones, and queue
        uploads that were complete but not yet in the outbox when the shim stopped. Each
        upload under its write lease: on a shared store another instance may be writing it
        (then it is not this one's to repair)."""
        repaired = 0
        holder = f"{self.instance}:recovery"
        for upload_id in await self.store.ids():
            upload = await self.store.load(upload_id)
            if not _recoverable(upload) or not await self.store.acquire(
                    f"write:{upload_id}", holder, self.lease_ttl):
                continue
            try:
                upload = await self.store.load(upload_id)  # as it is now, under the lease
                if upload is not None and _recoverable(upload):
                    repaired += await self._recover(upload)
            finally:
                await self.store.release(f"write:{upload_id}", holder)
        return repaired

    async def _recover(self, upload: Upload) -> int:
        """Repair one receiving upload; 1 if its record changed."""
        repaired = 0
        stored = await self.store.size(upload.id)
        if upload.unverified_from is not None:
            await self.store.truncate(upload.id, upload.unverified_from)
            offset = upload.unverified_from
        else:
            limit = upload.length if upload.length is not None else stored
            offset = max(upload.offset, min(stored, limit))
        if (offset, upload.unverified_from) != (upload.offset, None):
            upload = await self.change(upload, offset=offset, unverified_from=None)
            repaired = 1
        with contextlib.suppress(ShimError):  # a digest mismatch terminates it
            await self.settle(upload)  # complete before the crash, never queued
        return repaired

    async def sweep(self, batch: int = 500) -> int:
        """Remove uploads whose expiry passed, found through the expiry index a batch at a
        time (each batch awaits the store, so the event loop stays free)."""
        removed = 0
        while True:
            due = await self.store.expired(self.clock(), batch)
            swept = [await self._sweep_one(upload_id) for upload_id in due]
            removed += sum(swept)
            if len(due) < batch or not any(swept):
                return removed

    async def _sweep_one(self, upload_id: str) -> bool:
        upload = await self.store.load(upload_id)
        if upload is None:
            await self.store.forget(upload_id)  # a hint left by a write that failed
            return False
        if not await self._expired(upload):
            if await self._in_use(upload):  # its final upload waits: so do its bytes
                with contextlib.suppress(Conflict, ShimError):
                    await self.change(upload, updated=self.clock())
                    return True
            return False
        try:
            await self._expire(upload)
        except (Conflict, IllegalTransition):
            return False  # it changed meanwhile: not expired
        return True

    async def _expire(self, upload: Upload) -> None:
        """EXPIRED, then forgotten: the record goes (its version checked), and its bytes. A
        terminated upload's record (kept to answer 410) just goes. Under its write lease, so
        that no body starts (on a shared store, at any instance) on an upload going away;
        Conflict when one runs."""
        lease, holder = f"write:{upload.id}", f"{self.instance}:expiry"
        if not await self.store.acquire(lease, holder, self.lease_ttl):
            raise Conflict(f"upload {upload.id} is being written")
        try:
            await self._expire_leased(upload)
        finally:
            await self.store.release(lease, holder)

    async def _expire_leased(self, upload: Upload) -> None:
        if not upload.gone:
            upload = await self.store.save(replace(upload, state=advance(upload.state, Event.EXPIRE)))
            self.metrics.record(upload, "expired")
        await self.store.remove(upload)
        self._tickets.pop(upload.id, None)
        family = upload.metadata.get(FAMILY)
        if family and upload.exclusive_parts:
            await self.drop_family(family, upload.owner)


def _account(new: NewUpload) -> str:
    if new.part_of is not None:
        return PARTS_ACCOUNT
    return new.account if new.account is not None else new.owner


def check_length(upload: Upload, length: int, max_size: int) -> None:
    """Whether `length` may be the upload's length: the one it has, or, while deferred, at
    least what is stored and within `max_size`."""
    if upload.length is not None:
        if upload.length != length:
            raise ShimError("inconsistent-length",
                            f"the upload's length is {upload.length}, not {length}", 400)
        return
    if length < upload.offset:
        raise errors.bad_request(f"length {length} is less than the {upload.offset} bytes stored")
    if max_size and length > max_size:
        raise errors.too_large(f"the upload is larger than the limit of {max_size} bytes")


def _still_complete(upload: Upload) -> dict[str, Any]:
    """A guard for a move to COMPLETE on a record read again after a conflict."""
    if not upload.complete:
        raise ShimError("changed", "the upload changed before it was queued", 409)
    return {}


def _not_assembled(upload: Upload) -> dict[str, Any]:
    """A guard for assembling: another completion that got there first wins."""
    _still_receiving(upload)
    if upload.parts:
        raise ShimError("completed", "the upload was completed by another request", 409)
    return {}


def _still_receiving(upload: Upload) -> dict[str, Any]:
    """A guard for changes only a writer of a RECEIVING upload may make."""
    if not upload.receiving:
        raise ShimError("completed", "the upload is already complete", 409)
    return {}


def _recoverable(upload: Upload | None) -> bool:
    """Receiving, with bytes of its own: what a crash may have left short of the disk."""
    return upload is not None and upload.receiving and not upload.parts


def _same_request(existing: Upload, new: NewUpload) -> bool:
    """Whether `new` asks for what made `existing`: the same metadata, and the same target
    once each upload's own id is taken out of it (`{id}` in a path template)."""
    def shape(target: Target | None, upload_id: str) -> Target | None:
        return replace(target, path=target.path.replace(upload_id, "{id}")) if target else None

    return existing.metadata == new.metadata and \
        shape(existing.target, existing.id) == shape(new.target, new.id)


async def every(interval: float, step: Callable[[], Awaitable[object]], name: str) -> None:
    """Run `step` every `interval` seconds for ever; an error is logged, never fatal."""
    while True:
        try:
            await step()
        except Exception:
            log.exception("shim: %s failed; trying again in %.0fs", name, interval)
        await asyncio.sleep(interval)
