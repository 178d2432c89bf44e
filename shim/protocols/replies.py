"""Reply shapes several protocols share. No protocol logic: just how a reply is built."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shim.errors import ShimError
from shim.model import Answer, HeaderList, Reply
from shim.targets import connection_fields
from shim.wire import as_bytes

if TYPE_CHECKING:
    from shim.commands import Outcome

def legacy(answer: Answer, extra: HeaderList = (), status: int | None = None,
           reason: str | None = None) -> Reply:
    """The legacy server's own answer (status, headers, body) as the client's answer, with
    the protocol's own fields added; framing fields are mitmproxy's to set."""
    hop_by_hop = connection_fields(answer.headers)
    headers = tuple((k, v) for k, v in answer.headers if k.lower() not in hop_by_hop)
    return Reply(status or answer.status, (*headers, *extra), answer.body, reason or answer.reason)


def refusal(error: ShimError, extra: HeaderList = ()) -> Reply:
    """A refusal as plain text, with the fields the error carries (Retry-After, ...)."""
    return text(error.status, error.message, (*error.fields, *extra))


def text(status: int, message: str, extra: HeaderList = (), reason: str | None = None) -> Reply:
    return Reply(status, (("Content-Type", "text/plain; charset=utf-8"), *extra),
                 as_bytes(f"{message}\n"), reason)


def final(outcome: Outcome, extra: HeaderList = (), accepted_status: int | None = None) -> Reply | None:
    """The reply to a request that finished the file, or None if it did not: the status of
    the delivery while there is no answer (503 + Retry-After pending, 502 failed, 507 not
    recorded), else the legacy server's answer, recorded and replayed.
    `accepted_status` replaces a 2xx status (Google sessions want 200)."""
    delivery = outcome.delivery
    if delivery is not None and delivery.answer is None:
        return text(delivery.status, delivery.message, (*extra, *delivery.fields))
    answer = delivery.answer if delivery is not None else (
        outcome.upload.answer if outcome.upload is not None else None)
    if answer is None:
        return None
    if accepted_status is not None and answer.accepted:
        return legacy(answer, extra, status=accepted_status, reason="OK")
    return legacy(answer, extra)
