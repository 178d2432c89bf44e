"""Ingest throughput at several chunk sizes, side by side, as ratios (issue 12).

    .venv/bin/python -m bench.ingest [--quick] [--size-mib 256] [--chunks-mib 1 8 64]
        [--repeat 3] [--targets NAME ...] [--json FILE]

One Python client on one persistent connection sends `--size-mib` in chunks of each size to
each target (all by default; `--targets` picks some):
- `sink`: an asyncio server that reads and discards each body (the machine's ceiling);
- `mitmproxy`: mitmdump in reverse mode in front of that sink, no addon, bodies streamed
  (the ceiling of the engine the shim is built on);
- `shim` and `shim-nofsync`: the shim (mitmdump with the addon) taking the chunks as tus
  PATCHes into one upload, fsync on and off; its one delivery goes to the same sink;
- `@tus/server`: @tus/server with @tus/file-store (npm, run by node: bench/js/tus_server.mjs),
  and `tuspyserver`: the FastAPI tus router (PyPI) under uvicorn (bench/tus_servers.py); the
  same tus client as for the shim; each stores into a temp folder (emptied after each run,
  untimed) and neither fsyncs;
- `shim-content-range` and `shim-ietf`, at the 8 MiB chunk only: the fsync-on shim taking the
  chunks as `PUT` + `Content-Range` (308 until the last) and as IETF draft appends (interop 8:
  a `PUT` with `Upload-Complete: ?0` creates, `PATCH`es with `Upload-Offset` append).
Everything on 127.0.0.1, port 0. The figure is MiB/s from the first chunk sent to the last
answer (an upload's creation is untimed; its last answer is the sink's, after the delivery),
the median of `--repeat` runs; printed as a table with each target's ratio to mitmproxy and
the shim's to @tus/server and tuspyserver, and as JSON (last line; also to `--json`). The JSON
also says how many MiB each shim target delivered to the sink. `--quick`: 8 MiB, chunks 1 and
8, one run (the smoke test).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.tus_servers import start_listening, tus_node, tuspyserver
from tests.harness import ShimProcess, mitmdump_path

MIB = 1024 * 1024
TUS = {"Tus-Resumable": "1.0.0"}
IETF = {"Upload-Draft-Interop-Version": "8"}
DELIVERED = "/delivered/"
"""Path prefix of the shim targets' deliveries: /delivered/<target>/..., tallied by the sink."""
SUCCESS = frozenset(range(200, 300))

ENGINE_TARGETS = ("sink", "mitmproxy", "shim", "shim-nofsync")
TUS_SERVERS = ("@tus/server", "tuspyserver")
PROTOCOL_TARGETS = ("shim-content-range", "shim-ietf")
TARGETS = (*ENGINE_TARGETS, *TUS_SERVERS, *PROTOCOL_TARGETS)
PROTOCOL_CHUNK_MIB = 8
"""The one chunk size the Content-Range and IETF rows are measured at."""
COMPARED_SHIMS = ("shim", "shim-nofsync")
"""Shim targets given a ratio to each tus server."""


class DiscardingSink:
    """An HTTP/1.1 server that reads every request body to its end, keeps nothing, and
    answers 204 (201 to a PUT, as a legacy server takes a file); keep-alive. It tallies the
    bytes of PUTs to /delivered/<name>/... by name (`delivered`)."""

    def __init__(self) -> None:
        self.port = 0
        self.delivered: Counter[str] = Counter()
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
                method, target = head.split(b" ", 2)[:2]
                fields = {line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip()
                          for line in head.split(b"\r\n")[1:] if b":" in line}
                if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
                    size = await _discard_chunked(reader)
                else:
                    size = left = int(fields.get(b"content-length", b"0"))
                    while left:
                        left -= len(await reader.read(min(left, 1024 * 1024)))
                path = target.decode("latin-1")
                if method == b"PUT" and path.startswith(DELIVERED):
                    self.delivered[path[len(DELIVERED):].split("/", 1)[0]] += size
                status = b"201 Created" if method == b"PUT" else b"204 No Content"
                writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def _discard_chunked(reader: asyncio.StreamReader) -> int:
    """Read a chunked body to its end; its length."""
    total = 0
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers from the shim's upstream
            return total
        await reader.readexactly(size + 2)
        total += size


Request = tuple[str, str, dict[str, str]]
"""Method, path and fields of one chunk's request."""


def send_chunks(port: int, chunk: bytes, count: int, path_of: Callable[[int], Request],
                accept: Collection[int] = SUCCESS) -> float:
    """Send `count` chunks on one connection; seconds from the first byte to the last answer.
    Every answer's status must be in `accept`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.monotonic()
    for index in range(count):
        method, path, headers = path_of(index)
        conn.request(method, path, body=chunk, headers=headers)
        answer = conn.getresponse()
        body = answer.read()
        if answer.status not in accept:
            raise RuntimeError(f"{method} {path}: {answer.status} {body[:300]!r}")
    elapsed = time.monotonic() - started
    conn.close()
    return elapsed


def plain(port: int, chunk: bytes, count: int) -> float:
    return send_chunks(port, chunk, count, lambda i: ("PATCH", f"/chunk/{i}", {}))


def tus_create(port: int, length: int) -> str:
    """A tus upload of `length` bytes made at 127.0.0.1:`port`; its path."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/files/", headers={**TUS, "Upload-Length": str(length)})
    created = conn.getresponse()
    created.read()
    conn.close()
    if created.status != 201:
        raise RuntimeError(f"tus creation: {created.status}")
    return urlsplit(created.getheader("Location") or "").path


def tus(port: int, chunk: bytes, count: int) -> float:
    """One tus upload of `count` chunks (creation untimed)."""
    location = tus_create(port, count * len(chunk))
    return send_chunks(port, chunk, count, lambda i: ("PATCH", location, {
        **TUS, "Upload-Offset": str(i * len(chunk)),
        "Content-Type": "application/offset+octet-stream"}))


def content_range(name: str, port: int, chunk: bytes, count: int) -> float:
    """One upload of `count` chunks as `PUT` + `Content-Range` to a fresh legacy URL: 308
    Resume Incomplete until the last, which gets the legacy server's answer."""
    path = f"{DELIVERED}{name}/{uuid.uuid4().hex}"
    total = count * len(chunk)

    def request(index: int) -> Request:
        first = index * len(chunk)
        return "PUT", path, {"Content-Range": f"bytes {first}-{first + len(chunk) - 1}/{total}"}

    return send_chunks(port, chunk, count, request, accept=SUCCESS | {308})


def ietf(name: str, port: int, chunk: bytes, count: int) -> float:
    """One IETF draft upload (interop 8) of `count` chunks (creation untimed): an empty
    `PUT` with `Upload-Complete: ?0` creates it, `PATCH`es append, the last with ?1."""
    total = count * len(chunk)
    location = final_answer(port, "PUT", f"{DELIVERED}{name}/{uuid.uuid4().hex}", {
        **IETF, "Upload-Complete": "?0", "Upload-Length": str(total), "Content-Length": "0"})
    path = urlsplit(location).path
    return send_chunks(port, chunk, count, lambda i: ("PATCH", path, {
        **IETF, "Upload-Offset": str(i * len(chunk)),
        "Upload-Complete": "?1" if i == count - 1 else "?0",
        "Content-Type": "application/partial-upload"}))


def final_answer(port: int, method: str, path: str, fields: dict[str, str]) -> str:
    """Send a request without a body on a connection of its own, skip the interim (1xx)
    answers (http.client takes a 104 for the final one) and return the final answer's
    Location; it must be a 201."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in fields.items()) + "\r\n"
        sock.sendall(head.encode("latin-1"))
        stream = sock.makefile("rb")
        while True:
            status = int(stream.readline().split(b" ", 2)[1])
            answer: dict[str, str] = {}
            while (line := stream.readline().decode("latin-1").strip()):
                name, _, value = line.partition(":")
                answer[name.strip().lower()] = value.strip()
            if status >= 200:
                break
    if status != 201 or "location" not in answer:
        raise RuntimeError(f"{method} {path}: {status} {answer}")
    return answer["location"]


def mitmdump(upstream: str, workdir: Path) -> tuple[subprocess.Popen[str], int]:
    """mitmdump in reverse mode with no addon, streaming bodies; (process, port)."""
    return start_listening(
        [str(mitmdump_path()), "--mode", f"reverse:{upstream}", "--listen-host", "127.0.0.1",
         "--listen-port", "0", "--set", "stream_large_bodies=1", "--set", f"confdir={workdir}",
         "--set", "flow_detail=0"], "mitmdump")


def empty_files(folder: Path) -> Callable[[], None]:
    """Remove the files a tus server stored in `folder` (not its own subfolders)."""
    def empty() -> None:
        for entry in folder.iterdir():
            if entry.is_file():
                entry.unlink()
    return empty


@dataclass(frozen=True)
class Target:
    """One thing measured: `run(chunk, count)` gives seconds; `after` runs untimed after each."""

    run: Callable[[bytes, int], float]
    after: Callable[[], None] | None = None
    chunks_mib: frozenset[int] | None = None
    """The only chunk sizes it is measured at (None: all)."""


def measure(size_mib: int, chunk: bytes, repeat: int, target: Target) -> float:
    chunk_mib = len(chunk) // MIB
    count = max(1, size_mib // chunk_mib)
    speeds = []
    for _ in range(repeat):
        speeds.append(count * chunk_mib / target.run(chunk, count))
        if target.after is not None:
            target.after()
    return round(statistics.median(speeds), 1)


Ratios = dict[str, dict[str, dict[str, float]]]
"""Per chunk size, per target divided by, per target divided: the ratio."""


def ratios(figures: dict[str, dict[str, float]]) -> Ratios:
    """Per chunk size: every target to mitmproxy, and the shim (fsync on and off) to each tus
    server; only where both were measured."""
    found: Ratios = {}
    for chunk_mib, row in figures.items():
        found[chunk_mib] = {}
        for over, names in (("mitmproxy", [n for n in row if n != "mitmproxy"]),
                            *((server, COMPARED_SHIMS) for server in TUS_SERVERS)):
            if over in row and any(name in row for name in names):
                found[chunk_mib][over] = {name: round(row[name] / row[over], 2)
                                          for name in names if name in row}
    return found


def table(figures: dict[str, dict[str, float]], found: Ratios) -> str:
    """The figures and the ratios as two Markdown tables."""
    names = [name for name in TARGETS if any(name in row for row in figures.values())]
    pairs = [(name, over) for over in ("mitmproxy", *TUS_SERVERS) for name in TARGETS
             if any(name in row.get(over, {}) for row in found.values())]
    lines = ["| chunk | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for chunk_mib, row in figures.items():
        cells = [f"{row[name]:,.1f}" if name in row else "-" for name in names]
        lines.append(f"| {chunk_mib} MiB | " + " | ".join(cells) + " |")
    lines += ["", "| chunk | " + " | ".join(f"{name} / {over}" for name, over in pairs) + " |",
              "|---" * (len(pairs) + 1) + "|"]
    for chunk_mib, by_over in found.items():
        cells = [f"{by_over[over][name]:.2f}" if name in by_over.get(over, {}) else "-"
                 for name, over in pairs]
        lines.append(f"| {chunk_mib} MiB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="8 MiB, chunks 1 and 8, one run (overrides the three below)")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--chunks-mib", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS),
                        metavar="NAME", help=f"some of: {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.size_mib, args.chunks_mib, args.repeat = 8, [1, 8], 1
    return args


def write_figures(figures: dict[str, Any], path: Path | None) -> None:
    """A benchmark's figures as JSON: the last line printed (what bench.perf and the smoke
    tests read), and the file `path` when given."""
    if path is not None:
        path.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))


def main() -> int:
    args = parse_args()
    wanted = [name for name in TARGETS if name in args.targets]
    sink = DiscardingSink()
    upstream = f"http://127.0.0.1:{sink.port}"
    figures: dict[str, dict[str, float]] = {}
    processes: list[subprocess.Popen[str]] = []
    shims: dict[str, ShimProcess] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as folder:
        work = Path(folder)
        try:
            targets = start_targets(wanted, sink, upstream, work, processes, shims)
            for chunk_mib in args.chunks_mib:
                chunk = os.urandom(chunk_mib * MIB)
                figures[f"{chunk_mib}"] = {
                    name: measure(args.size_mib, chunk, args.repeat, target)
                    for name, target in targets.items()
                    if target.chunks_mib is None or chunk_mib in target.chunks_mib}
        finally:
            for proc in processes:
                proc.kill()
                proc.wait()
            for shim in shims.values():
                shim.kill()
    found = ratios(figures)
    print(f"ingest MiB/s, {args.size_mib} MiB in chunks on one connection, median of "
          f"{args.repeat}; then each target's ratio to mitmproxy pass-through, and the "
          "shim's to @tus/server and tuspyserver")
    print(table(figures, found))
    result: dict[str, Any] = {
        "size_mib": args.size_mib, "repeat": args.repeat, "chunks_mib": args.chunks_mib,
        "mib_per_s": figures, "ratios": found,
        "delivered_mib": {name: round(size / MIB, 1) for name, size in sink.delivered.items()},
    }
    write_figures(result, args.json)
    return 0


def start_targets(wanted: list[str], sink: DiscardingSink, upstream: str, work: Path,
                  processes: list[subprocess.Popen[str]], shims: dict[str, ShimProcess],
                  ) -> dict[str, Target]:
    """Start what the `wanted` targets need (processes go into `processes` and `shims`, for
    the caller to end) and return the targets, in `TARGETS` order."""
    targets: dict[str, Target] = {}
    for name in wanted:
        if name == "sink":
            targets[name] = Target(lambda chunk, count: plain(sink.port, chunk, count))
        elif name == "mitmproxy":
            proc, port = mitmdump(upstream, work)
            processes.append(proc)
            targets[name] = Target(_bind(plain, port))
        elif name in ("shim", "shim-nofsync"):
            targets[name] = Target(_bind(tus, start_shim(name, shims, upstream, work).port))
        elif name in TUS_SERVERS:
            store = work / re.sub(r"\W", "", name)
            store.mkdir()
            proc, port = (tus_node if name == "@tus/server" else tuspyserver)(store)
            processes.append(proc)
            targets[name] = Target(_bind(tus, port), after=empty_files(store))
        else:
            client = content_range if name == "shim-content-range" else ietf
            port = start_shim("shim", shims, upstream, work).port
            targets[name] = Target(_named(client, name, port),
                                   chunks_mib=frozenset({PROTOCOL_CHUNK_MIB}))
    return targets


def start_shim(name: str, shims: dict[str, ShimProcess], upstream: str, work: Path,
               ) -> ShimProcess:
    """The shim process `name` ("shim": fsync on, "shim-nofsync": off), started once; its tus
    deliveries go to /delivered/<name>/<id>."""
    if name not in shims:
        config = {"storage": {"fsync": name == "shim"},
                  "tus": {"forward": {"path": f"{DELIVERED}{name}/{{id}}"}}}
        shims[name] = ShimProcess.start("mitmdump", upstream, config, work)
    return shims[name]


def _bind(client: Callable[[int, bytes, int], float], port: int) -> Callable[[bytes, int], float]:
    return lambda chunk, count: client(port, chunk, count)


def _named(client: Callable[[str, int, bytes, int], float], name: str, port: int,
           ) -> Callable[[bytes, int], float]:
    return lambda chunk, count: client(name, port, chunk, count)


if __name__ == "__main__":
    raise SystemExit(main())
