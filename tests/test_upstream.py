"""Upstream.send against a real socket on 127.0.0.1: how the end of a delivery is told apart.

"Before the whole file was sent" (Unreachable: safe to send again) and "after it" (OutcomeUnknown:
the legacy server may have the file) must follow from what was sent, not from which of two
tasks the event loop happened to run first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shim.model import Answer, Target
from shim.store import FileRange
from shim.upstream import Origin, OutcomeUnknown, Unreachable, Upstream


class WatchedUpstream(Upstream):
    """An Upstream that says when its answer reader has ended (by an answer or a close)."""

    def __init__(self, origin: Origin) -> None:
        super().__init__(origin, timeout=5.0)
        self.answer_ended = asyncio.Event()

    async def _read_answer(self, *args: object) -> Answer:
        try:
            return await super()._read_answer(*args)  # type: ignore[arg-type]
        finally:
            self.answer_ended.set()


async def close_after(length: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
    """Read a head and `length` body bytes, then close without an answer."""
    await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(length)
    writer.close()


async def send_then(data_file: Path, wait_for_close: bool, cut: int | None = None) -> None:
    """Deliver `data_file` to a server that closes after reading it (or after `cut` bytes);
    with `wait_for_close` the body's end waits until the answer reader saw the close, the
    order in which a fast legacy server's close arrives."""
    length = data_file.stat().st_size
    server = await asyncio.start_server(
        lambda r, w: close_after(length if cut is None else cut, r, w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = WatchedUpstream(Origin("http", "127.0.0.1", port))

    async def body() -> AsyncIterator[bytes | FileRange]:
        with data_file.open("rb") as file:
            if cut is None:
                yield FileRange(file, 0, length)
            else:
                yield FileRange(file, 0, cut)
                await upstream.answer_ended.wait()
                yield FileRange(file, cut, length - cut)
                return
        if wait_for_close:
            await upstream.answer_ended.wait()

    async with server:
        await upstream.send(Target("PUT", "/file"), length, body())


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.write_bytes(bytes(range(256)) * 256)
    return path


@pytest.mark.parametrize("wait_for_close", [True, False])
def test_a_close_after_the_whole_file_is_outcome_unknown(data_file: Path,
                                                         wait_for_close: bool) -> None:
    """The whole file went out and the server closed without an answer: it may have kept the
    file, so the outcome is unknown, even when the close is seen before the sending ends."""
    with pytest.raises(OutcomeUnknown, match="the whole file was sent"):
        asyncio.run(send_then(data_file, wait_for_close))


def test_a_close_before_the_whole_file_is_unreachable(data_file: Path) -> None:
    """The server closed having read part of the file: it cannot have kept the file, so the
    delivery may be sent again."""
    with pytest.raises(Unreachable):
        asyncio.run(send_then(data_file, wait_for_close=False, cut=1000))
