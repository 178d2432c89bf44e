"""The guard: partial uploads no protocol took are refused, everything else passes."""

from __future__ import annotations

import pytest

from shim import commands as c
from shim.model import Request
from shim.protocols.guard import Guard


def req(method: str, *fields: tuple[str, str]) -> Request:
    return Request(method, "/anything", "", tuple(fields), 10)


@pytest.mark.parametrize("request_", [
    req("PATCH", ("Upload-Offset", "0")),
    req("POST", ("Upload-Complete", "?0")),
    req("PUT", ("Upload-Complete", "?0;x=1")),
    req("POST", ("Upload-Incomplete", "?1")),
])
def test_partial_uploads_are_refused_not_forwarded(request_: Request) -> None:
    command = Guard().parse(request_, "")
    assert isinstance(command, c.Refuse) and command.error.status == 400
    reply = Guard().render(request_, command, c.Outcome(error=command.error))
    assert reply.status == 400 and b"nothing was forwarded" in reply.body


@pytest.mark.parametrize("request_", [
    req("POST", ("Upload-Complete", "?1")),      # a whole file: URLSession's ordinary upload
    req("PATCH", ("Content-Type", "application/json")),
    req("PUT", ("Content-Range", "bytes 0-9/10")),  # paths restricted on purpose by config
    req("GET", ("Upload-Offset", "3")),
])
def test_everything_else_passes_through(request_: Request) -> None:
    assert Guard().parse(request_, "") is None
