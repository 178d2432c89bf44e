"""Pure tests of the byteranges decoders and module: bytes in, range starts and data out."""

from __future__ import annotations

import pytest

from shim import commands as c
from shim.config import ByterangesConfig
from shim.errors import ShimError
from shim.model import Request
from shim.protocols.byteranges import Byteranges, MessageDecoder, MultipartDecoder

DATA = bytes(range(256)) * 4


def part(start: int, end: int, total: int | str = len(DATA), extra: str = "") -> bytes:
    return f"Content-Range: bytes {start}-{end}/{total}\r\n{extra}\r\n".encode() + DATA[start:end + 1]


def multipart(*parts: bytes, boundary: bytes = b"B0UND") -> bytes:
    body = b"preamble\r\n"
    for one in parts:
        body += b"--" + boundary + b"\r\n" + one + b"\r\n"
    return body + b"--" + boundary + b"--\r\nepilogue"


def decode(decoder: c.BodyDecoder, body: bytes, piece: int) -> list[tuple[int, int, bytes]]:
    """Feed `body` in pieces of `piece` bytes; collect (start, end, data) per range."""
    ranges: list[tuple[int, int, bytes]] = []
    for at in range(0, len(body), piece):
        for event in decoder.feed(body[at:at + piece]):
            if isinstance(event, c.RangeStart):
                assert event.range.start is not None and event.range.end is not None
                ranges.append((event.range.start, event.range.end, b""))
            else:
                start, end, data = ranges[-1]
                ranges[-1] = (start, end, data + event)
    decoder.end()
    return ranges


@pytest.mark.parametrize("piece", [1, 7, 100, 10_000])
def test_message_byteranges_in_any_split(piece: int) -> None:
    body = part(10, 499, extra="Content-Type: application/octet-stream\r\n")
    assert decode(MessageDecoder(), body, piece) == [(10, 499, DATA[10:500])]


@pytest.mark.parametrize("piece", [1, 5, 64, 10_000])
def test_multipart_byteranges_in_any_split(piece: int) -> None:
    body = multipart(part(0, 99), part(100, 599), part(600, 1023))
    ranges = decode(MultipartDecoder(b"B0UND"), body, piece)
    assert [(s, e) for s, e, _ in ranges] == [(0, 99), (100, 599), (600, 1023)]
    assert b"".join(data for _, _, data in ranges) == DATA


def test_a_part_whose_data_contains_the_boundary_is_still_read_by_length() -> None:
    tricky = b"\r\n--B0UND\r\n" + b"x" * 21  # 32 bytes
    body = multipart(b"Content-Range: bytes 0-31/32\r\n\r\n" + tricky)
    assert decode(MultipartDecoder(b"B0UND"), body, 3) == [(0, 31, tricky)]


@pytest.mark.parametrize("body", [
    b"Content-Type: text/plain\r\n\r\nabc",                     # no Content-Range
    b"Content-Range: bytes */1024\r\n\r\n",                     # an inquiry is no range
    b"Content-Range: bytes 0-9/1024\r\nbroken line\r\n\r\n" + DATA[:10],
    b"Content-Range: bytes 9-0/1024\r\n\r\n",
    part(0, 9) + b"trailing",
])
def test_malformed_message_bodies_are_400(body: bytes) -> None:
    decoder = MessageDecoder()
    with pytest.raises(ShimError) as caught:
        decoder.feed(body)
        decoder.end()
    assert caught.value.status in (400, 416)


@pytest.mark.parametrize("body", [
    multipart(part(100, 199), part(0, 99)),                     # out of order
    multipart(part(0, 199), part(100, 299)),                    # overlapping
    multipart(part(0, 99) + b"extra"),                          # longer than its range
    multipart(b"Content-Type: text/plain\r\n\r\nx"),            # no Content-Range
    b"--B0UND\r\n" + part(0, 9) + b"\r\n--B0UND",               # never closed
    b"no boundary at all" * 2000,
    b"--B0UND junk\r\n" + part(0, 9),                           # malformed boundary line
    b"--B0UND--\r\n",                                           # no part
])
def test_malformed_multipart_bodies_are_400(body: bytes) -> None:
    decoder = MultipartDecoder(b"B0UND")
    with pytest.raises(ShimError) as caught:
        decoder.feed(body)
        decoder.end()
    assert caught.value.status == 400


def test_a_message_cut_off_inside_the_range_is_not_complete() -> None:
    decoder = MessageDecoder()
    decoder.feed(part(0, 99)[:-10])
    with pytest.raises(ShimError):
        decoder.end()


def req(method: str, *fields: tuple[str, str]) -> Request:
    return Request(method, "/doc.bin", "v=2", tuple(fields), 10)


def test_the_module_claims_byterange_patches_and_heads_only() -> None:
    proto = Byteranges(ByterangesConfig())
    command = proto.parse(req("PATCH", ("Content-Type", "message/byteranges"),
                              ("If-None-Match", "*"), ("Authorization", "a")), "alice")
    assert isinstance(command, c.WriteSegments) and command.if_none_match
    assert command.key == "byteranges:alice:/doc.bin?v=2"
    assert command.new.target is not None and command.new.target.method == "PUT"
    assert ("Authorization", "a") in command.new.target.headers
    head = proto.parse(req("HEAD"), "alice")
    assert head == c.Inspect(None, "alice", key="byteranges:alice:/doc.bin?v=2", pass_if_missing=True)
    assert proto.parse(req("PATCH", ("Content-Type", "application/json")), "") is None
    assert proto.parse(req("PUT", ("Content-Type", "message/byteranges")), "") is None
    no_boundary = proto.parse(req("PATCH", ("Content-Type", "multipart/byteranges")), "")
    assert isinstance(no_boundary, c.Refuse) and no_boundary.error.status == 400



