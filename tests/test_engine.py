"""The engine on a real store, delivering to the real whole-file server over 127.0.0.1."""

from __future__ import annotations

import asyncio
import errno
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import engine as e
from shim.demo_server import WholeFileServer
from shim.errors import ShimError
from shim.model import Target, Upload
from shim.store import Store
from shim.upstream import Origin, Upstream


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server(tmp_path: Path) -> Iterator[WholeFileServer]:
    legacy = WholeFileServer(tmp_path / "legacy")
    legacy.start()
    yield legacy
    legacy.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(tmp_path: Path, server: WholeFileServer, clock: Clock) -> Iterator[e.Engine]:
    store = Store(tmp_path / "store", fsync=False)
    yield e.Engine(store, Upstream(Origin.parse(server.url), timeout=10), clock=clock)
    store.close()


def new(length: int | None, owner: str = "me", expiration: int = 0, target: bool = True,
        parts: tuple[str, ...] = ()) -> e.NewUpload:
    upload_id = e.new_upload_id()
    return e.NewUpload(
        id=upload_id, protocol="test", owner=owner, length=length, metadata={},
        target=Target("PUT", f"/in/{upload_id}") if target else None, expiration=expiration,
        parts=parts,
    )


def append(engine: e.Engine, upload: Upload, data: bytes, offset: int | None = None,
           checksum: e.Checksum | None = None) -> Upload:
    writing = engine.begin_append(upload, upload.offset if offset is None else offset, len(data),
                                  checksum)
    writing.feed(data[: len(data) // 2])
    writing.feed(data[len(data) // 2:])
    return asyncio.run(engine.finish_append(writing))


def refusal(call: object, *args: object) -> ShimError:
    with pytest.raises(ShimError) as caught:
        call(*args)  # type: ignore[operator]
    return caught.value


def test_a_finished_upload_is_delivered_once_byte_exact(engine: e.Engine, server: WholeFileServer) -> None:
    upload = engine.create(new(10))
    upload = append(engine, upload, b"01234")
    upload = append(engine, upload, b"56789")
    assert upload.complete
    first = asyncio.run(engine.deliver(upload))
    again = asyncio.run(engine.deliver(upload))
    assert first.accepted and again.answer == first.answer
    puts = [r for r in server.received if r.method == "PUT"]
    assert len(puts) == 1
    assert puts[0].sha256 == hashlib.sha256(b"0123456789").hexdigest()
    assert engine.store.size(upload.id) == 0  # the bytes left the shim's disk once delivered


def test_a_wrong_offset_is_409_and_writes_nothing(engine: e.Engine) -> None:
    upload = append(engine, engine.create(new(10)), b"abc")
    error = refusal(engine.begin_append, upload, 1, 3)
    assert (error.status, error.details["expected-offset"]) == (409, 3)
    assert engine.store.size(upload.id) == 3


def test_a_body_cut_off_keeps_what_arrived(engine: e.Engine) -> None:
    upload = engine.create(new(100))
    writing = engine.begin_append(upload, 0, 100)
    writing.feed(b"x" * 40)
    assert engine.offset_of(upload) == 40  # a HEAD during the body already sees it
    assert engine.abort_append(writing).offset == 40
    assert engine.store.load(upload.id).offset == 40  # type: ignore[union-attr]


def test_a_second_writer_is_locked_out_until_the_first_ends(engine: e.Engine) -> None:
    upload = engine.create(new(100))
    writing = engine.begin_append(upload, 0, 10)
    assert refusal(engine.begin_append, upload, 0, 10).status == 423
    engine.abort_append(writing)
    engine.abort_append(engine.begin_append(upload, 0, 10))


def test_a_checksum_mismatch_discards_the_chunk(engine: e.Engine) -> None:
    upload = append(engine, engine.create(new(10)), b"abc")
    wrong = e.Checksum("sha1", hashlib.sha1(b"other").digest())
    writing = engine.begin_append(upload, 3, 3, wrong)
    writing.feed(b"def")
    assert engine.offset_of(upload) == 3  # unverified bytes are not shown
    with pytest.raises(ShimError) as caught:
        asyncio.run(engine.finish_append(writing))
    assert caught.value.status == 460
    assert engine.store.load(upload.id).offset == 3  # type: ignore[union-attr]
    assert engine.store.size(upload.id) == 3
    right = e.Checksum("sha256", hashlib.sha256(b"def").digest())
    assert append(engine, upload, b"def", checksum=right).offset == 6


def test_a_body_past_the_length_is_refused_whole(engine: e.Engine) -> None:
    upload = engine.create(new(5))
    assert refusal(engine.begin_append, upload, 0, 6).status == 413  # announced too long
    writing = engine.begin_append(upload, 0, None)  # chunked: found out while streaming
    writing.feed(b"abc")
    writing.feed(b"def")
    with pytest.raises(ShimError) as caught:
        asyncio.run(engine.finish_append(writing))
    assert caught.value.status == 413
    assert engine.store.load(upload.id).offset == 0  # type: ignore[union-attr]
    assert engine.store.size(upload.id) == 0


def test_a_size_limit_refuses_creation_and_deferred_lengths(engine: e.Engine) -> None:
    oversized = e.NewUpload(**{**new(11).__dict__, "max_size": 10})
    assert refusal(engine.create, oversized).status == 413
    deferred = engine.create(new(None))
    assert refusal(engine.declare_length, deferred, 11, 10).status == 413
    assert engine.declare_length(deferred, 10, 10).length == 10
    assert refusal(engine.declare_length, engine.store.load(deferred.id), 9, 10).status == 400


def test_a_full_disk_is_507_before_and_while_writing(engine: e.Engine,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    upload = append(engine, engine.create(new(10)), b"ab")
    engine.min_free_bytes = engine.store.free_bytes() * 2
    assert refusal(engine.begin_append, upload, 2, 3).status == 507
    engine.min_free_bytes = 0
    writing = engine.begin_append(upload, 2, 3)

    def full(data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writing.writer, "write", full)
    writing.feed(b"cde")
    with pytest.raises(ShimError) as caught:
        asyncio.run(engine.finish_append(writing))
    assert caught.value.status == 507
    assert engine.store.load(upload.id).offset == 2  # type: ignore[union-attr]


def test_restart_commits_bytes_on_disk_and_drops_unverified_ones(engine: e.Engine) -> None:
    plain = engine.create(new(10))
    writing = engine.begin_append(plain, 0, 10)
    writing.feed(b"12345")
    writing.writer.sync()  # the process dies here: the bytes are on disk, the offset is not
    checked = engine.create(new(10))
    checking = engine.begin_append(checked, 0, 10, e.Checksum("md5", b"0" * 16))
    checking.feed(b"abc")
    checking.writer.sync()
    restarted = e.Engine(engine.store, engine.upstream)
    assert restarted.recover() == 2
    assert restarted.get(plain.id, "me").offset == 5
    assert restarted.get(checked.id, "me").offset == 0
    assert engine.store.size(checked.id) == 0


def test_legacy_refusal_keeps_the_upload_for_a_retry(engine: e.Engine, server: WholeFileServer) -> None:
    upload = append(engine, engine.create(new(3)), b"abc")
    server.fail_status = 500
    failed = asyncio.run(engine.deliver(upload))
    assert not failed.accepted and failed.answer is not None and failed.answer.status == 500
    assert not engine.get(upload.id, "me").delivered
    server.fail_status = None
    assert asyncio.run(engine.deliver(upload)).accepted
    assert [r.status for r in server.received] == [500, 201]


def test_legacy_down_gives_no_answer_and_keeps_the_upload(tmp_path: Path, clock: Clock) -> None:
    store = Store(tmp_path / "store", fsync=False)
    down = e.Engine(store, Upstream(Origin.parse("http://127.0.0.1:1"), timeout=5), clock=clock)
    upload = append(down, down.create(new(3)), b"abc")
    delivery = asyncio.run(down.deliver(upload))
    assert delivery.answer is None and "connect" in delivery.problem
    assert store.size(upload.id) == 3
    store.close()


def test_concatenation_delivers_the_parts_in_order(engine: e.Engine, server: WholeFileServer) -> None:
    first = append(engine, engine.create(new(3, target=False)), b"abc")
    second = engine.create(new(2, target=False))
    whole = engine.concatenate(new(None, parts=(first.id, second.id)))
    assert not whole.complete and whole.length == 5
    assert engine.concatenate(new(None, parts=(first.id, second.id))).id == whole.id
    append(engine, second, b"de")
    assert (finished := engine.whole_of(engine.get(second.id, "me"))) is not None
    assert finished.complete
    assert asyncio.run(engine.deliver(finished)).accepted
    assert server.received[-1].sha256 == hashlib.sha256(b"abcde").hexdigest()


def test_only_the_owner_may_touch_an_upload(engine: e.Engine) -> None:
    upload = engine.create(new(3, owner="alice"))
    assert refusal(engine.get, upload.id, "mallory").status == 403
    assert refusal(engine.get, "nonexistent", "alice").status == 404


def test_terminated_and_expired_uploads_are_gone(engine: e.Engine, clock: Clock) -> None:
    doomed = append(engine, engine.create(new(10)), b"abc")
    engine.terminate(doomed)
    assert refusal(engine.get, doomed.id, "me").status == 410
    assert engine.store.size(doomed.id) == 0
    old = engine.create(new(10, expiration=60))
    clock.now += 61
    assert refusal(engine.get, old.id, "me").status == 410
    stale = engine.create(new(10, expiration=60), key="PUT /stale")
    clock.now += 61
    assert engine.sweep() >= 1 and engine.store.load(stale.id) is None
    assert engine.store.resolve("PUT /stale") is None


def test_a_range_that_overlaps_the_stored_end_skips_what_is_stored(engine: e.Engine) -> None:
    upload = append(engine, engine.create(new(8)), b"abc")
    retried = engine.begin_range(upload, 1, 5)  # "bcdef": a longer retry of an earlier chunk
    assert retried is not None
    retried.feed(b"b")
    retried.feed(b"cdef")
    upload = asyncio.run(engine.finish_append(retried))
    assert upload.offset == 6
    chunks = asyncio.run(_collect(engine, upload))
    assert chunks == b"abcdef"
    assert engine.begin_range(upload, 2, 3) is None  # nothing new in it
    assert refusal(engine.begin_range, upload, 7, 1).status == 416  # would leave a gap
    assert engine.store.size(upload.id) == 6


def test_uploads_are_found_by_key_only_by_their_owner(engine: e.Engine) -> None:
    upload = engine.create(new(5, owner="alice"), key="PUT /x")
    assert engine.find("PUT /x", "alice") == upload
    assert engine.find("PUT /x", "bob") is None
    assert engine.find("PUT /y", "alice") is None


async def _collect(engine: e.Engine, upload: Upload) -> bytes:
    return b"".join([chunk async for chunk in engine.store.read([upload.id], [upload.offset])])


def test_a_new_writer_ends_the_earlier_one_and_starts_where_it_stopped(engine: e.Engine) -> None:
    upload = engine.create(new(10))
    stale = engine.begin_append(upload, 0, 10)
    stale.feed(b"1234")  # then the client vanishes without the shim noticing
    stale.interrupt = lambda: asyncio.get_running_loop().call_soon(engine.abort_append, stale)

    async def resume() -> Upload:
        await engine.take_over(upload.id)
        fresh = engine.begin_append(engine.get(upload.id, "me"), 4, 6)
        fresh.feed(b"567890")
        return await engine.finish_append(fresh)

    assert asyncio.run(resume()).offset == 10
    assert asyncio.run(_collect(engine, engine.get(upload.id, "me"))) == b"1234567890"


def test_an_announced_digest_is_checked_before_anything_is_delivered(
        engine: e.Engine, server: WholeFileServer) -> None:
    import base64

    right = base64.b64encode(hashlib.sha256(b"abc").digest()).decode()
    upload = engine.expect_digests(engine.create(new(3)), {"sha256": right})
    assert refusal(engine.expect_digests, upload, {"sha256": "AAAA"}).status == 400
    assert asyncio.run(engine.deliver(append(engine, upload, b"abc"))).accepted
    wrong = engine.expect_digests(engine.create(new(3)), {"sha256": right})
    failed = asyncio.run(engine.deliver(append(engine, wrong, b"abd")))
    assert (failed.answer, failed.code) == (None, "digest-mismatch")
    assert refusal(engine.get, wrong.id, "me").status == 410  # the upload failed for good
    assert len([r for r in server.received if r.method == "PUT"]) == 1


def test_a_refusal_is_recorded_until_the_file_is_accepted(engine: e.Engine, server: WholeFileServer) -> None:
    upload = append(engine, engine.create(new(3)), b"abc")
    server.fail_status = 403
    asyncio.run(engine.deliver(upload))
    refused = engine.get(upload.id, "me")
    assert refused.refusal is not None and refused.refusal.status == 403
    server.fail_status = None
    asyncio.run(engine.deliver(refused))
    assert engine.get(upload.id, "me").refusal is None
