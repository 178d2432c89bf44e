"""What requests and bytes cost the shim (issue 12), held where a change would quietly bring
a cost back: the store reads of a tus PATCH, the disk-space reading shared by requests close
together, the write-behind that lets the disk work while a body arrives, "resumed" logged
once per pause rather than per chunk, delivery by sendfile in growing slices of exact ranges,
and clients held back rather than their bodies held in memory when the shim is busy.

Each test runs the real code on a real LocalStore in tmp_path; the counts come from
`tests.faulty_store.FaultyStore` (which counts calls) or from a recording stand-in for the
one system call a test is about.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import BinaryIO

import pytest

from shim import data_folder, store
from shim import engine as e
from shim import exchange as exchange_module
from shim import upstream as upstream_module
from shim.config import TusConfig
from shim.demo_server import WholeFileServer
from shim.exchange import Exchange
from shim.local_store import LocalStore
from shim.model import Reply, Request, Target, Upload
from shim.outbox import Outbox
from shim.protocols.tus import Tus
from shim.store import FileRange
from shim.upstream import Origin, Unreachable, Upstream
from tests.faulty_store import FaultyStore

TUS = (("Tus-Resumable", "1.0.0"),)
CHUNK = 4096


def run[T](scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(scenario(), timeout=20))


async def _request(engine: e.Engine, tus: Tus, request: Request, body: bytes = b"") -> Reply:
    """One request as the addon handles it: parsed, begun, fed, finished."""
    command = tus.parse(request, "me")
    assert command is not None
    exchange = Exchange(engine, tus, request, command)
    if request.has_body:
        exchange.start(lambda: None)
    else:
        await exchange.begin()
    exchange.feed(body)
    return await exchange.finish()


def test_a_tus_patch_reads_the_record_once_as_it_begins_and_once_as_it_ends(
        tmp_path: Path) -> None:
    """Every store read is a hop to the store's thread: a chunk of an upload in progress
    reads its record once to begin (the take-over check and the offset check share it) and
    once to commit, and its answer needs no third read."""
    async def scenario() -> list[int]:
        inner = LocalStore(tmp_path / "store", fsync=False)
        counting = FaultyStore(inner)
        outbox = Outbox(counting, Upstream(Origin.parse("http://127.0.0.1:9"), timeout=5))
        engine = e.Engine(counting, outbox, 0)
        tus = Tus(TusConfig())
        try:
            created = await _request(engine, tus, Request(
                "POST", "/files/", "", (*TUS, ("Upload-Length", str(3 * CHUNK))), 0))
            assert created.status == 201
            location = dict((k.lower(), v) for k, v in created.headers)["location"]
            path = location[location.index("/files/"):]
            loads = []
            for index in range(2):  # the third would complete it and start a delivery
                before = counting.calls["load"]
                patched = await _request(engine, tus, Request(
                    "PATCH", path, "", (*TUS, ("Upload-Offset", str(index * CHUNK)),
                                        ("Content-Type", "application/offset+octet-stream")),
                    CHUNK), os.urandom(CHUNK))
                assert patched.status == 204
                loads.append(counting.calls["load"] - before)
            upload = await inner.load(path.rsplit("/", 1)[1])
            assert upload is not None and upload.offset == 2 * CHUNK
            return loads
        finally:
            await inner.close()

    assert run(scenario) == [2, 2]


def test_the_free_space_reading_is_shared_by_requests_close_together(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk's free space is read once for every request within FREE_BYTES_FOR seconds,
    and read again after: a disk filling up is seen within that time."""
    readings: list[int] = []
    free = [10_000]

    def disk_usage(path: object) -> shutil._ntuple_diskusage:
        readings.append(free[0])
        return shutil._ntuple_diskusage(free[0] * 2, free[0], free[0])

    now = [100.0]
    monkeypatch.setattr(data_folder.shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(data_folder.time, "monotonic", lambda: now[0])

    async def scenario() -> list[int]:
        disk = LocalStore(tmp_path / "store", fsync=False)
        try:
            seen = [await disk.free_bytes(), await disk.free_bytes()]
            free[0] = 0  # the disk fills up
            now[0] += data_folder.FREE_BYTES_FOR / 2
            seen.append(await disk.free_bytes())  # not read again yet
            now[0] += data_folder.FREE_BYTES_FOR / 2
            seen.append(await disk.free_bytes())
            return seen
        finally:
            await disk.close()

    assert run(scenario) == [10_000, 10_000, 10_000, 0]
    assert readings == [10_000, 0]


class _Datasyncs:
    """Stands in for os.fdatasync: records the descriptors, fails when told to."""

    def __init__(self, fails: bool = False) -> None:
        self.fds: list[int] = []
        self.fails = fails

    def __call__(self, fd: int) -> None:
        self.fds.append(fd)
        if self.fails:
            raise OSError(errno.EIO, "injected write-back failure")


def _write_body(disk: LocalStore, upload_id: str, size: int) -> Awaitable[store.ChunkWriter]:
    async def write() -> store.ChunkWriter:
        writer = await disk.open_writer(upload_id, 0)
        for _ in range(size // (1024 * 1024)):
            writer.write(b"w" * (1024 * 1024))
        return writer
    return write()


def test_a_long_body_is_flushed_while_it_arrives_and_kept_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With fsync on, a body longer than FLUSH_EVERY starts its flush to the disk before it
    ends; the file is closed only after that flush, with every byte."""
    datasyncs = _Datasyncs()
    monkeypatch.setattr(store.os, "fdatasync", datasyncs)
    size = 2 * data_folder.FLUSH_EVERY

    async def scenario() -> tuple[int, int, int]:
        disk = LocalStore(tmp_path / "store", fsync=True)
        try:
            writer = await _write_body(disk, "u1", size)
            await writer.flushed()  # the flush the body started, on its thread
            flushed_before_close = len(datasyncs.fds)
            kept = await disk.close_writer("u1", writer, size, sync=True)
            with pytest.raises(OSError):
                os.fstat(writer.fd)  # closed
            return flushed_before_close, kept, writer.fd
        finally:
            await disk.close()

    flushed_before_close, kept, fd = run(scenario)
    assert flushed_before_close >= 1 and kept == size
    assert set(datasyncs.fds) == {fd}  # the body's own file
    assert (tmp_path / "store" / "data" / "u1").stat().st_size == size


def test_a_failed_flush_fails_the_commit_of_the_body_and_closes_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel reports a failed write-back once: when the background flush got it, the
    body's commit fails (the engine answers 507 and keeps the old offset) instead of a
    later fsync saying the bytes are safe. A body not kept (sync=False) just closes."""
    monkeypatch.setattr(store.os, "fdatasync", _Datasyncs(fails=True))

    async def scenario() -> None:
        disk = LocalStore(tmp_path / "store", fsync=True)
        try:
            kept = await _write_body(disk, "kept", data_folder.FLUSH_EVERY)
            with pytest.raises(OSError) as failed:
                await disk.close_writer("kept", kept, data_folder.FLUSH_EVERY, sync=True)
            assert failed.value.errno == errno.EIO
            with pytest.raises(OSError):
                os.fstat(kept.fd)
            dropped = await _write_body(disk, "dropped", data_folder.FLUSH_EVERY)
            assert await disk.close_writer("dropped", dropped, 0, sync=False) == 0
        finally:
            await disk.close()

    run(scenario)


def test_without_fsync_nothing_is_flushed_in_the_background(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`storage.fsync: false` means no flush at all, in the background either; and with it
    on, a body that is not kept (sync=False) is not synced either."""
    datasyncs = _Datasyncs()
    monkeypatch.setattr(store.os, "fdatasync", datasyncs)
    fsyncs = _Datasyncs()
    monkeypatch.setattr(data_folder.os, "fsync", fsyncs)

    async def scenario() -> int:
        disk = LocalStore(tmp_path / "store", fsync=False)
        try:
            writer = await _write_body(disk, "u", 2 * data_folder.FLUSH_EVERY)
            return await disk.close_writer("u", writer, None, sync=True)
        finally:
            await disk.close()

    async def dropped() -> int:
        disk = LocalStore(tmp_path / "synced", fsync=True)
        try:
            writer = await disk.open_writer("d", 0)
            writer.write(b"d" * 10)
            return await disk.close_writer("d", writer, 0, sync=False)
        finally:
            await disk.close()

    assert run(scenario) == 2 * data_folder.FLUSH_EVERY
    assert datasyncs.fds == [] and fsyncs.fds == []
    assert run(dropped) == 0 and fsyncs.fds == []


def test_flushes_do_not_pile_up_behind_a_slow_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One flush at a time per body: the bytes written while one runs wait for the next,
    however many thresholds they pass."""
    datasyncs = _Datasyncs()
    monkeypatch.setattr(store.os, "fdatasync", datasyncs)

    async def scenario() -> list[int]:
        disk = LocalStore(tmp_path / "store", fsync=True)
        try:
            # Written without an await: the first flush cannot have ended meanwhile.
            writer = await _write_body(disk, "u", 4 * data_folder.FLUSH_EVERY)
            await writer.flushed()
            counts = [len(datasyncs.fds)]
            writer.write(b"w" * data_folder.FLUSH_EVERY)
            await disk.close_writer("u", writer, None, sync=True)  # waits for that flush
            return [*counts, len(datasyncs.fds)]
        finally:
            await disk.close()

    assert run(scenario) == [1, 2]


def test_resumed_is_one_event_after_a_pause_not_one_per_chunk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A log line costs more than a small chunk's own work: chunks that follow each other log
    nothing; a body after a cut-off one, or after an offset inquiry, logs "resumed" once.
    Only the newest PAUSED_KEPT pauses are remembered."""
    monkeypatch.setattr(e, "PAUSED_KEPT", 2)
    caplog.set_level("INFO", logger="shim.events")

    async def scenario() -> list[tuple[str, int]]:
        disk = LocalStore(tmp_path / "store", fsync=False)
        engine = e.Engine(disk, Outbox(disk, Upstream(Origin.parse("http://127.0.0.1:9"),
                                                      timeout=5)), 0)

        async def body(upload: Upload, size: int, cut: bool = False) -> Upload:
            writing = await engine.begin_append(upload, upload.offset, None if cut else size)
            writing.feed(b"b" * size)
            return await (engine.abort_append(writing) if cut else engine.finish_append(writing))

        try:
            a, b, c = [await body(await engine.create(e.NewUpload(
                id=e.new_upload_id(), protocol="test", owner="me", length=100, metadata={},
                target=None)), 10) for _ in range(3)]
            a = await body(a, 10)  # a chunk after a chunk: no event
            a = await body(a, 5, cut=True)
            a = await body(a, 5)  # resumed at 25
            a = await body(a, 5)  # and that is all
            for upload in (b, c, a):  # b's pause is the oldest of three: forgotten
                engine.paused(upload)
            for upload in (b, c, a):
                await body(upload, 5)
            return [(r.getMessage().split("id=")[1].split()[0],
                     int(r.getMessage().split("bytes=")[1].split()[0]))
                    for r in caplog.records if "event=resumed" in r.getMessage()]
        finally:
            await disk.close()

    ids: dict[str, str] = {}
    resumed = run(scenario)
    for upload_id, _ in resumed:
        ids.setdefault(upload_id, "abc"[len(ids)])
    assert [(ids[i], at) for i, at in resumed] == [("a", 25), ("b", 10), ("a", 35)]


def test_a_delivery_sends_stored_ranges_byte_exact_and_a_short_file_never_passes_as_whole(
        tmp_path: Path, legacy: WholeFileServer) -> None:
    """Deliveries go by sendfile, range after range, across several data files (the parts
    of one file): the legacy server gets exactly the bytes. A range that runs past the end
    of its file (a data file cut short under the shim) fails the delivery as Unreachable
    (it is retried), and the legacy server stores nothing."""
    parts = [os.urandom(3 * 1024 * 1024 + 5), os.urandom(7), os.urandom(3 * CHUNK)]

    async def scenario() -> None:
        disk = LocalStore(tmp_path / "store", fsync=False)
        upstream = Upstream(Origin.parse(legacy.url), timeout=5)
        try:
            for index, data in enumerate(parts):
                writer = await disk.open_writer(f"p{index}", 0)
                writer.write(data)
                await disk.close_writer(f"p{index}", writer, None, sync=False)
            names, sizes = [f"p{i}" for i in range(3)], [len(p) for p in parts]
            answer = await upstream.send(Target("PUT", "/whole"), sum(sizes),
                                         disk.ranges(names, sizes))
            assert answer.status == 201

            async def past_the_end() -> AsyncIterator[FileRange]:
                with open(tmp_path / "store" / "data" / "p1", "rb") as file:
                    yield FileRange(file, 0, 7 + 100)

            with pytest.raises(Unreachable):  # (after waiting `timeout` for an answer)
                await Upstream(Origin.parse(legacy.url), timeout=0.5).send(
                    Target("PUT", "/short"), 107, past_the_end())
        finally:
            await disk.close()

    run(scenario)
    whole = [r for r in legacy.received if r.path == "/whole"]
    assert [(r.complete, r.sha256) for r in whole] == [
        (True, hashlib.sha256(b"".join(parts)).hexdigest())]
    assert all(not r.complete for r in legacy.received if r.path == "/short")


def test_a_fast_legacy_server_gets_the_file_in_few_large_slices(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sendfile is fast only in large pieces: a file goes in SLICE-sized calls (here 16 MiB:
    16, 16, then the 8 left of 40 MiB), not in 1 MiB reads; every byte arrives."""
    size = 40 * 1024 * 1024
    calls: list[int] = []
    real_sendfile = asyncio.BaseEventLoop.sendfile

    async def counting(self: asyncio.AbstractEventLoop, transport: asyncio.WriteTransport,
                       file: BinaryIO, offset: int = 0, count: int | None = None,
                       *, fallback: bool = True) -> int:
        calls.append(count or 0)
        return await real_sendfile(self, transport, file, offset, count,  # type: ignore[arg-type]
                                   fallback=fallback)

    monkeypatch.setattr(asyncio.BaseEventLoop, "sendfile", counting)
    monkeypatch.setattr(upstream_module, "SLICE", 16 * 1024 * 1024)
    received = []

    async def scenario() -> int:
        async def discard(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            left = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while left:
                left -= len(data := await reader.read(1 << 20))
                received.append(len(data))
            writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(discard, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        disk = LocalStore(tmp_path / "store", fsync=False)
        try:
            writer = await disk.open_writer("big", 0)
            writer.write(b"s" * size)
            await disk.close_writer("big", writer, None, sync=False)
            answer = await Upstream(Origin.parse(f"http://127.0.0.1:{port}"), timeout=60).send(
                Target("PUT", "/big"), size, disk.ranges(["big"], [size]))
            return answer.status
        finally:
            await disk.close()
            server.close()

    assert run(scenario) == 201
    assert sum(received) == size
    mib = 1024 * 1024
    assert calls == [16 * mib, 16 * mib, 8 * mib]


def test_a_busy_shim_holds_back_clients_instead_of_holding_their_bodies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks that arrive before their request has begun wait in memory; once all requests
    together hold more than EARLY_BUDGET so, the client is held back (once) until its request
    has begun, then read again, and every byte is stored."""
    monkeypatch.setattr(exchange_module, "EARLY_BUDGET", 4 * CHUNK)

    class SlowStore(FaultyStore):
        """Record reads wait at a gate: a store too busy to answer at once."""

        gate: asyncio.Event

        async def load(self, upload_id: str) -> Upload | None:
            await self.gate.wait()
            return await super().load(upload_id)

    async def scenario() -> tuple[list[str], int, int, int, int | None]:
        inner = LocalStore(tmp_path / "store", fsync=False)
        slow = SlowStore(inner)
        slow.gate = asyncio.Event()
        slow.gate.set()
        engine = e.Engine(slow, Outbox(slow, Upstream(Origin.parse("http://127.0.0.1:9"),
                                                      timeout=5)), 0)
        tus = Tus(TusConfig())
        try:
            created = await _request(engine, tus, Request(
                "POST", "/files/", "", (*TUS, ("Upload-Length", str(100 * CHUNK))), 0))
            location = dict((k.lower(), v) for k, v in created.headers)["location"]
            path = location[location.index("/files/"):]
            slow.gate.clear()
            request = Request("PATCH", path, "", (
                *TUS, ("Upload-Offset", "0"), ("Content-Type", "application/offset+octet-stream")),
                8 * CHUNK)
            command = tus.parse(request, "me")
            assert command is not None
            exchange = Exchange(engine, tus, request, command)
            calls: list[str] = []

            def hold() -> Callable[[], object]:
                calls.append("hold")
                return lambda: calls.append("resume")

            exchange.start(lambda: None, None, hold)
            for _ in range(8):
                exchange.feed(b"c" * CHUNK)
            held_bytes = engine.early_bytes
            slow.gate.set()
            reply = await exchange.finish()
            upload = await inner.load(path.rsplit("/", 1)[1])
            return calls, held_bytes, engine.early_bytes, reply.status, \
                upload.offset if upload else None
        finally:
            await inner.close()

    calls, held_bytes, left, status, offset = run(scenario)
    assert calls == ["hold", "resume"]
    assert (held_bytes, left, status, offset) == (8 * CHUNK, 0, 204, 8 * CHUNK)


def test_a_range_hashes_exactly_its_bytes_in_bounded_reads_and_splits_off_its_tail(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What delivery hashes and sends is exactly the range: every hasher gets the range's
    bytes (read HASH_READ at a time, never the whole file at once), a range past the end of
    its file is an OSError, and `split` cuts off exactly the last bytes (nothing when there
    is nothing to cut)."""
    monkeypatch.setattr(store, "HASH_READ", 7)
    data = os.urandom(100)
    path = tmp_path / "data"
    path.write_bytes(data)
    reads: list[int] = []
    real_pread = os.pread

    def pread(fd: int, size: int, offset: int) -> bytes:
        reads.append(size)
        return real_pread(fd, size, offset)

    monkeypatch.setattr(store.os, "pread", pread)
    with open(path, "rb") as file:
        piece = FileRange(file, 10, 50)
        first, second = hashlib.sha256(), hashlib.md5()
        piece.hash_into(first, second)
        assert first.digest() == hashlib.sha256(data[10:60]).digest()
        assert second.digest() == hashlib.md5(data[10:60]).digest()
        assert max(reads) == 7 and sum(reads) == 50
        with pytest.raises(OSError):
            FileRange(file, 90, 20).hash_into(hashlib.sha256())
        assert piece.split(0) == (piece,) and piece.split(50) == (piece,)
        assert [(p.offset, p.count) for p in piece.split(1)] == [(10, 49), (59, 1)]
        assert piece.split(60) == (piece,)
        head, tail = piece.split(8)
        assert (head.offset, head.count, tail.offset, tail.count) == (10, 42, 52, 8)
        assert head.file is file and tail.file is file and len(head) == 42


def test_a_legacy_server_that_stops_reading_mid_file_is_cut_off_after_the_idle_timeout(
        tmp_path: Path) -> None:
    """The idle timeout counts the bytes the legacy server takes: one that reads 1 MiB of a
    32 MiB file and then reads no more (its connection open) is given up on about `timeout`
    after it stopped, as Unreachable (the delivery is retried); the send never hangs."""
    size = 32 * 1024 * 1024

    async def scenario() -> None:
        stopped = asyncio.Event()
        release = asyncio.Event()

        async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.transport.set_write_buffer_limits(0)
            got = 0
            while got < 1024 * 1024:
                got += len(await reader.read(65536))
            writer.transport.pause_reading()  # the kernel buffers fill, then nothing moves
            stopped.set()
            await release.wait()
            writer.close()

        server = await asyncio.start_server(stall, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        disk = LocalStore(tmp_path / "store", fsync=False)
        try:
            writer = await disk.open_writer("big", 0)
            writer.write(b"s" * size)
            await disk.close_writer("big", writer, None, sync=False)
            upstream = Upstream(Origin.parse(f"http://127.0.0.1:{port}"), timeout=0.5)
            sending = asyncio.ensure_future(upstream.send(
                Target("PUT", "/big"), size, disk.ranges(["big"], [size])))
            await stopped.wait()
            with pytest.raises(Unreachable):
                await sending
        finally:
            release.set()
            await disk.close()
            server.close()

    run(scenario)
