"""Pure tests of the two small URL-named protocols: tus on the target URL and seed 001."""

from __future__ import annotations

import pytest

from shim import commands as c
from shim.config import Seed001Config, TusTargetConfig
from shim.engine import Delivery
from shim.model import Answer, Request, Upload
from shim.protocols.seed001 import Seed001
from shim.protocols.tus_target import TusTarget

TUS = ("Tus-Resumable", "1.0.0")


def req(method: str, path: str, query: str = "", *fields: tuple[str, str],
        body: int | None = 0) -> Request:
    return Request(method, path, query, tuple(fields), body)


def target() -> TusTarget:
    return TusTarget(TusTargetConfig(), "/files/")


def test_tus_on_the_target_url_creates_with_put_and_names_uploads_by_url() -> None:
    put = target().parse(req("PUT", "/docs/a.txt", "", TUS, ("Upload-Length", "30"), body=10), "o")
    assert isinstance(put, c.WriteRange)
    assert (put.start, put.total, put.restart, put.key) == (0, 30, True, "tus-target:o:/docs/a.txt")
    assert put.new is not None and put.new.target is not None
    assert (put.new.target.method, put.new.target.path) == ("PUT", "/docs/a.txt")
    head = target().parse(req("HEAD", "/docs/a.txt", "", TUS), "o")
    assert head == c.Inspect(None, "o", key="tus-target:o:/docs/a.txt")
    patch = target().parse(req("PATCH", "/docs/a.txt", "", TUS, ("Upload-Offset", "10"),
                               ("Content-Type", "application/offset+octet-stream"), body=5), "o")
    assert isinstance(patch, c.Append) and (patch.key, patch.offset) == ("tus-target:o:/docs/a.txt", 10)


@pytest.mark.parametrize("request_, status", [
    (req("PUT", "/a", "", ("Tus-Resumable", "0.2.2"), body=3), 412),
    (req("PUT", "/a", "", TUS, body=None), 400),
    (req("PATCH", "/a", "", TUS, ("Upload-Offset", "0"), body=3), 415),
    (req("PATCH", "/a", "", TUS, ("Content-Type", "application/offset+octet-stream"), body=3), 400),
])
def test_tus_on_the_target_url_refuses_bad_requests(request_: Request, status: int) -> None:
    command = target().parse(request_, "")
    assert isinstance(command, c.Refuse) and command.error.status == status


def test_tus_on_the_target_url_leaves_other_requests_alone() -> None:
    assert target().parse(req("PUT", "/a", "", body=3), "") is None  # no Tus-Resumable
    assert target().parse(req("PATCH", "/files/x", "", TUS, body=3), "") is None  # tus's own


def test_tus_on_the_target_url_answers() -> None:
    upload = Upload(id="u", protocol="tus-target", owner="", length=30, offset=10)
    head = target().render(req("HEAD", "/a"), c.Inspect(None, ""), c.Outcome(upload, 10))
    assert head.status == 200 and ("Upload-Offset", "10") in head.headers
    assert ("Upload-Length", "30") in head.headers
    answer = Answer(201, "Created", (), b"ok")
    final = target().render(req("PATCH", "/a"), c.Append(None, "", 10),
                            c.Outcome(upload, 30, Delivery(answer)))
    assert (final.status, final.body) == (201, b"ok") and ("Upload-Offset", "30") in final.headers


def seed(**switches: bool) -> Seed001:
    return Seed001(Seed001Config(**switches))


def test_query_range_writes_the_range_and_drops_the_parameter() -> None:
    command = seed(query_range=True).parse(req("PUT", "/img.jpg", "v=1&range=0-999/5000",
                                               body=1000), "o")
    assert isinstance(command, c.WriteRange)
    assert (command.start, command.total, command.key) == (0, 5000, "seed001:o:/img.jpg?v=1")
    assert command.new is not None and command.new.target is not None
    assert command.new.target.path == "/img.jpg?v=1"


def test_expect_range_writes_the_range_and_never_forwards_range_fields() -> None:
    command = seed(expect_range=True).parse(req("PUT", "/doc.txt", "", ("Expect", "Range"),
                                                ("Range", "bytes 0-99/100"), body=100), "")
    assert isinstance(command, c.WriteRange) and (command.start, command.total) == (0, 100)
    assert command.new is not None and command.new.target is not None
    names = {k.lower() for k, _ in command.new.target.headers}
    assert not names & {"range", "expect"}


@pytest.mark.parametrize("switches, request_", [
    ({}, req("PUT", "/a", "range=0-9/10", body=10)),
    ({"query_range": True}, req("PUT", "/a", "", ("Expect", "Range"), ("Range", "bytes 0-9/10"),
                                body=10)),
    ({"expect_range": True}, req("PUT", "/a", "", ("Range", "bytes 0-9/10"), body=10)),
    ({"query_range": True}, req("POST", "/a", "range=0-9/10", body=10)),
])
def test_seed001_variants_are_off_unless_switched_on(switches: dict[str, bool],
                                                      request_: Request) -> None:
    assert seed(**switches).parse(request_, "") is None


@pytest.mark.parametrize("query, body, status", [
    ("range=0-9", 10, 400), ("range=9-0/10", 10, 400), ("range=0-9/10", 5, 400),
    ("range=abc", 3, 400), ("range=0-10/10", 11, 416),
])
def test_malformed_query_ranges_are_refused(query: str, body: int, status: int) -> None:
    command = seed(query_range=True).parse(req("PUT", "/a", query, body=body), "")
    assert isinstance(command, c.Refuse) and command.error.status == status


def test_seed001_answers_202_with_the_stored_range_until_complete() -> None:
    upload = Upload(id="u", protocol="seed001", owner="", length=100, offset=40)
    reply = seed(query_range=True).render(req("PUT", "/a"), c.WriteRange(""), c.Outcome(upload, 40))
    assert (reply.status, dict(reply.headers)["Range"]) == (202, "bytes=0-39")
