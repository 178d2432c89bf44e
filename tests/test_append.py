"""One request body being written (shim/append.py), on a real file: what it writes, what
it compares, and what makes it fail. No engine, no store: the pieces the engine composes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim import errors
from shim.append import Append, Checksum
from shim.model import Upload
from shim.store import ChunkWriter

UPLOAD = Upload(id="u1", protocol="test", owner="me", length=100)


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    path = tmp_path / "data"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    try:
        yield path, fd
    finally:
        os.close(fd)


def body(fd: int, start: int = 0, room: int | None = None,
         checksum: Checksum | None = None) -> Append:
    return Append(UPLOAD, ChunkWriter(fd, start), room, checksum, holder="h")


def test_a_fresh_append_writes_every_byte_it_is_fed(data_file: tuple[Path, int]) -> None:
    path, fd = data_file
    append = body(fd)
    assert (append.compare, append.replaces, append.ended, append.verify_only) == (0, False, False, False)
    assert append.received == 0 and append.held == [] and append.interrupt is None
    assert append.digests == {} and append.on_rewind is None
    for piece in (b"abc", b"", b"de"):
        append.feed(piece)
    assert path.read_bytes() == b"abcde" and append.writer.written == 5
    assert append.received == 5 and append.failure is None


def test_nothing_is_written_once_it_ended_or_failed(data_file: tuple[Path, int]) -> None:
    path, fd = data_file
    ended = body(fd)
    ended.ended = True
    ended.feed(b"late")
    assert path.read_bytes() == b"" and ended.received == 0
    failed = body(fd)
    failed.feed(b"ok")
    failed.seek(5)  # past the end: a gap
    failed.feed(b"more")
    assert path.read_bytes() == b"ok" and failed.failure is not None


def test_a_body_past_its_room_fails_as_too_large_and_writes_no_more(
        data_file: tuple[Path, int]) -> None:
    path, fd = data_file
    append = body(fd, room=4)
    append.feed(b"abcd")
    assert append.failure is None
    append.feed(b"e")
    assert append.failure is not None and append.failure.status == 413
    assert "past the upload's length" in append.failure.message
    assert path.read_bytes() == b"abcd" and append.all_or_nothing


@pytest.mark.parametrize(("pieces", "ok"), [
    ([b"abc", b"de"], True),
    ([b"abcde", b"f"], False),  # longer than announced: refused as the byte arrives
    ([b"abcdef"], False),
    ([b"abcd"], False),  # shorter: refused when the body ends
    ([], False),
])
def test_a_body_must_have_the_size_its_headers_announced(
        data_file: tuple[Path, int], pieces: list[bytes], ok: bool) -> None:
    _, fd = data_file
    append = body(fd)
    append.expected = 5
    for piece in pieces:
        append.feed(piece)
    append.check_size()
    assert (append.failure is None) is ok
    if not ok:
        assert append.failure is not None and append.failure.status == 400
        assert "announced" in append.failure.message and append.all_or_nothing
    assert append.writer.written <= 5


def test_check_size_keeps_an_earlier_failure_and_ignores_bodies_without_announcement(
        data_file: tuple[Path, int]) -> None:
    _, fd = data_file
    unannounced = body(fd)
    unannounced.feed(b"xyz")
    unannounced.check_size()
    assert unannounced.failure is None
    earlier = body(fd, room=1)
    earlier.expected = 9
    earlier.feed(b"ab")
    first = earlier.failure
    earlier.check_size()
    assert first is not None and earlier.failure is first


def test_stored_bytes_are_compared_and_skipped_then_the_rest_appended(
        data_file: tuple[Path, int]) -> None:
    path, fd = data_file
    path.write_bytes(b"hello")
    append = body(fd, start=5)
    append.compare = 3  # the body starts at 2: "llo" is stored
    append.feed(b"ll")
    assert append.compare == 1 and path.read_bytes() == b"hello"
    append.feed(b"o wor")
    append.feed(b"ld")
    assert append.compare == 0 and path.read_bytes() == b"hello world"
    assert append.received == 9


def test_different_bytes_past_the_start_are_a_conflict(data_file: tuple[Path, int]) -> None:
    path, fd = data_file
    path.write_bytes(b"hello")
    append = body(fd, start=5)
    append.compare = 3
    append.feed(b"lXo!")
    assert append.failure is not None and append.failure.status == 409
    assert "differ" in append.failure.message
    assert path.read_bytes() == b"hello" and append.all_or_nothing


def test_a_body_from_0_that_differs_is_a_new_file_from_the_first_difference(
        data_file: tuple[Path, int]) -> None:
    path, fd = data_file
    path.write_bytes(b"AAAAAA")
    recorded: list[int] = []

    async def scenario() -> None:
        async def on_rewind(position: int) -> None:
            recorded.append(position)

        append = body(fd, start=6)
        append.compare, append.replaces, append.on_rewind = 6, True, on_rewind
        append.feed(b"AAX")
        append.feed(b"YZ")  # arrives while the rewind is being recorded: held, then written
        assert append.rewinding is not None
        await append.rewinding
        assert append.floor == 2 and append.compare == 0 and append.held == []

    asyncio.run(scenario())
    assert recorded == [2]
    assert path.read_bytes()[:5] == b"AAXYZ"


def test_seek_compares_a_later_range_that_overlaps_and_refuses_a_gap(
        data_file: tuple[Path, int]) -> None:
    path, fd = data_file
    append = body(fd)
    append.feed(b"0123456789")
    append.seek(7)
    assert append.compare == 3 and append.failure is None
    append.feed(b"789AB")
    assert path.read_bytes() == b"0123456789AB"
    append.seek(12)  # exactly the end: nothing to compare
    assert append.compare == 0 and append.failure is None
    append.seek(13)
    assert append.failure is not None and append.failure.status == 416
    assert "starts at 13, after the 12 bytes" in append.failure.message


def test_a_new_file_that_cannot_be_put_on_record_fails_and_writes_nothing(
        data_file: tuple[Path, int]) -> None:
    """The store refused to record the rewind (a full disk): the body fails with that
    refusal, and the stored file is untouched (never a splice of two files)."""
    path, fd = data_file
    path.write_bytes(b"AAAAAA")

    async def scenario() -> Append:
        async def on_rewind(position: int) -> None:
            raise errors.insufficient_storage("cannot record the new file")

        append = body(fd, start=6)
        append.compare, append.replaces, append.on_rewind = 6, True, on_rewind
        append.feed(b"AAXYZ")
        assert append.rewinding is not None
        await append.rewinding
        return append

    append = asyncio.run(scenario())
    assert append.failure is not None and append.failure.status == 507
    assert path.read_bytes() == b"AAAAAA"
