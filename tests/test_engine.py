"""The engine and the delivery outbox on a real LocalStore, delivering over 127.0.0.1.

The legacy server is the real WholeFileServer (its `fail_status` makes it refuse), or a tiny
asyncio server in this file where a test needs a legacy server that misbehaves on the wire.
Store faults come from `tests.faulty_store.FaultyStore`. Each test body is one coroutine run
with `asyncio.run`; the store and the outbox are made inside it and closed at its end. Every
delivery is counted at the legacy server; waits poll a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import inspect
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import pytest

from shim import engine as e
from shim.demo_server import ReceivedRequest, WholeFileServer
from shim.errors import ShimError
from shim.lifecycle import Event, State
from shim.local_store import LocalStore
from shim.model import Target, Upload
from shim.outbox import Delivery, DeliveryPolicy, Outbox
from shim.store import Store, StoreError, transition
from shim.upstream import Origin, Upstream
from tests.faulty_store import FaultyStore

OWNER = "me"
DEADLINE = 10.0
"""Seconds any poll may take before the test fails."""
UPSTREAM_TIMEOUT = 5.0
NOWHERE = "http://127.0.0.1:9"
"""The legacy server of tests that deliver nothing (nothing listens on the discard port)."""
FAST = DeliveryPolicy(wait=DEADLINE, first_backoff=0.05, max_backoff=0.5)
MIB = 1024 * 1024


# --- helpers --------------------------------------------------------------------------------


class Clock:
    """A clock that moves only when a test moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    engine: e.Engine
    store: Store
    outbox: Outbox


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, origin: str, *, policy: DeliveryPolicy = FAST,
              clock: Callable[[], float] = time.time, store: Store | None = None,
              start: bool = True, min_free_bytes: int = 0,
              upstream_timeout: float = UPSTREAM_TIMEOUT) -> AsyncIterator[Rig]:
    """An engine and its outbox on a LocalStore in tmp_path/"store" (or `store`), sending to
    `origin`; the outbox runs unless `start` is False. Stopped and closed at the end."""
    if store is None:
        store = LocalStore(tmp_path / "store", fsync=False)
    outbox = Outbox(store, Upstream(Origin.parse(origin), timeout=upstream_timeout), policy)
    engine = e.Engine(store, outbox, min_free_bytes, clock)
    if start:
        outbox.start()
    try:
        yield Rig(engine, store, outbox)
    finally:
        await outbox.stop()
        await store.close()


async def restarted_store(tmp_path: Path) -> LocalStore:
    """The store folder opened again as a new process would: no lease of the old one is live."""
    store = LocalStore(tmp_path / "store", fsync=False)
    await store.drop_leases()
    return store


def new(length: int | None, *, owner: str = OWNER, expiration: int = 0, target: bool = True,
        path: str | None = None, parts: tuple[str, ...] = (), max_size: int = 0,
        digests: dict[str, str] | None = None) -> e.NewUpload:
    upload_id = e.new_upload_id()
    return e.NewUpload(
        id=upload_id, protocol="test", owner=owner, length=length, metadata={},
        target=Target("PUT", path or f"/in/{upload_id}") if target else None, max_size=max_size,
        expiration=expiration, parts=parts, digests=digests or {},
    )


async def append(engine: e.Engine, upload: Upload, data: bytes, *, offset: int | None = None,
                 checksum: e.Checksum | None = None) -> Upload:
    """One whole request body, arriving in two chunks."""
    writing = await engine.begin_append(upload, upload.offset if offset is None else offset,
                                        len(data), checksum)
    writing.feed(data[: len(data) // 2])
    writing.feed(data[len(data) // 2:])
    return await engine.finish_append(writing)


async def refusal(step: Awaitable[object]) -> ShimError:
    with pytest.raises(ShimError) as caught:
        await step
    return caught.value


async def record(store: Store, upload_id: str) -> Upload:
    upload = await store.load(upload_id)
    assert upload is not None, f"upload {upload_id} has no record"
    return upload


async def stored(store: Store, upload_id: str) -> bytes:
    """Every byte in the upload's data file."""
    size = await store.size(upload_id)
    return b"".join([os.pread(piece.file.fileno(), piece.count, piece.offset)
                     async for piece in store.ranges([upload_id], [size])])


async def eventually(check: Callable[[], bool | Awaitable[bool]], what: str,
                     timeout: float = DEADLINE) -> None:
    """Poll `check` on the running loop until it holds; TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.02)


async def in_state(store: Store, upload_id: str, state: State) -> bool:
    upload = await store.load(upload_id)
    return upload is not None and upload.state is state


def puts(server: WholeFileServer) -> list[ReceivedRequest]:
    return [request for request in server.received if request.method == "PUT"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


@dataclass
class Seen:
    """One request as a RawLegacy server saw it."""

    headers: dict[str, str]
    complete: bool = False
    """The whole Content-Length body was read."""


@dataclass
class RawLegacy:
    """A legacy server that misbehaves on the wire, served on the test's own event loop:

    - "close-after-body": reads the whole Content-Length body, then closes without an answer;
    - "early-413": reads only the head, answers 413 and closes;
    - "gated": reads the body, answers 201 once `gate` is set;
    - "stalled": reads only the head, then nothing until `gate` is set (then drops it);
    - "early-201": reads only the head, answers 201 and closes;
    - "slow": reads the body 64 KiB every 30 ms through a small receive buffer, then
      answers 201 after 200 ms."""

    mode: Literal["close-after-body", "early-413", "gated", "stalled", "early-201", "slow"]
    seen: list[Seen] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RawLegacy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # accepted ones too
        listener.bind(("127.0.0.1", 0))
        self._server = await asyncio.start_server(self._serve, sock=listener)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.gate.set()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), DEADLINE)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            pairs = (line.partition(":") for line in head.split("\r\n")[1:] if line)
            seen = Seen({name.strip().lower(): value.strip() for name, _, value in pairs})
            self.seen.append(seen)
            if self.mode in ("early-413", "early-201"):
                status = b"413 Content Too Large" if self.mode == "early-413" else b"201 Created"
                writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
                await writer.drain()
                return
            if self.mode == "stalled":
                await self.gate.wait()
                return
            if self.mode == "slow":
                left = int(seen.headers.get("content-length", "0"))
                while left:
                    await asyncio.sleep(0.03)
                    left -= len(await reader.readexactly(min(64 * 1024, left)))
                seen.complete = True
                await asyncio.sleep(0.2)
                writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            await reader.readexactly(int(seen.headers.get("content-length", "0")))
            seen.complete = True
            if self.mode == "gated":
                await self.gate.wait()
                writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


# --- delivery: once, whole, replayed ----------------------------------------------------------


def test_upload_ids_are_unguessable_url_safe_and_never_look_like_an_option(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An id is what an operator types (`python -m shim retry ID`): one with a leading '-'
    would be taken for an option. The generator draws again until it has none."""
    drawn = iter(["-starts-with-a-dash-xyz", "AbCdEfGhIjKlMnOpQrStUvWx"])
    monkeypatch.setattr(e.secrets, "token_urlsafe", lambda size: next(drawn))
    assert e.new_upload_id() == "AbCdEfGhIjKlMnOpQrStUvWx"
    monkeypatch.undo()
    ids = {e.new_upload_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(len(i) == 24 and not i.startswith("-") and i.replace("-", "").replace("_", "")
               .isalnum() for i in ids)


def test_the_last_bytes_are_put_on_record_only_as_they_go_out(tmp_path: Path) -> None:
    """While the legacy server has not taken the whole file, the record says the last bytes
    have not gone out (a crash then is safe to retry); once they have, it says so (a crash
    then leaves the outcome unknown)."""

    async def attempt(mode: Literal["stalled", "gated"], size: int) -> bool:
        async with RawLegacy(mode) as server, rig(tmp_path / mode, server.url) as r:
            upload = await append(r.engine, await r.engine.create(new(size)), os.urandom(size))
            await eventually(lambda: bool(server.seen), "the delivery to start")
            if mode == "gated":
                await eventually(lambda: server.seen[0].complete, "the whole body to arrive")
            else:
                await asyncio.sleep(0)  # let the sender block on the full socket buffers
            during = await record(r.store, upload.id)
            assert during.state is State.DELIVERING
            server.gate.set()
            return during.last_bytes_sent

    async def scenario() -> None:
        assert await attempt("stalled", 16 * MIB) is False
        assert await attempt("gated", 3) is True

    asyncio.run(scenario())


def test_a_slow_but_steady_legacy_server_is_not_cut_off(tmp_path: Path) -> None:
    """upstream.timeout is an idle timeout: a legacy server that takes about 2 s to read a
    file and answer, but never pauses longer than the timeout (1 s), gets it delivered once."""

    async def scenario() -> None:
        async with RawLegacy("slow") as server, \
                rig(tmp_path, server.url, upstream_timeout=1.0) as r:
            size = 4 * MIB
            upload = await append(r.engine, await r.engine.create(new(size)), os.urandom(size))
            started = time.monotonic()
            assert (await r.engine.await_delivery(upload)).accepted
            assert time.monotonic() - started > 1.0  # longer than the timeout in all
            assert len(server.seen) == 1 and server.seen[0].complete

    asyncio.run(scenario())


def test_an_early_acceptance_records_no_digest_of_bytes_never_sent(tmp_path: Path) -> None:
    """A legacy server that accepts before reading the body: the answer is recorded, but no
    SHA-256 is kept (it would not be the file's), so a repeat is not taken for a duplicate."""

    async def scenario() -> None:
        async with RawLegacy("early-201") as server, rig(tmp_path, server.url) as r:
            upload = await append(r.engine, await r.engine.create(new(4 * MIB)), os.urandom(4 * MIB))
            delivery = await r.engine.await_delivery(upload)
            assert delivery.accepted
            assert (await record(r.store, upload.id)).sha256 is None

    asyncio.run(scenario())


def test_a_delivery_lease_held_elsewhere_means_no_attempt_here(tmp_path: Path,
                                                                legacy: WholeFileServer) -> None:
    """At most one attempt per upload is in flight: while another worker (another instance)
    holds the upload's delivery lease, this one sends nothing; once it is released, it does."""

    async def scenario() -> None:
        async with rig(tmp_path, legacy.url, start=False) as r:
            upload = await r.engine.create(new(3))
            assert await r.store.acquire(f"deliver:{upload.id}", "elsewhere", 60.0)
            upload = await append(r.engine, upload, b"abc")
            r.outbox.start()
            r.outbox.kick()
            await asyncio.sleep(0.3)  # several worker rounds: none may send it
            assert puts(legacy) == [] and (await record(r.store, upload.id)).state is State.COMPLETE
            await r.store.release(f"deliver:{upload.id}", "elsewhere")
            r.outbox.kick()
            assert (await r.engine.await_delivery(upload)).accepted

    asyncio.run(scenario())
    assert len(puts(legacy)) == 1


def test_a_client_waits_delivery_wait_then_hears_pending_with_retry_after(tmp_path: Path) -> None:
    """A legacy server that takes longer than delivery.wait: the final request gets 'pending'
    (503) with Retry-After about that wait, no earlier; the attempt goes on and its answer
    is what a later request gets."""

    async def scenario() -> None:
        async with RawLegacy("gated") as server:
            policy = replace(FAST, wait=1.5)
            async with rig(tmp_path, server.url, policy=policy) as r:
                upload = await append(r.engine, await r.engine.create(new(3)), b"abc")
                started = time.monotonic()
                delivery = await r.engine.await_delivery(upload)
                waited = time.monotonic() - started
                assert (delivery.code, delivery.status, delivery.retry_after) == ("pending", 503, 2)
                assert "not answered yet" in delivery.problem
                assert waited >= 1.4
                server.gate.set()
                later = replace(FAST, wait=DEADLINE)
                r.outbox.policy = later
                assert (await r.engine.await_delivery(upload)).accepted
                assert len(server.seen) == 1

    asyncio.run(scenario())


def test_a_finished_upload_is_delivered_once_byte_exact_and_the_answer_is_replayed(
        tmp_path: Path, legacy: WholeFileServer) -> None:
    """The legacy server gets one PUT with exactly the uploaded bytes; asking again for the
    outcome replays its answer instead of sending the file again, and the shim's copy is freed.
    The delivery records the SHA-256 of what it sent for a file a key names (a later upload
    under that key may repeat it), and spends no hashing on one that no key names."""

    async def scenario() -> str:
        async with rig(tmp_path, legacy.url) as r:
            unnamed = await append(r.engine, await r.engine.create(new(3)), b"abc")
            assert (await r.engine.await_delivery(unnamed)).accepted
            assert (await record(r.store, unnamed.id)).sha256 is None
            upload = await r.engine.create(new(10), key="name")
            upload = await append(r.engine, upload, b"01234")
            upload = await append(r.engine, upload, b"56789")
            # The body that completes the file queues it before its write lease ends.
            assert upload.complete and upload.state is State.COMPLETE
            settled = await r.engine.settle(upload)
            assert settled == upload
            first = await r.engine.await_delivery(settled)
            again = await r.engine.await_delivery(settled)
            assert first.accepted and first.answer is not None and first.answer.status == 201
            assert again.answer == first.answer
            delivered = await record(r.store, upload.id)
            assert delivered.state is State.DELIVERED and delivered.answer == first.answer
            assert delivered.sha256 == sha256(b"0123456789")
            assert await r.engine.settle(delivered) == delivered  # nothing queued again
            assert await r.store.size(upload.id) == 0  # the file left the shim's disk
            assert len(puts(legacy)) == 2
            return upload.id

    upload_id = asyncio.run(scenario())
    [_, put] = puts(legacy)
    assert (put.size, put.sha256, put.path) == (10, sha256(b"0123456789"), f"/in/{upload_id}")


def test_a_wrong_offset_is_409_and_writes_nothing(tmp_path: Path) -> None:
    """An append at an offset other than the stored one is refused with the expected offset;
    the file and the record stay as they were and the upload stays writable."""

    async def scenario() -> None:
        async with rig(tmp_path, NOWHERE) as r:
            upload = await append(r.engine, await r.engine.create(new(10)), b"abc")
            error = await refusal(r.engine.begin_append(upload, 1, 3))
            assert (error.status, error.details["expected-offset"]) == (409, 3)
            assert await stored(r.store, upload.id) == b"abc"
            assert (await record(r.store, upload.id)).offset == 3
            assert (await append(r.engine, upload, b"def")).offset == 6  # no lease was left held

    asyncio.run(scenario())


def test_a_body_cut_off_keeps_what_arrived(tmp_path: Path) -> None:
    """A client that vanishes mid-body keeps every byte that arrived: HEAD during the body
    already shows them, and the next request resumes after them."""

    async def scenario() -> None:
        async with rig(tmp_path, NOWHERE) as r:
            upload = await r.engine.create(new(100))
            writing = await r.engine.begin_append(upload, 0, 100)
            writing.feed(b"x" * 40)
            assert r.engine.offset_of(upload) == 40
            assert (await r.engine.abort_append(writing)).offset == 40
            resumed = await record(r.store, upload.id)
            assert resumed.offset == 40 and r.engine.offset_of(resumed) == 40
            assert (await append(r.engine, resumed, b"y" * 60)).offset == 100
            assert await stored(r.store, upload.id) == b"x" * 40 + b"y" * 60

    asyncio.run(scenario())


def test_a_second_writer_is_locked_out_and_a_take_over_resumes_where_the_first_stopped(
        tmp_path: Path, legacy: WholeFileServer) -> None:
    """While one request writes an upload, another (in this or another shim on the same store)
    gets 423; a take-over ends the first request, and the new one continues from its last byte,
    so the delivered file is whole."""

    async def scenario() -> None:
        async with rig(tmp_path, legacy.url) as r:
            upload = await r.engine.create(new(10))
            stale_ticket, _ = await r.engine.take_over(upload.id)  # how every write request begins
            stale = await r.engine.begin_append(upload, 0, 10)
            stale.feed(b"1234")  # then its client vanishes without the shim noticing
            assert (await refusal(r.engine.begin_append(upload, 0, 10))).status == 423
            other_instance = e.Engine(r.store, r.outbox)
            assert (await refusal(other_instance.begin_append(upload, 0, 10))).status == 423
            ended: list[asyncio.Future[Upload]] = []
            stale.interrupt = lambda: ended.append(asyncio.ensure_future(r.engine.abort_append(stale)))
            ticket, _ = await r.engine.take_over(upload.id)
            assert len(ended) == 1 and (await ended[0]).offset == 4
            assert r.engine.superseded(upload.id, stale_ticket)
            assert not r.engine.superseded(upload.id, ticket)
            current = await r.engine.get(upload.id, OWNER)
            assert current.offset == 4
            fresh = await r.engine.begin_append(current, 4, 6)
            fresh.feed(b"567890")
            done = await r.engine.finish_append(fresh)
            assert done.offset == 10
            delivery = await r.engine.await_delivery(await r.engine.settle(done))
            assert delivery.accepted

    asyncio.run(scenario())
    assert [put.sha256 for put in puts(legacy)] == [sha256(b"1234567890")]


def test_a_checksum_mismatch_discards_the_chunk(tmp_path: Path) -> None:
    """A chunk whose checksum does not match is dropped whole (460): the offset and the file
    stay as before it, HEAD never showed its bytes, and the right chunk is then accepted."""

    async def scenario() -> None:
        async with rig(tmp_path, NOWHERE) as r:
            upload = await append(r.engine, await r.engine.create(new(10)), b"abc")
            wrong = e.Checksum("sha1", hashlib.sha1(b"other").digest())
            writing = await r.engine.begin_append(upload, 3, 3, wrong)
            writing.feed(b"def")
            assert r.engine.offset_of(upload) == 3  # unverified bytes are not shown
            error = await refusal(r.engine.finish_append(writing))
            assert (error.status, error.code) == (460, "checksum-mismatch")
            after = await record(r.store, upload.id)
            assert (after.offset, after.unverified_from) == (3, None)
            assert await stored(r.store, upload.id) == b"abc"
            right = e.Checksum("sha256", hashlib.sha256(b"def").digest())
            assert (await append(r.engine, after, b"def", checksum=right)).offset == 6
            assert await stored(r.store, upload.id) == b"abcdef"

    asyncio.run(scenario())


def test_a_body_past_the_length_is_refused_whole(tmp_path: Path) -> None:
    """A body longer than the room left is refused with 413: up front when announced, at the
    end when chunked; none of its bytes are kept."""

    async def scenario() -> None:
        async with rig(tmp_path, NOWHERE) as r:
            upload = await r.engine.create(new(5))
            assert (await refusal(r.engine.begin_append(upload, 0, 6))).status == 413
            writing = await r.engine.begin_append(upload, 0, None)  # chunked: found out streaming
            writing.feed(b"abc")
            writing.feed(b"def")
            assert r.engine.offset_of(upload) == 0
            assert (await refusal(r.engine.finish_append(writing))).status == 413
            assert (await record(r.store, upload.id)).offset == 0
            assert await r.store.size(upload.id) == 0
            assert (await append(r.engine, upload, b"abcde")).complete

    asyncio.run(scenario())


def test_a_size_limit_refuses_creation_deferred_lengths_and_bodies(tmp_path: Path) -> None:
    """max_size refuses (413) an upload announced too large, a deferred length declared too
    large, and a body of an upload of unknown length that would pass the limit; a length that
    contradicts the stored bytes is 400."""

    async def scenario() -> None:
        async with rig(tmp_path, NOWHERE) as r:
            assert (await refusal(r.engine.create(new(11, max_size=10)))).status == 413
            deferred = await r.engine.create(new(None))
            assert (await refusal(r.engine.begin_append(deferred, 0, 11, max_size=10))).status == 413
            writing = await r.engine.begin_append(deferred, 0, None, max_size=10)
            writing.feed(b"x" * 11)
            assert (await refusal(r.engine.finish_append(writing))).status == 413
            deferred = await record(r.store, deferred.id)
            assert deferred.offset == 0
            assert (await refusal(r.engine.declare_length(deferred, 11, 10))).status == 413
            declared = await r.engine.declare_length(deferred, 10, 10)
            assert declared.length == 10
            assert (await refusal(r.engine.declare_length(declared, 9, 10))).status == 400

    asyncio.run(scenario())


def test_a_full_disk_is_507_before_and_while_writing(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Too little free space refuses an append with 507 before its body; a disk that fills up
    during the body answers 507 and keeps the offset where it was."""

    async def scenario() -> None:
        async with rig(tmp_path, NOWHERE) as r:
            upload = await append(r.engine, await r.engine.create(new(10)), b"ab")
            r.engine.min_free_bytes = await r.store.free_bytes() * 2
            assert (await refusal(r.engine.begin_append(upload, 2, 3))).status == 507
            r.engine.min_free_bytes = 0
            writing = await r.engine.begin_append(upload, 2, 3)

            def full(data: bytes) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(writing.writer, "write", full)
            writing.feed(b"cde")
            assert (await refusal(r.engine.finish_append(writing))).status == 507
            assert (await record(r.store, upload.id)).offset == 2
            assert (await append(r.engine, upload, b"cde")).offset == 5  # the lease was released

    asyncio.run(scenario())


def test_a_full_disk_refuses_an_append_before_anything_is_written(tmp_path: Path) -> None:
    """When the store reports no free space, an append is refused with 507 at once: no byte is
    written, the record is untouched and no lease is left behind."""

    async def scenario() -> None:
        store = FaultyStore(LocalStore(tmp_path / "store", fsync=False))
        async with rig(tmp_path, NOWHERE, store=store, min_free_bytes=MIB) as r:
            upload = await r.engine.create(new(10))
            store.disk_full = True
            store.calls.clear()
            assert (await refusal(r.engine.begin_append(upload, 0, 10))).status == 507
            assert (await refusal(r.engine.begin_append(upload, 0, None))).status == 507
            assert store.calls["open_writer"] == store.calls["save"] == store.calls["acquire"] == 0
            assert await r.store.size(upload.id) == 0
            assert await record(r.store, upload.id) == upload
            store.disk_full = False
            assert (await append(r.engine, upload, b"0123456789")).complete

    asyncio.run(scenario())


# --- restart ------------------------------------------------------------------------------------


def test_a_crash_while_a_new_file_replaces_the_old_one_never_splices_them(tmp_path: Path) -> None:
    """A body from 0 that differs from the stored bytes is a new file. Killed while it is
    written, the shim keeps only the bytes both files share: never the new file's start
    followed by the old file's rest. HEAD never showed more than that meanwhile."""

    async def crash() -> tuple[str, int]:
        async with rig(tmp_path, NOWHERE, start=False) as r:
            upload = await append(r.engine, await r.engine.create(new(8)), b"AAAAAA")
            writing = await r.engine.begin_range(upload, 0, 8)
            writing.feed(b"AAXX")
            assert writing.rewinding is not None
            await writing.rewinding  # the new file's start is on record
            writing.feed(b"X")
            told = r.engine.offset_of(upload)
            assert (await record(r.store, upload.id)).unverified_from == 2
            os.close(writing.writer.fd)  # the process dies mid-body
            return upload.id, told

    async def restart(upload_id: str) -> None:
        async with rig(tmp_path, NOWHERE, store=await restarted_store(tmp_path)) as r:
            await r.engine.recover()
            recovered = await r.engine.get(upload_id, OWNER)
            assert recovered.offset == 2 and await stored(r.store, upload_id) == b"AA"

    upload_id, told = asyncio.run(crash())
    assert told == 2
    asyncio.run(restart(upload_id))


def test_a_new_file_from_0_replaces_the_old_one_from_the_first_difference(tmp_path: Path,
                                                                         legacy: WholeFileServer) -> None:
    """A whole file from 0 that differs from the stored start of another is a new file: what
    is delivered is exactly the new file, whatever arrived while its start was put on record."""

    async def scenario() -> None:
        async with rig(tmp_path, legacy.url) as r:
            upload = await append(r.engine, await r.engine.create(new(8)), b"AAAAAA")
            writing = await r.engine.begin_range(upload, 0, 8)
            for piece in (b"AAX", b"Y", b"ZZ", b"QQ"):
                writing.feed(piece)  # most arrive while the rewind is being recorded
            done = await r.engine.finish_append(writing)
            assert done.offset == 8 and await stored(r.store, upload.id) == b"AAXYZZQQ"
            assert (await r.engine.await_delivery(await r.engine.settle(done))).accepted

    asyncio.run(scenario())
    assert [put.sha256 for put in puts(legacy)] == [sha256(b"AAXYZZQQ")]


def test_a_new_file_that_began_on_a_stale_record_cannot_touch_a_completed_upload(
        tmp_path: Path, legacy: WholeFileServer) -> None:
    """A body from 0 that began while another request was completing the upload (it read
    the record before): the completing request queues the file before its lease ends, and
    the late body, which differs, is refused (409) without writing a byte. The legacy server
    gets the first file, whole, once."""

    async def scenario() -> None:
        async with rig(tmp_path, legacy.url, start=False) as r:
            stale = await append(r.engine, await r.engine.create(new(8)), b"AAAA")
            finishing = await r.engine.begin_append(stale, 4, 4)
            assert (await refusal(r.engine.begin_range(stale, 0, 8))).status == 423
            finishing.feed(b"BBBB")
            done = await r.engine.finish_append(finishing)
            assert done.state is State.COMPLETE
            late = await r.engine.begin_range(stale, 0, 8)  # read before the upload completed
            late.feed(b"AAAXXXXX")
            error = await refusal(r.engine.finish_append(late))
            assert error.status == 409
            assert await stored(r.store, done.id) == b"AAAABBBB"  # not cut, not overwritten
            r.outbox.start()
            delivery = await r.engine.await_delivery(done)
            assert delivery.accepted

    asyncio.run(scenario())
    assert [put.sha256 for put in puts(legacy)] == [sha256(b"AAAABBBB")]


def test_restart_commits_bytes_on_disk_and_drops_unverified_ones(tmp_path: Path) -> None:
    """After the shim died mid-body, start-up recovery commits the bytes that reached the disk
    and drops those of a checksummed chunk that was never verified; no offset a client was
    told goes back, and uploading continues from the recovered offset."""

    async def crash() -> tuple[str, str, int, int]:
        async with rig(tmp_path, NOWHERE, start=False) as r:
            plain = await r.engine.create(new(10))
            writing = await r.engine.begin_append(plain, 0, 10)
            writing.feed(b"12345")
            checked = await append(r.engine, await r.engine.create(new(10)), b"abc")
            checking = await r.engine.begin_append(checked, 3, 4, e.Checksum("md5", b"0" * 16))
            checking.feed(b"de")
            told = r.engine.offset_of(plain), r.engine.offset_of(checked)
            os.close(writing.writer.fd)  # the process dies: its files close, nothing is committed
            os.close(checking.writer.fd)
            return plain.id, checked.id, *told

    async def restart(plain_id: str, checked_id: str, told_plain: int, told_checked: int) -> None:
        async with rig(tmp_path, NOWHERE, store=await restarted_store(tmp_path)) as r:
            assert await r.engine.recover() == 2
            plain = await r.engine.get(plain_id, OWNER)
            checked = await r.engine.get(checked_id, OWNER)
            assert (plain.offset, checked.offset) == (5, 3)
            assert plain.offset >= told_plain and checked.offset >= told_checked
            assert checked.unverified_from is None
            assert await stored(r.store, plain_id) == b"12345"
            assert await stored(r.store, checked_id) == b"abc"
            assert await r.engine.recover() == 0  # nothing left to repair
            assert (await append(r.engine, plain, b"67890")).complete
            assert (await append(r.engine, checked, b"defghij")).complete

    plain_id, checked_id, told_plain, told_checked = asyncio.run(crash())
    assert (told_plain, told_checked) == (5, 3)
    asyncio.run(restart(plain_id, checked_id, told_plain, told_checked))


def test_a_file_whose_last_bytes_reached_the_disk_before_a_crash_is_delivered_after_restart(
        tmp_path: Path, legacy: WholeFileServer) -> None:
    """The shim died after the last byte of a file reached its disk but before the file was
    committed and queued: after restart the file is delivered, once and whole."""

    async def crash() -> str:
        async with rig(tmp_path, NOWHERE, start=False) as r:
            upload = await r.engine.create(new(6))
            writing = await r.engine.begin_append(upload, 0, 6)
            writing.feed(b"abcdef")
            os.close(writing.writer.fd)
            return upload.id

    async def restart(upload_id: str) -> None:
        async with rig(tmp_path, legacy.url, store=await restarted_store(tmp_path)) as r:
            await r.engine.recover()
            await eventually(lambda: in_state(r.store, upload_id, State.DELIVERED),
                             "the recovered file to be delivered")
            assert (await r.engine.await_delivery(await record(r.store, upload_id))).accepted

    asyncio.run(restart(asyncio.run(crash())))
    assert [(put.size, put.sha256) for put in puts(legacy)] == [(6, sha256(b"abcdef"))]


def test_offset_during_a_body_is_what_the_os_has_and_never_more_than_survives(tmp_path: Path) -> None:
    """HEAD during a body reports exactly the bytes already handed to the OS (on disk in the
    data file), and after the shim is killed and restarted the offset is at least that."""

    async def crash() -> tuple[str, list[int]]:
        async with rig(tmp_path, NOWHERE, start=False) as r:
            upload = await r.engine.create(new(100))
            writing = await r.engine.begin_append(upload, 0, 100)
            told = []
            for piece in (b"a" * 10, b"b" * 15, b"c" * 5):
                writing.feed(piece)
                told.append(r.engine.offset_of(upload))
                assert told[-1] == await r.store.size(upload.id)
            os.close(writing.writer.fd)  # killed mid-body
            return upload.id, told

    async def restart(upload_id: str, told: list[int]) -> None:
        async with rig(tmp_path, NOWHERE, store=await restarted_store(tmp_path)) as r:
            await r.engine.recover()
            recovered = await r.engine.get(upload_id, OWNER)
            assert recovered.offset >= max(told)
            assert await stored(r.store, upload_id) == b"a" * 10 + b"b" * 15 + b"c" * 5

    upload_id, told = asyncio.run(crash())
    assert told == [10, 25, 30]
    asyncio.run(restart(upload_id, told))


@pytest.mark.parametrize("on_unknown", ["hold", "retry"])
def test_a_delivery_cut_short_by_a_crash_follows_on_unknown(
        tmp_path: Path, legacy: WholeFileServer, on_unknown: Literal["hold", "retry"]) -> None:
    """An upload the shim was delivering when it died, after its last bytes went out, has an
    unknown outcome: with on_unknown=hold it is FAILED without another request (the client
    is told 502), with retry it is delivered again, once."""

    async def crash() -> str:
        async with rig(tmp_path, NOWHERE, start=False) as r:
            upload = await append(r.engine, await r.engine.create(new(3)), b"abc")
            settled = await r.engine.settle(upload)
            await transition(r.store, settled, Event.ATTEMPT, attempts=1, first_attempt=time.time(),
                             last_bytes_sent=True)
            return upload.id

    async def restart(upload_id: str) -> None:
        policy = replace(FAST, on_unknown=on_unknown)
        async with rig(tmp_path, legacy.url, policy=policy, store=await restarted_store(tmp_path)) as r:
            await r.engine.recover()
            if on_unknown == "hold":
                delivery = await r.engine.await_delivery(await record(r.store, upload_id))
                assert (delivery.code, delivery.status, delivery.answer) == ("failed", 502, None)
                assert "unknown" in delivery.problem
                assert (await record(r.store, upload_id)).state is State.FAILED
                assert await stored(r.store, upload_id) == b"abc"  # kept for an operator
            else:
                await eventually(lambda: in_state(r.store, upload_id, State.DELIVERED),
                                 "the second delivery")

    asyncio.run(restart(asyncio.run(crash())))
    assert len(puts(legacy)) == (0 if on_unknown == "hold" else 1)


def test_a_delivery_cut_short_before_its_last_bytes_is_retried_whatever_on_unknown(
        tmp_path: Path, legacy: WholeFileServer) -> None:
    """A shim that died before the file's last bytes went out left the legacy server an
    incomplete request: after a restart it is delivered, once, even under on_unknown=hold."""

    async def crash() -> str:
        async with rig(tmp_path, NOWHERE, start=False) as r:
            upload = await append(r.engine, await r.engine.create(new(3)), b"abc")
            settled = await r.engine.settle(upload)
            await transition(r.store, settled, Event.ATTEMPT, attempts=1, first_attempt=time.time())
            return upload.id

    async def restart(upload_id: str) -> None:
        policy = replace(FAST, on_unknown="hold")
        async with rig(tmp_path, legacy.url, policy=policy, store=await restarted_store(tmp_path)) as r:
            await r.engine.recover()
            await eventually(lambda: in_state(r.store, upload_id, State.DELIVERED), "the retry")

    asyncio.run(restart(asyncio.run(crash())))
    assert [put.sha256 for put in puts(legacy)] == [sha256(b"abc")]


# --- the legacy server's answers ----------------------------------------------------------------


def test_a_legacy_refusal_is_recorded_replayed_and_never_sent_again(
        tmp_path: Path, legacy: WholeFileServer) -> None:
    """A 403 from the legacy server is final: the upload is REFUSED with that answer, every
    later request gets the same 403, and the file is never sent again, even once the legacy
    server would accept it."""

    async def scenario() -> None:
        async with rig(tmp_path, legacy.url) as r:
            legacy.fail_status = 403
            upload = await append(r.engine, await r.engine.create(new(3)), b"abc")
            settled = await r.engine.settle(upload)
            first = await r.engine.await_delivery(settled)
            assert first.answer is not None and first.answer.status == 403 and not first.accepted
            refused = await record(r.store, upload.id)
            assert refused.state is State.REFUSED and refused.answer == first.answer
            legacy.fail_status = None
            r.outbox.kick()
            assert await r.engine.settle(refused) == refused
            assert (await r.engine.await_delivery(refused)).answer == first.answer
            assert upload.id not in await r.store.due(time.time() + 10**6)  # not queued at all
            assert (await refusal(r.engine.begin_append(refused, 3, 0))).status == 403

    asyncio.run(scenario())
    assert [put.status for put in puts(legacy)] == [403]


def test_a_legacy_503_is_retried_with_backoff_until_accepted_once(
        tmp_path: Path, legacy: WholeFileServer) -> None:
    """A 503 from the legacy server is not final: the client is told 503 with Retry-After, the
    upload waits COMPLETE with backoff, and once the legacy server accepts, exactly one 201;
    every attempt carried the upload's Idempotency-Key."""

    async def scenario() -> str:
        async with rig(tmp_path, legacy.url) as r:
            legacy.fail_status = 503
            upload = await append(r.engine, await r.engine.create(new(3)), b"abc")
            pending = await r.engine.await_delivery(await r.engine.settle(upload))
            assert (pending.code, pending.status, pending.answer) == ("pending", 503, None)
            assert pending.retry_after >= 1 and ("Retry-After", str(pending.retry_after)) in pending.fields
            waiting = await record(r.store, upload.id)
            assert waiting.state in (State.COMPLETE, State.DELIVERING) and waiting.attempts >= 1
            assert "503" in waiting.problem
            legacy.fail_status = None
            await eventually(lambda: in_state(r.store, upload.id, State.DELIVERED), "acceptance")
            assert (await r.engine.await_delivery(upload)).accepted
            return upload.id

    upload_id = asyncio.run(scenario())
    statuses = [put.status for put in puts(legacy)]
    assert statuses.count(201) == 1 and statuses[-1] == 201 and set(statuses[:-1]) == {503}
    assert {put.header("Idempotency-Key") for put in puts(legacy)} == {f'"{upload_id}"'}


def test_a_legacy_server_that_is_down_gets_the_file_once_it_is_back(tmp_path: Path) -> None:
    """While the legacy server is down the client is told "pending" (503) with Retry-After,
    and the shim keeps the file; once the server listens again it gets the file once."""
    first = WholeFileServer(tmp_path / "legacy")
    first.start()
    port, url = first.port, first.url
    first.stop()
    back: WholeFileServer | None = None

    async def scenario() -> None:
        nonlocal back
        async with rig(tmp_path, url) as r:
            upload = await append(r.engine, await r.engine.create(new(3)), b"abc")
            settled = await r.engine.settle(upload)
            waiting = await r.engine.await_delivery(settled)
            assert (waiting.code, waiting.status, waiting.answer) == ("pending", 503, None)
            assert waiting.retry_after >= 1 and "connect" in waiting.problem
            assert await stored(r.store, upload.id) == b"abc"
            back = WholeFileServer(tmp_path / "legacy", port=port)
            back.start()
            await eventually(lambda: in_state(r.store, upload.id, State.DELIVERED),
                             "delivery once the legacy server is back")
            assert (await r.engine.await_delivery(settled)).accepted

    try:
        asyncio.run(scenario())
    finally:
        if back is not None:
            back.stop()
    assert back is not None
    assert [(put.status, put.sha256) for put in puts(back)] == [(201, sha256(b"abc"))]


def test_delivery_gives_up_after_give_up_after(tmp_path: Path, legacy: WholeFileServer) -> None:
    """Past delivery.give_up_after the upload is FAILED with a reason the client is told
    (code "failed", 502), it is not tried again, and its bytes stay for an operator."""

    async def scenario() -> None:
        policy = replace(FAST, give_up_after=0.0)
        async with rig(tmp_path, legacy.url, policy=policy) as r:
            legacy.fail_status = 503
            upload = await append(r.engine, await r.engine.create(new(3)), b"abc")
            delivery = await r.engine.await_delivery(await r.engine.settle(upload))
            assert (delivery.code, delivery.status, delivery.answer) == ("failed", 502, None)
            assert "gave up" in delivery.problem and "503" in delivery.problem
            failed = await record(r.store, upload.id)
            assert failed.state is State.FAILED and failed.problem == delivery.problem
            assert upload.id not in await r.store.due(time.time() + 10**6)
            assert await stored(r.store, upload.id) == b"abc"

    asyncio.run(scenario())
    assert [put.status for put in puts(legacy)] == [503]


def test_an_upload_whose_give_up_time_passed_while_queued_is_failed_unsent(
        tmp_path: Path, legacy: WholeFileServer) -> None:
    """A queued upload whose first attempt is older than give_up_after when the worker picks
    it up (the shim was down meanwhile) is FAILED at once, saying why, without a request."""

    async def scenario() -> None:
        async with rig(tmp_path, legacy.url, start=False,
                       policy=replace(FAST, give_up_after=60.0)) as r:
            upload = await append(r.engine, await r.engine.create(new(3)), b"abc")
            await transition(r.store, await record(r.store, upload.id), first_attempt=time.time() - 61,
                             attempts=3, problem="the legacy server answered 503")
            r.outbox.start()
            delivery = await r.engine.await_delivery(upload)
            assert (delivery.code, delivery.problem) == ("failed",
                                                         "gave up: the legacy server answered 503")

    asyncio.run(scenario())
    assert puts(legacy) == []


def test_no_more_deliveries_in_flight_than_the_concurrency_allows(tmp_path: Path) -> None:
    """With delivery concurrency 1, a second finished upload waits until the first attempt
    has ended: the legacy server never has two deliveries at once; both arrive."""

    async def scenario() -> None:
        async with RawLegacy("gated") as server, \
                rig(tmp_path, server.url, policy=replace(FAST, concurrency=1)) as r:
            first = await append(r.engine, await r.engine.create(new(3)), b"abc")
            second = await append(r.engine, await r.engine.create(new(3)), b"def")
            await eventually(lambda: len(server.seen) == 1, "the first delivery")
            r.outbox.kick()
            await asyncio.sleep(0.2)  # worker rounds in which a second one must not start
            assert len(server.seen) == 1
            server.gate.set()
            for upload in (first, second):
                assert (await r.engine.await_delivery(upload)).accepted
            assert len(server.seen) == 2

    asyncio.run(scenario())


def test_no_answer_after_the_whole_file_is_held_with_on_unknown_hold(tmp_path: Path) -> None:
    """A legacy server that reads the whole file and closes without an answer may have stored
    it: with on_unknown=hold it gets no second request; the upload is FAILED (client: 502)."""

    async def scenario() -> None:
        async with RawLegacy("close-after-body") as server:
            policy = replace(FAST, on_unknown="hold")
            async with rig(tmp_path, server.url, policy=policy) as r:
                upload = await append(r.engine, await r.engine.create(new(3)), b"abc")
                delivery = await r.engine.await_delivery(await r.engine.settle(upload))
                assert (delivery.code, delivery.status, delivery.answer) == ("failed", 502, None)
                assert (await record(r.store, upload.id)).state is State.FAILED
                r.outbox.kick()
                assert (await r.engine.await_delivery(upload)).code == "failed"
                assert upload.id not in await r.store.due(time.time() + 10**6)  # never again
                assert await stored(r.store, upload.id) == b"abc"
            assert [seen.complete for seen in server.seen] == [True]

    asyncio.run(scenario())


def test_no_answer_after_the_whole_file_is_sent_again_with_on_unknown_retry(tmp_path: Path) -> None:
    """With on_unknown=retry, a legacy server that read the whole file and closed without an
    answer gets the file again (at-least-once)."""

    async def scenario() -> None:
        async with RawLegacy("close-after-body") as server:
            policy = replace(FAST, on_unknown="retry")
            async with rig(tmp_path, server.url, policy=policy) as r:
                upload = await append(r.engine, await r.engine.create(new(3)), b"abc")
                await r.engine.settle(upload)
                await eventually(lambda: sum(seen.complete for seen in server.seen) >= 2,
                                 "a second whole request")
                waiting = await record(r.store, upload.id)
                assert waiting.state in (State.COMPLETE, State.DELIVERING) and waiting.attempts >= 2
            assert all(seen.complete for seen in server.seen[:2])

    asyncio.run(scenario())


def test_every_attempt_carries_the_quoted_upload_id_as_idempotency_key(tmp_path: Path) -> None:
    """Each delivery attempt of an upload carries Idempotency-Key: "<upload id>" (the same on
    a retry, so the legacy server can drop a repeat); two uploads carry different keys."""

    async def scenario() -> None:
        async with RawLegacy("close-after-body") as server:
            policy = replace(FAST, on_unknown="retry")
            async with rig(tmp_path, server.url, policy=policy) as r:
                one = await append(r.engine, await r.engine.create(new(3)), b"abc")
                two = await append(r.engine, await r.engine.create(new(3)), b"xyz")
                await r.engine.settle(one)
                await r.engine.settle(two)
                expected = {f'"{one.id}"', f'"{two.id}"'}

                def retried_both() -> bool:
                    keys = [seen.headers.get("idempotency-key") for seen in server.seen]
                    return all(keys.count(key) >= 2 for key in expected)

                await eventually(retried_both, "two attempts of each upload")
            assert {seen.headers.get("idempotency-key") for seen in server.seen} == expected

    asyncio.run(scenario())


def test_an_early_413_while_the_file_is_still_being_sent_is_recorded(tmp_path: Path) -> None:
    """A legacy server that answers 413 after the head and closes while a large file is still
    being sent (nginx past client_max_body_size): the upload is REFUSED with that 413, which
    the client gets, and the file is sent only once."""

    async def scenario() -> None:
        async with RawLegacy("early-413") as server:
            async with rig(tmp_path, server.url) as r:
                size = 16 * MIB
                upload = await r.engine.create(new(size))
                writing = await r.engine.begin_append(upload, 0, size)
                for _ in range(size // MIB):
                    writing.feed(os.urandom(MIB))
                upload = await r.engine.finish_append(writing)
                delivery = await r.engine.await_delivery(await r.engine.settle(upload))
                assert delivery.answer is not None, delivery.problem
                assert delivery.answer.status == 413 and not delivery.accepted
                refused = await record(r.store, upload.id)
                assert refused.state is State.REFUSED and refused.answer == delivery.answer
            assert len(server.seen) == 1

    asyncio.run(scenario())


# --- concatenation, ownership, termination, expiry ----------------------------------------------


def test_concatenation_delivers_the_parts_in_order_and_keeps_them_for_other_finals(
        tmp_path: Path, legacy: WholeFileServer) -> None:
    """A final upload made of two partial ones is delivered as their bytes in order once the
    last part is in; the parts keep their bytes, so a second final upload of the same parts
    (in the other order) is delivered too."""

    async def scenario() -> None:
        async with rig(tmp_path, legacy.url) as r:
            first = await append(r.engine, await r.engine.create(new(3, target=False)), b"abc")
            second = await r.engine.create(new(2, target=False))
            whole = await r.engine.concatenate(new(None, parts=(first.id, second.id)))
            assert not whole.complete and whole.length == 5
            again = await r.engine.concatenate(new(None, parts=(first.id, second.id)))
            assert again.id == whole.id
            second = await append(r.engine, second, b"de")
            [finished] = await r.engine.wholes_of(second)
            assert finished.id == whole.id and finished.complete
            assert (await r.engine.await_delivery(await r.engine.settle(finished))).accepted
            assert await stored(r.store, first.id) == b"abc"
            assert await stored(r.store, second.id) == b"de"
            reverse = await r.engine.concatenate(new(None, parts=(second.id, first.id)))
            assert reverse.complete and reverse.id != whole.id
            assert (await r.engine.await_delivery(await r.engine.settle(reverse))).accepted

    asyncio.run(scenario())
    assert [put.sha256 for put in puts(legacy)] == [sha256(b"abcde"), sha256(b"deabc")]


def test_a_second_final_upload_of_the_same_parts_is_delivered_to_its_own_target(
        tmp_path: Path, legacy: WholeFileServer) -> None:
    """Two final uploads made of the same parts in the same order but meant for different
    files (another target) are two deliveries: the second file reaches its own path too."""

    async def scenario() -> None:
        async with rig(tmp_path, legacy.url) as r:
            first = await append(r.engine, await r.engine.create(new(3, target=False)), b"abc")
            second = await append(r.engine, await r.engine.create(new(2, target=False)), b"de")
            parts = (first.id, second.id)
            one = await r.engine.concatenate(new(None, parts=parts, path="/in/one.bin"))
            assert (await r.engine.await_delivery(await r.engine.settle(one))).accepted
            two = await r.engine.concatenate(new(None, parts=parts, path="/in/two.bin"))
            assert (await r.engine.await_delivery(await r.engine.settle(two))).accepted

    asyncio.run(scenario())
    assert [(put.path, put.sha256) for put in puts(legacy)] == [
        ("/in/one.bin", sha256(b"abcde")), ("/in/two.bin", sha256(b"abcde"))]


def test_only_the_owner_may_touch_an_upload(tmp_path: Path) -> None:
    """Another owner gets exactly what an unknown id gets (404: no id leaks), cannot find it
    by its key, and cannot use it as a part."""

    async def scenario() -> None:
        async with rig(tmp_path, NOWHERE) as r:
            upload = await r.engine.create(new(3, owner="alice"), key="PUT /x")
            stranger = await refusal(r.engine.get(upload.id, "mallory"))
            missing = await refusal(r.engine.get("nonexistent", "alice"))
            assert (stranger.status, stranger.message) == (missing.status, missing.message) \
                == (404, "no such upload")
            assert await r.engine.find("PUT /x", "alice") == upload
            assert await r.engine.find("PUT /x", "mallory") is None
            assert await r.engine.find("PUT /y", "alice") is None
            part = await r.engine.create(new(3, owner="alice", target=False))
            stolen = new(None, owner="mallory", parts=(part.id,))
            assert (await refusal(r.engine.concatenate(stolen))).status == 404

    asyncio.run(scenario())


def test_terminate_while_delivering_is_409_and_the_delivery_completes(tmp_path: Path) -> None:
    """Cancelling an upload while the legacy server is receiving it is refused with 409 (its
    outcome is not known yet); the delivery then completes and is recorded."""

    async def scenario() -> None:
        async with RawLegacy("gated") as server:
            async with rig(tmp_path, server.url) as r:
                upload = await append(r.engine, await r.engine.create(new(3)), b"abc")
                settled = await r.engine.settle(upload)
                await eventually(lambda: bool(server.seen) and server.seen[0].complete,
                                 "the legacy server to have the whole file")
                assert (await record(r.store, upload.id)).state is State.DELIVERING
                error = await refusal(r.engine.terminate(settled))  # the record the client saw
                assert (error.status, error.code) == (409, "delivering")
                assert (await record(r.store, upload.id)).state is State.DELIVERING
                server.gate.set()
                delivery = await r.engine.await_delivery(settled)
                assert delivery.accepted
                assert (await record(r.store, upload.id)).state is State.DELIVERED
            assert len(server.seen) == 1

    asyncio.run(scenario())


def test_terminated_and_expired_uploads_are_gone(tmp_path: Path) -> None:
    """A cancelled upload answers 410 and its bytes are deleted; it cannot be cancelled while a
    body is being written (423). An upload unused past its expiration answers 410 and is
    removed."""

    async def scenario() -> None:
        clock = Clock()
        async with rig(tmp_path, NOWHERE, clock=clock) as r:
            busy = await r.engine.create(new(10))
            writing = await r.engine.begin_append(busy, 0, 10)
            assert (await refusal(r.engine.terminate(busy))).status == 423
            await r.engine.abort_append(writing)
            doomed = await append(r.engine, await r.engine.create(new(10)), b"abc")
            await r.engine.terminate(doomed)
            assert (await refusal(r.engine.get(doomed.id, OWNER))).status == 410
            assert await r.store.size(doomed.id) == 0
            old = await r.engine.create(new(10, expiration=60))
            clock.now += 61
            assert (await refusal(r.engine.get(old.id, OWNER))).status == 410
            assert await r.store.load(old.id) is None
            assert (await refusal(r.engine.get(old.id, OWNER))).status in (404, 410)

    asyncio.run(scenario())


def test_a_queued_upload_and_the_parts_of_a_waiting_final_upload_never_expire(
        tmp_path: Path, legacy: WholeFileServer) -> None:
    """While the legacy server is down, a complete upload waiting in the outbox is kept past
    its expiration, and so are the parts of a final upload that waits: they cannot be
    deleted either (409). Once the server is back, both files are delivered once."""

    async def scenario() -> None:
        clock = Clock(time.time())
        port = legacy.port
        legacy.stop()
        async with rig(tmp_path, f"http://127.0.0.1:{port}", clock=clock) as r:
            single = await append(r.engine, await r.engine.create(new(3, expiration=60)), b"abc")
            single = await r.engine.settle(single)
            first = await append(r.engine, await r.engine.create(
                new(2, target=False, expiration=60)), b"de")
            second = await append(r.engine, await r.engine.create(
                new(2, target=False, expiration=60)), b"fg")
            whole = await r.engine.settle(await r.engine.concatenate(
                new(None, parts=(first.id, second.id), expiration=60)))
            assert (await r.engine.await_delivery(whole)).code == "pending"
            assert (await refusal(r.engine.terminate(first))).status == 409
            clock.now += 3600
            await r.engine.sweep()
            for kept in (single, first, second, whole):
                assert (await r.engine.get(kept.id, OWNER)).id == kept.id
            revived = WholeFileServer(legacy.directory, port=port)
            revived.start()
            try:
                for done in (single, whole):
                    await eventually(lambda done=done: in_state(r.store, done.id, State.DELIVERED),
                                     "the delivery once the legacy server is back")
                assert sorted(put.sha256 for put in puts(revived)) == sorted(
                    [sha256(b"abc"), sha256(b"defg")])
            finally:
                revived.stop()

    asyncio.run(scenario())


def test_a_final_upload_whose_part_is_gone_fails_without_sending_anything(tmp_path: Path,
                                                                          legacy: WholeFileServer) -> None:
    """If a part's bytes are gone anyway (removed behind the shim's back), the final upload is
    FAILED with the reason, and the legacy server never sees a request that breaks off."""

    async def scenario() -> None:
        async with rig(tmp_path, legacy.url, start=False) as r:
            first = await append(r.engine, await r.engine.create(new(2, target=False)), b"de")
            second = await append(r.engine, await r.engine.create(new(2, target=False)), b"fg")
            whole = await r.engine.settle(await r.engine.concatenate(
                new(None, parts=(first.id, second.id))))
            await r.store.discard(second.id)
            r.outbox.start()
            delivery = await r.engine.await_delivery(whole)
            assert (delivery.code, delivery.status) == ("failed", 502)
            assert "shorter than recorded" in delivery.problem

    asyncio.run(scenario())
    assert puts(legacy) == []


def test_sweep_removes_expired_uploads_through_the_index_and_keeps_the_rest(tmp_path: Path) -> None:
    """The sweeper removes uploads unused past their expiration (record, key and bytes) and
    terminated ones whose expiry passed, found through the expiry index (no scan of every
    upload); unexpired uploads, uploads without expiry and one being written stay."""

    async def scenario() -> None:
        clock = Clock()
        store = FaultyStore(LocalStore(tmp_path / "store", fsync=False))
        async with rig(tmp_path, NOWHERE, clock=clock, store=store) as r:
            stale = await append(r.engine, await r.engine.create(new(10, expiration=60),
                                                                 key="PUT /stale"), b"abc")
            cancelled = await r.engine.create(new(10, expiration=60))
            await r.engine.terminate(cancelled)
            fresh = await r.engine.create(new(10, expiration=600))
            forever = await r.engine.create(new(10))
            active = await r.engine.create(new(10, expiration=60))
            writing = await r.engine.begin_append(active, 0, 10)
            writing.feed(b"xy")
            clock.now += 61
            store.calls.clear()
            assert await r.engine.sweep() == 2
            assert store.calls["ids"] == 0 and store.calls["expired"] >= 1
            assert await r.store.load(stale.id) is None and await r.store.load(cancelled.id) is None
            assert await r.store.resolve("PUT /stale") is None
            assert await r.store.size(stale.id) == 0
            for kept in (fresh, forever, active):
                assert await r.store.load(kept.id) is not None
            assert (await r.engine.finish_append(writing)).offset == 2  # active again just now
            assert await r.engine.sweep() == 0
            assert (await r.engine.get(active.id, OWNER)).offset == 2

    asyncio.run(scenario())


def test_expiry_counts_from_the_last_activity_without_growing(tmp_path: Path) -> None:
    """An upload expires its configured time after its last write, not later: two writes do
    not add up to a longer life."""

    async def scenario() -> None:
        clock = Clock(1000.0)
        async with rig(tmp_path, NOWHERE, clock=clock) as r:
            upload = await r.engine.create(new(10, expiration=60))
            clock.now = 1050.0
            upload = await append(r.engine, upload, b"abc")
            clock.now = 1100.0
            upload = await append(r.engine, upload, b"def")
            assert upload.expires == 1160.0
            clock.now = 1159.0
            assert (await r.engine.get(upload.id, OWNER)).offset == 6
            clock.now = 1161.0
            assert (await refusal(r.engine.get(upload.id, OWNER))).status == 410

    asyncio.run(scenario())


# --- overlapping ranges and repeats -------------------------------------------------------------


def test_a_range_overlapping_stored_bytes_that_are_equal_is_skipped(tmp_path: Path) -> None:
    """A retried range that overlaps stored bytes with the same bytes only adds what is new;
    one entirely inside the stored bytes changes nothing; one past the end is 416."""

    async def scenario() -> None:
        async with rig(tmp_path, NOWHERE) as r:
            upload = await append(r.engine, await r.engine.create(new(8)), b"abc")
            retried = await r.engine.begin_range(upload, 1, 5)  # "bcdef": a longer retry
            assert r.engine.offset_of(upload) == 3
            retried.feed(b"b")
            retried.feed(b"cdef")
            upload = await r.engine.finish_append(retried)
            assert upload.offset == 6
            inside = await r.engine.begin_range(upload, 2, 3)
            inside.feed(b"cde")
            assert (await r.engine.finish_append(inside)).offset == 6
            assert (await refusal(r.engine.begin_range(upload, 7, 1))).status == 416
            assert await stored(r.store, upload.id) == b"abcdef"

    asyncio.run(scenario())


def test_a_range_from_later_on_that_differs_from_stored_bytes_is_409(tmp_path: Path) -> None:
    """A range starting after 0 whose overlap differs from the stored bytes is refused with
    409, and nothing changes: not even its new bytes past the stored end are kept."""

    async def scenario() -> None:
        async with rig(tmp_path, NOWHERE) as r:
            upload = await append(r.engine, await r.engine.create(new(8)), b"abcdef")
            differing = await r.engine.begin_range(upload, 4, 4)
            differing.feed(b"eXgh")
            error = await refusal(r.engine.finish_append(differing))
            assert (error.status, error.code) == (409, "conflict")
            after = await record(r.store, upload.id)
            assert (after.offset, after.length, after.state) == (6, 8, State.RECEIVING)
            assert await stored(r.store, upload.id) == b"abcdef"
            assert (await append(r.engine, after, b"gh")).complete  # nothing was left held

    asyncio.run(scenario())


def test_a_range_from_0_that_differs_is_a_new_file(tmp_path: Path, legacy: WholeFileServer) -> None:
    """A body from byte 0 that differs from the stored bytes replaces them from the first
    difference on: the delivered file is the new one."""

    async def scenario() -> None:
        async with rig(tmp_path, legacy.url) as r:
            upload = await append(r.engine, await r.engine.create(new(8)), b"abcdef")
            replacing = await r.engine.begin_range(upload, 0, 8)
            replacing.feed(b"abXYZ")
            replacing.feed(b"fgh")
            upload = await r.engine.finish_append(replacing)
            assert upload.offset == 8
            assert await stored(r.store, upload.id) == b"abXYZfgh"
            assert (await r.engine.await_delivery(await r.engine.settle(upload))).accepted

    asyncio.run(scenario())
    assert [(put.size, put.sha256) for put in puts(legacy)] == [(8, sha256(b"abXYZfgh"))]


def test_a_repeated_whole_file_with_the_same_bytes_gets_the_recorded_answer(
        tmp_path: Path, legacy: WholeFileServer) -> None:
    """The same whole file sent again to the same URL after it was delivered gets the
    recorded answer and is not delivered again; different bytes are a new file, delivered."""

    async def scenario() -> None:
        async with rig(tmp_path, legacy.url) as r:
            key, path = "PUT /same.bin", "/in/same.bin"
            first = await append(r.engine, await r.engine.create(new(3, path=path), key), b"abc")
            answered = await r.engine.await_delivery(await r.engine.settle(first))
            assert answered.accepted
            repeat = await r.engine.create(new(3, path=path), key, previous=first.id)
            repeat = await append(r.engine, repeat, b"abc")
            settled = await r.engine.settle(repeat)
            assert settled.state is State.DELIVERED and settled.answer == answered.answer
            assert (await r.engine.await_delivery(settled)).answer == answered.answer
            assert await r.store.size(repeat.id) == 0
            assert len(puts(legacy)) == 1
            changed = await r.engine.create(new(3, path=path), key, previous=first.id)
            changed = await append(r.engine, changed, b"abd")
            settled = await r.engine.settle(changed)
            assert settled.state is State.COMPLETE
            assert (await r.engine.await_delivery(settled)).accepted

    asyncio.run(scenario())
    assert [put.sha256 for put in puts(legacy)] == [sha256(b"abc"), sha256(b"abd")]


def test_an_announced_digest_that_does_not_match_is_400_and_nothing_is_delivered(
        tmp_path: Path, legacy: WholeFileServer) -> None:
    """A digest announced for the whole file is checked before delivery: a file that does
    not match is refused (400 digest-mismatch) and ended, never sent; a digest that changes
    between requests is 400; a matching file is delivered."""

    async def scenario() -> None:
        async with rig(tmp_path, legacy.url) as r:
            right = b64_sha256(b"abc")
            good = await r.engine.create(new(3, digests={"sha256": right}))
            assert (await refusal(r.engine.expect_digests(good, {"sha256": "AAAA"}))).status == 400
            good = await append(r.engine, good, b"abc")
            assert (await r.engine.await_delivery(await r.engine.settle(good))).accepted
            bad = await r.engine.create(new(3, digests={"sha256": right}))
            error = await refusal(append(r.engine, bad, b"abd"))
            assert (error.status, error.code) == (400, "digest-mismatch")
            assert (await refusal(r.engine.get(bad.id, OWNER))).status == 410
            assert await r.store.size(bad.id) == 0

    asyncio.run(scenario())
    assert [put.sha256 for put in puts(legacy)] == [sha256(b"abc")]


# --- store faults ---------------------------------------------------------------------------------


def test_a_failed_save_while_committing_a_body_releases_the_lease(
        tmp_path: Path, legacy: WholeFileServer) -> None:
    """When the store cannot save the offset at the end of a body, the client gets a store
    error, the upload is not left locked (the next request can write) and the offset on
    record is unchanged or correct; the retried body completes a whole, correct file. A save
    that fails while a checksummed body begins leaves no lease held either."""

    async def scenario() -> None:
        store = FaultyStore(LocalStore(tmp_path / "store", fsync=False))
        async with rig(tmp_path, legacy.url, store=store) as r:
            upload = await r.engine.create(new(5))
            writing = await r.engine.begin_append(upload, 0, 5)
            writing.feed(b"hello")
            store.fail_saves(1)
            with pytest.raises(ShimError) as refused:
                await r.engine.finish_append(writing)
            assert refused.value.status == 507 and store.failed_saves == 1
            # Until the offset is saved (in the background), the shown offset stays at 5.
            assert r.engine.offset_of(await record(r.store, upload.id)) == 5

            async def saved() -> bool:
                return (await record(r.store, upload.id)).offset == 5

            await eventually(saved, "the offset saved in the background")
            after = await record(r.store, upload.id)
            assert after.offset == 5 and after.unverified_from is None
            # Saved late, still queued: the file (checked at the legacy server below) goes out.
            assert (await r.engine.await_delivery(await r.engine.settle(after))).accepted

            checked = await r.engine.create(new(3))
            checksum = e.Checksum("sha256", hashlib.sha256(b"abc").digest())
            store.fail_saves(1)
            with pytest.raises((ShimError, StoreError)):
                await r.engine.begin_append(checked, 0, 3, checksum)
            assert store.failed_saves == 2
            assert (await append(r.engine, checked, b"abc", checksum=checksum)).offset == 3

    asyncio.run(scenario())
    assert [put.sha256 for put in puts(legacy)] == [sha256(b"hello")]


def test_a_concurrent_change_during_a_commit_is_kept(tmp_path: Path, legacy: WholeFileServer) -> None:
    """A record changed by someone else while a body is committed (or while the outbox records
    an answer) is read again and the change applied on top: both changes survive, and the file
    is delivered once."""

    async def scenario() -> None:
        store = FaultyStore(LocalStore(tmp_path / "store", fsync=False))
        async with rig(tmp_path, legacy.url, store=store) as r:
            upload = await r.engine.create(new(None))
            writing = await r.engine.begin_append(upload, 0, None)
            writing.feed(b"abc")
            store.conflict_once(lambda stored: replace(stored, length=6))  # a length declared
            done = await r.engine.finish_append(writing)
            assert (done.offset, done.length) == (3, 6)
            assert (await record(r.store, upload.id)).length == 6
            done = await append(r.engine, done, b"def")
            store.conflict_once(lambda stored: replace(stored, metadata={"note": "meanwhile"}),
                                State.DELIVERED)
            assert (await r.engine.await_delivery(await r.engine.settle(done))).accepted
            delivered = await record(r.store, upload.id)
            assert delivered.state is State.DELIVERED and delivered.metadata == {"note": "meanwhile"}

    asyncio.run(scenario())
    assert [put.sha256 for put in puts(legacy)] == [sha256(b"abcdef")]


def test_an_answer_that_cannot_be_recorded_is_507_and_never_delivered_twice(
        tmp_path: Path, legacy: WholeFileServer) -> None:
    """The legacy server accepted the file but the store cannot record it: the client is told
    507 ("unrecorded"), the legacy server got exactly one request, and once the store works
    again the upload becomes DELIVERED without a second request."""

    async def scenario() -> None:
        store = FaultyStore(LocalStore(tmp_path / "store", fsync=False))
        async with rig(tmp_path, legacy.url, store=store) as r:
            upload = await append(r.engine, await r.engine.create(new(3)), b"abc")
            store.fail_saves_in(State.DELIVERED)
            settled = await r.engine.settle(upload)
            delivery: Delivery = await r.engine.await_delivery(settled)
            assert (delivery.code, delivery.status) == ("unrecorded", 507)
            assert delivery.retry_after >= 1
            assert len(puts(legacy)) == 1
            assert (await r.engine.await_delivery(settled)).code == "unrecorded"
            store.fail_saves_in(None)
            await eventually(lambda: in_state(r.store, upload.id, State.DELIVERED),
                             "the answer to be recorded")
            final = await r.engine.await_delivery(settled)
            assert final.accepted and final.answer is not None and final.answer.status == 201

    asyncio.run(scenario())
    assert [put.status for put in puts(legacy)] == [201]


def test_a_concatenation_past_its_limit_is_413_at_creation_and_when_its_parts_grow(
        tmp_path: Path) -> None:
    """tus concatenation + Tus-Max-Size: parts that add up to more than max_size refuse the
    final upload (413); when a deferred part's length makes it too large later, the part's
    own write is accepted and the final upload answers 413 from then on, never delivered."""

    async def scenario() -> None:
        async with rig(tmp_path, NOWHERE) as r:
            small, large = [await r.engine.create(new(n, target=False)) for n in (4, 9)]
            too_much = new(None, parts=(small.id, large.id), max_size=10)
            assert (await refusal(r.engine.concatenate(too_much))).status == 413
            deferred = await r.engine.create(new(None, target=False))
            final = await r.engine.concatenate(new(None, parts=(small.id, deferred.id), max_size=10))
            assert final.length is None and final.max_size == 10
            writing = await r.engine.begin_append(deferred, 0, 8, declared_length=8)
            writing.feed(b"12345678")
            grown = await r.engine.finish_append(writing)
            assert (grown.length, grown.offset) == (8, 8)  # the part's own write is fine
            assert await r.engine.wholes_of(grown) == []
            error = await refusal(r.engine.refresh(final))
            assert error.status == 413 and "12 bytes" in error.message

    asyncio.run(scenario())
