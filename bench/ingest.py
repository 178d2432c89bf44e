"""Ingest throughput at several chunk sizes, side by side, as ratios (issue 12, first part).

    .venv/bin/python -m bench.ingest [--size-mib 256] [--chunks-mib 1 8 64] [--repeat 3]
        [--json FILE]

One Python client on one persistent connection sends `--size-mib` in chunks of each size to:
- `sink`: an asyncio server that reads and discards each body (the machine's ceiling);
- `mitmproxy`: mitmdump in reverse mode in front of that sink, no addon, bodies streamed
  (the ceiling of the engine the shim is built on);
- `shim` and `shim-nofsync`: the shim (mitmdump with the addon) taking the chunks as tus
  PATCHes into one upload, fsync on and off; its one delivery goes to the same sink.
Everything on 127.0.0.1. The figure is MiB/s from the first chunk sent to the last answer,
the median of `--repeat` runs; printed as a table with each target's ratio to mitmproxy, and
written as JSON with `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.client
import json
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.harness import ShimProcess, mitmdump_path, subprocess_env

MIB = 1024 * 1024
TUS = {"Tus-Resumable": "1.0.0"}


class DiscardingSink:
    """An HTTP/1.1 server that reads every request body to its end, keeps nothing, and
    answers 204 (201 to a PUT, as a legacy server takes a file); keep-alive."""

    def __init__(self) -> None:
        self.port = 0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, limit=1024 * 1024))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method = head.split(b" ", 1)[0]
                fields = {line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip()
                          for line in head.split(b"\r\n")[1:] if b":" in line}
                if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
                    await _discard_chunked(reader)
                else:
                    left = int(fields.get(b"content-length", b"0"))
                    while left:
                        left -= len(await reader.read(min(left, 1024 * 1024)))
                status = b"201 Created" if method == b"PUT" else b"204 No Content"
                writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def _discard_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers from the shim's upstream
            return
        await reader.readexactly(size + 2)


Request = tuple[str, str, dict[str, str]]
"""Method, path and fields of one chunk's request."""


def send_chunks(port: int, chunk: bytes, count: int, path_of: Callable[[int], Request]) -> float:
    """Send `count` chunks on one connection; seconds from the first byte to the last answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.monotonic()
    for index in range(count):
        method, path, headers = path_of(index)
        conn.request(method, path, body=chunk, headers=headers)
        answer = conn.getresponse()
        answer.read()
        if answer.status >= 300:
            raise RuntimeError(f"{method} {path}: {answer.status}")
    elapsed = time.monotonic() - started
    conn.close()
    return elapsed


def plain(port: int, chunk: bytes, count: int) -> float:
    return send_chunks(port, chunk, count, lambda i: ("PATCH", f"/chunk/{i}", {}))


def tus(port: int, chunk: bytes, count: int) -> float:
    """One tus upload of `count` chunks (creation untimed)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/files/", headers={**TUS, "Upload-Length": str(count * len(chunk))})
    created = conn.getresponse()
    created.read()
    location = created.getheader("Location") or ""
    conn.close()
    return send_chunks(port, chunk, count, lambda i: ("PATCH", location, {
        **TUS, "Upload-Offset": str(i * len(chunk)),
        "Content-Type": "application/offset+octet-stream"}))


def mitmdump(upstream: str, workdir: Path) -> tuple[subprocess.Popen[str], int]:
    """mitmdump in reverse mode with no addon, streaming bodies; (process, port)."""
    proc = subprocess.Popen(
        [str(mitmdump_path()), "--mode", f"reverse:{upstream}", "--listen-host", "127.0.0.1",
         "--listen-port", "0", "--set", "stream_large_bodies=1", "--set", f"confdir={workdir}",
         "--set", "flow_detail=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"listening at 127\.0\.0\.1:(\d+)", line)
        if found:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # never blocks it
            return proc, int(found.group(1))
    raise RuntimeError("mitmdump did not start")


def measure(size_mib: int, chunk_mib: int, repeat: int, run: Callable[[bytes, int], float]) -> float:
    chunk = os.urandom(chunk_mib * MIB)
    count = max(1, size_mib // chunk_mib)
    speeds = [count * chunk_mib / run(chunk, count) for _ in range(repeat)]
    return round(statistics.median(speeds), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--chunks-mib", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sink = DiscardingSink()
    upstream = f"http://127.0.0.1:{sink.port}"
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        proxy, proxy_port = mitmdump(upstream, work)
        shims = {name: ShimProcess.start("mitmdump", upstream, {"storage": {"fsync": fsync}},
                                         work)
                 for name, fsync in (("shim", True), ("shim-nofsync", False))}
        try:
            targets: dict[str, Callable[[bytes, int], float]] = {
                "sink": functools.partial(plain, sink.port),
                "mitmproxy": functools.partial(plain, proxy_port),
                **{name: functools.partial(tus, proc.port) for name, proc in shims.items()},
            }
            for chunk_mib in args.chunks_mib:
                figures[f"{chunk_mib}"] = {name: measure(args.size_mib, chunk_mib, args.repeat, run)
                                           for name, run in targets.items()}
        finally:
            proxy.kill()
            for proc in shims.values():
                proc.kill()
    print(f"ingest MiB/s, {args.size_mib} MiB in chunks, median of {args.repeat} "
          "(ratio to mitmproxy pass-through)")
    for chunk_mib, row in figures.items():
        cells = "  ".join(f"{name} {speed} ({speed / row['mitmproxy']:.2f})"
                          for name, speed in row.items())
        print(f"{chunk_mib:>3} MiB: {cells}")
    result = {"size_mib": args.size_mib, "repeat": args.repeat, "mib_per_s": figures}
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
