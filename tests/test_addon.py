"""The addon's hooks through mitmproxy's own test helpers (taddons, tflow): no sockets to
clients, a real store on disk, and the legacy server address pointing nowhere - nothing in
these tests may reach it."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from mitmproxy import exceptions, http, options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons, tflow, tutils

from shim.addon import Shim
from shim.protocols.tus import Tus

NOWHERE = "reverse:http://127.0.0.1:1"
TUS = {"Tus-Resumable": "1.0.0"}


@pytest.fixture(autouse=True)
def _in_a_folder_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mitmproxy configures an addon with the default options first: the embedded config's
    `./shim-data`, which a shim claims for its process. Each test has its own."""
    monkeypatch.chdir(tmp_path)


def reverse() -> options.Options:
    """Options as mitmdump has them when it loads the script: reverse mode already set."""
    return options.Options(mode=[NOWHERE])


@asynccontextmanager
async def running_shim(tmp_path: Path, yaml: str = "",
                       listen_host: str = "127.0.0.1") -> AsyncIterator[Shim]:
    config = tmp_path / "shim.yaml"
    config.write_text(f"storage: {{dir: {tmp_path / 'store'}, fsync: false}}\n"
                      f"admin: {{listen: '127.0.0.1:0'}}\n{yaml}")
    shim = Shim()
    with taddons.context(shim, Proxyserver(), options=reverse()) as tctx:
        tctx.configure(shim, shim_config=str(config), listen_host=listen_host)
        await shim.running()
        try:
            yield shim
        finally:
            await shim.done()


def flow(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> http.HTTPFlow:
    fields = [(k.encode(), v.encode()) for k, v in headers.items()]
    if body:
        fields.append((b"content-length", str(len(body)).encode()))
    request = tutils.treq(method=method.encode(), path=path.encode(), host="127.0.0.1", port=1,
                          headers=http.Headers(fields), content=b"")
    return tflow.tflow(req=request)


async def exchange(shim: Shim, f: http.HTTPFlow, body: bytes = b"", cut_off: bool = False) -> None:
    """Drive the hooks as mitmproxy does: body chunks through the stream callable."""
    await shim.requestheaders(f)
    if not body:
        await shim.request(f)
        return
    stream = f.request.stream
    assert callable(stream)
    for start in range(0, len(body), 4):
        assert stream(body[start:start + 4]) == []
    if cut_off:
        await shim.error(f)
        return
    stream(b"")
    await shim.request(f)
    f.response = http.Response.make(204)  # what the sink answers
    await shim.response(f)


async def create(shim: Shim, length: int) -> str:
    f = flow("POST", "/files/", {**TUS, "Upload-Length": str(length)})
    await exchange(shim, f)
    assert f.response is not None and f.response.status_code == 201
    return f.response.headers["Location"]


async def head_offset(shim: Shim, location: str) -> int:
    f = flow("HEAD", location, TUS)
    await exchange(shim, f)
    assert f.response is not None and f.response.status_code == 200
    return int(f.response.headers["Upload-Offset"])


def patch(location: str, offset: int, body: bytes) -> http.HTTPFlow:
    return flow("PATCH", location, {**TUS, "Upload-Offset": str(offset),
                                    "Content-Type": "application/offset+octet-stream"}, body)


def test_requests_no_protocol_claims_pass_through_untouched(tmp_path: Path) -> None:
    async def run() -> None:
        async with running_shim(tmp_path) as shim:
            f = flow("PUT", "/files", {"Content-Type": "text/plain", "Host": "shim.example"},
                     b"whole")  # not under /files/
            f.request.data.port = 9  # where mitmproxy aims it: the eager sink connection
            await shim.requestheaders(f)
            await shim.request(f)
            assert f.response is None and f.request.stream is True  # streamed through, not buffered
            assert (f.request.host, f.request.port, f.request.path) == ("127.0.0.1", 1, "/files")
            assert f.request.host_header == "127.0.0.1:1"  # as mitmproxy's reverse mode does
            assert f.request.headers["Content-Type"] == "text/plain"

    asyncio.run(run())


def test_a_chunk_is_written_through_the_stream_and_kept_on_a_cut_off(tmp_path: Path) -> None:
    async def run() -> None:
        async with running_shim(tmp_path) as shim:
            location = await create(shim, 100)
            f = patch(location, 0, b"x" * 30)
            await exchange(shim, f, b"x" * 30, cut_off=True)
            assert f.request.host == "127.0.0.1" and f.request.port == shim.sink.port
            assert await head_offset(shim, location) == 30
            f = patch(location, 30, b"y" * 10)
            await exchange(shim, f, b"y" * 10)
            assert f.response is not None and f.response.headers["Upload-Offset"] == "40"

    asyncio.run(run())


def test_an_exception_is_answered_500_and_never_forwarded(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Tus, request: object, owner: str) -> None:
        raise RuntimeError("bug")

    async def run() -> None:
        async with running_shim(tmp_path) as shim:
            monkeypatch.setattr(Tus, "parse", broken)
            f = flow("PATCH", "/files/abc", TUS, b"data")
            await exchange(shim, f, b"data")
            assert f.response is not None and f.response.status_code == 500
            assert f.request.port == shim.sink.port  # the body went to the sink, not upstream

    asyncio.run(run())


def test_a_full_disk_while_streaming_is_507_and_keeps_earlier_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        async with running_shim(tmp_path) as shim:
            location = await create(shim, 100)
            await exchange(shim, patch(location, 0, b"a" * 8), b"a" * 8)
            f = patch(location, 8, b"b" * 8)
            await shim.requestheaders(f)
            exchange_ = f.metadata["shim"].exchange
            await exchange_.begun()
            monkeypatch.setattr(exchange_.append.writer, "write", _enospc)
            assert callable(f.request.stream)
            f.request.stream(b"b" * 8)
            f.request.stream(b"")
            f.response = http.Response.make(204)
            await shim.response(f)
            assert f.response.status_code == 507
            assert await head_offset(shim, location) == 8

    asyncio.run(run())


def _enospc(data: bytes) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("yaml, key", [
    ("tus: {forward: {body: form}}", "tus.forward.body"),
    ("tus: {endpont: /x/}", "tus.endpont"),
])
def test_a_bad_config_refuses_to_start_naming_the_key(tmp_path: Path, yaml: str, key: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml)
    shim = Shim()
    with taddons.context(shim, Proxyserver(), options=reverse()) as tctx, \
            pytest.raises(exceptions.OptionsError, match=key):
        tctx.configure(shim, shim_config=str(config))


@pytest.mark.parametrize(("listen_host", "warned"), [("", True), ("127.0.0.1", False),
                                                     ("0.0.0.0", False)])
def test_mitmdumps_every_interface_default_is_pointed_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, listen_host: str, warned: bool) -> None:
    """An operator who chose an address chose it; mitmdump's default is every interface."""
    async def run() -> None:
        async with running_shim(tmp_path, listen_host=listen_host):
            pass

    with caplog.at_level(logging.WARNING, logger="shim"):
        asyncio.run(run())
    assert ("listening on every interface" in caplog.text) == warned


def test_the_shim_needs_reverse_mode(tmp_path: Path) -> None:
    shim = Shim()
    with taddons.context(shim, Proxyserver(), options=reverse()) as tctx, \
            pytest.raises(exceptions.OptionsError, match="reverse"):
        tctx.configure(shim, mode=["regular"])


def test_running_opens_each_client_connection_to_the_sink_at_once(tmp_path: Path) -> None:
    async def run() -> None:
        from mitmproxy import ctx
        from mitmproxy.proxy.server_hooks import ServerConnectionHookData

        async with running_shim(tmp_path) as shim:
            assert ctx.options.connection_strategy == "eager"
            first, later = tflow.tflow(), tflow.tflow()
            shim.client_connected(first.client_conn)
            shim.server_connect(ServerConnectionHookData(first.server_conn, first.client_conn))
            later.client_conn = first.client_conn
            shim.server_connect(ServerConnectionHookData(later.server_conn, later.client_conn))
            assert first.server_conn.address == ("127.0.0.1", shim.sink.port)
            assert later.server_conn.address != ("127.0.0.1", shim.sink.port)

    asyncio.run(run())



def test_an_exception_after_begin_is_500_and_leaves_no_lease_held(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug that raises after a PATCH began writing (here: while rendering the answer) gives
    the client a 500 with a reason and forwards nothing; the bytes are kept and the upload is
    not left locked: the next PATCH is answered, not 423."""
    async def run() -> None:
        async with running_shim(tmp_path) as shim:
            location = await create(shim, 30)
            original = Tus.render
            monkeypatch.setattr(Tus, "render", _raising)
            f = patch(location, 0, b"a" * 10)
            await exchange(shim, f, b"a" * 10)
            assert f.response is not None and f.response.status_code == 500
            assert b"nothing was forwarded" in (f.response.content or b"")
            monkeypatch.setattr(Tus, "render", original)
            assert await head_offset(shim, location) == 10
            f = patch(location, 10, b"b" * 10)
            await exchange(shim, f, b"b" * 10)
            assert f.response is not None and f.response.status_code == 204, f.response

    asyncio.run(run())


def test_an_exception_while_sending_the_104_releases_the_new_upload(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An IETF creation whose 1xx cannot be sent (a bug, a client gone) still ends cleanly:
    the lease on the upload it began is released, so a later append is not 423 for ever."""
    async def run() -> None:
        async with running_shim(tmp_path) as shim:
            async def broken_interim(*args: object, **kwargs: object) -> bool:
                raise RuntimeError("bug")

            monkeypatch.setattr("shim.addon.send_interim", broken_interim)
            f = flow("POST", "/up", {"Upload-Draft-Interop-Version": "8",
                                     "Upload-Complete": "?0"}, b"hello")
            await exchange(shim, f, b"hello")
            assert f.response is not None and f.response.status_code in (201, 500)
            engine = shim.engine
            assert engine is not None
            assert not engine._writers, "a write is still registered after the request ended"

    asyncio.run(run())


def _raising(*args: object, **kwargs: object) -> object:
    raise RuntimeError("bug")
