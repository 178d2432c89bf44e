"""The states of an upload and the only moves between them, as one table.

Modelled on h11's `_state.py`: no I/O, no clock, no store. Every change of an upload's state
goes through `advance`, which raises `IllegalTransition` for a move the table does not list,
so an impossible state (delivered twice, terminated while a delivery runs) cannot be written.

    RECEIVING --complete--> COMPLETE --attempt--> DELIVERING --accepted--> DELIVERED
        |                     ^   |                    |-------refused---> REFUSED
        |                     |   |                    |-------unknown---> FAILED (on_unknown: hold)
        |                     +---+---transient--------+ (backoff; also on_unknown: retry)
        |                         +---give_up--------------------------->  FAILED
        +--terminate--> TERMINATED            (from any state but DELIVERING)
        +--expire-----> EXPIRED               (not while queued or being delivered)
    RECEIVING --duplicate--> DELIVERED  (complete, with the bytes of the file delivered just
                                         before under the same key: its answer is reused)
    FAILED --retry--> COMPLETE          (an operator re-queues it)
    A crash in DELIVERING leaves the outcome unknown: the worker that finds it moves it by
    unknown-hold or unknown-retry, as `delivery.on_unknown` says.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    RECEIVING = "receiving"
    """Bytes are still arriving; the length may not be known yet."""
    COMPLETE = "complete"
    """Every byte is stored; queued in the outbox for delivery."""
    DELIVERING = "delivering"
    """One attempt is sending the file to the legacy server."""
    DELIVERED = "delivered"
    """The legacy server accepted the file (2xx); its answer is recorded."""
    REFUSED = "refused"
    """The legacy server gave a final answer other than 2xx; recorded and replayed."""
    FAILED = "failed"
    """No delivery will be attempted again without an operator: gave up, or outcome unknown."""
    TERMINATED = "terminated"
    """The client cancelled it; its bytes are gone."""
    EXPIRED = "expired"
    """Unused for longer than its expiration; its bytes are gone."""


class Event(StrEnum):
    COMPLETE = "complete"
    ATTEMPT = "attempt"
    ACCEPTED = "accepted"
    REFUSED = "refused"
    TRANSIENT = "transient"
    """No answer and nothing the legacy server could have acted on, or 502/503/504."""
    UNKNOWN_RETRY = "unknown-retry"
    """The outcome is unknown and `delivery.on_unknown` is `retry`."""
    UNKNOWN_HOLD = "unknown-hold"
    """The outcome is unknown and `delivery.on_unknown` is `hold`."""
    GIVE_UP = "give-up"
    DUPLICATE = "duplicate"
    RETRY = "retry"
    TERMINATE = "terminate"
    EXPIRE = "expire"


class IllegalTransition(Exception):
    """A move the lifecycle does not allow; the record is left as it was."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"an upload that is {state} cannot take {event}")
        self.state = state
        self.event = event


_ENDABLE = (State.RECEIVING, State.COMPLETE, State.DELIVERED, State.REFUSED, State.FAILED)
"""States a client may end: all but DELIVERING, whose outcome is not known yet and whose
record the delivery worker is about to write."""

_EXPIRABLE = (State.RECEIVING, State.DELIVERED, State.REFUSED, State.FAILED)
"""States the sweeper may end: not COMPLETE either, since a file waiting for the legacy
server to come back is what the outbox promised to deliver."""

TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.RECEIVING, Event.COMPLETE): State.COMPLETE,
    (State.RECEIVING, Event.DUPLICATE): State.DELIVERED,
    (State.COMPLETE, Event.ATTEMPT): State.DELIVERING,
    (State.COMPLETE, Event.GIVE_UP): State.FAILED,
    (State.DELIVERING, Event.ACCEPTED): State.DELIVERED,
    (State.DELIVERING, Event.REFUSED): State.REFUSED,
    (State.DELIVERING, Event.TRANSIENT): State.COMPLETE,
    (State.DELIVERING, Event.UNKNOWN_RETRY): State.COMPLETE,
    (State.DELIVERING, Event.UNKNOWN_HOLD): State.FAILED,
    (State.DELIVERING, Event.GIVE_UP): State.FAILED,
    (State.FAILED, Event.RETRY): State.COMPLETE,
    **{(state, Event.TERMINATE): State.TERMINATED for state in _ENDABLE},
    **{(state, Event.EXPIRE): State.EXPIRED for state in _EXPIRABLE},
}

FINAL = frozenset({State.DELIVERED, State.REFUSED})
"""States with a recorded answer of the legacy server, replayed to every later request."""

GONE = frozenset({State.TERMINATED, State.EXPIRED})
"""States of an upload that no longer exists for clients."""

AWAITING_DELIVERY = frozenset({State.COMPLETE, State.DELIVERING})
"""States in which the outbox holds the upload."""


def advance(state: State, event: Event) -> State:
    """The state after `event`; IllegalTransition if the table has no such move."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None
