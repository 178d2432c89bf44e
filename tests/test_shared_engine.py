"""Two engines on one Redis and one folder, in one process: what makes several shim instances
one shim (issue 13), below mitmproxy. Each "instance" has its own RedisStore, RedisSignals,
outbox and engine, as separate processes would; a real redis-server carries everything
between them (the `redis_server` fixture), and the legacy server is a real WholeFileServer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim import engine as e
from shim.demo_server import WholeFileServer
from shim.errors import ShimError
from shim.lifecycle import State
from shim.model import Target, Upload
from shim.outbox import DeliveryPolicy, Outbox
from shim.redis_store import RedisStore, safe_url
from shim.signals import RedisSignals
from shim.store import Conflict, StoreError
from shim.upstream import Origin, Upstream
from tests.redis_server import RedisServer

OWNER = "me"
DEADLINE = 10.0
"""Seconds any wait in these tests may take before it fails."""
LEASE_TTL = 1.0


@dataclass
class Instance:
    engine: e.Engine
    store: RedisStore
    signals: RedisSignals
    outbox: Outbox


@contextlib.asynccontextmanager
async def instance(redis: RedisServer, folder: Path, origin: str,
                   wait: float = DEADLINE) -> AsyncIterator[Instance]:
    store = RedisStore(redis.url, folder, fsync=False)
    signals = RedisSignals(store.redis, f"{store.ns}signals")
    outbox = Outbox(store, Upstream(Origin.parse(origin), timeout=5.0),
                    DeliveryPolicy(wait=wait, first_backoff=0.05), signals=signals,
                    lease_ttl=LEASE_TTL)
    engine = e.Engine(store, outbox, signals=signals, lease_ttl=LEASE_TTL)
    await signals.start()
    outbox.start()
    try:
        yield Instance(engine, store, signals, outbox)
    finally:
        await outbox.stop()
        await signals.close()
        await store.close()


@contextlib.asynccontextmanager
async def two(redis: RedisServer, folder: Path, origin: str,
              wait: float = DEADLINE) -> AsyncIterator[tuple[Instance, Instance]]:
    async with instance(redis, folder, origin, wait) as one, \
            instance(redis, folder, origin, wait) as other:
        yield one, other


def new(length: int) -> e.NewUpload:
    upload_id = e.new_upload_id()
    return e.NewUpload(id=upload_id, protocol="test", owner=OWNER, length=length, metadata={},
                       target=Target("PUT", f"/in/{upload_id}"))


def interruptible(engine: e.Engine, writing: e.Append) -> list[asyncio.Future[Upload]]:
    """Give a running body the interrupt a request has: it ends the body, keeping its bytes."""
    ended: list[asyncio.Future[Upload]] = []
    writing.interrupt = lambda: ended.append(asyncio.ensure_future(engine.abort_append(writing)))
    return ended


def delivered(legacy: WholeFileServer) -> list[str]:
    return [r.sha256 for r in legacy.received if r.method == "PUT"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "shared"


def test_a_write_at_another_instance_is_taken_over_and_resumed_where_it_stopped(
        redis_server: RedisServer, folder: Path, legacy: WholeFileServer) -> None:
    """Instance A writes 4 bytes, its client gone unnoticed; instance B's request takes the
    upload over: A ends its body (committing the 4 bytes) and frees the lease, B learns the
    record changed and goes on from byte 4; the file is delivered once, whole."""
    async def scenario() -> None:
        async with two(redis_server, folder, legacy.url) as (a, b):
            upload = await a.engine.create(new(10))
            stale = await a.engine.begin_append(upload, 0, 10)
            stale.feed(b"1234")
            ended = interruptible(a.engine, stale)
            assert (await b.engine.take_over(upload.id)) == (1, True)
            assert len(ended) == 1 and (await ended[0]).offset == 4
            assert await b.store.holder(f"write:{upload.id}") is None
            current = await b.engine.get(upload.id, OWNER)
            assert current.offset == 4
            fresh = await b.engine.begin_append(current, 4, 6)
            fresh.feed(b"567890")
            done = await b.engine.finish_append(fresh)
            assert (await b.engine.await_delivery(await b.engine.settle(done))).accepted

    asyncio.run(scenario())
    assert delivered(legacy) == [sha256(b"1234567890")]


def test_a_read_on_a_shared_store_ends_a_write_elsewhere_but_not_one_here(
        redis_server: RedisServer, folder: Path) -> None:
    """`take_over(here=False)` (a tus HEAD on a shared store) ends a body at another
    instance, and neither ends nor supersedes one running at its own."""
    async def scenario() -> None:
        async with two(redis_server, folder, "http://127.0.0.1:9") as (a, b):
            upload = await a.engine.create(new(10))
            ticket, _ = await a.engine.take_over(upload.id)
            writing = await a.engine.begin_append(upload, 0, 10)
            writing.feed(b"12")
            ended = interruptible(a.engine, writing)
            assert await a.engine.take_over(upload.id, here=False) == (ticket, True)
            assert ended == [] and not a.engine.superseded(upload.id, ticket)
            assert await b.engine.take_over(upload.id, here=False) == (0, True)
            assert len(ended) == 1 and (await ended[0]).offset == 2
            assert a.engine.superseded(upload.id, ticket)  # ended from elsewhere

    asyncio.run(scenario())


def test_nothing_to_take_over_costs_no_wait_and_no_signal(
        redis_server: RedisServer, folder: Path) -> None:
    """No body runs anywhere: take_over says so at once; a write lease this instance holds
    itself is not "elsewhere"."""
    async def scenario() -> None:
        async with two(redis_server, folder, "http://127.0.0.1:9") as (a, b):
            upload = await a.engine.create(new(10))
            assert await b.engine.take_over(upload.id) == (1, False)
            assert await b.store.acquire(f"write:{upload.id}", f"{b.engine.instance}:x", 60)
            assert await b.engine.take_over(upload.id, here=False) == (1, False)

    asyncio.run(scenario())


def test_a_dead_instances_write_lease_is_waited_for_until_it_lapses(
        redis_server: RedisServer, folder: Path) -> None:
    """The instance holding the write lease died (nobody answers the signal): the take-over
    returns once the lease lapses (storage.lease_ttl), and the upload can be written again."""
    async def scenario() -> None:
        async with instance(redis_server, folder, "http://127.0.0.1:9") as b:
            upload = await b.engine.create(new(10))
            assert await b.store.acquire(f"write:{upload.id}", "dead-instance:1", LEASE_TTL)
            assert (await asyncio.wait_for(b.engine.take_over(upload.id), DEADLINE))[1]
            assert await b.store.holder(f"write:{upload.id}") is None
            writing = await b.engine.begin_append(await b.engine.get(upload.id, OWNER), 0, 10)
            writing.feed(b"x" * 10)
            assert (await b.engine.finish_append(writing)).offset == 10

    asyncio.run(scenario())


def test_a_take_over_that_is_not_answered_gives_up_after_its_timeout(
        redis_server: RedisServer, folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A holder that neither answers nor lets its lease lapse: the take-over stops waiting
    after its timeout (the request then meets the lease: 423) and says why in the log."""
    async def scenario() -> bool:
        async with instance(redis_server, folder, "http://127.0.0.1:9") as b:
            upload = await b.engine.create(new(10))
            assert await b.store.acquire(f"write:{upload.id}", "stuck:1", 60)
            _, writing = await asyncio.wait_for(b.engine.take_over(upload.id, timeout=0.3),
                                                DEADLINE)
            return writing and await b.store.holder(f"write:{upload.id}") == "stuck:1"

    with caplog.at_level(logging.WARNING, "shim.engine"):
        assert asyncio.run(scenario())
    assert "did not end in 0.3s" in caplog.text


def test_an_outcome_recorded_by_another_instance_wakes_a_client_waiting_here(
        redis_server: RedisServer, folder: Path, legacy: WholeFileServer) -> None:
    """A client waits at B for the delivery A makes: A's "settled" signal wakes it, long
    before B's own wait (60 s here) would run out."""
    async def scenario() -> bool:
        async with two(redis_server, folder, legacy.url, wait=60.0) as (a, b):
            await b.outbox.stop()  # only A delivers
            upload = await a.engine.create(new(3))
            waiting = asyncio.ensure_future(b.outbox.outcome(upload.id))
            writing = await a.engine.begin_append(upload, 0, 3)
            writing.feed(b"abc")
            await a.engine.settle(await a.engine.finish_append(writing))
            outcome = await asyncio.wait_for(waiting, DEADLINE)
            return outcome.accepted

    assert asyncio.run(scenario())
    assert delivered(legacy) == [sha256(b"abc")]


def test_recovery_leaves_an_upload_another_instance_writes_and_repairs_the_others(
        redis_server: RedisServer, folder: Path) -> None:
    """Start-up recovery commits bytes that reached the shared folder, except for an upload
    whose write lease another instance holds: its bytes are that writer's to commit."""
    async def scenario() -> tuple[int, int, int]:
        async with two(redis_server, folder, "http://127.0.0.1:9") as (a, b):
            busy, idle = await a.engine.create(new(10)), await a.engine.create(new(10))
            for upload in (busy, idle):
                writer = await a.store.open_writer(upload.id, 0)
                writer.write(b"12345")
                await a.store.close_writer(upload.id, writer, None, sync=False)
            assert await a.store.acquire(f"write:{busy.id}", f"{a.engine.instance}:w", 60)
            repaired = await b.engine.recover()
            busy_now, idle_now = (await b.store.load(busy.id)), (await b.store.load(idle.id))
            assert busy_now is not None and idle_now is not None
            assert await b.store.holder(f"write:{idle.id}") is None  # released after
            return repaired, busy_now.offset, idle_now.offset

    assert asyncio.run(scenario()) == (1, 0, 5)


def test_an_upload_being_written_elsewhere_is_not_expired(
        redis_server: RedisServer, folder: Path) -> None:
    """Expiry takes the write lease: while another instance writes the upload, it is not
    removed (Conflict); once the write ends, it is."""
    async def scenario() -> None:
        async with two(redis_server, folder, "http://127.0.0.1:9") as (a, b):
            upload = await a.engine.create(new(10))
            assert await a.store.acquire(f"write:{upload.id}", f"{a.engine.instance}:w", 60)
            with pytest.raises(Conflict):
                await b.engine._expire(upload)
            assert await b.store.load(upload.id) is not None
            await a.store.release(f"write:{upload.id}", f"{a.engine.instance}:w")
            await b.engine._expire(upload)
            assert await b.store.load(upload.id) is None
            assert await b.store.holder(f"write:{upload.id}") is None

    asyncio.run(scenario())


def test_a_body_whose_lease_lapsed_is_ended_without_cutting_or_committing(
        redis_server: RedisServer, folder: Path) -> None:
    """The loop stalled longer than the lease: renewing finds it gone (another request may
    have it now), so the body is ended; as it ends it neither cuts the shared file to its
    own end nor commits its offset over the new holder's (409 lease-lost)."""
    async def scenario() -> None:
        async with instance(redis_server, folder, "http://127.0.0.1:9") as a:
            upload = await a.engine.create(new(10))
            writing = await a.engine.begin_append(upload, 0, 10)
            writing.feed(b"12")
            ended = interruptible(a.engine, writing)
            await a.engine.renew_leases()
            assert ended == []
            await a.store.release(f"write:{upload.id}", writing.holder)  # as a lapse would
            assert await a.store.acquire(f"write:{upload.id}", "newer:1", 60)
            newer = await a.store.open_writer(upload.id, 2)
            newer.write(b"3456")  # the new holder's bytes, past where the stale body stopped
            await a.engine.renew_leases()
            assert len(ended) == 1
            with pytest.raises(ShimError) as caught:
                await ended[0]
            assert (caught.value.status, caught.value.code) == (409, "lease-lost")
            assert await a.store.size(upload.id) == 6
            stored = await a.store.load(upload.id)
            assert stored is not None and stored.offset == 0
            await a.store.close_writer(upload.id, newer, None, sync=False)

    asyncio.run(scenario())


def test_a_delivery_is_made_by_one_instance_when_both_find_it_due(
        redis_server: RedisServer, folder: Path, legacy: WholeFileServer) -> None:
    """Both workers see the finished upload in the outbox; the delivery lease lets one send."""
    async def scenario() -> State:
        async with two(redis_server, folder, legacy.url) as (a, b):
            upload = await a.engine.create(new(5))
            writing = await a.engine.begin_append(upload, 0, 5)
            writing.feed(b"hello")
            settled = await a.engine.settle(await a.engine.finish_append(writing))
            b.outbox.kick()
            assert (await b.outbox.outcome(settled.id)).accepted
            final = await b.store.load(upload.id)
            assert final is not None
            return final.state

    assert asyncio.run(scenario()) is State.DELIVERED
    assert delivered(legacy) == [sha256(b"hello")]


# --- the signals themselves -------------------------------------------------------------------


def test_signals_reach_the_other_instances_only(redis_server: RedisServer, folder: Path) -> None:
    """A signal reaches every other subscriber of its topic, never its sender; a message
    that is not "sender topic id" is ignored."""
    async def scenario() -> tuple[list[str], list[str], list[str]]:
        async with two(redis_server, folder, "http://127.0.0.1:9") as (a, b):
            heard_a: list[str] = []
            heard_b: list[str] = []
            other_topic: list[str] = []
            a.signals.subscribe("test", heard_a.append)
            b.signals.subscribe("test", heard_b.append)
            b.signals.subscribe("other", other_topic.append)
            await a.store.redis.publish(a.signals.channel, b"garbage")
            await a.store.redis.publish(a.signals.channel, b"x test two words")
            await a.signals.publish("test", "id-1")
            await asyncio.wait_for(_until(lambda: heard_b), DEADLINE)
            return heard_a, heard_b, other_topic

    assert asyncio.run(scenario()) == ([], ["id-1"], [])


def test_signals_cannot_start_without_redis_and_a_failed_publish_is_only_logged(
        folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        store = RedisStore(f"redis://127.0.0.1:{_closed_port()}/0", folder, fsync=False)
        signals = RedisSignals(store.redis, "shim:signals")
        try:
            with pytest.raises(StoreError):
                await signals.start()
            await signals.publish("take-over", "id-1")
        finally:
            await store.close()

    with caplog.at_level(logging.WARNING, "shim.signals"):
        asyncio.run(scenario())
    assert "could not signal take-over of upload id-1" in caplog.text


def test_signals_are_heard_again_after_redis_comes_back(redis_server: RedisServer,
                                                        folder: Path) -> None:
    """Redis restarts (same port): the listener subscribes again and hears later signals."""
    async def scenario() -> list[str]:
        async with two(redis_server, folder, "http://127.0.0.1:9") as (a, b):
            heard: list[str] = []
            b.signals.subscribe("test", heard.append)
            redis_server.stop()
            redis_server.start()

            async def publish_until_heard() -> None:
                while not heard:
                    await a.signals.publish("test", "after")
                    await asyncio.sleep(0.1)  # a publish before the listener is back is lost

            await asyncio.wait_for(publish_until_heard(), DEADLINE)
            return heard

    assert "after" in asyncio.run(scenario())


async def _until(predicate: object) -> None:
    assert callable(predicate)
    while not predicate():
        await asyncio.sleep(0.01)


def _closed_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_a_bad_message_or_a_failing_handler_does_not_stop_the_listening(
        redis_server: RedisServer, folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A topic nobody here listens to, bytes that are not UTF-8, and a handler that raises
    (logged with its topic and upload): the next signal is still heard, by every handler."""
    async def scenario() -> list[str]:
        async with two(redis_server, folder, "http://127.0.0.1:9") as (a, b):
            heard: list[str] = []

            def failing(upload_id: str) -> None:
                raise RuntimeError(f"cannot handle {upload_id}")

            b.signals.subscribe("test", failing)
            b.signals.subscribe("test", heard.append)
            await a.signals.publish("nobody-listens", "id-0")
            await a.store.redis.publish(a.signals.channel, b"\xff\xfe test \xff")
            await a.signals.publish("test", "id-1")
            await asyncio.wait_for(_until(lambda: heard), DEADLINE)
            return heard

    with caplog.at_level(logging.ERROR, "shim.signals"):
        assert asyncio.run(scenario()) == ["id-1"]
    assert "handling the signal test of upload id-1 failed" in caplog.text


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
    ("rediss://user:s3cret@redis.example:6380/1", "rediss://***@redis.example:6380/1"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("unix:///run/redis.sock", "unix:///run/redis.sock"),
])
def test_a_redis_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert safe_url(url) == shown


def test_health_says_when_redis_does_not_answer_without_its_password(
        redis_server: RedisServer, folder: Path) -> None:
    """/readyz's reason: None while Redis answers and the folder is writable; once Redis is
    gone, why, naming Redis without the password."""
    async def scenario() -> tuple[str | None, str | None]:
        host_port = redis_server.url.split("//", 1)[1]
        store = RedisStore(f"redis://:pw-in-url@{host_port}", folder, fsync=False)
        try:
            healthy = await store.health()
            redis_server.stop()
            return healthy, await store.health()
        finally:
            await store.close()

    healthy, gone = asyncio.run(scenario())
    assert healthy is None
    assert gone is not None and gone.startswith("redis: ") and "pw-in-url" not in gone
    assert "redis://***@127.0.0.1:" in gone
