"""Carries one protocol command out on the engine, in two steps around the request body.

`begin` runs when the request head arrives (create the upload, check the offset, open the
file); `feed` receives the body chunk by chunk; `finish` runs when the body ended (commit,
deliver when complete) and `abort` when the client went away. Protocol-agnostic: what the
commands mean is fixed in `shim.commands`, how the answer looks is the protocol's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from shim import commands as c
from shim import engine as e
from shim import errors
from shim.engine import check_length
from shim.errors import ShimError
from shim.lifecycle import AWAITING_DELIVERY, State
from shim.model import Reply, Request, Upload
from shim.protocols import Protocol
from shim.store import Conflict
from shim.wire import ContentRange

log = logging.getLogger("shim.exchange")

_BYTES_KEPT = frozenset({State.COMPLETE, State.DELIVERING, State.FAILED})
"""States of a complete upload whose file is still on the shim's disk."""
_NEW_FILE_AFTER = frozenset({State.DELIVERED, State.REFUSED, State.FAILED})
"""States after which a whole file from byte 0 at the same URL is a new upload."""

TURN_WAIT = 30.0
"""Seconds a request waits for the earlier ones on the same upload to begin."""
EARLY_LIMIT = 64 * 1024 * 1024
"""Body bytes held in memory while a request's upload is still being looked up."""
EARLY_BUDGET = 16 * 1024 * 1024
"""Body bytes all requests may hold so before their clients are held back (Exchange.feed)."""

Hold = Callable[[], Callable[[], object] | None]
"""Stops reading from the request's client; returns how to go on (None: it cannot)."""


UploadCommand = c.Append | c.Inspect | c.Cancel | c.WriteRange | c.WriteSegments


async def _lookup(engine: e.Engine, command: UploadCommand, protocol: str) -> Upload | None:
    """The upload a command names: by id (404/410 when it cannot have it; only an upload
    `protocol` made: one protocol's URL never reaches another's upload) or by key (None
    when there is none)."""
    if command.upload_id:
        return await engine.get(command.upload_id, command.owner, protocol)
    return await engine.find(command.key, command.owner) if command.key else None


async def _superseding(engine: e.Engine, command: c.Command, protocol: str) -> Upload | None:
    """The upload whose running request this command ends before it starts: every write and
    cancel does, an inspection when its protocol says so, or on a shared store (where the
    body runs on any instance: tusd's HEAD likewise takes the upload's lock). Only the owner
    may end one: the lookup refuses anybody else before anything is interrupted."""
    if _takes_over(command, engine.shared):
        assert isinstance(command, c.Append | c.Inspect | c.Cancel | c.WriteRange |
                          c.WriteSegments)
        return await _lookup(engine, command, protocol)
    return None


def _takes_over(command: c.Command, shared: bool) -> bool:
    return isinstance(command, c.Append | c.Cancel | c.WriteRange | c.WriteSegments) or (
        isinstance(command, c.Inspect) and (command.take_over or shared))


def _takes_over_here(command: c.Command) -> bool:
    """Whether the command also ends a body running in this process: every write and cancel,
    an inspection when its protocol says so (an IETF HEAD, not a tus HEAD)."""
    return not isinstance(command, c.Inspect) or command.take_over


def _resource(command: c.Command) -> str | None:
    """What a command works on, known from the request head alone: an upload's id or key."""
    if isinstance(command, c.Append | c.Inspect | c.Cancel | c.WriteRange | c.WriteSegments):
        return command.upload_id or command.key
    if isinstance(command, c.Open):
        return command.new.id
    if isinstance(command, c.Assemble):
        return command.upload_id
    return None


def _location_sent(command: c.Command) -> bool:
    """The client was told the upload's location before its body was read (a 1xx)."""
    return isinstance(command, c.Open) and command.interim is not None


def _completes_at_end(command: c.Command) -> bool:
    return isinstance(command, c.Open | c.Append) and command.complete_at_end


class Exchange:
    def __init__(self, engine: e.Engine, protocol: Protocol, request: Request,
                 command: c.Command) -> None:
        self.engine = engine
        self.protocol = protocol
        self.request = request
        self.command = command
        self.upload: Upload | None = None
        self.append: e.Append | None = None
        self.error: ShimError | None = None
        self.declined = False
        """The request turned out not to be the shim's: it passes through untouched."""
        self.created = False
        """This request made the upload: refused, it leaves nothing behind."""
        self.previous: str | None = None
        """The delivered upload a new one under the same key may repeat."""
        self._interrupt: Callable[[], object] | None = None
        self._after: asyncio.Future[None] | None = None
        self._turn: asyncio.Future[None] | None = None
        self._begun: asyncio.Future[None] | None = None
        self._early: list[bytes] = []
        self._early_bytes = 0
        self._segments: asyncio.Queue[bytes | None] | None = None
        self._segments_task: asyncio.Future[None] | None = None
        self._queued = 0
        """Bytes of a byte-range body waiting in the queue (at most EARLY_LIMIT)."""
        self._hold: Hold | None = None
        self._resume: Callable[[], object] | None = None
        """Reads from the client again, while it is held back (see `start`)."""
        self._found: Upload | None = None
        """The upload `_begin_in_turn` looked up, while nothing can have changed it since:
        the lookups in `_begin` take it instead of reading the store again."""

    async def _lookup(self, command: UploadCommand) -> Upload | None:
        found, self._found = self._found, None
        if found is not None:
            return found
        return await _lookup(self.engine, command, self.protocol.name)

    async def _required(self, command: UploadCommand) -> Upload:
        upload = await self._lookup(command)
        if upload is None:
            raise errors.not_found()
        return upload

    def _queue(self) -> None:
        """Take this request's turn on its resource (see Engine.queue_begin), once."""
        resource = _resource(self.command)
        if resource is not None and self._turn is None:
            self._after, self._turn = self.engine.queue_begin(resource)

    async def begin(self) -> None:
        """Do what must happen before the body arrives; remember a refusal for `finish`.
        Requests on the same upload begin in the order they arrived."""
        self._queue()
        try:
            if self._after is not None:  # bounded: a lost turn must not stall the upload
                await asyncio.wait([self._after], timeout=TURN_WAIT)
            await self._begin_in_turn()
        finally:
            resource = _resource(self.command)
            if resource is not None and self._turn is not None:
                self.engine.end_turn(resource, self._turn)

    async def _begin_in_turn(self) -> None:
        upload_id, ticket = None, 0
        try:
            try:
                upload_id, ticket = await self._take_over_and_begin()
            except ShimError as exc:
                if exc.status != 423 or not self.engine.shared \
                        or not _takes_over(self.command, shared=True):
                    raise
                # A request of this upload at another instance took the write lease after
                # this one looked: end it too (within one instance the turn queue orders them).
                upload_id, ticket = await self._take_over_and_begin()
        except ShimError as exc:
            self.error = exc
        if self.append is None:
            return
        self.append.interrupt = self._interrupt
        if upload_id is not None and self.engine.superseded(upload_id, ticket):
            # A newer request took over while this one was still beginning: it writes
            # nothing, and ends as a request that is taken over does.
            self.append.failure = ShimError("superseded", "a newer request on this upload "
                                            "took over", 409)
            if self._interrupt is not None:
                self._interrupt()

    async def _take_over_and_begin(self) -> tuple[str | None, int]:
        """End the request running on this command's upload (if it ends one), then begin;
        the upload taken over and this request's ticket."""
        superseding = await _superseding(self.engine, self.command, self.protocol.name)
        upload_id, ticket = None, 0
        try:
            if superseding is not None:
                upload_id = superseding.id
                ticket, writing = await self.engine.take_over(
                    upload_id, here=_takes_over_here(self.command))
                if not writing:  # what was found is still the newest record
                    self._found = superseding
            await self._begin()
        finally:
            self._found = None
        return upload_id, ticket

    def start(self, interrupt: Callable[[], object],
              then: Callable[[], Awaitable[object]] | None = None,
              hold: Hold | None = None) -> None:
        """Begin in the background, so the hook that saw the request head returns at once:
        mitmproxy drops the body of a client that leaves while that hook still runs. Chunks
        that arrive meanwhile wait in memory (at most EARLY_LIMIT bytes) until it is done;
        once all requests hold more than EARLY_BUDGET so, `hold` stops reading from this
        one's client until it has begun (a busy shim must not buffer every slow upload's
        body). `then` runs after it, refused or not (the 1xx, or the early refusal, is sent
        from there; it must not wait for `finish`, which waits for this)."""
        self._interrupt = interrupt
        self._hold = hold
        self._queue()

        async def run() -> None:
            await self.begin()
            self._feed_early()
            if then is not None:
                await then()

        self._begun = asyncio.ensure_future(run())

    async def begun(self) -> None:
        """Wait for a background `begin`; whatever it raised is this request's failure."""
        if self._begun is None:
            return
        begun, self._begun = self._begun, None
        try:
            await begun
        finally:
            self._feed_early()

    def _feed_early(self) -> None:
        early, self._early = self._early, []
        self.engine.early_bytes -= sum(len(data) for data in early)
        resume, self._resume = self._resume, None
        if resume is not None:
            resume()
        for data in early:
            self._feed(data)

    async def _begin(self) -> None:
        command = self.command
        if isinstance(command, c.Refuse):
            raise command.error
        if isinstance(command, c.Open):
            if command.within is not None:
                await self._part_of(command.within, command.new.owner)
            self.upload = await self.engine.create(command.new,
                                                   previous=await self._delivered_as(command),
                                                   keyed=command.key is not None)
            self.created = True
            if command.with_body:
                # A filtered body's size on the wire is not the file's (aws-chunked framing):
                # the filter checks the size it decodes.
                length = None if command.body_filter is not None else self.request.body_length
                try:
                    self.append = await self.engine.begin_append(
                        self.upload, 0, length, command.checksum,
                        command.new.max_size, body_filter=command.body_filter)
                except ShimError:
                    await self._discard_created(self.upload)
                    raise
        elif isinstance(command, c.Forward | c.NeedBody):
            self.declined = True
        elif isinstance(command, c.Inspect) and command.pass_if_missing:
            found = await self._lookup(command)
            self.declined = found is None or found.delivered  # nothing in progress here
        elif isinstance(command, c.Append):
            await self._begin_append(command)
        elif isinstance(command, c.WriteRange):
            await self._begin_range(command)
        elif isinstance(command, c.WriteSegments):
            await self._begin_segments(command)

    async def _delivered_as(self, command: c.Open) -> str | None:
        """The file last delivered under the name a new one will take (S3 PutObject): the
        same bytes again (a retry whose answer was lost) get its answer, not a second
        delivery (Engine._duplicate_of)."""
        if command.key is None or command.within is not None:
            return None
        before = await self.engine.store.resolve(command.key)
        earlier = await self.engine.store.load(before) if before is not None else None
        if earlier is None or earlier.owner != command.new.owner:
            return None
        if earlier.state in AWAITING_DELIVERY:
            # Sent, perhaps, but its answer not yet recorded: a retry whose first answer was
            # lost can arrive just then. Its outcome decides (Engine.await_delivery).
            await self.engine.await_delivery(earlier)
            earlier = await self.engine.store.load(earlier.id)
        return earlier.id if earlier is not None and earlier.state is State.DELIVERED else None

    async def _part_of(self, whole_id: str, owner: str) -> Upload:
        """The owner's upload a new part belongs to: still taking parts, and now active."""
        whole = await self.engine.get(whole_id, owner, self.protocol.name)
        if not whole.receiving or whole.parts:
            raise errors.not_found("the upload was completed or aborted")
        return await self.engine.change(whole, updated=self.engine.clock())

    async def _begin_append(self, command: c.Append) -> None:
        upload = self.upload = await self._required(command)
        digests = await self.engine.expect_digests(upload, command.digests)
        if upload.complete and not self.request.has_body and command.offset == upload.offset:
            if command.declared_length is not None:
                check_length(upload, command.declared_length, command.max_size)
            return  # a retried final request: finish() reports the delivery's outcome
        self.append = await self.engine.begin_append(
            upload, command.offset, self.request.body_length, command.checksum,
            command.max_size, digests, command.declared_length)
        self.upload = self.append.upload

    async def _begin_segments(self, command: c.WriteSegments) -> None:
        found = await self._lookup(command)
        if found is not None and command.if_none_match and not found.delivered:
            raise ShimError("precondition", "If-None-Match: * but an upload of this "
                            "resource is in progress", 412)
        self.upload = found if found is not None and not found.delivered else None
        self.previous = found.id if found is not None and found.delivered else None

    async def _start_segment(self, command: c.WriteSegments, chunk: ContentRange) -> None:
        """A range begins in the body: find or make its upload, fix the length, go there."""
        upload = self.upload
        if upload is None:
            if chunk.start != 0:
                raise ShimError("gap", f"nothing is stored; a first range must start at 0, "
                                f"not at {chunk.start}", 416)
            upload = self.upload = await self.engine.create(command.new, command.key,
                                                            self.previous)
            self.created = True
        assert chunk.start is not None
        if self.append is None:
            try:
                self.append = await self.engine.begin_range(upload, chunk.start, None,
                                                            command.max_size, chunk.total)
            except ShimError:
                await self._discard_created(upload)
                raise
            return
        if chunk.total is not None:
            self._declare_in_body(self.append, chunk.total, command.max_size)
        self.append.seek(chunk.start)

    @staticmethod
    def _declare_in_body(append: e.Append, total: int, max_size: int) -> None:
        """A later range of a byte-range body names the total: it must agree with the one
        known, and a deferred one is saved only with the body, once it is accepted."""
        known = append.upload.length if append.upload.length is not None \
            else append.declared_length
        if known is not None and known != total:
            raise errors.bad_request(f"the ranges disagree on the total: {total}")
        check_length(append.upload, total, max_size)
        if known is None:
            append.declared_length = total
            append.room = total - append.writer.start

    async def _begin_range(self, command: c.WriteRange) -> None:
        upload = await self._range_upload(command)
        if upload is None:
            return  # an inquiry about nothing
        if not upload.receiving:
            # A retry once the file is complete: finish() reports the delivery's outcome and
            # nothing is sent again. While its bytes are still here, the body must equal
            # them (409 otherwise): another file never gets this one's answer.
            if command.start is not None and upload.state in _BYTES_KEPT:
                self.append = await self.engine.begin_check(upload, command.start,
                                                            self.request.body_length)
            return
        self.upload = upload
        if command.start is None:
            self.engine.paused(upload)  # a status inquiry: the range that follows resumes
            if command.total is not None:  # an inquiry that names the total fixes it
                self.upload = await self.engine.declare_length(upload, command.total,
                                                               command.max_size)
            return
        try:
            self.append = await self.engine.begin_range(
                upload, command.start, self.request.body_length, command.max_size, command.total)
        except ShimError:
            await self._discard_created(upload)
            raise
        self.append.expected = command.size
        self.upload = self.append.upload

    async def _range_upload(self, command: c.WriteRange) -> Upload | None:
        """The upload a range belongs to; a new one only for a range that starts at 0."""
        upload = await self._lookup(command)
        admitted = False
        if upload is not None and command.restart and command.start == 0 and upload.receiving \
                and command.new is not None:
            # A whole new file replaces the one in progress, once it is sure to be taken: a
            # refused restart leaves the old upload as it was.
            await self.engine.admit(command.new, replacing=True)
            await self.engine.terminate(upload)
            upload, admitted = None, True
        fresh = upload is None or (upload.state in _NEW_FILE_AFTER and command.start == 0)
        if fresh and command.start == 0 and command.new is not None:
            previous = upload.id if upload is not None else None
            upload = await self.engine.create(command.new, command.key, previous, admitted)
            self.created = True
        elif upload is None and command.start:
            raise e.ShimError("gap", f"nothing is stored; a range must start at 0, not at "
                              f"{command.start}", 416)
        self.upload = upload
        return upload

    @property
    def interim(self) -> Reply | None:
        """The 1xx to send before the body, unless the request was refused already."""
        if self.error is None and isinstance(self.command, c.Open):
            return self.command.interim
        return None

    def on_interrupt(self, interrupt: Callable[[], object]) -> None:
        """How to end this request when a newer one on the same upload arrives."""
        self._interrupt = interrupt
        if self.append is not None:
            self.append.interrupt = interrupt

    def feed(self, data: bytes) -> None:
        """One chunk of the body (mitmproxy's stream callback cannot await); dropped when the
        request was refused before its body. A byte-range body may have to create its upload
        mid-body, so its chunks go through a queue that one task works off in order."""
        if (self._begun is not None and not self._begun.done()) or self._early:
            self._early_bytes += len(data)
            if self._early_bytes > EARLY_LIMIT:
                self.error = self.error or ShimError(
                    "busy", "the upload was not ready for the body in time", 503)
            else:
                self._early.append(data)
                self.engine.early_bytes += len(data)
                if self.engine.early_bytes > EARLY_BUDGET and self._hold is not None \
                        and self._resume is None:
                    self._resume = self._hold()
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        command = self.command
        if isinstance(command, c.WriteSegments):
            self._queued += len(data)
            if self._queued > EARLY_LIMIT:  # its upload is still being made (a preflight)
                self._refuse_body(ShimError("busy", "the upload was not ready for the body in "
                                            "time", 503))
            elif self.error is None:
                self._segments_queue().put_nowait(data)
        elif self.append is not None:
            self.append.feed(data)

    def _segments_queue(self) -> asyncio.Queue[bytes | None]:
        if self._segments is None:
            assert isinstance(self.command, c.WriteSegments)
            self._segments = asyncio.Queue()
            self._segments_task = asyncio.ensure_future(self._work_segments(self.command))
        return self._segments

    async def _work_segments(self, command: c.WriteSegments) -> None:
        assert self._segments is not None
        while (data := await self._segments.get()) is not None:
            self._queued -= len(data)
            if self.error is not None:
                continue
            try:
                for event in command.decoder.feed(data) if data else ():
                    if isinstance(event, c.RangeStart):
                        await self._start_segment(command, event.range)
                    elif self.append is not None:
                        self.append.feed(event)
            except ShimError as exc:
                self._refuse_body(exc)

    async def _segments_done(self) -> None:
        """Wait until every queued chunk of a byte-range body has been worked off."""
        if self._segments is not None and self._segments_task is not None:
            self._segments.put_nowait(None)
            task, self._segments_task = self._segments_task, None
            await task

    def _refuse_body(self, error: ShimError) -> None:
        """What the body says is wrong: nothing of this request is kept."""
        if self.append is not None and self.append.failure is None:
            self.append.failure = error
        elif self.append is None and self.error is None:
            self.error = error

    async def abort(self) -> None:
        """The client went away (or the shim failed): keep what arrived, release the lease.
        Safe to call more than once, and after `finish`."""
        with contextlib.suppress(Exception):  # a failed begin holds nothing
            await self.begun()
        with contextlib.suppress(Exception):  # every chunk that arrived is written first
            await self._segments_done()
        if self.append is not None:
            append, self.append = self.append, None
            upload = await self.engine.abort_append(append)
            if isinstance(self.command, c.Open) and self.command.body_filter is not None:
                await self._discard_created(upload)  # whole or absent
                log.info("client left mid-body; upload %s keeps nothing", upload.id)
            else:
                log.info("client left mid-body; upload %s keeps %d bytes", upload.id,
                         upload.offset)

    async def finish(self) -> Reply:
        try:
            await self.begun()
            outcome = await self._finish()
        except ShimError as exc:
            outcome = c.Outcome(upload=self.upload, error=exc)
        finally:
            await self.abort()  # releases anything a failure left held
        return self.protocol.render(self.request, self.command, outcome)

    async def _finish(self) -> c.Outcome:
        await self._segments_done()
        if self.error is not None:
            return c.Outcome(upload=self.upload, error=self.error)
        command = self.command
        if isinstance(command, c.Immediate):
            return c.Outcome()
        if isinstance(command, c.Report):
            return await self._report(command)
        if isinstance(command, c.Inspect):
            return await self._inspect(command)
        if isinstance(command, c.Cancel):
            upload = await self._required(command)
            await self.engine.terminate(upload)
            if command.family is not None:
                await self.engine.drop_family(command.family, upload.owner)
            return c.Outcome()
        if isinstance(command, c.Assemble):
            whole = await self.engine.get(command.upload_id, command.owner, self.protocol.name)
            whole = await self.engine.assemble(whole, command.parts, command.min_part_size,
                                               command.family, command.facts)
            if command.key is not None:
                await self._name(command.key, whole)
            return await self._settle(whole)
        if isinstance(command, c.Concatenate):
            return await self._settle(await self.engine.concatenate(command.new))
        if isinstance(command, c.WriteSegments):
            refused = await self._end_segments(command)
            if refused is not None:
                return refused
        committed = False
        if self.append is not None:
            append, self.append = self.append, None
            self.upload = await self._finish_body(append)
            committed = not append.verify_only
            if _completes_at_end(command) and self.upload.length is None:
                self.upload = await self.engine.declare_length(self.upload, self.upload.offset, 0)
        if self.upload is None:
            return c.Outcome()
        if isinstance(command, c.Open) and command.key is not None:
            if command.within is not None:
                try:  # its whole may have been completed or aborted while it arrived
                    await self._part_of(command.within, command.new.owner)
                except ShimError:
                    await self.engine.remove_part(self.upload)
                    raise
            await self._name(command.key, self.upload)
        elif committed and not self.upload.complete:
            return await self._settle(self.upload)  # just saved, and nothing else writes it
        return await self._settle(await self.engine.store.load(self.upload.id) or self.upload)

    async def _name(self, key: str, upload: Upload) -> None:
        """`key` names `upload` from now on; the part it named before is replaced. Names are
        given one at a time per key, so that of two parts sent at once, one is left."""
        previous, turn = self.engine.queue_begin(f"name:{key}")
        try:
            if previous is not None:
                await asyncio.wait([previous], timeout=TURN_WAIT)
            before = await self.engine.store.resolve(key)
            await self.engine.store.link(key, upload.id)
            replaced = await self.engine.store.load(before) if before not in (None, upload.id) \
                else None
            # Only a part goes at once (a file of its own keeps its record for its delivery),
            # and not one an upload was already assembled from.
            if replaced is not None and replaced.owner == upload.owner and \
                    replaced.target is None and not await self.engine.assembled_in(replaced):
                await self.engine.remove_part(replaced)
        finally:
            self.engine.end_turn(f"name:{key}", turn)

    async def _report(self, command: c.Report) -> c.Outcome:
        if command.within is not None:
            whole = await self.engine.get(command.within, command.owner, self.protocol.name)
            if not whole.receiving:
                raise errors.not_found("the upload was completed or aborted")
        listing = await self.engine.in_progress(command.key_prefix, command.owner)
        exact = await self.engine.find(command.exact_key, command.owner)
        if exact is not None and exact.receiving:
            listing = [(command.exact_key, exact), *listing]
        return c.Outcome(listing=tuple(dict(listing).items()))

    async def _inspect(self, command: c.Inspect) -> c.Outcome:
        upload = await self.engine.refresh(await self._required(command))
        self.engine.paused(upload)
        if not command.settle:
            return c.Outcome(upload=upload, offset=self.engine.offset_of(upload))
        return await self._settle(upload, finishes_wholes=False)

    async def _end_segments(self, command: c.WriteSegments) -> c.Outcome | None:
        """The byte-range body ended: an outcome if it was refused, else None."""
        try:
            command.decoder.end()
        except ShimError as exc:
            self._refuse_body(exc)
        if self.error is not None:
            return c.Outcome(upload=self.upload, error=self.error)
        return None

    async def _finish_body(self, append: e.Append) -> Upload:
        """Commit the body. A refused body that made a new upload leaves nothing behind, so a
        retry starts afresh (and may say If-None-Match: * again), unless the client was
        already told where the upload is (an IETF 104 gave its Location)."""
        try:
            return await self.engine.finish_append(append)
        except ShimError:
            await self._discard_created(append.upload)
            raise

    async def _discard_created(self, upload: Upload) -> None:
        """A refused request that made an upload leaves nothing behind (see _finish_body)."""
        if self.created and not _location_sent(self.command):
            left = await self.engine.store.load(upload.id)
            if left is not None:
                with contextlib.suppress(Conflict):
                    await self.engine.store.remove(left)
            self.upload = None

    async def _settle(self, upload: Upload, finishes_wholes: bool = True) -> c.Outcome:
        """Queue what just became complete; wait for the outcome of its delivery (never
        starting one). A write that completes a part of a concatenation answers with the
        delivery of the final upload it finishes (an inspection of the part does not)."""
        delivery = None
        if upload.complete and upload.target is not None:
            upload = await self.engine.settle(upload)
            delivery = await self.engine.await_delivery(upload)
            upload = await self.engine.store.load(upload.id) or upload
        elif upload.complete and finishes_wholes:
            for whole in await self.engine.wholes_of(upload):
                if whole.complete:  # the part that finishes a file answers with its delivery
                    delivery = await self.engine.await_delivery(await self.engine.settle(whole))
        return c.Outcome(upload=upload, offset=self.engine.offset_of(upload), delivery=delivery)
