"""Conformance tests for the `Store` interface (shim/store.py).

Every test runs against the `store` fixture, parametrized by backend. Today the only param is
"local" (`LocalStore` in tmp_path) or "redis" (`RedisStore` on a redis-server of the test's
own, bytes in tmp_path), each one entry in `BACKENDS`. pytest-asyncio is not installed: each test is a
coroutine `scenario(store)` run by `Backend.run`, which opens a store, runs it in a fresh event
loop and closes the store. Two `run` calls on the same `Backend` see the same persistent data
(a close and a reopen)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from shim.lifecycle import Event, IllegalTransition, State
from shim.local_store import LocalStore
from shim.model import Answer, Target, Upload
from shim.redis_store import RedisStore
from shim.store import CapReached, Caps, Conflict, Store, StoreError, transition
from tests.redis_server import RedisServer

Opener = Callable[[], Awaitable[Store]]


@dataclass
class Backend:
    """One store backend as the tests see it: how to open it, and how to open a broken one."""

    name: str
    open: Opener
    """A store over this test's own, initially empty, persistent place; each call reopens it."""
    open_broken: Opener
    """A store whose database cannot be written (every index/record write fails)."""
    stop: Callable[[], None] = lambda: None
    """Ends what the backend started (a redis-server)."""

    def run[T](self, scenario: Callable[[Store], Awaitable[T]], broken: bool = False) -> T:
        async def main() -> T:
            store = await (self.open_broken if broken else self.open)()
            try:
                return await asyncio.wait_for(scenario(store), timeout=20)
            finally:
                await store.close()

        return asyncio.run(main())


def local_backend(tmp_path: Path) -> Backend:
    async def open_local() -> Store:
        return LocalStore(tmp_path / "store", fsync=False)

    async def open_broken() -> Store:
        directory = tmp_path / "broken"
        # The index database path is a directory: SQLite cannot open it, as root too.
        (directory / "index.sqlite").mkdir(parents=True)
        return LocalStore(directory, fsync=False)

    return Backend("local", open_local, open_broken)


def redis_backend(tmp_path: Path) -> Backend:
    server = RedisServer(tmp_path / "redis").start()

    async def open_redis() -> Store:
        return RedisStore(server.url, tmp_path / "shared", fsync=False)

    async def open_broken() -> Store:
        # Nothing listens there: every call fails as with a Redis that went away.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        return RedisStore(f"redis://127.0.0.1:{port}/0", tmp_path / "broken", fsync=False)

    return Backend("redis", open_redis, open_broken, server.close)


BACKENDS: dict[str, Callable[[Path], Backend]] = {"local": local_backend, "redis": redis_backend}


@pytest.fixture(params=sorted(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The backend under test; each param must give every test a fresh, empty store."""
    backend = BACKENDS[request.param](tmp_path)
    try:
        yield backend
    finally:
        backend.stop()


# --- helpers ---------------------------------------------------------------------------------------


def new_id() -> str:
    return secrets.token_hex(8)


def record(upload_id: str | None = None, **changes: object) -> Upload:
    upload = Upload(id=upload_id or new_id(), protocol="test", owner="me", length=10,
                    target=Target("PUT", "/in/file"), created=1000.0, updated=1000.0)
    return replace(upload, **changes)  # type: ignore[arg-type]


async def collect(store: Store, ids: list[str], limits: list[int]) -> bytes:
    return b"".join([os.pread(piece.file.fileno(), piece.count, piece.offset)
                     async for piece in store.ranges(ids, limits)])


async def write(store: Store, upload_id: str, data: bytes, offset: int = 0,
                keep: int | None = None) -> int:
    writer = await store.open_writer(upload_id, offset)
    writer.write(data)
    return await store.close_writer(upload_id, writer, keep, sync=True)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll `check` until it is true; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.01)


# --- records -----------------------------------------------------------------------------------------


def test_save_new_record_gets_version_one(store: Backend) -> None:
    """A new upload is stored as version 1, every field kept; saving it again bumps the version."""
    async def scenario(s: Store) -> None:
        answer = Answer(201, "Created", (("X-Id", "7"),), b"\x00\xffbody")
        fresh = record(metadata={"filename": "a b.bin"}, answer=answer, parts=("p1", "p2"),
                       digests={"sha256": "abc="}, next_attempt=12.5)
        saved = await s.save(fresh)
        assert saved.version == 1
        assert saved == replace(fresh, version=1)
        assert await s.load(fresh.id) == saved
        again = await s.save(replace(saved, offset=4))
        assert again.version == 2
        assert (await s.load(fresh.id)) == again
        assert fresh.id in await s.ids()
        assert await s.load(new_id()) is None

    store.run(scenario)


def test_stale_version_is_a_conflict_and_writes_nothing(store: Backend) -> None:
    """Two writers that read the same version: the second save is refused, the first one kept."""
    async def scenario(s: Store) -> None:
        first = await s.save(record())
        winner = await s.save(replace(first, offset=5))
        with pytest.raises(Conflict):
            await s.save(replace(first, offset=7))
        assert await s.load(first.id) == winner
        with pytest.raises(Conflict):  # a "new" record whose id is already taken
            await s.save(replace(first, version=0, offset=9))
        assert await s.load(first.id) == winner

    store.run(scenario)


def test_saving_a_removed_record_is_a_conflict(store: Backend) -> None:
    """A writer holding an upload that was removed meanwhile cannot bring it back."""
    async def scenario(s: Store) -> None:
        saved = await s.save(record())
        await s.remove(saved)
        assert await s.load(saved.id) is None
        with pytest.raises(Conflict):
            await s.save(replace(saved, offset=3))
        assert await s.load(saved.id) is None
        assert saved.id not in await s.ids()

    store.run(scenario)


def test_records_survive_close_and_reopen(store: Backend) -> None:
    """What the store said it saved is there after a restart: records, keys, bytes, indexes."""
    upload_id = new_id()

    async def before(s: Store) -> None:
        saved = await s.save(record(upload_id, offset=3, expires_after=60, state=State.COMPLETE,
                                    next_attempt=1500.0))
        assert saved.version == 1
        await s.link("durable:key", upload_id)
        await write(s, upload_id, b"abc")
        await s.save(record("idle-" + upload_id, expires_after=60))

    async def after(s: Store) -> None:
        loaded = await s.load(upload_id)
        assert loaded is not None and loaded.version == 1 and loaded.offset == 3
        assert loaded.state is State.COMPLETE
        assert await s.resolve("durable:key") == upload_id
        assert await collect(s, [upload_id], [3]) == b"abc"
        # A queued upload never expires; an idle receiving one does.
        assert await s.expired(2000.0) == ["idle-" + upload_id]
        assert await s.due(2000.0) == [upload_id]
        assert await s.next_due() == 1500.0

    store.run(before)
    store.run(after)


def test_remove_with_stale_version_keeps_the_record(store: Backend) -> None:
    """Removing an upload that changed since it was read fails with Conflict; record, bytes and
    keys all stay."""
    async def scenario(s: Store) -> None:
        first = await s.save(record())
        await s.link("k", first.id)
        await write(s, first.id, b"0123456789")
        current = await s.save(replace(first, offset=10))
        with pytest.raises(Conflict):
            await s.remove(first)
        assert await s.load(first.id) == current
        assert await s.resolve("k") == first.id
        assert await collect(s, [first.id], [10]) == b"0123456789"
        with pytest.raises(Conflict):  # nothing stored under that id at all
            await s.remove(record())

    store.run(scenario)


def test_remove_forgets_record_bytes_keys_and_index_entries(store: Backend) -> None:
    """A removed upload leaves nothing behind: no record, no bytes, no key naming it, no entry
    in the expiry index or the outbox; other uploads' keys stay."""
    async def scenario(s: Store) -> None:
        gone = await s.save(record(expires_after=10, state=State.COMPLETE, next_attempt=5.0))
        other = await s.save(record())
        await s.link("a/gone", gone.id)
        await s.link("a/other", other.id)
        await write(s, gone.id, b"xyz")
        await s.remove(gone)
        assert await s.load(gone.id) is None
        assert await s.size(gone.id) == 0
        assert await s.links("a/") == [("a/other", other.id)]
        assert await s.expired(10**9) == []
        assert await s.due(10**9) == []
        assert await s.next_due() is None

    store.run(scenario)


def test_illegal_transition_leaves_the_record_as_it_was(store: Backend) -> None:
    """`transition` with a move the lifecycle forbids raises IllegalTransition and saves nothing."""
    async def scenario(s: Store) -> None:
        delivered = await s.save(record(state=State.DELIVERED))
        with pytest.raises(IllegalTransition):
            await transition(s, delivered, Event.ATTEMPT, attempts=1)
        assert await s.load(delivered.id) == delivered
        moved = await transition(s, delivered, Event.TERMINATE)
        assert moved.state is State.TERMINATED and moved.version == delivered.version + 1

    store.run(scenario)


def test_concurrent_compare_and_set_loses_no_update(store: Backend) -> None:
    """20 writers each read-modify-save one counter, retrying on Conflict: the counter ends at 20."""
    async def scenario(s: Store) -> None:
        saved = await s.save(record())

        async def increment() -> None:
            for _ in range(200):
                current = await s.load(saved.id)
                assert current is not None
                try:
                    await s.save(replace(current, attempts=current.attempts + 1))
                    return
                except Conflict:
                    continue
            raise AssertionError("never got to save")

        await asyncio.gather(*(increment() for _ in range(20)))
        final = await s.load(saved.id)
        assert final is not None and final.attempts == 20 and final.version == 21

    store.run(scenario)


def test_concurrent_transitions_lose_no_update(store: Backend) -> None:
    """20 concurrent `transition()` calls, each adding one to `attempts` of the record it read,
    all succeed and the counter ends at 20: a concurrent change is never overwritten."""
    async def scenario(s: Store) -> None:
        saved = await s.save(record())

        async def increment() -> Upload:
            current = await s.load(saved.id)
            assert current is not None
            return await transition(s, current, update=lambda u: {"attempts": u.attempts + 1})

        await asyncio.gather(*(increment() for _ in range(20)))
        final = await s.load(saved.id)
        assert final is not None and final.attempts == 20

    store.run(scenario)


# --- secondary keys ------------------------------------------------------------------------------


def test_link_resolve_and_unlink(store: Backend) -> None:
    """A key names an upload; relinking it names the new one; unlink drops it only while it still
    names the upload asked for (a late cleanup of an old upload keeps the new one's key)."""
    async def scenario(s: Store) -> None:
        assert await s.resolve("put:/f") is None
        await s.link("put:/f", "old")
        assert await s.resolve("put:/f") == "old"
        await s.link("put:/f", "new")
        assert await s.resolve("put:/f") == "new"
        await s.unlink("put:/f", "old")
        assert await s.resolve("put:/f") == "new"
        await s.unlink("put:/f", "new")
        assert await s.resolve("put:/f") is None
        await s.unlink("put:/f", "new")  # already gone: no error
        assert await s.resolve("put:/f") is None

    store.run(scenario)


def test_links_by_prefix_in_key_order_with_limit(store: Backend) -> None:
    """`links(prefix)` returns exactly the keys starting with the prefix, sorted, at most `limit`."""
    async def scenario(s: Store) -> None:
        for key, upload_id in [("b/2", "i2"), ("a/9", "x"), ("b/10", "i10"), ("b/1", "i1"),
                               ("b", "bare"), ("c/1", "y"), ("b0", "z"), ("B/1", "upper")]:
            await s.link(key, upload_id)
        assert await s.links("b/") == [("b/1", "i1"), ("b/10", "i10"), ("b/2", "i2")]
        assert await s.links("b/", limit=2) == [("b/1", "i1"), ("b/10", "i10")]
        assert await s.links("b") == [("b", "bare"), ("b/1", "i1"), ("b/10", "i10"), ("b/2", "i2"),
                                      ("b0", "z")]
        assert await s.links("nothing/") == []
        assert [key for key, _ in await s.links("")] == sorted(
            ["b/2", "a/9", "b/10", "b/1", "b", "c/1", "b0", "B/1"])

    store.run(scenario)


def test_links_prefix_with_like_wildcards_and_non_ascii(store: Backend) -> None:
    """Prefixes with "%", "_", "\\" or non-ASCII letters match literally: an upload is never
    found under another URL that a LIKE pattern or a case fold would also match."""
    async def scenario(s: Store) -> None:
        keys = ["a%b/1", "a%bc", "axb/1", "a_b/1", "azb/1", "a\\b/1", "é/1", "éa", "e/1", "É/1",
                "日本/ファイル", "日本語"]
        for key in keys:
            await s.link(key, f"id-{key}")
        assert [k for k, _ in await s.links("a%b")] == ["a%b/1", "a%bc"]
        assert [k for k, _ in await s.links("a%")] == ["a%b/1", "a%bc"]
        assert [k for k, _ in await s.links("a_")] == ["a_b/1"]
        assert [k for k, _ in await s.links("a\\")] == ["a\\b/1"]
        assert [k for k, _ in await s.links("é")] == ["é/1", "éa"]
        assert [k for k, _ in await s.links("日本/")] == ["日本/ファイル"]
        assert [k for k, _ in await s.links("日本")] == ["日本/ファイル", "日本語"]
        assert await s.links("%") == [] and await s.links("_") == []
        assert await s.resolve("a%b/1") == "id-a%b/1"

    store.run(scenario)


def test_keys_from_paths_with_raw_non_utf8_bytes(store: Backend) -> None:
    """mitmproxy decodes a raw non-UTF-8 byte in a request path as a lone surrogate
    ("/up/\\xff" -> "/up/\\udcff"); a key built from such a URL links, resolves and is found by
    prefix like any other instead of crashing the request with a UnicodeEncodeError."""
    async def scenario(s: Store) -> None:
        key = "content-range:me:PUT /up/\udcff.bin"
        await s.link(key, "u1")
        assert await s.resolve(key) == "u1"
        assert await s.links("content-range:me:PUT /up/") == [(key, "u1")]

    store.run(scenario)


# --- derived indexes: expiry and outbox ---------------------------------------------------------------


def test_expired_finds_exactly_the_uploads_past_their_expiry(store: Backend) -> None:
    """`expired(now)` names the uploads inactive for longer than their expiration, and only them;
    one that never expires is never named."""
    async def scenario(s: Store) -> None:
        soon = await s.save(record(updated=1000.0, expires_after=60))     # expires 1060
        later = await s.save(record(updated=1000.0, expires_after=200))   # expires 1200
        await s.save(record(updated=1.0, expires_after=0))                # never
        assert await s.expired(1059.0) == []
        assert await s.expired(1061.0) == [soon.id]
        assert set(await s.expired(1201.0)) == {soon.id, later.id}
        assert len(await s.expired(1201.0, limit=1)) == 1
        assert len(await s.expired(10.0**12)) == 2

    store.run(scenario)


def test_activity_moves_the_expiry(store: Backend) -> None:
    """An upload saved with a later `updated` is no longer expired at the old time, and is at
    the new one; switching expiry off drops it from the index."""
    async def scenario(s: Store) -> None:
        saved = await s.save(record(updated=1000.0, expires_after=60))
        assert await s.expired(1061.0) == [saved.id]
        touched = await s.save(replace(saved, updated=1050.0))            # expires 1110
        assert await s.expired(1061.0) == []
        assert await s.expired(1111.0) == [saved.id]
        await s.save(replace(touched, expires_after=0))
        assert await s.expired(10.0**12) == []

    store.run(scenario)


def test_expiry_of_terminated_and_removed_uploads(store: Backend) -> None:
    """A terminated upload's record (kept to answer 410 Gone) stays in the expiry index so the
    sweeper removes it once it expires; after `remove` nothing is left in the index."""
    async def scenario(s: Store) -> None:
        saved = await s.save(record(updated=1000.0, expires_after=60))
        terminated = await transition(s, saved, Event.TERMINATE, updated=1100.0)
        assert terminated.state is State.TERMINATED
        assert await s.expired(1161.0) == [saved.id]
        assert await s.expired(1159.0) == []
        await s.remove(terminated)
        assert await s.expired(10.0**12) == []

    store.run(scenario)


def test_outbox_holds_complete_and_delivering_uploads_when_due(store: Backend) -> None:
    """`due(now)` lists the uploads waiting for delivery whose next attempt is due - complete or
    being delivered - never ones still receiving or already delivered; `next_due` is the
    earliest attempt."""
    async def scenario(s: Store) -> None:
        assert await s.next_due() is None
        assert await s.due(10.0**12) == []
        receiving = await s.save(record(next_attempt=1.0))
        complete = await s.save(record(state=State.COMPLETE, next_attempt=500.0))
        delivering = await s.save(record(state=State.COMPLETE, next_attempt=400.0))
        delivering = await transition(s, delivering, Event.ATTEMPT)
        waiting = await s.save(record(state=State.COMPLETE, next_attempt=2000.0))
        delivered = await s.save(record(state=State.COMPLETE, next_attempt=100.0))
        delivered = await transition(s, delivered, Event.ATTEMPT)
        delivered = await transition(s, delivered, Event.ACCEPTED)

        assert set(await s.due(1000.0)) == {complete.id, delivering.id}
        assert receiving.id not in await s.due(10.0**12)
        assert delivered.id not in await s.due(10.0**12)
        assert await s.due(399.0) == []
        assert await s.due(400.0) == [delivering.id]        # next_attempt <= now
        assert len(await s.due(10.0**12, limit=2)) == 2
        assert await s.next_due() == 400.0

        # A transient failure re-queues it later; an attempt that gives up leaves the outbox.
        await transition(s, delivering, Event.TRANSIENT, next_attempt=3000.0)
        assert await s.next_due() == 500.0
        await transition(s, complete, Event.GIVE_UP)
        assert await s.next_due() == 2000.0
        assert set(await s.due(10.0**12)) == {waiting.id, delivering.id}

    store.run(scenario)


def test_forget_drops_hints_of_an_upload_without_a_record(store: Backend) -> None:
    """`forget` drops index entries left for an upload whose record was never written: it is no
    longer named as expired, due, or by a key."""
    async def scenario(s: Store) -> None:
        kept = await s.save(record(updated=0.0, expires_after=1, state=State.COMPLETE))
        await s.link("k/kept", kept.id)
        orphan = await s.save(record(updated=0.0, expires_after=1, state=State.COMPLETE))
        await s.link("k/orphan", orphan.id)
        idle = await s.save(record(updated=0.0, expires_after=1))
        idle_orphan = await s.save(record(updated=0.0, expires_after=1))
        await s.forget(orphan.id)
        await s.forget(idle_orphan.id)
        assert await s.expired(10.0) == [idle.id]
        assert await s.due(10.0) == [kept.id]
        assert await s.links("k/") == [("k/kept", kept.id)]

    store.run(scenario)


# --- leases ----------------------------------------------------------------------------------------


def test_lease_is_exclusive_until_its_ttl_passes(store: Backend) -> None:
    """While one holder has a lease, another is refused; once the ttl has passed, the other gets it."""
    async def scenario(s: Store) -> None:
        assert await s.holder("write:u1") is None
        started = time.time()
        ttl = 0.2
        assert await s.acquire("write:u1", "one", ttl)
        assert await s.holder("write:u1") == "one"
        assert not await s.acquire("write:u1", "two", ttl)
        assert await s.holder("write:u1") == "one"
        assert await s.acquire("write:u2", "two", ttl)  # leases are per name
        await eventually(lambda: s.acquire("write:u1", "two", 60), 10, "lease lapsed")
        assert time.time() - started >= ttl
        assert await s.holder("write:u1") == "two"
        assert not await s.acquire("write:u1", "one", 60)

    store.run(scenario)


def test_lease_renewal_by_its_holder(store: Backend) -> None:
    """The holder may take its lease again (renewing it, with the new ttl); others still cannot."""
    async def scenario(s: Store) -> None:
        assert await s.acquire("L", "one", 60)
        assert await s.acquire("L", "one", 60)
        assert not await s.acquire("L", "two", 60)
        assert await s.acquire("L", "one", 0.05)  # renewed with a short ttl: it lapses soon
        await eventually(lambda: s.acquire("L", "two", 60), 10, "renewed lease lapsed")
        assert await s.holder("L") == "two"

    store.run(scenario)


def test_lease_release_only_by_its_holder(store: Backend) -> None:
    """Only the holder can give a lease up; a release by anyone else changes nothing."""
    async def scenario(s: Store) -> None:
        assert await s.acquire("L", "one", 60)
        await s.release("L", "two")
        assert await s.holder("L") == "one"
        assert not await s.acquire("L", "two", 60)
        await s.release("L", "one")
        assert await s.holder("L") is None
        assert await s.acquire("L", "two", 60)
        assert await s.holder("L") == "two"
        await s.release("nobody-has-this", "one")  # no error

    store.run(scenario)


# --- bytes ------------------------------------------------------------------------------------------


def test_writer_keeps_exactly_keep_bytes(store: Backend) -> None:
    """A body written through a ChunkWriter is stored; closing with `keep` leaves exactly that
    many bytes (what was committed), None keeps all."""
    async def scenario(s: Store) -> None:
        upload_id = new_id()
        assert await write(s, upload_id, b"hello world", keep=None) == 11
        assert await s.size(upload_id) == 11
        assert await write(s, upload_id, b"", offset=11, keep=5) == 5
        assert await collect(s, [upload_id], [5]) == b"hello"
        writer = await s.open_writer(upload_id, 3)
        for piece in (b"X", b"YZ", b"W"):
            writer.write(piece)
        assert writer.position == 7 and writer.written == 4
        assert await s.close_writer(upload_id, writer, 6, sync=False) == 6
        assert await collect(s, [upload_id], [6]) == b"helXYZ"
        assert await s.size(upload_id) == 6

    store.run(scenario)


def test_writer_keep_beyond_the_end_adds_nothing(store: Backend) -> None:
    """`keep` larger than what is stored does not pad the file."""
    async def scenario(s: Store) -> None:
        upload_id = new_id()
        assert await write(s, upload_id, b"abc", keep=100) == 3
        assert await s.size(upload_id) == 3

    store.run(scenario)


def test_read_concatenates_several_uploads_exactly(store: Backend) -> None:
    """Reading several uploads gives the first `limits[i]` bytes of each, back to back (a
    concatenated upload); a zero limit needs no data file."""
    async def scenario(s: Store) -> None:
        a, b, c = new_id(), new_id(), new_id()
        await write(s, a, b"AAAAAAAA")
        await write(s, b, b"bb")
        big = bytes(range(256)) * 9000  # more than one read chunk
        await write(s, c, big)
        assert await collect(s, [a, b], [3, 2]) == b"AAAbb"
        assert await collect(s, [b, a, b], [1, 8, 2]) == b"bAAAAAAAAbb"
        assert await collect(s, [a, new_id(), b], [2, 0, 2]) == b"AAbb"
        assert await collect(s, [c, a], [len(big), 1]) == big + b"A"
        assert await collect(s, [], []) == b""

    store.run(scenario)


def test_missing_or_short_data_raises_oserror(store: Backend) -> None:
    """Bytes the record promises but the disk does not have are an error, never a short file."""
    async def scenario(s: Store) -> None:
        present = new_id()
        await write(s, present, b"abc")
        with pytest.raises(OSError):
            await collect(s, [present, new_id()], [3, 1])
        with pytest.raises(OSError):
            await collect(s, [present], [4])

    store.run(scenario)


def test_size_truncate_and_discard(store: Backend) -> None:
    """`size` reports stored bytes (0 when none), `truncate` shortens, `discard` deletes them."""
    async def scenario(s: Store) -> None:
        upload_id = new_id()
        assert await s.size(upload_id) == 0
        await s.truncate(upload_id, 0)   # nothing stored: no error
        await s.discard(upload_id)       # likewise
        await write(s, upload_id, b"0123456789")
        await s.truncate(upload_id, 4)
        assert await s.size(upload_id) == 4
        assert await collect(s, [upload_id], [4]) == b"0123"
        await s.discard(upload_id)
        assert await s.size(upload_id) == 0
        with pytest.raises(OSError):
            await collect(s, [upload_id], [1])
        assert await s.free_bytes() > 0

    store.run(scenario)


# --- failures ---------------------------------------------------------------------------------------


def test_database_failure_is_a_store_error(store: Backend) -> None:
    """When the database cannot be written, callers get StoreError (which the outbox and the
    engine handle: 507, retry), not a backend exception such as sqlite3.Error; nothing is saved."""
    async def scenario(s: Store) -> None:
        upload = record()
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: s.save(upload),
            lambda: s.link("k", upload.id),
            lambda: s.acquire("L", "one", 60),
            lambda: s.due(1.0),
        ]
        for call in calls:
            with pytest.raises(StoreError) as caught:
                await call()
            assert not isinstance(caught.value, sqlite3.Error)
        with contextlib.suppress(StoreError):  # a broken backend may not even read
            assert await s.load(upload.id) is None

    store.run(scenario, broken=True)


# --- the caps' count -------------------------------------------------------------------------------


def test_incomplete_counts_receiving_uploads_short_of_their_length_by_account(
        store: Backend) -> None:
    """What the caps on uploads in progress count: uploads still receiving and short of
    their length, per owner (or the account they count against) and in all; completing,
    terminating or removing one frees its place."""
    async def scenario(s: Store) -> None:
        alice = [await s.save(record(owner="alice")) for _ in range(3)]
        await s.save(record(owner="bob", length=None))  # a deferred length is incomplete
        await s.save(record(owner="", account="carol"))  # a capability counts for its creator
        await s.save(record(owner="alice", offset=10))  # complete: no longer counted
        assert (await s.incomplete("alice"), await s.incomplete("bob")) == (3, 1)
        assert (await s.incomplete("carol"), await s.incomplete("")) == (1, 0)
        assert await s.incomplete() == 5
        await s.save(replace(alice[0], offset=10))
        await s.save(replace(alice[1], state=State.TERMINATED))
        await s.remove(alice[2])
        assert await s.incomplete("alice") == 0 and await s.incomplete() == 2
        assert (await s.incomplete("nobody")) == 0

    store.run(scenario)


def test_create_saves_a_new_record_only_under_its_caps_even_when_raced(store: Backend) -> None:
    """`create` counts and saves in one step: a per-account cap and a total cap each refuse
    the creation past them (CapReached names which), and 20 creations at once for one free
    place leave exactly one more record; no caps, no limit; a record that exists already is
    a Conflict, as with `save`."""
    async def scenario(s: Store) -> None:
        for _ in range(2):
            await s.create(record(owner="alice"), Caps("alice", per_account=3, total=5))
        with pytest.raises(CapReached) as account_full:
            await s.create(record(owner="alice"), Caps("alice", per_account=2, total=5))
        assert account_full.value.cap == "per_account"
        await s.create(record(owner="bob"), Caps("bob", per_account=2, total=5))
        await s.create(record(owner="", account="bob"), Caps("bob", per_account=2, total=5))
        with pytest.raises(CapReached):  # bob's capability upload counts for bob
            await s.create(record(owner="bob"), Caps("bob", per_account=2, total=5))
        with pytest.raises(CapReached) as all_full:
            await s.create(record(owner="carol"), Caps("carol", per_account=9, total=4))
        assert all_full.value.cap == "total"
        raced = await asyncio.gather(
            *(s.create(record(owner="dave"), Caps("dave", per_account=1, total=99))
              for _ in range(20)), return_exceptions=True)
        assert sum(isinstance(r, Upload) for r in raced) == 1
        assert all(isinstance(r, Upload | CapReached) for r in raced)
        assert await s.incomplete("dave") == 1 and await s.incomplete() == 5
        kept = await s.create(record(owner="erin"))
        assert kept.version == 1 and await s.incomplete() == 6
        with pytest.raises(Conflict):
            await s.create(replace(kept, version=0))

    store.run(scenario)
