"""The lifecycle table (shim/lifecycle.py) and the `Upload` properties derived from its state.

Pure tests: no store, no clock. The table is checked against an independent copy written out
below, so a changed entry (a delivered upload that could be delivered again, a delivery that
could be terminated half-way) fails here before it can reach a client."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from shim.lifecycle import (
    AWAITING_DELIVERY,
    FINAL,
    GONE,
    TRANSITIONS,
    Event,
    IllegalTransition,
    State,
    advance,
)
from shim.model import Upload

S = State
E = Event

ENDABLE = (S.RECEIVING, S.COMPLETE, S.DELIVERED, S.REFUSED, S.FAILED)

EXPECTED: dict[tuple[State, Event], State] = {
    (S.RECEIVING, E.COMPLETE): S.COMPLETE,
    (S.COMPLETE, E.ATTEMPT): S.DELIVERING,
    (S.RECEIVING, E.DUPLICATE): S.DELIVERED,
    (S.COMPLETE, E.GIVE_UP): S.FAILED,
    (S.DELIVERING, E.ACCEPTED): S.DELIVERED,
    (S.DELIVERING, E.REFUSED): S.REFUSED,
    (S.DELIVERING, E.TRANSIENT): S.COMPLETE,
    (S.DELIVERING, E.UNKNOWN_RETRY): S.COMPLETE,
    (S.DELIVERING, E.UNKNOWN_HOLD): S.FAILED,
    (S.DELIVERING, E.GIVE_UP): S.FAILED,
    (S.FAILED, E.RETRY): S.COMPLETE,
    (S.RECEIVING, E.TERMINATE): S.TERMINATED,
    (S.COMPLETE, E.TERMINATE): S.TERMINATED,
    (S.DELIVERED, E.TERMINATE): S.TERMINATED,
    (S.REFUSED, E.TERMINATE): S.TERMINATED,
    (S.FAILED, E.TERMINATE): S.TERMINATED,
    (S.RECEIVING, E.EXPIRE): S.EXPIRED,
    (S.DELIVERED, E.EXPIRE): S.EXPIRED,
    (S.REFUSED, E.EXPIRE): S.EXPIRED,
    (S.FAILED, E.EXPIRE): S.EXPIRED,
}
"""Every legal move, written out independently of shim/lifecycle.py."""

ILLEGAL = [pair for pair in itertools.product(State, Event) if pair not in EXPECTED]


def events_from(state: State) -> set[Event]:
    return {event for (source, event) in TRANSITIONS if source is state}


def reachable_from(state: State) -> set[State]:
    """Every state some sequence of legal moves leads to from `state` (itself included)."""
    seen = {state}
    frontier = [state]
    for _ in range(len(State)):  # bounded: each round adds at least one state or stops
        following = {TRANSITIONS[(s, e)] for s in frontier for e in Event if (s, e) in TRANSITIONS}
        frontier = list(following - seen)
        if not frontier:
            break
        seen |= following
    return seen


def test_table_is_exactly_the_expected_moves() -> None:
    """No move was added, dropped or redirected: the lifecycle users rely on is the documented one."""
    assert dict(TRANSITIONS) == EXPECTED


@pytest.mark.parametrize(("state", "event"), list(TRANSITIONS), ids=lambda v: str(v))
def test_every_listed_move_advances_to_its_target(state: State, event: Event) -> None:
    """Each move the table lists is taken by `advance` and lands where the table says."""
    assert advance(state, event) is TRANSITIONS[(state, event)]


@pytest.mark.parametrize(("state", "event", "target"), [(s, e, t) for (s, e), t in EXPECTED.items()],
                         ids=lambda v: str(v))
def test_expected_moves(state: State, event: Event, target: State) -> None:
    """The important moves, spelled out: accepted -> delivered, refused -> refused, a transient
    failure back to the queue, an unknown outcome held or retried, operator retry, end by the
    client or by expiry."""
    assert advance(state, event) is target


@pytest.mark.parametrize(("state", "event"), ILLEGAL, ids=lambda v: str(v))
def test_every_other_move_is_illegal_and_changes_nothing(state: State, event: Event) -> None:
    """A move the table does not list raises IllegalTransition naming the state and the event,
    and leaves the table as it was (no entry created by the lookup)."""
    before = dict(TRANSITIONS)
    with pytest.raises(IllegalTransition) as caught:
        advance(state, event)
    assert caught.value.state is state
    assert caught.value.event is event
    assert str(state) in str(caught.value) and str(event) in str(caught.value)
    assert not isinstance(caught.value, KeyError)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert dict(TRANSITIONS) == before
    assert (state, event) not in TRANSITIONS


def test_illegal_moves_cover_the_rest_of_the_product() -> None:
    """Every (state, event) pair is either a legal move or an illegal one: none is forgotten."""
    assert len(ILLEGAL) + len(EXPECTED) == len(State) * len(Event)
    assert len(EXPECTED) == 20


def test_state_sets() -> None:
    """FINAL holds the states with a recorded legacy answer, GONE the ones clients no longer see,
    AWAITING_DELIVERY the ones the outbox holds; the three do not overlap."""
    assert frozenset({S.DELIVERED, S.REFUSED}) == FINAL
    assert frozenset({S.TERMINATED, S.EXPIRED}) == GONE
    assert frozenset({S.COMPLETE, S.DELIVERING}) == AWAITING_DELIVERY
    assert not FINAL & GONE and not FINAL & AWAITING_DELIVERY and not GONE & AWAITING_DELIVERY


@pytest.mark.parametrize("event", [E.TERMINATE, E.EXPIRE])
def test_a_running_delivery_can_be_neither_terminated_nor_expired(event: Event) -> None:
    """While the legacy server may be receiving the file, a DELETE or the sweeper cannot end the
    upload (its outcome is not known yet)."""
    with pytest.raises(IllegalTransition):
        advance(S.DELIVERING, event)


@pytest.mark.parametrize("state", sorted(FINAL))
def test_delivered_and_refused_only_end(state: State) -> None:
    """A delivered or refused upload takes no move but terminate/expire: never a second delivery."""
    assert events_from(state) == {E.TERMINATE, E.EXPIRE}
    assert reachable_from(state) == {state} | GONE
    assert S.DELIVERING not in reachable_from(state)


@pytest.mark.parametrize("state", sorted(GONE))
def test_terminated_and_expired_are_dead_ends(state: State) -> None:
    """A terminated or expired upload takes no move at all, not even a second terminate/expire."""
    assert events_from(state) == set()
    for event in Event:
        with pytest.raises(IllegalTransition):
            advance(state, event)


def test_failed_leaves_only_by_retry_terminate_or_expire() -> None:
    """A held (FAILED) upload is not delivered again unless an operator retries it, which
    re-queues it; otherwise it can only be ended."""
    assert events_from(S.FAILED) == {E.RETRY, E.TERMINATE, E.EXPIRE}
    assert advance(S.FAILED, E.RETRY) is S.COMPLETE


def test_delivered_is_entered_only_by_an_accepted_delivery_or_a_duplicate() -> None:
    """The only ways to 'delivered' are a 2xx answer or the same bytes already delivered."""
    into = {pair for pair, target in TRANSITIONS.items() if target is S.DELIVERED}
    assert into == {(S.DELIVERING, E.ACCEPTED), (S.RECEIVING, E.DUPLICATE)}


def test_a_delivery_attempt_starts_only_from_complete() -> None:
    """Only a complete, queued upload is sent to the legacy server."""
    into = {pair for pair, target in TRANSITIONS.items() if target is S.DELIVERING}
    assert into == {(S.COMPLETE, E.ATTEMPT)}


def test_every_state_is_reachable_from_receiving() -> None:
    """The table has no state an upload could never be in."""
    assert reachable_from(S.RECEIVING) == set(State)


def test_endable_states_are_all_but_delivering_and_gone() -> None:
    """Terminate and expire are accepted from exactly the states a client or the sweeper may end."""
    assert {s for (s, e) in TRANSITIONS if e is E.TERMINATE} == set(ENDABLE)
    assert set(ENDABLE) == set(State) - GONE - {S.DELIVERING}


def test_an_upload_waiting_for_delivery_never_expires() -> None:
    """A complete upload queued while the legacy server is down, or one being delivered, is
    not removed by the sweeper however long the outage: only a client or give-up ends it."""
    assert {s for (s, e) in TRANSITIONS if e is E.EXPIRE} == set(ENDABLE) - {S.COMPLETE}
    for state in AWAITING_DELIVERY:
        with pytest.raises(IllegalTransition):
            advance(state, E.EXPIRE)


# --- Upload properties derived from state ------------------------------------------------------

BASE = Upload(id="u1", protocol="test", owner="me", length=10)


@pytest.mark.parametrize("state", list(State))
def test_upload_state_properties(state: State) -> None:
    """`delivered` is true only with a recorded final answer, `gone` only once terminated or
    expired, `receiving` only while bytes may still arrive."""
    upload = replace(BASE, state=state)
    assert upload.delivered is (state in (S.DELIVERED, S.REFUSED))
    assert upload.gone is (state in (S.TERMINATED, S.EXPIRED))
    assert upload.receiving is (state is S.RECEIVING)


def test_expires_is_updated_plus_expires_after() -> None:
    """An upload expires `expires_after` seconds after it was last active."""
    upload = replace(BASE, updated=1000.5, expires_after=60)
    assert upload.expires == 1060.5
    assert replace(upload, updated=2000.0).expires == 2060.0


def test_zero_expires_after_means_never() -> None:
    """expires_after 0 means the upload never expires, however old it is."""
    assert replace(BASE, updated=1000.0, expires_after=0).expires is None
    assert replace(BASE, updated=0.0, expires_after=0).expires is None


def test_complete_needs_a_known_length() -> None:
    """An upload is complete once every byte of a known length is stored; never while the
    length is deferred."""
    assert not replace(BASE, length=None, offset=50).complete
    assert not replace(BASE, offset=9).complete
    assert replace(BASE, offset=10).complete
    assert replace(BASE, length=0, offset=0).complete
