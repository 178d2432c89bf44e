"""Protocol-agnostic upload logic: ownership, locks, offsets, limits, completion, delivery.

Protocol modules decide *what* a request asks for; the engine does it, using the store for
bytes and metadata and the upstream for the one delivery of a finished file. It never looks
at HTTP headers and never touches a path on disk.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from shim import errors
from shim.errors import ShimError

__all__ = ["Append", "Checksum", "Delivery", "Engine", "NewUpload", "ShimError", "new_upload_id"]
from shim.model import Answer, Target, Upload
from shim.store import ChunkWriter, Store
from shim.upstream import Upstream, UpstreamError

log = logging.getLogger("shim.engine")

CHECKSUM_ALGORITHMS = ("sha1", "md5", "sha256", "sha512")


def new_upload_id() -> str:
    """144 random bits, URL-safe: unguessable, so an upload URL works as a capability."""
    return secrets.token_urlsafe(18)


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


@dataclass(frozen=True)
class Checksum:
    algorithm: str
    digest: bytes


@dataclass(frozen=True)
class Delivery:
    """How handing the finished file to the legacy server went."""

    answer: Answer | None
    """The legacy server's answer, accepting or refusing; None when it gave none."""
    problem: str = ""
    code: str = "unreachable"
    """Why there is no answer: "unreachable", or "digest-mismatch" (nothing was sent)."""

    @property
    def accepted(self) -> bool:
        return self.answer is not None and self.answer.accepted


_REFUSALS = frozenset({"too-large", "bad-request", "gap", "range"})


class Append:
    """One request body being written to an upload. `feed` runs on the event loop."""

    def __init__(self, upload: Upload, writer: ChunkWriter, room: int | None,
                 checksum: Checksum | None) -> None:
        self.upload = upload
        self.writer = writer
        self.room = room
        self.checksum = checksum
        self.hasher = hashlib.new(checksum.algorithm) if checksum else None
        self.failure: ShimError | None = None
        self.skip = 0
        """Bytes at the start of the body that are stored already (a retried range)."""
        self.interrupt: Callable[[], object] | None = None
        """Ends the request that carries this body; set by whoever owns the connection."""
        self.released = asyncio.Event()

    def feed(self, data: bytes) -> None:
        if self.skip and data:
            dropped = min(self.skip, len(data))
            self.skip -= dropped
            data = data[dropped:]
        if self.failure is not None or not data:
            return
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

    def seek(self, start: int) -> None:
        """The next bytes belong at `start` (a body with several ranges): at or before the
        end written so far; what is stored already is skipped."""
        position = self.writer.start + self.writer.written
        if start > position:
            self.failure = ShimError("gap", f"a range starts at {start}, after the {position} "
                                     "bytes stored", 416)
        else:
            self.skip = position - start

    @property
    def all_or_nothing(self) -> bool:
        """A checksummed chunk, or a body refused for what it says, is kept whole or not at
        all; only a body cut off or failed by the disk keeps what arrived."""
        return self.checksum is not None or (
            self.failure is not None and self.failure.code in _REFUSALS)


class Engine:
    def __init__(self, store: Store, upstream: Upstream, min_free_bytes: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.upstream = upstream
        self.min_free_bytes = min_free_bytes
        self.clock = clock
        self._active: dict[str, Append] = {}
        self._delivering: dict[str, asyncio.Lock] = {}

    # --- lifecycle ------------------------------------------------------------------------

    def create(self, new: NewUpload, key: str | None = None) -> Upload:
        """A new upload; `key` names it for protocols that find uploads by URL, not by id."""
        upload = self._create(new)
        if key is not None:
            self.store.link(key, upload.id)
        return upload

    def find(self, key: str, owner: str) -> Upload | None:
        """The live upload last created under `key`, if any."""
        upload_id = self.store.resolve(key)
        if upload_id is None:
            return None
        try:
            return self.get(upload_id, owner)
        except ShimError:
            return None

    def _create(self, new: NewUpload) -> Upload:
        if new.max_size and new.length is not None and new.length > new.max_size:
            raise errors.too_large(f"the upload is larger than the limit of {new.max_size} bytes")
        now = self.clock()
        upload = Upload(
            id=new.id, protocol=new.protocol, owner=new.owner,
            length=new.length, metadata=dict(new.metadata), target=new.target, parts=new.parts,
            created=now, updated=now, expires=now + new.expiration if new.expiration else None,
            digests=dict(new.digests),
        )
        self.store.save(upload)
        return upload

    def get(self, upload_id: str, owner: str) -> Upload:
        """The upload, if it exists, is alive and belongs to `owner`."""
        upload = self.store.load(upload_id)
        if upload is None:
            raise errors.not_found()
        if upload.owner != owner:
            raise errors.forbidden("this upload was created with other credentials")
        if upload.terminated:
            raise errors.gone("the upload was terminated")
        if upload.expires is not None and upload.expires < self.clock():
            self.store.remove(upload.id)
            raise errors.gone("the upload has expired")
        return upload

    def in_progress(self, key_prefix: str, owner: str) -> list[tuple[str, Upload]]:
        """The live, unfinished uploads whose keys start with `key_prefix`, with their keys."""
        found = []
        for key, upload_id in self.store.links(key_prefix):
            upload = self.store.load(upload_id)
            if upload is None or upload.owner != owner or upload.terminated or upload.delivered:
                continue
            if upload.expires is not None and upload.expires < self.clock():
                continue
            found.append((key, upload))
        return found

    def offset_of(self, upload: Upload) -> int:
        """Bytes stored, including those of a running body that will be kept whatever happens."""
        active = self._active.get(upload.id)
        if active is None or active.all_or_nothing:
            return upload.offset
        return upload.offset + active.writer.written

    def terminate(self, upload: Upload) -> None:
        self._refuse_if_busy(upload)
        self.store.discard_data(upload.id)
        self.store.save(replace(upload, terminated=True, offset=0))

    def expect_digests(self, upload: Upload, digests: dict[str, str]) -> Upload:
        """Remember digests of the whole file (RFC 9530 Repr-Digest); they must not change."""
        for algorithm, digest in digests.items():
            known = upload.digests.get(algorithm)
            if known is not None and known != digest:
                raise errors.bad_request(f"the {algorithm} digest of the upload changed")
        if digests.items() <= upload.digests.items():
            return upload
        upload = replace(upload, digests={**upload.digests, **digests})
        self.store.save(upload)
        return upload

    def declare_length(self, upload: Upload, length: int, max_size: int) -> Upload:
        """Fix a deferred length (tus creation-defer-length; IETF Upload-Length)."""
        if upload.length is not None:
            if upload.length != length:
                raise ShimError("inconsistent-length",
                                f"the upload's length is {upload.length}, not {length}", 400)
            return upload
        if length < upload.offset:
            raise errors.bad_request(f"length {length} is less than the {upload.offset} bytes stored")
        if max_size and length > max_size:
            raise errors.too_large(f"the upload is larger than the limit of {max_size} bytes")
        upload = replace(upload, length=length)
        self.store.save(upload)
        return upload

    # --- appending ------------------------------------------------------------------------

    def begin_append(self, upload: Upload, offset: int, body_length: int | None,
                     checksum: Checksum | None = None, max_size: int = 0) -> Append:
        """Check an append before its body arrives and open the data file at `offset`."""
        self._refuse_if_busy(upload)
        if upload.delivered or upload.parts:
            raise ShimError("completed", "the upload is already complete", 403)
        if offset != upload.offset:
            raise errors.offset_mismatch(upload.offset, offset)
        room = upload.length - offset if upload.length is not None else None
        if room is None and max_size:
            room = max_size - offset
        if room is not None and body_length is not None and body_length > room:
            raise errors.too_large(f"the body of {body_length} bytes goes past the upload's length")
        needed = self.min_free_bytes + (body_length or 0)
        if self.store.free_bytes() < needed:
            raise errors.insufficient_storage("the shim's disk is too full to store more")
        if checksum is not None:
            upload = replace(upload, unverified_from=offset)
            self.store.save(upload)
        append = Append(upload, self.store.writer(upload.id, offset), room, checksum)
        self._active[upload.id] = append
        return append

    def begin_range(self, upload: Upload, start: int, body_length: int | None,
                    max_size: int = 0) -> Append | None:
        """Write a body that starts at `start`, at or before the stored end: the bytes already
        stored are skipped, never written twice; a start past the end would leave a gap and is
        refused (seed 000; draft-wright-http-partial-upload, "Security Considerations")."""
        if start > upload.offset:
            raise ShimError("gap", f"{upload.offset} bytes are stored; a range must start at or "
                            f"before {upload.offset}, not at {start}", 416)
        skip = upload.offset - start
        if body_length is not None and body_length <= skip:
            return None
        remaining = None if body_length is None else body_length - skip
        append = self.begin_append(upload, upload.offset, remaining, max_size=max_size)
        append.skip = skip
        return append

    async def finish_append(self, append: Append) -> Upload:
        """The body ended: verify it, make it durable, commit the new offset."""
        try:
            if append.failure is None:
                await asyncio.to_thread(append.writer.sync)
        except OSError as exc:
            append.failure = errors.insufficient_storage(f"cannot store the body: {exc.strerror}")
        failure = append.failure
        if failure is None and append.checksum is not None:
            assert append.hasher is not None
            if append.hasher.digest() != append.checksum.digest:
                failure = errors.checksum_mismatch(append.checksum.algorithm)
        upload = self._commit(append, keep=failure is None or not append.all_or_nothing)
        if failure is not None:
            raise failure
        return upload

    def abort_append(self, append: Append) -> Upload:
        """The client went away mid-body: keep what arrived unless it must be all or nothing."""
        return self._commit(append, keep=not append.all_or_nothing)

    async def take_over(self, upload_id: str, timeout: float = 10.0) -> None:
        """End a body still arriving for this upload and wait until its bytes are committed.

        A client that lost its connection often comes back before the shim has noticed; the
        IETF draft ("Concurrency") recommends that the new request end the earlier one."""
        active = self._active.get(upload_id)
        if active is None or active.interrupt is None:
            return
        active.interrupt()
        try:
            await asyncio.wait_for(active.released.wait(), timeout)
        except TimeoutError:
            log.warning("upload %s: the earlier request did not end in %ss", upload_id, timeout)

    def _commit(self, append: Append, keep: bool) -> Upload:
        upload_id = append.upload.id
        if self._active.get(upload_id) is append:
            del self._active[upload_id]
        append.released.set()
        try:
            append.writer.close()
        except OSError:
            log.warning("flushing upload %s failed; keeping what reached the disk", upload_id)
        upload = self.store.load(upload_id) or append.upload
        stored = self.store.size(upload_id) if keep else append.writer.start
        if upload.length is not None:
            stored = min(stored, upload.length)
        self.store.truncate(upload_id, stored)
        upload = replace(upload, offset=stored, unverified_from=None, updated=self.clock(),
                         expires=self._renewed(upload))
        self.store.save(upload)
        return upload

    def _renewed(self, upload: Upload) -> float | None:
        if upload.expires is None:
            return None
        return self.clock() + (upload.expires - upload.created)

    def _refuse_if_busy(self, upload: Upload) -> None:
        if upload.id in self._active:
            raise errors.locked()

    # --- concatenation (tus "concatenation"; several partial uploads make one file) ---------

    def concatenate(self, new: NewUpload) -> Upload:
        """Create an upload made of `new.parts`, or return the one already made of them."""
        key = "concat:" + " ".join(new.parts)
        existing_id = self.store.resolve(key)
        existing = self.store.load(existing_id) if existing_id else None
        if existing is not None and existing.owner == new.owner and not existing.terminated:
            return existing
        parts = [self.get(part_id, new.owner) for part_id in new.parts]
        if any(part.parts or part.target is not None for part in parts):
            raise errors.bad_request("only partial uploads can be concatenated")
        upload = self.create(replace(new, length=None))  # refresh() sums the parts
        self.store.link(key, upload.id)
        for part in parts:
            self.store.link(f"part-of:{part.id}", upload.id)
        return self.refresh(upload)

    def refresh(self, upload: Upload) -> Upload:
        """Bring a concatenated upload's length and offset up to date with its parts."""
        if not upload.parts or upload.delivered:
            return upload
        parts = [self.store.load(part_id) for part_id in upload.parts]
        if any(part is None or part.terminated for part in parts):
            raise errors.gone("a part of this upload was terminated or has expired")
        lengths = [part.length for part in parts if part is not None]
        length = sum(n for n in lengths if n is not None) if None not in lengths else None
        offset = sum(part.offset for part in parts if part is not None)
        if (length, offset) != (upload.length, upload.offset):
            upload = replace(upload, length=length, offset=offset)
            self.store.save(upload)
        return upload

    def whole_of(self, part: Upload) -> Upload | None:
        """The concatenated upload that `part` belongs to, if any."""
        whole_id = self.store.resolve(f"part-of:{part.id}")
        whole = self.store.load(whole_id) if whole_id else None
        return self.refresh(whole) if whole is not None and not whole.terminated else None

    # --- delivery -------------------------------------------------------------------------

    async def deliver(self, upload: Upload) -> Delivery:
        """Send the finished file to the legacy server, at most once successfully."""
        lock = self._delivering.setdefault(upload.id, asyncio.Lock())
        async with lock:
            current = self.store.load(upload.id) or upload
            if current.answer is not None:
                return Delivery(current.answer)
            if not current.complete or current.target is None or current.length is None:
                raise ShimError("incomplete", "the upload is not complete", 409)
            mismatch = await self._digest_mismatch(current)
            if mismatch:
                self.store.discard_data(current.id)
                self.store.save(replace(current, terminated=True))
                return Delivery(None, mismatch, "digest-mismatch")
            delivery = await self._send(current)
            if delivery.accepted:
                self.store.save(replace(current, answer=delivery.answer, refusal=None))
                for upload_id in current.parts or (current.id,):
                    self.store.discard_data(upload_id)
            elif delivery.answer is not None:
                self.store.save(replace(current, refusal=delivery.answer))
        return delivery

    async def _send(self, upload: Upload) -> Delivery:
        assert upload.target is not None and upload.length is not None
        ids, sizes = self._pieces(upload)
        try:
            answer = await self.upstream.send(upload.target, upload.length, self.store.read(ids, sizes))
        except UpstreamError as exc:
            log.warning("delivery of upload %s failed: %s", upload.id, exc)
            return Delivery(None, str(exc))
        log.info("delivered upload %s: legacy server answered %d", upload.id, answer.status)
        return Delivery(answer)

    async def _digest_mismatch(self, upload: Upload) -> str:
        """Check the expected digests over the stored file; an empty string when they match."""
        if not upload.digests:
            return ""
        hashers = {name: hashlib.new(name) for name in upload.digests}
        ids, sizes = self._pieces(upload)
        async for chunk in self.store.read(ids, sizes):
            for hasher in hashers.values():
                hasher.update(chunk)
        for name, hasher in hashers.items():
            if base64.b64encode(hasher.digest()).decode() != upload.digests[name]:
                log.warning("upload %s: %s digest mismatch; not delivered", upload.id, name)
                return f"the {name} digest of the uploaded file does not match the one announced"
        return ""

    def _pieces(self, upload: Upload) -> tuple[list[str], list[int]]:
        if not upload.parts:
            return [upload.id], [upload.offset]
        parts = [self.store.load(part_id) for part_id in upload.parts]
        return list(upload.parts), [part.offset if part else 0 for part in parts]

    # --- housekeeping ---------------------------------------------------------------------

    def recover(self) -> int:
        """After a restart: commit bytes that reached the disk, drop unverified ones."""
        repaired = 0
        for upload_id in self.store.ids():
            upload = self.store.load(upload_id)
            if upload is None or upload.delivered or upload.terminated or upload.parts:
                continue
            stored = self.store.size(upload_id)
            if upload.unverified_from is not None:
                self.store.truncate(upload_id, upload.unverified_from)
                upload = replace(upload, offset=upload.unverified_from, unverified_from=None)
            elif stored != upload.offset:
                limit = upload.length if upload.length is not None else stored
                upload = replace(upload, offset=min(stored, limit))
            else:
                continue
            self.store.save(upload)
            repaired += 1
        return repaired

    def sweep(self) -> int:
        """Remove uploads whose expiry has passed (finished ones too: their replay window)."""
        now = self.clock()
        removed = 0
        for upload_id in self.store.ids():
            upload = self.store.load(upload_id)
            if upload and upload.expires is not None and upload.expires < now \
                    and upload_id not in self._active:
                self.store.remove(upload_id)
                removed += 1
        for key, upload_id in self.store.links(""):
            if self.store.load(upload_id) is None:
                self.store.unlink(key)  # the key named an upload that is gone
        return removed
