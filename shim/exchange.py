"""Carries one protocol command out on the engine, in two steps around the request body.

`begin` runs when the request head arrives (create the upload, check the offset, open the
file); `feed` receives the body chunk by chunk; `finish` runs when the body ended (commit,
deliver when complete) and `abort` when the client went away. Protocol-agnostic: what the
commands mean is fixed in `shim.commands`, how the answer looks is the protocol's business.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from shim import commands as c
from shim import engine as e
from shim import errors
from shim.errors import ShimError
from shim.model import Reply, Request, Upload
from shim.protocols import Protocol
from shim.wire import ContentRange

log = logging.getLogger("shim.exchange")


UploadCommand = c.Append | c.Inspect | c.Cancel | c.WriteRange | c.WriteSegments


def _lookup(engine: e.Engine, command: UploadCommand) -> Upload | None:
    """The upload a command names: by id (404/410/403 when it cannot have it) or by key
    (None when there is none)."""
    if command.upload_id:
        return engine.get(command.upload_id, command.owner)
    return engine.find(command.key, command.owner) if command.key else None


def _superseding(engine: e.Engine, command: c.Command) -> str | None:
    """The upload whose running request this command ends before it starts: every write and
    cancel does, an inspection only when its protocol says so. Only the owner may end one:
    the lookup refuses anybody else before anything is interrupted."""
    if isinstance(command, c.Append | c.Cancel | c.WriteRange | c.WriteSegments) or (
            isinstance(command, c.Inspect) and command.take_over):
        upload = _lookup(engine, command)
        return upload.id if upload is not None else None
    return None


def _required(engine: e.Engine, command: UploadCommand) -> Upload:
    upload = _lookup(engine, command)
    if upload is None:
        raise errors.not_found()
    return upload


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
        """This request's body made the upload (a byte-range body names it only inside)."""

    async def begin(self) -> None:
        """Do what must happen before the body arrives; remember a refusal for `finish`."""
        try:
            upload_id = _superseding(self.engine, self.command)
            if upload_id is not None:
                await self.engine.take_over(upload_id)
            self._begin()
        except ShimError as exc:
            self.error = exc

    def _begin(self) -> None:
        command = self.command
        if isinstance(command, c.Refuse):
            raise command.error
        if isinstance(command, c.Open):
            self.upload = self.engine.create(command.new)
            if command.with_body:
                self.append = self.engine.begin_append(
                    self.upload, 0, self.request.body_length, command.checksum,
                    command.new.max_size)
        elif isinstance(command, c.Forward | c.NeedBody):
            self.declined = True
        elif isinstance(command, c.Inspect) and command.pass_if_missing:
            found = _lookup(self.engine, command)
            self.declined = found is None or found.delivered  # nothing in progress here
        elif isinstance(command, c.Append):
            upload = _required(self.engine, command)
            if command.digests:
                upload = self.engine.expect_digests(upload, command.digests)
            if command.declared_length is not None:
                upload = self.engine.declare_length(upload, command.declared_length,
                                                    command.max_size)
            self.upload = upload
            if upload.complete and not self.request.has_body and command.offset == upload.offset:
                return  # a retried final request: finish() replays or retries the delivery
            self.append = self.engine.begin_append(
                upload, command.offset, self.request.body_length, command.checksum,
                command.max_size)
        elif isinstance(command, c.WriteRange):
            self._begin_range(command)
        elif isinstance(command, c.WriteSegments):
            self._begin_segments(command)

    def _begin_segments(self, command: c.WriteSegments) -> None:
        found = _lookup(self.engine, command)
        if found is not None and command.if_none_match and not found.delivered:
            raise ShimError("precondition", "If-None-Match: * but an upload of this "
                            "resource is in progress", 412)
        self.upload = found if found is not None and not found.delivered else None

    def _start_segment(self, command: c.WriteSegments, chunk: ContentRange) -> None:
        """A range begins in the body: find or make its upload, fix the length, go there."""
        upload = self.upload
        if upload is None:
            if chunk.start != 0:
                raise ShimError("gap", f"nothing is stored; a first range must start at 0, "
                                f"not at {chunk.start}", 416)
            upload = self.upload = self.engine.create(command.new, command.key)
            self.created = True
        if chunk.total is not None and (upload.length is None or self.append is None):
            upload = self.upload = self.engine.declare_length(upload, chunk.total,
                                                              command.max_size)
        elif chunk.total is not None and upload.length != chunk.total:
            raise errors.bad_request(f"the ranges disagree on the total: {chunk.total}")
        if self.append is None:
            assert chunk.start is not None
            self.append = self.engine.begin_range(upload, chunk.start, None, command.max_size)
        else:
            assert chunk.start is not None
            self.append.seek(chunk.start)

    def _begin_range(self, command: c.WriteRange) -> None:
        upload = self._range_upload(command)
        if upload is None or upload.delivered:
            return  # an inquiry about nothing, or a retry of a delivered file: finish() replies
        if command.total is not None:
            upload = self.engine.declare_length(upload, command.total, command.max_size)
        self.upload = upload
        if command.start is not None:
            self.append = self.engine.begin_range(upload, command.start, self.request.body_length,
                                                  command.max_size)

    def _range_upload(self, command: c.WriteRange) -> Upload | None:
        """The upload a range belongs to; a new one only for a range that starts at 0."""
        upload = _lookup(self.engine, command)
        if upload is not None and command.restart and command.start == 0 and not upload.delivered:
            self.engine.terminate(upload)  # a whole new file replaces the one in progress
            upload = None
        fresh = upload is None or (upload.delivered and command.start == 0)
        if fresh and command.start == 0 and command.new is not None:
            upload = self.engine.create(command.new, command.key)
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
        if self.append is not None:
            self.append.interrupt = interrupt

    def feed(self, data: bytes) -> None:
        """One chunk of the body; dropped when the request was refused before its body."""
        command = self.command
        if isinstance(command, c.WriteSegments):
            if self.error is None:
                self._feed_segments(command, data)
        elif self.append is not None:
            self.append.feed(data)

    def _feed_segments(self, command: c.WriteSegments, data: bytes) -> None:
        try:
            for event in command.decoder.feed(data) if data else ():
                if isinstance(event, c.RangeStart):
                    self._start_segment(command, event.range)
                elif self.append is not None:
                    self.append.feed(event)
        except ShimError as exc:
            self._refuse_body(exc)

    def _refuse_body(self, error: ShimError) -> None:
        """What the body says is wrong: nothing of this request is kept."""
        if self.append is not None and self.append.failure is None:
            self.append.failure = error
        elif self.append is None:
            self.error = error

    def abort(self) -> None:
        if self.append is not None:
            upload = self.engine.abort_append(self.append)
            self.append = None
            log.info("client left mid-body; upload %s keeps %d bytes", upload.id, upload.offset)

    async def finish(self) -> Reply:
        try:
            outcome = await self._finish()
        except ShimError as exc:
            outcome = c.Outcome(upload=self.upload, error=exc)
        return self.protocol.render(self.request, self.command, outcome)

    async def _finish(self) -> c.Outcome:
        if self.error is not None:
            self.abort()
            return c.Outcome(upload=self.upload, error=self.error)
        command = self.command
        if isinstance(command, c.Immediate):
            return c.Outcome()
        if isinstance(command, c.Report):
            return self._report(command)
        if isinstance(command, c.Inspect):
            return await self._inspect(command)
        if isinstance(command, c.Cancel):
            self.engine.terminate(_required(self.engine, command))
            return c.Outcome()
        if isinstance(command, c.Concatenate):
            return await self._settle(self.engine.concatenate(command.new))
        if isinstance(command, c.WriteSegments):
            refused = await self._end_segments(command)
            if refused is not None:
                return refused
        if self.append is not None:
            append, self.append = self.append, None
            self.upload = await self.engine.finish_append(append)
            if _completes_at_end(command) and self.upload.length is None:
                self.upload = self.engine.declare_length(self.upload, self.upload.offset, 0)
        if self.upload is None:
            return c.Outcome()
        return await self._settle(self.engine.store.load(self.upload.id) or self.upload)

    def _report(self, command: c.Report) -> c.Outcome:
        listing = self.engine.in_progress(command.key_prefix, command.owner)
        exact = self.engine.find(command.exact_key, command.owner)
        if exact is not None and not exact.delivered:
            listing = [(command.exact_key, exact), *listing]
        return c.Outcome(listing=tuple(dict(listing).items()))

    async def _inspect(self, command: c.Inspect) -> c.Outcome:
        upload = self.engine.refresh(_required(self.engine, command))
        refusal = upload.refusal
        if refusal is not None and 400 <= refusal.status < 500:
            # A status inquiry repeats a refusal; only an explicit retry sends the file again.
            return c.Outcome(upload=upload, offset=upload.offset, delivery=e.Delivery(refusal))
        return await self._settle(upload)

    async def _end_segments(self, command: c.WriteSegments) -> c.Outcome | None:
        """The byte-range body ended: an outcome if it was refused, else None."""
        try:
            command.decoder.end()
        except ShimError as exc:
            self._refuse_body(exc)
        if self.error is not None:
            self.abort()
            return c.Outcome(upload=self.upload, error=self.error)
        if self.append is not None and self.append.failure is not None and self.created:
            return await self._refuse_new_upload(self.append)
        return None

    async def _refuse_new_upload(self, append: e.Append) -> c.Outcome:
        """A refused body that had made a new upload leaves nothing behind: a retry starts
        afresh (and may say If-None-Match: * again)."""
        self.append = None
        try:
            await self.engine.finish_append(append)
        except ShimError as exc:
            self.engine.store.remove(append.upload.id)
            return c.Outcome(error=exc)
        return c.Outcome(upload=self.upload)  # pragma: no cover - a failure always raises

    async def _settle(self, upload: Upload) -> c.Outcome:
        """Deliver what just became complete (or was complete but not yet delivered)."""
        delivery = None
        if upload.complete and upload.target is not None:
            delivery = await self.engine.deliver(upload)
            upload = self.engine.store.load(upload.id) or upload
        elif upload.complete:
            whole = self.engine.whole_of(upload)
            if whole is not None and whole.complete:
                delivery = await self.engine.deliver(whole)
        return c.Outcome(upload=upload, offset=self.engine.offset_of(upload), delivery=delivery)
