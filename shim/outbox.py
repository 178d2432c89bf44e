"""Delivery as a durable outbox: one worker sends finished files to the legacy server.

The way a mail server queues: an upload that became COMPLETE is in the store's outbox
(derived from its state and `next_attempt`, so it survives a restart). The worker takes a due
upload under a delivery lease, moves it to DELIVERING, sends it once and records the outcome
before anyone is told. At most one attempt per upload is ever in flight; the requests of
clients only wait for outcomes (`outcome`), they never send anything themselves.

Outcomes (`shim.lifecycle` names the moves):
- a 2xx answer: DELIVERED; any other answer but 502/503/504: REFUSED. Recorded, replayed.
- no connection, a break before the whole file was sent, or 502/503/504: back to COMPLETE
  with exponential backoff, until `give_up_after` has passed since the first attempt: FAILED.
- the whole file was sent and no answer came (or the shim stopped in DELIVERING): the
  outcome is unknown; `on_unknown: hold` makes it FAILED (no second attempt), `retry` queues
  it again (at-least-once).
Every attempt carries `Idempotency-Key` (draft-ietf-httpapi-idempotency-key-header) with
the upload id, so a legacy server that honours it can drop a repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import secrets
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from shim.lifecycle import Event, IllegalTransition, State
from shim.metrics import Metrics
from shim.model import Answer, Upload
from shim.signals import SETTLED, Signals
from shim.store import Conflict, FileRange, Store, StoreError, pieces, transition
from shim.upstream import OutcomeUnknown, Unreachable, Upstream

log = logging.getLogger("shim.outbox")

LAST_BYTES = 1024 * 1024
"""The file's last bytes, sent apart once `last_bytes_sent` is on record (Upload)."""
LEASE_TTL = 60.0
"""A delivery lease lapses this long after its last renewal (unless the outbox is given
another `lease_ttl`); the worker renews it every third of that, so only a crashed
instance's lease lapses."""
TICK = 5.0
"""The worker looks at the outbox at least this often."""
RETRYABLE_STATUSES = frozenset({502, 503, 504})
DUE_LOOKAHEAD = 64
"""Due uploads looked at beyond this worker's free slots: a delivery another instance runs
stays in the outbox index while it runs, and must not hide the ones queued behind it."""


class LeaseLost(Exception):
    """The delivery lease lapsed during the attempt (the instance stalled past it): another
    worker may be delivering the upload now, so this attempt must not send its last bytes."""


@dataclass(frozen=True)
class DeliveryPolicy:
    wait: float = 30.0
    """How long a client's final request waits for the outcome before 503 + Retry-After."""
    give_up_after: float = 86400.0
    on_unknown: Literal["hold", "retry"] = "hold"
    first_backoff: float = 1.0
    max_backoff: float = 300.0
    concurrency: int = 4
    """Deliveries in flight at once (each to a different upload)."""

    def backoff(self, attempts: int) -> float:
        return float(min(self.max_backoff, self.first_backoff * 2 ** max(0, attempts - 1)))


@dataclass(frozen=True)
class Delivery:
    """What a client is told about the delivery of a finished file."""

    answer: Answer | None
    """The legacy server's recorded answer, accepting or refusing."""
    problem: str = ""
    code: str = ""
    """Why there is no answer: "pending" (503), "failed" (502), "unrecorded" (507: an answer
    came but could not be recorded yet), "digest-mismatch" (400, nothing was sent)."""
    retry_after: int = 0

    @property
    def accepted(self) -> bool:
        return self.answer is not None and self.answer.accepted

    @property
    def status(self) -> int:
        """The status a client gets while there is no answer to give it."""
        return {"pending": 503, "unrecorded": 507, "digest-mismatch": 400}.get(self.code, 502)

    @property
    def fields(self) -> tuple[tuple[str, str], ...]:
        """Header fields of that reply: when to ask again (RFC 9110 section 10.2.3)."""
        return (("Retry-After", str(self.retry_after)),) if self.retry_after else ()

    @property
    def message(self) -> str:
        return f"the upload is complete but not delivered: {self.problem}"


_RESULTS = {Event.ACCEPTED: "delivered", Event.REFUSED: "refused", Event.TRANSIENT: "transient",
            Event.UNKNOWN_HOLD: "unknown", Event.UNKNOWN_RETRY: "unknown",
            Event.GIVE_UP: "gave_up"}
"""The name each move of a delivery is counted under (shim_delivery_attempts)."""


class Outbox:
    def __init__(self, store: Store, upstream: Upstream, policy: DeliveryPolicy | None = None,
                 clock: Callable[[], float] = time.time, metrics: Metrics | None = None,
                 signals: Signals | None = None, lease_ttl: float = LEASE_TTL) -> None:
        self.store = store
        self.metrics = metrics or Metrics()
        self.upstream = upstream
        self.policy = policy or DeliveryPolicy()
        self.clock = clock
        self.instance = secrets.token_hex(8)
        self._kicked = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._holders: dict[str, str] = {}
        self._settled: dict[str, asyncio.Event] = {}
        self._unrecorded: dict[str, Delivery] = {}
        self._worker: asyncio.Task[None] | None = None
        self.lease_ttl = lease_ttl
        self.signals = signals
        """How outcomes recorded by other instances' workers are heard of (None: alone)."""
        if signals is not None:
            signals.subscribe(SETTLED, self._notify)

    # --- running --------------------------------------------------------------------------

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="shim-outbox")

    async def stop(self) -> None:
        tasks = [task for task in (self._worker, *self._running.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._worker = None

    def kick(self) -> None:
        """Look at the outbox now (an upload just became COMPLETE)."""
        self._kicked.set()

    async def _run(self) -> None:
        while True:
            delay = min(TICK, self.lease_ttl / 3)
            try:
                await self._renew()
                await self._dispatch()
                due = await self.store.next_due()
                if due is not None:
                    delay = min(delay, max(0.0, due - self.clock()))
            except Exception:
                log.exception("shim: the delivery worker failed; trying again in %.0fs", TICK)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kicked.wait(), delay)
            self._kicked.clear()

    async def _dispatch(self) -> None:
        room = self.policy.concurrency - len(self._running)
        if room <= 0:
            return
        for upload_id in await self.store.due(self.clock(),
                                              room + len(self._running) + DUE_LOOKAHEAD):
            if len(self._running) >= self.policy.concurrency:
                break
            if upload_id in self._running or \
                    await self.store.holder(f"deliver:{upload_id}") is not None:
                continue  # being delivered (here, or by another instance)
            task = asyncio.create_task(self._attempt(upload_id), name=f"deliver-{upload_id}")
            self._running[upload_id] = task
            task.add_done_callback(functools.partial(self._done, upload_id))

    def _done(self, upload_id: str, _: object = None) -> None:
        self._running.pop(upload_id, None)
        self._notify(upload_id)
        self.kick()  # a slot is free, and the outbox may hold more

    def _notify(self, upload_id: str) -> None:
        event = self._settled.pop(upload_id, None)
        if event is not None:
            event.set()

    async def _renew(self) -> None:
        for upload_id, holder in list(self._holders.items()):
            if not await self.store.renew(f"deliver:{upload_id}", holder, self.lease_ttl):
                log.warning("upload %s: the delivery lease lapsed during the attempt; its last "
                            "bytes will not be sent", upload_id)

    # --- one attempt ----------------------------------------------------------------------

    async def _attempt(self, upload_id: str) -> None:
        """One delivery attempt under the upload's delivery lease: its one release path."""
        lease, holder = f"deliver:{upload_id}", f"{self.instance}:{secrets.token_hex(4)}"
        if not await self.store.acquire(lease, holder, self.lease_ttl):
            return  # another worker has it
        self._holders[upload_id] = holder
        try:
            upload = await self.store.load(upload_id)
            if upload is not None:
                await self._deliver(upload)
        except (Conflict, IllegalTransition):
            log.info("upload %s changed during its delivery attempt; looking again", upload_id)
        except LeaseLost as exc:
            log.warning("upload %s: %s", upload_id, exc)
        except Exception:
            log.exception("shim: the delivery attempt of upload %s failed", upload_id)
        finally:
            self._holders.pop(upload_id, None)
            await self.store.release(lease, holder)

    async def _deliver(self, upload: Upload) -> None:
        now = self.clock()
        if upload.state is State.DELIVERING:  # its lease lapsed: the shim stopped mid-way
            move = self._unknown(upload, "the shim stopped during a delivery; the outcome is "
                                 "unknown") if upload.last_bytes_sent else self._transient(
                upload, "the shim stopped before the whole file was sent")
            await self._record(upload, *move)
            return
        if upload.state is not State.COMPLETE or upload.next_attempt > now:
            return
        if upload.first_attempt is not None and now - upload.first_attempt > self.policy.give_up_after:
            await self._record(upload, Event.GIVE_UP, {"problem": f"gave up: {upload.problem}"})
            return
        missing = await self._missing_bytes(upload)
        if missing:
            log.error("upload %s: %s; not delivered", upload.id, missing)
            await self._record(upload, Event.GIVE_UP, {"problem": missing})
            return
        upload = await transition(self.store, upload, Event.ATTEMPT, updated=now, last_bytes_sent=False,
                                  update=lambda u: {"attempts": u.attempts + 1,
                                                    "first_attempt": u.first_attempt or now})
        self._notify(upload.id)
        event, changes = await self._send(upload)
        await self._record(upload, event, changes)

    async def _send(self, upload: Upload) -> tuple[Event, dict[str, Any]]:
        """Send the file once; the move and the changes that record how it went."""
        assert upload.target is not None and upload.length is not None
        digest = hashlib.sha256()
        # Only a file a key names can be repeated by a later one (Engine._duplicate_of).
        hashers = (digest,) if upload.keyed else ()
        sent = {"all": False, "last": upload.length == 0}
        if sent["last"]:
            await self._mark_last_bytes(upload)

        async def body() -> AsyncGenerator[FileRange]:
            ids, sizes = await pieces(self.store, upload)
            remaining = upload.length or 0
            loop = asyncio.get_running_loop()
            async for whole in self.store.ranges(ids, sizes):
                remaining -= whole.count
                # The file's last bytes go on their own, once they are put on record.
                pieces_of_whole = whole.split(LAST_BYTES) if remaining <= 0 else (whole,)
                for piece in pieces_of_whole:
                    # Hashed on a worker thread while it is sent (the page cache serves both).
                    hashing = loop.run_in_executor(None, piece.hash_into, *hashers) \
                        if hashers else None
                    try:
                        if remaining <= 0 and piece is pieces_of_whole[-1] and not sent["last"]:
                            await self._mark_last_bytes(upload)
                            sent["last"] = True
                        yield piece
                    finally:
                        if hashing is not None:
                            await hashing  # before its file may be closed
            sent["all"] = True

        key = (("Idempotency-Key", f'"{upload.id}"'),)
        try:
            async with contextlib.aclosing(body()) as sending:
                answer = await self.upstream.send(upload.target, upload.length, sending, key)
        except Unreachable as exc:
            return self._transient(upload, str(exc))
        except OutcomeUnknown as exc:
            return self._unknown(upload, str(exc))
        except asyncio.CancelledError:
            move = self._unknown(upload, "the shim stopped during the delivery") if sent["last"] \
                else self._transient(upload, "the shim stopped before the whole file was sent")
            await asyncio.shield(self._record(upload, *move))
            raise
        log.info("upload %s: the legacy server answered %d to %s %s", upload.id, answer.status,
                 upload.target.method, upload.target.path)
        if answer.status in RETRYABLE_STATUSES:
            return self._transient(upload, f"the legacy server answered {answer.status}")
        if answer.accepted:
            return Event.ACCEPTED, {"answer": answer, "problem": "",
                                    "sha256": digest.hexdigest() if sent["all"] and hashers
                                    else None}
        return Event.REFUSED, {"answer": answer, "problem": ""}

    async def _missing_bytes(self, upload: Upload) -> str:
        """Why the shim's own copy of the file is not whole ("" when it is): sending it would
        hand the legacy server a request that breaks off, and blame it for that."""
        ids, sizes = await pieces(self.store, upload)
        if sum(sizes) != upload.length:
            return "a part of this upload is gone"
        for upload_id, size in zip(ids, sizes, strict=True):
            if size and await self.store.size(upload_id) < size:
                return f"the shim's copy of {upload_id} is shorter than recorded"
        return ""

    async def _mark_last_bytes(self, upload: Upload) -> None:
        """Record that the file's last bytes go out now. Before this, a crash leaves a
        request the legacy server cannot have completed (its Content-Length is not met), so
        the delivery is safe to retry; after it, the outcome is unknown. Only while the
        delivery lease is still this attempt's (LeaseLost): an instance that stalled past it
        must leave its request unfinished, since another may be sending the file."""
        holder = self._holders.get(upload.id)
        if holder is None or not await self.store.renew(f"deliver:{upload.id}", holder,
                                                        self.lease_ttl):
            raise LeaseLost("the delivery lease lapsed during the attempt; the request is "
                            "left unfinished, and the upload to whoever holds it now")
        await transition(self.store, upload, last_bytes_sent=True)

    def _transient(self, upload: Upload, problem: str) -> tuple[Event, dict[str, Any]]:
        log.warning("upload %s: delivery attempt %d failed: %s", upload.id, upload.attempts, problem)
        first = upload.first_attempt or self.clock()
        if self.clock() - first > self.policy.give_up_after:
            return Event.GIVE_UP, {"problem": f"gave up: {problem}"}
        return Event.TRANSIENT, {"problem": problem,
                                 "next_attempt": self.clock() + self.policy.backoff(upload.attempts)}

    def _unknown(self, upload: Upload, problem: str) -> tuple[Event, dict[str, Any]]:
        log.warning("upload %s: %s (on_unknown: %s)", upload.id, problem, self.policy.on_unknown)
        if self.policy.on_unknown == "retry":
            return Event.UNKNOWN_RETRY, {
                "problem": problem, "next_attempt": self.clock() + self.policy.backoff(upload.attempts)}
        return Event.UNKNOWN_HOLD, {"problem": problem}

    async def _record(self, upload: Upload, event: Event, changes: dict[str, Any]) -> None:
        """Write the outcome before anyone is told. If the store cannot take it (a full disk),
        waiting clients are told 507 and the write is tried again until it succeeds: the
        attempt keeps its lease meanwhile, so nothing delivers the file again."""
        changes["updated"] = self.clock()
        while True:
            try:
                saved = await transition(self.store, upload, event, **changes)
                break
            except StoreError as exc:
                answer = changes.get("answer")
                self._unrecorded[upload.id] = Delivery(
                    answer if isinstance(answer, Answer) else None,
                    f"the outcome could not be recorded: {exc}", "unrecorded", 5)
                self._notify(upload.id)
                await asyncio.sleep(1.0)
        self._unrecorded.pop(upload.id, None)
        if self.signals is not None:  # a client may wait for it at another instance
            await self.signals.publish(SETTLED, upload.id)
        self._count(saved, event)
        if saved.state in (State.DELIVERED, State.REFUSED):
            await self._discard_bytes(saved)

    def _count(self, upload: Upload, event: Event) -> None:
        """An attempt's result, and the upload's end if this was it."""
        self.metrics.attempts.labels(result=_RESULTS.get(event, event.name.lower())).inc()
        ended = {State.DELIVERED: "delivered", State.REFUSED: "refused", State.FAILED: "failed"}
        target = upload.target
        self.metrics.record(
            upload, ended.get(upload.state, "delivery attempted"),
            method=target.method if target else None, path=target.path if target else None,
            status=upload.answer.status if upload.answer else None,
            problem=upload.problem or None, attempts=upload.attempts)
        if upload.state in ended and upload.first_attempt is not None:
            self.metrics.delivery_seconds.observe(max(0.0, self.clock() - upload.first_attempt))

    async def _discard_bytes(self, upload: Upload) -> None:
        """The file is out of the shim's hands: free its disk. The parts of a concatenation
        stay (other final uploads may use them, and they expire on their own), unless they
        are the upload's alone (S3 multipart): then they go, records and all."""
        if not upload.parts:
            await self.store.discard(upload.id)
        elif upload.exclusive_parts:
            for part_id in upload.parts:
                part = await self.store.load(part_id)
                if part is not None:
                    with contextlib.suppress(Conflict):
                        await self.store.remove(part)
                await self.store.unlink(f"part-of:{part_id}:{upload.id}", upload.id)

    # --- what clients are told ------------------------------------------------------------

    async def outcome(self, upload_id: str) -> Delivery:
        """The recorded outcome, waiting up to `policy.wait` for the attempt in flight (or the
        first one); never starts an attempt of its own."""
        deadline = time.monotonic() + self.policy.wait
        while True:
            unrecorded = self._unrecorded.get(upload_id)
            if unrecorded is not None:
                return unrecorded
            upload = await self.store.load(upload_id)
            told = _told(upload, self.clock())
            if told is not None:
                return told
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Delivery(None, "the legacy server has not answered yet", "pending",
                                max(1, min(30, math.ceil(self.policy.wait))))
            settled = self._settled.setdefault(upload_id, asyncio.Event())
            self.kick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(settled.wait(), remaining)


def _told(upload: Upload | None, now: float) -> Delivery | None:
    """What a client is told of an upload's delivery now; None while an attempt is due or
    in flight."""
    if upload is None or upload.gone:
        return Delivery(None, "the upload is gone", "failed")
    if upload.state in (State.DELIVERED, State.REFUSED):
        return Delivery(upload.answer)
    if upload.state is State.FAILED:
        return Delivery(None, upload.problem, "failed")
    if upload.state is State.COMPLETE and upload.attempts and upload.next_attempt > now:
        retry_after = max(1, math.ceil(upload.next_attempt - now))
        return Delivery(None, f"{upload.problem}; trying again in {retry_after}s", "pending",
                        retry_after)
    return None
