"""HEAD latency and many slow uploads at once, against the shim (issue 12).

    .venv/bin/python -m bench.load [--uploads 1000] [--rate-kib 64] [--size-kib 512]
        [--throttled 200] [--settle 2] [--window 10] [--heads 2000] [--quick] [--json FILE]

The shim is mitmdump with the addon, fsync on, tus, its per-owner and total upload caps
raised above the load; its legacy server is bench.ingest's DiscardingSink (in this process,
it counts the deliveries: PUTs it answered 201). Everything on 127.0.0.1. Three phases:

1. `idle`: `--heads` tus HEADs back to back on one keep-alive connection, on an upload that
   exists (64 KiB of 1 MiB stored), nothing else going on.
2. `with_200_uploads`: `--throttled` uploads, each on its own connection, creating its upload;
   once all are created, each sends one PATCH body at `--rate-kib` in small writes. Once every
   one of them is sending and `--settle` seconds have passed (the shim begins 200 PATCHes
   that arrive together in one burst of work), HEADs go one every `--head-interval-ms` for
   `--window` seconds (each body lasts until after that); afterwards every upload must
   complete.
3. `slow_1000`: on a fresh shim, `--uploads` uploads of `--size-kib` each at `--rate-kib`
   (creation + one PATCH, each on its own connection, starting spread over `--ramp` s).
   Completed = a final PATCH answered 204 with `Shim-Upstream-Status: 201`; delivered = the
   sink's count. Figures: seconds from the first connection to the last answer, aggregate
   MiB/s of completed bytes over them, the shim's peak RSS (VmHWM of the mitmdump process,
   MB = 2^20 bytes) and CPU seconds (utime + stime, /proc/PID/stat), and the HEADs (one every
   `--head-interval-ms` on a separate connection) during the whole phase.

The upload clients are asyncio raw sockets in this process (RLIMIT_NOFILE raised to the hard
limit; the shim inherits it). The HEAD probe is a blocking socket in its own process, so
that the busy client loop never counts as the shim's latency. Anything that went wrong
(refused or reset connections, non-2xx answers, error lines in the shim's output) is
counted in the JSON and printed, not retried. `--quick`: 200 idle HEADs, 20 throttled and
50 slow uploads of 128 KiB, 3 s window (the smoke test). The table is printed, then the JSON
as the last line; `--json FILE` writes it too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import resource
import socket
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.ingest import DiscardingSink, write_figures
from tests.harness import ShimProcess

KIB = 1024
MIB = 1024 * 1024
PIECE = 8 * KIB
"""Bytes per write of a slow upload: at 64 KiB/s, eight writes a second."""
TUS_FIELDS = "Tus-Resumable: 1.0.0\r\n"
PROBLEM_LINE = re.compile(r"error|traceback|exception|warn", re.IGNORECASE)


class CountingSink(DiscardingSink):
    """bench.ingest's DiscardingSink that also counts the files it took (PUTs answered 201)."""

    def __init__(self) -> None:
        self.deliveries = 0
        super().__init__()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await super()._serve(reader, _CountingWriter(writer, self))  # type: ignore[arg-type]


class _CountingWriter:
    """The writer the sink answers through; counts its `201 Created` answers."""

    def __init__(self, writer: asyncio.StreamWriter, sink: CountingSink) -> None:
        self._writer = writer
        self._sink = sink

    def write(self, data: bytes) -> None:
        if data.startswith(b"HTTP/1.1 201"):
            self._sink.deliveries += 1  # only the sink's own thread counts
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()


# ---- the raw HTTP/1.1 client -------------------------------------------------------------


@dataclass
class Answer:
    status: int
    fields: dict[str, str]
    body: bytes = b""


async def read_answer(reader: asyncio.StreamReader, method: str) -> Answer:
    """One answer (after any 1xx); its body by Content-Length or chunked."""
    while True:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        lines = head.split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {name.strip().lower(): value.strip()
                  for name, _, value in (line.partition(":") for line in lines[1:] if line)}
        if not 100 <= status < 200:
            break
    if method == "HEAD" or status in (204, 304):
        return Answer(status, fields)
    if fields.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
        return Answer(status, fields, body)
    return Answer(status, fields, await reader.readexactly(int(fields.get("content-length", "0"))))


def request_head(method: str, path: str, port: int, fields: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{TUS_FIELDS}{fields}"
            "\r\n").encode()


async def create(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int,
                 length: int) -> str:
    """A tus creation on this connection; the upload's path."""
    writer.write(request_head("POST", "/files/", port,
                              f"Upload-Length: {length}\r\nContent-Length: 0\r\n"))
    answer = await read_answer(reader, "POST")
    if answer.status != 201:
        raise AnswerError(f"creation {answer.status}")
    return urlsplit(answer.fields["location"]).path


def patch_head(path: str, port: int, offset: int, length: int) -> bytes:
    return request_head("PATCH", path, port,
                        f"Upload-Offset: {offset}\r\nContent-Type: application/offset+octet-stream"
                        f"\r\nContent-Length: {length}\r\n")


class AnswerError(Exception):
    """The shim answered, but not as a successful upload would be answered."""


async def head_target(port: int) -> str:
    """An upload that exists and is not finished (64 KiB of 1 MiB): what the HEADs ask about."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    path = await create(reader, writer, port, MIB)
    writer.write(patch_head(path, port, 0, 64 * KIB) + os.urandom(64 * KIB))
    answer = await read_answer(reader, "PATCH")
    writer.close()
    if answer.status != 204:
        raise AnswerError(f"the HEAD target's PATCH got {answer.status}")
    return path


# ---- slow uploads ------------------------------------------------------------------------


@dataclass
class Load:
    """What a set of slow uploads did."""

    uploads: int
    size: int
    together: bool = False
    """Every upload waits until all are created before it sends its PATCH."""
    created: int = 0
    """Uploads created (or that failed before)."""
    all_created: asyncio.Event = field(default_factory=asyncio.Event)
    sending: int = 0
    """Uploads whose PATCH head went out (or that failed before it)."""
    all_sending: asyncio.Event = field(default_factory=asyncio.Event)
    completed: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    connect_ms: list[float] = field(default_factory=list)
    create_ms: list[float] = field(default_factory=list)
    body_s: list[float] = field(default_factory=list)
    """From the PATCH head to the body's last byte written: longer than size / rate when the
    shim reads slower than the client sends."""
    answer_ms: list[float] = field(default_factory=list)
    """From the body's last byte to the final answer: storing, delivering, answering."""
    first_body_done: float = 0.0
    last_answer: float = 0.0

    def made(self) -> None:
        self.created += 1
        if self.created == self.uploads:
            self.all_created.set()

    def started(self) -> None:
        self.sending += 1
        if self.sending == self.uploads:
            self.all_sending.set()


async def slow_upload(port: int, payload: memoryview, rate: float, delay: float, load: Load) -> None:
    """Wait `delay`, connect, create an upload, send it as one PATCH at `rate` bytes/s in
    PIECE writes, and record the final answer (or what went wrong) in `load`."""
    await asyncio.sleep(delay)
    loop = asyncio.get_running_loop()
    created = sending = False
    writer: asyncio.StreamWriter | None = None
    try:
        began = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        load.connect_ms.append((loop.time() - began) * 1000)
        began = loop.time()
        path = await create(reader, writer, port, len(payload))
        load.create_ms.append((loop.time() - began) * 1000)
        created = True
        load.made()
        if load.together:
            await load.all_created.wait()
        writer.write(patch_head(path, port, 0, len(payload)))
        sending = True
        load.started()
        began = loop.time()
        for sent in range(0, len(payload), PIECE):
            writer.write(payload[sent:sent + PIECE])
            await writer.drain()
            wait = began + (sent + PIECE) / rate - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
        body_done = loop.time()
        load.body_s.append(body_done - began)
        if not load.first_body_done:
            load.first_body_done = body_done
        answer = await read_answer(reader, "PATCH")
        load.answer_ms.append((loop.time() - body_done) * 1000)
        load.last_answer = max(load.last_answer, loop.time())
        if answer.status == 204 and answer.fields.get("shim-upstream-status") == "201":
            load.completed += 1
            load.outcomes["completed"] += 1
        else:
            load.outcomes[f"PATCH {answer.status} (upstream "
                          f"{answer.fields.get('shim-upstream-status', '-')})"] += 1
    except (OSError, asyncio.IncompleteReadError, AnswerError, ValueError) as exc:
        load.outcomes[f"{type(exc).__name__}: {exc}"[:120]] += 1
    finally:
        if not created:
            load.made()
        if not sending:
            load.started()
        if writer is not None:
            writer.close()


def launch(port: int, load: Load, rate: float, ramp: float) -> list[asyncio.Task[None]]:
    payload = memoryview(os.urandom(load.size))
    return [asyncio.create_task(slow_upload(port, payload, rate, random.uniform(0, ramp), load))
            for _ in range(load.uploads)]


# ---- the HEAD probe, in its own process --------------------------------------------------


def probe_main(port: int, path: str, count: int, interval: float, ready: Event, go: Event,
               stop: Event, out: Connection) -> None:
    """HEADs on one keep-alive connection, from `go` until `stop` (or `count` of them), one
    every `interval` s (0: back to back); sends their latencies (ms) and problems to `out`."""
    request = request_head("HEAD", path, port)
    latencies: list[float] = []
    problems: Counter[str] = Counter()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ready.set()
    go.wait()
    due = time.perf_counter()
    while not stop.is_set() and not (count and len(latencies) >= count):
        began = time.perf_counter()
        try:
            sock.sendall(request)
            head = b""
            while b"\r\n\r\n" not in head:
                piece = sock.recv(65536)
                if not piece:
                    raise ConnectionResetError("the shim closed the HEAD connection")
                head += piece
            latencies.append((time.perf_counter() - began) * 1000)
            status = head.split(b" ", 2)[1].decode()
            if status != "200":
                problems[f"HEAD {status}"] += 1
        except OSError as exc:
            problems[type(exc).__name__] += 1
            sock.close()
            sock = socket.create_connection(("127.0.0.1", port))
        if interval:
            due += interval
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            else:
                due = time.perf_counter()  # late: no burst to catch up
    sock.close()
    out.send({"latencies_ms": latencies, "problems": dict(problems)})


class Probe:
    """The HEAD probe process: connected once constructed, measuring between go() and stop()."""

    def __init__(self, port: int, path: str, count: int = 0, interval: float = 0.0) -> None:
        context = multiprocessing.get_context("spawn")
        self._ready, self._go, self._stop = context.Event(), context.Event(), context.Event()
        self._results, child_end = context.Pipe(duplex=False)
        self._proc = context.Process(target=probe_main, daemon=True, args=(
            port, path, count, interval, self._ready, self._go, self._stop, child_end))
        self._proc.start()
        if not self._ready.wait(30):
            raise RuntimeError("the HEAD probe did not connect")

    def go(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self._stop.set()

    async def result(self) -> dict[str, Any]:
        """Wait for its figures: p50/p99 ms, count, and its problems."""
        raw: dict[str, Any] = await asyncio.to_thread(self._results.recv)
        self._proc.join(10)
        latencies = raw["latencies_ms"]
        return {"p50_ms": round(percentile(latencies, 50), 3),
                "p99_ms": round(percentile(latencies, 99), 3),
                "max_ms": round(max(latencies, default=0.0), 3), "count": len(latencies),
                "problems": raw["problems"]}


# ---- the phases --------------------------------------------------------------------------


def percentile(values: list[float], percent: int) -> float:
    if len(values) < 2:
        return max(values, default=0.0)
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


def spread(values: list[float]) -> dict[str, float]:
    """p50, p99 and max of what each upload took."""
    return {"p50": round(percentile(values, 50), 3), "p99": round(percentile(values, 99), 3),
            "max": round(max(values, default=0.0), 3)}


def per_upload(load: Load) -> dict[str, dict[str, float]]:
    return {"connect_ms": spread(load.connect_ms), "create_ms": spread(load.create_ms),
            "body_s": spread(load.body_s), "answer_ms": spread(load.answer_ms)}


def vm_hwm_mb(pid: int) -> float:
    found = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return round(int(found.group(1)) / 1024, 1) if found else 0.0


def vm_rss_mb(pid: int) -> float:
    found = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return round(int(found.group(1)) / 1024, 1) if found else 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def shim_problems(shim: ShimProcess, since: int) -> list[str]:
    """Lines of the shim's output after line `since` that look like trouble."""
    return [line for line in shim.output().splitlines()[since:] if PROBLEM_LINE.search(line)]


async def idle_and_throttled(shim: ShimProcess, args: argparse.Namespace, rate: float,
                             sink: CountingSink) -> tuple[dict[str, Any], dict[str, Any]]:
    path = await head_target(shim.port)
    probe = Probe(shim.port, path, count=args.heads)
    probe.go()
    idle = await probe.result()

    since = len(shim.output().splitlines())
    delivered = sink.deliveries
    load = Load(args.throttled, int(rate * (args.settle + args.window + 2)), together=True)
    probe = Probe(shim.port, path, interval=args.head_interval_ms / 1000)
    tasks = launch(shim.port, load, rate, ramp=0.0)
    await load.all_sending.wait()
    # The shim begins 200 PATCHes that arrived together in a burst of loop work (their heads,
    # leases, files): the window measures the uploads in flight, after that start.
    await asyncio.sleep(args.settle)
    loop = asyncio.get_running_loop()
    window_began = loop.time()
    probe.go()
    await asyncio.sleep(args.window)
    probe.stop()
    window_ended = loop.time()
    busy = await probe.result()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=load.size / rate + 120)
    busy.update(uploads=load.uploads, completed=load.completed, settle_s=args.settle,
                delivered=await settle(sink, delivered, load.completed),
                window_s=round(window_ended - window_began, 2),
                all_sending_throughout=bool(load.first_body_done == 0
                                            or load.first_body_done >= window_ended),
                per_upload=per_upload(load), outcomes=dict(load.outcomes),
                shim_problems=shim_problems(shim, since)[:20])
    return idle, busy


async def settle(sink: CountingSink, before: int, expected: int) -> int:
    """The sink's deliveries since `before`, once `expected` arrived or 10 s went by (a
    delivery is answered before the PATCH that made it is, so this is a safety net)."""
    deadline = time.monotonic() + 10
    while sink.deliveries - before < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return sink.deliveries - before


async def slow_uploads(shim: ShimProcess, args: argparse.Namespace, rate: float,
                       sink: CountingSink) -> dict[str, Any]:
    assert shim.pid is not None
    path = await head_target(shim.port)
    since = len(shim.output().splitlines())
    delivered, rss_before, cpu_before = sink.deliveries, vm_rss_mb(shim.pid), cpu_seconds(shim.pid)
    client_before = resource.getrusage(resource.RUSAGE_SELF)
    probe = Probe(shim.port, path, interval=args.head_interval_ms / 1000)
    load = Load(args.uploads, args.size_kib * KIB)
    loop = asyncio.get_running_loop()
    probe.go()
    began = loop.time()
    tasks = launch(shim.port, load, rate, ramp=args.ramp)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.ramp + load.size / rate + 180)
    ended = load.last_answer or loop.time()
    probe.stop()
    heads = await probe.result()
    client_after = resource.getrusage(resource.RUSAGE_SELF)
    seconds = ended - began
    return {
        "uploads": load.uploads, "completed": load.completed,
        "delivered": await settle(sink, delivered, load.completed),
        "size_kib": args.size_kib, "rate_kib_per_s": args.rate_kib,
        "seconds": round(seconds, 2),
        "ideal_seconds": round(args.ramp + load.size / rate, 2),
        "aggregate_mib_per_s": round(load.completed * load.size / MIB / seconds, 2),
        "peak_rss_mb": vm_hwm_mb(shim.pid), "rss_before_mb": rss_before,
        "shim_cpu_s": round(cpu_seconds(shim.pid) - cpu_before, 2),
        "client_cpu_s": round(client_after.ru_utime + client_after.ru_stime
                              - client_before.ru_utime - client_before.ru_stime, 2),
        "head_p50_ms": heads["p50_ms"], "head_p99_ms": heads["p99_ms"],
        "head_max_ms": heads["max_ms"], "head_count": heads["count"],
        "head_problems": heads["problems"],
        "per_upload": per_upload(load),
        "outcomes": dict(load.outcomes), "shim_running": shim.is_running(),
        "shim_problems": shim_problems(shim, since)[:20],
    }


def start_shim(upstream: str, work: Path, uploads: int) -> ShimProcess:
    cap = 2 * uploads + 1000  # far above the load: nothing is refused for the caps
    return ShimProcess.start("mitmdump", upstream, {
        "storage": {"fsync": True},
        "limits": {"uploads_per_owner": cap, "uploads_total": cap}}, work)


def raise_open_files(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        print(f"warning: RLIMIT_NOFILE is {soft}, the load needs about {needed}")
    return soft


def table(figures: dict[str, Any]) -> str:
    idle, busy, slow = figures["idle"], figures["with_200_uploads"], figures["slow_1000"]
    row: Callable[[str, str], str] = lambda name, value: f"  {name:<44} {value}"  # noqa: E731
    return "\n".join([
        "HEAD latency (tus HEAD on an existing upload, ms)",
        row("idle, back to back", f"p50 {idle['p50_ms']}  p99 {idle['p99_ms']}  "
            f"max {idle['max_ms']}  (n={idle['count']})"),
        row(f"{busy['uploads']} throttled uploads in flight",
            f"p50 {busy['p50_ms']}  p99 {busy['p99_ms']}  max {busy['max_ms']}  "
            f"(n={busy['count']}; completed {busy['completed']}/{busy['uploads']}, "
            f"delivered {busy['delivered']})"),
        row("  their creation / final answer ms, p99",
            f"{busy['per_upload']['create_ms']['p99']} / {busy['per_upload']['answer_ms']['p99']}"),
        f"{slow['uploads']} concurrent slow uploads ({slow['size_kib']} KiB at "
        f"{slow['rate_kib_per_s']} KiB/s each)",
        row("completed / delivered", f"{slow['completed']} / {slow['delivered']} "
            f"of {slow['uploads']}"),
        row("seconds (ideal)", f"{slow['seconds']} ({slow['ideal_seconds']})"),
        row("aggregate MiB/s", f"{slow['aggregate_mib_per_s']}"),
        row("shim peak RSS MB (before)", f"{slow['peak_rss_mb']} ({slow['rss_before_mb']})"),
        row("shim CPU s / client CPU s", f"{slow['shim_cpu_s']} / {slow['client_cpu_s']}"),
        row("HEAD meanwhile, ms", f"p50 {slow['head_p50_ms']}  p99 {slow['head_p99_ms']}  "
            f"max {slow['head_max_ms']}  (n={slow['head_count']})"),
        *(row(f"per upload {name} p50 / p99 / max", f"{v['p50']} / {v['p99']} / {v['max']}")
          for name, v in slow["per_upload"].items()),
        row("outcomes", json.dumps(slow["outcomes"])),
        *(row("shim output", line[:160]) for line in slow["shim_problems"][:5]),
        *(row("shim output (200 phase)", line[:160]) for line in busy["shim_problems"][:5]),
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=1000, help="concurrent slow uploads")
    parser.add_argument("--rate-kib", type=int, default=64, help="KiB/s each upload sends")
    parser.add_argument("--size-kib", type=int, default=512, help="size of each slow upload")
    parser.add_argument("--throttled", type=int, default=200,
                        help="uploads in flight while HEADs are measured")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds between the last PATCH head sent and the HEAD window")
    parser.add_argument("--window", type=float, default=10.0,
                        help="seconds of HEADs with the throttled uploads in flight")
    parser.add_argument("--heads", type=int, default=2000, help="HEADs on the idle shim")
    parser.add_argument("--head-interval-ms", type=float, default=10.0,
                        help="one HEAD every so often under load")
    parser.add_argument("--ramp", type=float, default=1.0,
                        help="the slow uploads start spread over these seconds")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the smoke test")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.uploads, args.size_kib, args.throttled = 50, 128, 20
        args.window, args.heads, args.ramp, args.settle = 3.0, 200, 0.5, 0.5
    rate = args.rate_kib * KIB
    raise_open_files(3 * max(args.uploads, args.throttled) + 200)  # client, shim, its sink
    sink = CountingSink()
    upstream = f"http://127.0.0.1:{sink.port}"
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        with start_shim(upstream, work, args.throttled) as shim:
            idle, busy = asyncio.run(idle_and_throttled(shim, args, rate, sink))
        with start_shim(upstream, work, args.uploads) as shim:
            slow = asyncio.run(slow_uploads(shim, args, rate, sink))
    figures = {"idle": idle, "with_200_uploads": busy, "slow_1000": slow}
    print(table(figures))
    write_figures(figures, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
