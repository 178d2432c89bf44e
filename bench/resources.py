"""What the shim costs in CPU and memory, and how fast it delivers (issue 12).

    .venv/bin/python -m bench.resources [--quick] [--repeat 3] [--json FILE]

Everything on 127.0.0.1, the shim with fsync on, 8 MiB chunks on one persistent connection
from one Python client. One recording sink (bench.ingest's DiscardingSink, which also notes
each request's method, path, body size and timing) stands for the legacy server of every
process. Three figures:

1. CPU seconds per GiB ingested: user + system time of the process (/proc/PID/stat, all its
   threads), for a tus upload of 1 GiB into the shim, against mitmproxy pass-through with no
   addon (`mitmdump --mode reverse` with `stream_large_bodies=1` in front of the sink) taking
   the same chunks as plain PATCHes. The shim's final PATCH is answered only after the
   delivery, so its CPU is split at the delivery: the sink reads the shim's CPU time the
   moment the delivery's head arrives, before it reads a byte of the body (meanwhile the
   shim can at most fill the socket buffers, a few MiB, well under 1% of the file).
   Ingest = from before the creating POST to that moment (the last chunk's fsync and the
   completion included); delivery = from that moment until the final answer has arrived and
   the shim has removed the delivered file (`storage.dir/data/<id>` gone: its unlink is the
   delivery's work too). mitmproxy's figure runs from before the first chunk to the last
   answer. Median of `--repeat` uploads in one shim process and one mitmdump process. Shown
   too: the system part of each, and the shim with fsync off (fsync makes the kernel's
   writeback of the file the shim's own system time; mitmproxy writes no file).
2. Delivery MiB/s from disk to a whole-file server, measured at the receiving sink from the
   delivery's head (after the CPU reading above) to its last body byte: the shim's delivery
   of each finished 1 GiB upload, against the bench itself sending a file of the same size
   and bytes (written just before, so in the page cache as the shim's file is) to the same
   sink with `socket.sendfile` (`raw_copy`), and with an `os.read`/`sendall` loop of 1 MiB
   pieces (`read_sendall`, for reference). Medians of `--repeat`.
3. Peak RSS (VmHWM of /proc/PID/status, in MB of 2^20 bytes) of a fresh shim process for
   each of: a 256 MiB tus upload, a 2 GiB tus upload (both with their delivery), and a 1 GiB
   plain PUT to a path no protocol claims (passed through, streamed to the sink); `idle` is
   the VmRSS of a fresh shim once it listens. `flat` means the 2 GiB figure is within
   `FLAT_MB` of the 256 MiB one. (A fresh process's peak creeps up by some MB over its
   first GiBs, then levels off: glibc's dynamic mmap threshold keeps freed 1-8 MiB buffers
   in its heaps; with MALLOC_MMAP_THRESHOLD_=131072 in the environment it stays flat.)

Every request is checked at the sink: each upload delivered exactly once with its byte
count, each pass-through request received once, whole. `--quick` uses 16 and 32 MiB sizes
and one repetition (the smoke test, about 10 s); the full run takes 1-1.5 minutes on 2 cores.
Prints a table, then the JSON as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.ingest import (
    MIB,
    TUS,
    DiscardingSink,
    mitmdump,
    send_chunks,
    tus_create,
    write_figures,
)
from tests.harness import ShimProcess, wait_until

GIB = 1024 * MIB
CHUNK = 8 * MIB
FLAT_MB = 8.0
"""How far the 2 GiB upload's peak RSS may be above the 256 MiB one's and still be flat."""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Cpu:
    """CPU seconds, user and system."""

    user: float
    system: float

    @property
    def total(self) -> float:
        return self.user + self.system

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.user - other.user, self.system - other.system)

    def __truediv__(self, by: float) -> Cpu:
        return Cpu(self.user / by, self.system / by)


def cpu_times(pid: int) -> Cpu:
    """CPU seconds of a process, all its threads (utime and stime, fields 14 and 15 of
    /proc/PID/stat, counted after the command name, which may hold spaces)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return Cpu(int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS)


def memory_mb(pid: int, field: str) -> float:
    """A memory figure of /proc/PID/status (`VmHWM`, `VmRSS`) in MB of 2^20 bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


@dataclass
class Received:
    """One request as the sink saw it."""

    method: str
    path: str
    cpu_at_head: Cpu | None
    """CPU seconds of the watched process when the head arrived, if one was watched."""
    head_at: float
    size: int = 0
    end_at: float = 0.0

    @property
    def mib_per_s(self) -> float:
        return self.size / MIB / max(self.end_at - self.head_at, 1e-9)


class RecordingSink(DiscardingSink):
    """The discarding sink, also recording every request (`received`) as it comes; while
    `watch_pid` is set, it reads that process's CPU time as each head arrives, before it
    reads the body."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.watch_pid: int | None = None
        super().__init__()

    def requests(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, path = request_line.split(" ")[:2]
                fields = {name.strip().lower(): value.strip()
                          for name, colon, value in (line.partition(":") for line in lines) if colon}
                pid = self.watch_pid
                record = Received(method, path, cpu_times(pid) if pid else None, 0.0)
                self.received.append(record)
                record.head_at = time.monotonic()
                if fields.get("transfer-encoding", "").lower() == "chunked":
                    await _count_chunked(reader, record)
                else:
                    left = int(fields.get("content-length", "0"))
                    while left:
                        data = await reader.read(min(left, MIB))
                        if not data:
                            raise asyncio.IncompleteReadError(b"", left)
                        left -= len(data)
                        record.size += len(data)
                record.end_at = time.monotonic()
                status = b"201 Created" if method == "PUT" else b"204 No Content"
                writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def _count_chunked(reader: asyncio.StreamReader, record: Received) -> None:
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return
        await reader.readexactly(size + 2)
        record.size += size


@dataclass(frozen=True)
class Sizes:
    cpu: int
    small: int
    big: int
    passthrough: int
    repeat: int


FULL = Sizes(cpu=GIB, small=256 * MIB, big=2 * GIB, passthrough=GIB, repeat=3)
QUICK = Sizes(cpu=32 * MIB, small=16 * MIB, big=32 * MIB, passthrough=32 * MIB, repeat=1)


class Checks:
    """What the sink must have received: each name with its requests and bytes."""

    def __init__(self, sink: RecordingSink) -> None:
        self.sink = sink
        self.results: dict[str, dict[str, int]] = {}

    def expect(self, name: str, paths: list[str], size_each: int) -> list[Received]:
        got = [r for path in paths for r in self.sink.requests(path)]
        self.results[name] = {"requests": len(got), "expected_requests": len(paths),
                              "bytes": sum(r.size for r in got),
                              "expected_bytes": size_each * len(paths)}
        if len(got) != len(paths) or any(r.size != size_each for r in got):
            raise RuntimeError(f"{name}: the sink got {[(r.path, r.size) for r in got]}, "
                               f"not {len(paths)} requests of {size_each} bytes")
        return got


def tus_upload(port: int, chunk: bytes, count: int) -> str:
    """One tus upload of `count` chunks on one connection; returns the upload's id (the
    final answer comes after its delivery)."""
    location = tus_create(port, count * len(chunk))
    send_chunks(port, chunk, count, lambda i: ("PATCH", location, {
        **TUS, "Upload-Offset": str(i * len(chunk)),
        "Content-Type": "application/offset+octet-stream"}))
    return location.rstrip("/").rsplit("/", 1)[-1]


def delivered(shim: ShimProcess, upload_id: str) -> None:
    """Wait until the shim has removed the delivered file from its store."""
    data = shim.storage_dir / "data" / upload_id
    wait_until(lambda: not data.exists(), 30, f"removal of {data}")


def plain_put(port: int, path: str, chunk: bytes, count: int) -> None:
    """One PUT of `count` chunks that no protocol claims, streamed by http.client."""

    def body() -> Iterator[bytes]:
        for _ in range(count):
            yield chunk

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("PUT", path, body=body(), headers={
        "Content-Length": str(count * len(chunk)), "Content-Type": "application/octet-stream"})
    answer = conn.getresponse()
    answer.read()
    conn.close()
    if answer.status >= 300:
        raise RuntimeError(f"PUT {path}: {answer.status}")


def raw_copy(port: int, path: str, source: Path, use_sendfile: bool) -> None:
    """Send `source` as one PUT to the sink with a plain socket: sendfile, or a loop of
    1 MiB os.read and sendall."""
    size = source.stat().st_size
    with socket.create_connection(("127.0.0.1", port)) as sock, source.open("rb") as file:
        sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode())
        if use_sendfile:
            sock.sendfile(file)
        else:
            while data := os.read(file.fileno(), MIB):
                sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError(f"no answer to the raw copy {path}")
            answer += data
    if not answer.startswith(b"HTTP/1.1 201"):
        raise RuntimeError(f"raw copy {path}: {answer[:40]!r}")


def median(values: list[float], digits: int = 3) -> float:
    return round(statistics.median(values), digits)


def mitmproxy_cpu(sink: RecordingSink, checks: Checks, work: Path, sizes: Sizes,
                  chunk: bytes) -> tuple[list[Cpu], list[float], dict[str, float]]:
    """CPU per GiB of mitmproxy pass-through for each repetition, its MiB/s, and its RSS."""
    count = sizes.cpu // CHUNK
    per_gib: list[Cpu] = []
    speeds: list[float] = []
    paths: list[str] = []
    proxy, port = mitmdump(f"http://127.0.0.1:{sink.port}", work)
    try:
        rss = {"mitmproxy_idle": memory_mb(proxy.pid, "VmRSS")}
        for rep in range(sizes.repeat):
            before = cpu_times(proxy.pid)
            seconds = send_chunks(port, chunk, count,
                                  lambda i, rep=rep: ("PATCH", f"/mitmproxy/{rep}/{i}", {}))
            per_gib.append((cpu_times(proxy.pid) - before) / (sizes.cpu / GIB))
            speeds.append(sizes.cpu / MIB / seconds)
            paths += [f"/mitmproxy/{rep}/{i}" for i in range(count)]
        rss["mitmproxy_peak"] = memory_mb(proxy.pid, "VmHWM")
    finally:
        proxy.kill()
        proxy.wait()
    checks.expect("mitmproxy_chunks", paths, CHUNK)
    return per_gib, speeds, rss


@dataclass
class ShimRuns:
    ingest: list[Cpu]
    delivery: list[Cpu]
    mib_per_s: list[float]
    """Delivery speed, at the sink."""


def shim_cpu(sink: RecordingSink, checks: Checks, work: Path, sizes: Sizes, chunk: bytes,
             fsync: bool) -> ShimRuns:
    """`repeat` uploads into one shim, each split at its delivery's head (module docstring)."""
    runs = ShimRuns([], [], [])
    shim = ShimProcess.start("mitmdump", f"http://127.0.0.1:{sink.port}",
                             {"storage": {"fsync": fsync}}, work)
    gib = sizes.cpu / GIB
    try:
        pid = shim.pid
        assert pid is not None
        for rep in range(sizes.repeat):
            before = cpu_times(pid)
            sink.watch_pid = pid
            try:
                upload_id = tus_upload(shim.port, chunk, sizes.cpu // CHUNK)
                delivered(shim, upload_id)
            finally:
                sink.watch_pid = None
            after = cpu_times(pid)
            name = f"cpu_upload_{rep + 1}" + ("" if fsync else "_nofsync")
            [record] = checks.expect(name, [f"/uploads/{upload_id}"], sizes.cpu)
            assert record.cpu_at_head is not None
            runs.ingest.append((record.cpu_at_head - before) / gib)
            runs.delivery.append((after - record.cpu_at_head) / gib)
            runs.mib_per_s.append(record.mib_per_s)
    finally:
        shim.kill()
    return runs


def raw_copies(sink: RecordingSink, checks: Checks, work: Path, sizes: Sizes,
               chunk: bytes) -> dict[str, list[float]]:
    """MiB/s at the sink of the same-size file sent by sendfile and by a read/sendall loop."""
    source = work / "raw-copy.bin"
    with source.open("wb") as out:
        for _ in range(sizes.cpu // CHUNK):
            out.write(chunk)
    speeds: dict[str, list[float]] = {"sendfile": [], "loop": []}
    for rep in range(sizes.repeat):
        for kind, found in speeds.items():
            path = f"/raw-copy/{kind}/{rep}"
            raw_copy(sink.port, path, source, kind == "sendfile")
            [record] = checks.expect(f"raw_copy_{kind}_{rep}", [path], sizes.cpu)
            found.append(record.mib_per_s)
    source.unlink()
    return speeds


def measure_cpu_and_delivery(sink: RecordingSink, checks: Checks, work: Path, sizes: Sizes,
                             chunk: bytes) -> tuple[dict[str, float], dict[str, float],
                                                    dict[str, float]]:
    mitm, mitm_speeds, mitm_rss = mitmproxy_cpu(sink, checks, work, sizes, chunk)
    shim = shim_cpu(sink, checks, work, sizes, chunk, fsync=True)
    nofsync = shim_cpu(sink, checks, work, sizes, chunk, fsync=False)
    raw = raw_copies(sink, checks, work, sizes, chunk)

    def total(runs: list[Cpu]) -> float:
        return median([c.total for c in runs])

    def system(runs: list[Cpu]) -> float:
        return median([c.system for c in runs])

    cpu = {"shim_s_per_gib": total(shim.ingest), "mitmproxy_s_per_gib": total(mitm),
           "ratio": round(total(shim.ingest) / total(mitm), 2),
           "shim_delivery_s_per_gib": total(shim.delivery),
           "shim_delivery_system_s_per_gib": system(shim.delivery),
           "shim_system_s_per_gib": system(shim.ingest),
           "mitmproxy_system_s_per_gib": system(mitm),
           "shim_nofsync_s_per_gib": total(nofsync.ingest),
           "mitmproxy_mib_per_s": median(mitm_speeds, 1)}
    shim_speed, raw_speed = median(shim.mib_per_s, 1), median(raw["sendfile"], 1)
    delivery = {"shim_mib_per_s": shim_speed, "raw_copy_mib_per_s": raw_speed,
                "ratio": round(shim_speed / raw_speed, 2),
                "read_sendall_mib_per_s": median(raw["loop"], 1),
                "shim_nofsync_mib_per_s": median(nofsync.mib_per_s, 1)}
    return cpu, delivery, mitm_rss


def measure_rss(sink: RecordingSink, checks: Checks, work: Path, sizes: Sizes,
                chunk: bytes) -> dict[str, float]:
    upstream = f"http://127.0.0.1:{sink.port}"
    rss: dict[str, float] = {}
    for name, size in (("upload_256mib", sizes.small), ("upload_2gib", sizes.big),
                       ("passthrough_put_1gib", sizes.passthrough)):
        shim = ShimProcess.start("mitmdump", upstream, {"storage": {"fsync": True}}, work)
        try:
            pid = shim.pid
            assert pid is not None
            if not rss:
                rss["idle"] = memory_mb(pid, "VmRSS")
            if name.startswith("upload"):
                upload_id = tus_upload(shim.port, chunk, size // CHUNK)
                delivered(shim, upload_id)
                checks.expect(name, [f"/uploads/{upload_id}"], size)
            else:
                plain_put(shim.port, "/plain/big.bin", chunk, size // CHUNK)
                checks.expect(name, ["/plain/big.bin"], size)
            rss[name] = memory_mb(pid, "VmHWM")
        finally:
            shim.kill()
    return rss


def table(result: dict[str, Any]) -> str:
    cpu, delivery, rss, sizes = (result["cpu"], result["delivery"], result["rss_mb"],
                                 result["sizes_mib"])
    targets = result["targets"]

    def row(label: str, value: float, note: str = "") -> str:
        return f"  {label:<30}{value:9.2f}{'   ' + note if note else ''}"

    def mark(name: str) -> str:
        return "ok" if targets[name] else "MISSED"

    return "\n".join([
        f"CPU s per GiB ingested ({sizes['cpu']} MiB, {CHUNK // MIB} MiB chunks, "
        f"median of {result['repeat']})",
        row("shim ingest, fsync on", cpu["shim_s_per_gib"],
            f"(system {cpu['shim_system_s_per_gib']:.2f})"),
        row("shim ingest, fsync off", cpu["shim_nofsync_s_per_gib"], "(reference)"),
        row("shim delivery (separate)", cpu["shim_delivery_s_per_gib"],
            f"(system {cpu['shim_delivery_system_s_per_gib']:.2f})"),
        row("mitmproxy pass-through", cpu["mitmproxy_s_per_gib"],
            f"(system {cpu['mitmproxy_system_s_per_gib']:.2f}; "
            f"{cpu['mitmproxy_mib_per_s']} MiB/s)"),
        row("ratio shim / mitmproxy", cpu["ratio"], f"target <= 1.3: {mark('cpu_ratio_le_1_3')}"),
        f"Delivery MiB/s from disk ({sizes['delivery']} MiB, measured at the receiver)",
        row("shim", delivery["shim_mib_per_s"]),
        row("shim, fsync off", delivery["shim_nofsync_mib_per_s"], "(reference)"),
        row("raw copy (sendfile)", delivery["raw_copy_mib_per_s"]),
        row("raw copy (read + sendall)", delivery["read_sendall_mib_per_s"], "(reference)"),
        row("ratio shim / raw copy", delivery["ratio"],
            f"target >= 0.8: {mark('delivery_ratio_ge_0_8')}"),
        "Peak RSS MB (VmHWM, a fresh shim process each)",
        row("idle after start (VmRSS)", rss["idle"]),
        row(f"{sizes['small']} MiB tus upload", rss["upload_256mib"]),
        row(f"{sizes['big']} MiB tus upload", rss["upload_2gib"],
            f"flat (within {FLAT_MB:g} MB of the above): {mark('rss_flat')}"),
        row(f"{sizes['passthrough']} MiB pass-through PUT", rss["passthrough_put_1gib"]),
        row("mitmproxy alone, idle", rss["mitmproxy_idle"], "(reference)"),
        row("mitmproxy alone, peak", rss["mitmproxy_peak"], "(reference)"),
        f"  every shim peak < 150 MB: {mark('rss_lt_150')}",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16/32 MiB sizes, one repetition")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.repeat is not None:
        sizes = Sizes(sizes.cpu, sizes.small, sizes.big, sizes.passthrough, args.repeat)
    chunk = os.urandom(CHUNK)
    sink = RecordingSink()
    checks = Checks(sink)
    with tempfile.TemporaryDirectory(prefix="bench-resources-") as folder:
        work = Path(folder)
        cpu, delivery, mitm_rss = measure_cpu_and_delivery(sink, checks, work, sizes, chunk)
        rss = {**measure_rss(sink, checks, work, sizes, chunk), **mitm_rss}
    peaks = (rss["upload_256mib"], rss["upload_2gib"], rss["passthrough_put_1gib"])
    result: dict[str, Any] = {
        "quick": args.quick, "repeat": sizes.repeat, "chunk_mib": CHUNK // MIB,
        "sizes_mib": {"cpu": sizes.cpu // MIB, "delivery": sizes.cpu // MIB,
                      "small": sizes.small // MIB, "big": sizes.big // MIB,
                      "passthrough": sizes.passthrough // MIB},
        "cpu": cpu, "delivery": delivery, "rss_mb": rss,
        "targets": {"cpu_ratio_le_1_3": cpu["ratio"] <= 1.3,
                    "delivery_ratio_ge_0_8": delivery["ratio"] >= 0.8,
                    "rss_lt_150": max(peaks) < 150,
                    "rss_flat": rss["upload_2gib"] - rss["upload_256mib"] <= FLAT_MB},
        "received": checks.results,
    }
    print(table(result))
    write_figures(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
