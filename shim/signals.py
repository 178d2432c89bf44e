"""Signals between shim instances that share one store: "end your write of upload X" and
"the delivery of X is settled", over a Redis pub/sub channel.

A signal is a hint that makes something happen sooner, never the only way it happens: a lost
one costs time, not correctness. Whoever waits for what a signal announces also looks at the
store itself (a lease's holder, a record's state) from time to time, so a missed message, a
Redis fail-over or a crashed instance only delays it.

One process alone needs none of this: the engine and the outbox then run with `signals`
None, as they always did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shim.store import StoreError

log = logging.getLogger("shim.signals")

TAKE_OVER = "take-over"
"""A newer request of an upload's owner came to another instance: end the write here."""
RELEASED = "released"
"""A write ended at another instance's asking: its lease is free."""
SETTLED = "settled"
"""An upload's delivery attempt has a recorded outcome: clients waiting for it may look."""
RECONNECT_AFTER = 1.0
"""Seconds between attempts to listen again after Redis went away."""

Handler = Callable[[str], None]


class Signals(Protocol):
    async def publish(self, topic: str, upload_id: str) -> None:
        """Tell every other instance; a failure to send is logged, never raised."""

    def subscribe(self, topic: str, handler: Handler) -> None:
        """Call `handler(upload_id)` on the event loop for each signal of `topic` that another
        instance sends."""


class RedisSignals:
    """Signals on one Redis pub/sub channel; an instance ignores its own messages."""

    def __init__(self, redis: aioredis.Redis, channel: str) -> None:
        self.redis = redis
        self.channel = channel
        self.sender = secrets.token_hex(8)
        self._handlers: dict[str, list[Handler]] = {}
        self._listening: asyncio.Task[None] | None = None

    def subscribe(self, topic: str, handler: Handler) -> None:
        self._handlers.setdefault(topic, []).append(handler)

    async def publish(self, topic: str, upload_id: str) -> None:
        try:
            await self.redis.publish(self.channel, f"{self.sender} {topic} {upload_id}")
        except (RedisError, OSError) as exc:
            log.warning("shim: could not signal %s of upload %s: %s", topic, upload_id, exc)

    async def start(self) -> None:
        """Subscribe before returning (a request served from then on may be asked to end),
        then listen in the background; StoreError when Redis cannot be reached."""
        if self._listening is not None:
            return
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
        except (RedisError, OSError) as exc:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            raise StoreError(f"redis: {exc}") from exc
        self._listening = asyncio.create_task(self._listen(pubsub), name="shim-signals")

    async def close(self) -> None:
        if self._listening is not None:
            self._listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listening

    async def _listen(self, pubsub: aioredis.client.PubSub) -> None:
        try:
            while True:
                try:
                    async for message in pubsub.listen():
                        self._dispatch(message.get("data"))
                except (RedisError, OSError) as exc:
                    log.warning("shim: signals from other instances paused (%s); listening "
                                "again in %.0fs", exc, RECONNECT_AFTER)
                    await asyncio.sleep(RECONNECT_AFTER)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _dispatch(self, data: object) -> None:
        if not isinstance(data, bytes):
            return
        try:
            words = data.decode("ascii").split(" ")  # ids, topics and senders are ASCII
        except UnicodeDecodeError:
            return
        if len(words) != 3 or words[0] == self.sender:
            return
        _, topic, upload_id = words
        for handler in self._handlers.get(topic, ()):
            try:
                handler(upload_id)
            except Exception:
                log.exception("shim: handling the signal %s of upload %s failed", topic, upload_id)
