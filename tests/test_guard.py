"""The guard: partial uploads no protocol took are refused, everything else passes."""

from __future__ import annotations

import pytest

from shim import commands as c
from shim.errors import ShimError
from shim.model import Reply, Request
from shim.protocols.guard import CONTENT_RANGE, TUS_LENGTH, UPLOAD_OFFSET, Guard, foreign
from shim.protocols.routing import route


def req(method: str, *fields: tuple[str, str]) -> Request:
    return Request(method, "/anything", "", tuple(fields), 10)


PARTIAL = [
    (req("PATCH", ("Upload-Offset", "0")), "Upload-Offset"),
    (req("POST", ("Upload-Complete", "?0")), "Upload-Complete: ?0"),
    (req("PUT", ("Upload-Complete", "?0;x=1")), "Upload-Complete: ?0"),
    (req("POST", ("Upload-Incomplete", "?1")), "Upload-Complete: ?0"),
    (req("PUT", ("Content-Range", "bytes 0-9/10")), "Content-Range"),
    (req("POST", ("Content-Range", "bytes 10-19/*")), "Content-Range"),
    (req("PATCH", ("Content-Range", "bytes 0-9/10")), "Content-Range"),
    (req("PUT", ("Tus-Resumable", "1.0.0"), ("Upload-Length", "10")), "Tus-Resumable"),
    (req("POST", ("Tus-Resumable", "1.0.0"), ("Upload-Defer-Length", "1")), "Tus-Resumable"),
    (req("PATCH", ("Content-Type", "message/byteranges")), "byteranges"),
    (req("PATCH", ("Content-Type", "Multipart/Byteranges; boundary=x")), "byteranges"),
    (Request("PUT", "/f", "a=1&range=0-9/10", (), 10), "range="),
    (Request("PUT", "/f", "range=*/*", (), 0), "range="),
    (req("PUT", ("Expect", "100-continue, Range"), ("Range", "bytes 0-9/10")), "Expect: Range"),
    (req("PUT", ("Expect", "100-continue,range")), "Expect: Range"),
    (req("GET", ("X-HTTP-Method-Override", "put"), ("Content-Range", "bytes 0-9/10")), "Content-Range"),
    (req("POST", ("X-HTTP-Method-Override", "PATCH"), ("Content-Type", "message/byteranges")),
     "byteranges"),
    (req("DELETE", ("X-HTTP-Method-Override", "PUT"), ("Upload-Complete", "?0")), "Upload-Complete"),
    # the request's own method counts too: a legacy server that ignores the override sees a
    # partial PUT or PATCH
    (req("PUT", ("X-HTTP-Method-Override", "GET"), ("Content-Range", "bytes 0-9/10")),
     "Content-Range"),
    (req("PATCH", ("X-HTTP-Method-Override", "DELETE"), ("Content-Type", "message/byteranges")),
     "byteranges"),
]


@pytest.mark.parametrize(("request_", "named"), PARTIAL)
def test_partial_uploads_are_refused_naming_the_field_not_forwarded(
        request_: Request, named: str) -> None:
    command = Guard().parse(request_, "")
    assert isinstance(command, c.Refuse) and command.error.status == 400
    reply = Guard().render(request_, command, c.Outcome(error=command.error))
    assert reply.status == 400 and b"nothing was forwarded" in reply.body
    assert named.encode() in reply.body and command.error.code == "not-resumable-here"


@pytest.mark.parametrize(("request_", "named"), PARTIAL)
def test_pass_through_lets_an_operator_forward_them(request_: Request, named: str) -> None:
    assert Guard(pass_through=True).parse(request_, "") is None


@pytest.mark.parametrize("request_", [
    req("POST", ("Upload-Complete", "?1")),      # a whole file: URLSession's ordinary upload
    req("PATCH", ("Content-Type", "application/json")),
    req("GET", ("Upload-Offset", "3")),
    req("GET", ("Content-Range", "bytes 0-9/10")),
    req("HEAD", ("Tus-Resumable", "1.0.0")),
    req("PUT", ("Expect", "100-continue")),
    Request("PUT", "/f", "ranges=0-9/10&orange=0-9/10", (), 10),
    Request("PUT", "/f", "range=yes", (), 10),  # the application's own parameter
])
def test_everything_else_passes_through(request_: Request) -> None:
    assert Guard().parse(request_, "") is None


def test_a_protocol_must_handle_every_upload_field_of_a_request_it_takes() -> None:
    """tus on the target URL takes a PUT with Tus-Resumable; with a Content-Range as well it
    would store a chunk as the whole file, so it is refused, naming the field."""
    put = req("PUT", ("Tus-Resumable", "1.0.0"), ("Upload-Length", "100"),
              ("Content-Range", "bytes 10-14/100"))
    refusal = foreign(put, frozenset({UPLOAD_OFFSET, TUS_LENGTH}))
    assert refusal is not None and refusal.status == 400 and "Content-Range" in refusal.message
    assert foreign(put, frozenset({CONTENT_RANGE, TUS_LENGTH})) is None
    assert refusal.code == "foreign-fields"


# --- routing: which protocol takes a request --------------------------------------------------


class _Claims:
    """A protocol that takes every request with `command` and handles `understands`."""

    def __init__(self, name: str, command: c.Command | None,
                 understands: frozenset[str] = frozenset()) -> None:
        self.name = name
        self.command = command
        self.understands = understands

    def parse(self, request: Request, owner: str) -> c.Command | None:
        self.asked = (request, owner)
        return self.command

    def render(self, request: Request, command: c.Command, outcome: c.Outcome) -> Reply:
        return Reply(204)


OPEN = c.Inspect("some-id", "")


def test_the_first_protocol_that_claims_a_request_takes_it() -> None:
    first, second, third = _Claims("a", None), _Claims("b", OPEN), _Claims("c", OPEN)
    get = req("GET")
    assert route([first, second, third], get, "alice") == (second, OPEN)
    assert first.asked == second.asked == (get, "alice") and not hasattr(third, "asked")
    assert route([first], req("GET"), "") is None


def test_a_taken_request_with_a_field_its_protocol_does_not_handle_is_refused() -> None:
    put = req("PUT", ("Content-Range", "bytes 0-1/2"))
    protocol, command = route([_Claims("a", OPEN, frozenset({UPLOAD_OFFSET}))], put, "") or (None, None)
    assert protocol is not None and isinstance(command, c.Refuse)
    assert command.error.status == 400 and "Content-Range" in command.error.message
    handled = route([_Claims("a", OPEN, frozenset({CONTENT_RANGE}))], put, "")
    assert handled is not None and handled[1] is OPEN


def test_a_bad_host_refuses_what_a_protocol_would_store_but_not_what_passes_through() -> None:
    routed = route([_Claims("a", OPEN)], req("GET"), "", host_ok=False)
    assert routed is not None and isinstance(routed[1], c.Refuse)
    assert "Host" in routed[1].error.message and routed[1].error.status == 400
    forward = c.Forward("DAV", "resumable-upload")  # passes through: the legacy server's
    webdav = _Claims("a", forward)
    assert route([webdav], req("OPTIONS"), "", host_ok=False) == (webdav, forward)
    refusal = c.Refuse(ShimError("x", "y", 409))
    routed = route([_Claims("a", refusal)], req("PUT", ("Content-Range", "bytes 0-1/2")), "",
                   host_ok=False)
    assert routed is not None and routed[1] is refusal  # the protocol's own refusal stands


@pytest.mark.parametrize("path", ["/only/./f", "/only/../f", "/only/%2e%2E/f", "/a/.", "/a/.."])
def test_a_claimed_request_with_a_dot_segment_is_refused(path: str) -> None:
    """The shim delivers to the path as written; a `.`/`..` segment would let the client
    steer where the legacy server stores the file."""
    claims = _Claims("a", OPEN)
    routed = route([claims], Request("PUT", path, "", (), 5), "")
    assert routed is not None and isinstance(routed[1], c.Refuse)
    assert "dot segment" in routed[1].error.message
    assert route([claims], Request("PUT", "/only/..f/.x", "", (), 5), "") == (claims, OPEN)
