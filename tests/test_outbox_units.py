"""What the outbox tells clients and how long it waits between attempts: pure, no sockets."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from shim.lifecycle import State
from shim.local_store import LocalStore
from shim.model import Answer, Target, Upload
from shim.outbox import Delivery, DeliveryPolicy, _told
from shim.store import pieces

ANSWER = Answer(201, "Created", (("Location", "/x"),), b"ok")
BASE = Upload(id="u1", protocol="test", owner="me", length=10, offset=10,
              target=Target("PUT", "/in/u1"))


@pytest.mark.parametrize(("attempts", "seconds"), [
    (0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (9, 256.0), (10, 300.0), (60, 300.0),
])
def test_backoff_doubles_from_the_first_wait_up_to_the_cap(attempts: int, seconds: float) -> None:
    """Retries of a legacy server that is down wait 1 s, 2 s, 4 s ... and never more than
    the cap (5 min), so a long outage is not hammered and a short one is not waited out."""
    assert DeliveryPolicy().backoff(attempts) == seconds


def test_backoff_follows_its_policy() -> None:
    policy = DeliveryPolicy(first_backoff=0.5, max_backoff=3.0)
    assert [policy.backoff(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize(("code", "status"), [
    ("pending", 503), ("unrecorded", 507), ("digest-mismatch", 400), ("failed", 502), ("", 502),
])
def test_a_client_without_an_answer_gets_the_status_of_why(code: str, status: int) -> None:
    """503 while the delivery goes on, 507 when the answer could not be recorded, 400 for a
    digest mismatch, 502 when it failed."""
    delivery = Delivery(None, "why", code)
    assert delivery.status == status
    assert delivery.message == "the upload is complete but not delivered: why"
    assert not delivery.accepted


def test_retry_after_is_sent_only_when_known() -> None:
    assert Delivery(None, "", "pending", 7).fields == (("Retry-After", "7"),)
    assert Delivery(None, "", "failed").fields == ()


def test_accepted_only_with_a_2xx_answer() -> None:
    assert Delivery(ANSWER).accepted
    assert not Delivery(replace(ANSWER, status=403)).accepted


@pytest.mark.parametrize("state", [State.DELIVERED, State.REFUSED])
def test_a_final_answer_is_replayed(state: State) -> None:
    told = _told(replace(BASE, state=state, answer=ANSWER), now=0.0)
    assert told == Delivery(ANSWER)


def test_a_held_upload_tells_its_problem_as_failed() -> None:
    told = _told(replace(BASE, state=State.FAILED, problem="no answer"), now=0.0)
    assert told is not None and (told.code, told.problem, told.answer) == ("failed", "no answer", None)


@pytest.mark.parametrize("state", [State.TERMINATED, State.EXPIRED])
def test_a_gone_upload_or_none_is_failed(state: State) -> None:
    for upload in (replace(BASE, state=state), None):
        told = _told(upload, now=0.0)
        assert told is not None and told.code == "failed" and "gone" in told.problem


def test_an_upload_waiting_for_its_backoff_says_when_to_ask_again() -> None:
    """A complete upload whose last attempt failed and whose next one is due in 4.2 s: 503
    with Retry-After 5 (rounded up) and the last problem."""
    waiting = replace(BASE, state=State.COMPLETE, attempts=1, next_attempt=104.2, problem="down")
    told = _told(waiting, now=100.0)
    assert told is not None and (told.code, told.retry_after) == ("pending", 5)
    assert "down" in told.problem and "5s" in told.problem


@pytest.mark.parametrize("upload", [
    replace(BASE, state=State.COMPLETE),  # never attempted yet: wait for the first attempt
    replace(BASE, state=State.COMPLETE, attempts=1, next_attempt=100.0),  # due now
    replace(BASE, state=State.DELIVERING, attempts=1),  # in flight
])
def test_an_attempt_due_or_in_flight_is_waited_for(upload: Upload) -> None:
    assert _told(upload, now=100.0) is None


def test_pieces_of_a_plain_and_a_concatenated_upload(tmp_path: Path) -> None:
    """A plain upload is its own file up to its offset; a final upload is its parts in
    order, each up to its own offset (a missing part counts 0, which the outbox refuses)."""
    async def scenario() -> None:
        store = LocalStore(tmp_path / "store", fsync=False)
        try:
            first = await store.save(Upload(id="p1", protocol="t", owner="", length=3, offset=3))
            second = await store.save(Upload(id="p2", protocol="t", owner="", length=4, offset=2))
            assert await pieces(store, BASE) == (["u1"], [10])
            whole = replace(BASE, parts=(second.id, first.id, "gone"))
            assert await pieces(store, whole) == (["p2", "p1", "gone"], [2, 3, 0])
        finally:
            await store.close()

    asyncio.run(scenario())
