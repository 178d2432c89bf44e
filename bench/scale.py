"""Aggregate ingest of one shim against three sharing one Redis, behind a balancer (issue 13).

    .venv/bin/python -m bench.scale [--quick] [--clients 6] [--size-mib 64] [--chunk-mib 8]
        [--repeat 3] [--json FILE]

`--clients` tus clients upload at once, each `--size-mib` in `--chunk-mib` PATCHes on one
persistent connection of its own, through a round-robin TCP balancer (tests/balancer.py: each
new connection to the next instance) in front of:
- `local-1`: one shim on the embedded local store (the single-instance baseline);
- `redis-1`: one shim on the Redis store (what Redis costs one instance);
- `redis-3`: three shims on one Redis and one shared folder.
Every shim fsyncs (the default) and delivers each finished file to one discarding sink,
which tallies what it got. The figure is the aggregate MiB/s from the first chunk sent to
the last client's last answer (creations untimed), the median of `--repeat` runs; printed
with `redis-3 / redis-1` and `redis-3 / local-1`, and as JSON (last line; also `--json`).
Each upload must reach the sink exactly once, whole, or the run fails. On 2 cores three
instances share the cores one had: the ratio says what the shared store costs and how far
the work spreads, not what three machines would do.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench.ingest import DELIVERED, MIB, DiscardingSink, send_chunks, tus_create, write_figures
from tests.balancer import RoundRobinBalancer
from tests.harness import ShimProcess
from tests.redis_server import RedisServer

SETUPS = ("local-1", "redis-1", "redis-3")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 clients of 4 MiB in 1 MiB chunks, one run (overrides the rest)")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--chunk-mib", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.clients, args.size_mib, args.chunk_mib, args.repeat = 2, 4, 1, 1
    return args


@contextmanager
def instances(setup: str, upstream: str, work: Path) -> Iterator[RoundRobinBalancer]:
    """The shims of `setup` behind a balancer; all stopped on leaving."""
    backend, count = setup.split("-")
    with ExitStack() as stack:
        storage: dict[str, Any] = {"dir": str(work / setup / "store")}
        if backend == "redis":
            redis = stack.enter_context(RedisServer(work / setup / "redis"))
            storage.update(backend="redis", redis_url=redis.url)
        config = {"storage": storage, "tus": {"forward": {"path": f"{DELIVERED}{setup}/{{id}}"}}}
        shims = [ShimProcess.start("mitmdump", upstream, config, work) for _ in range(int(count))]
        for shim in shims:
            stack.callback(shim.kill)
        balancer = stack.enter_context(RoundRobinBalancer([("127.0.0.1", s.port) for s in shims]))
        yield balancer


def one_run(port: int, clients: int, chunk: bytes, count: int) -> float:
    """`clients` tus uploads at once through 127.0.0.1:`port`; seconds for all of them."""
    length = count * len(chunk)
    locations = [tus_create(port, length) for _ in range(clients)]
    failures: list[BaseException] = []

    def upload(location: str) -> None:
        try:
            send_chunks(port, chunk, count, lambda i: ("PATCH", location, {
                "Tus-Resumable": "1.0.0", "Upload-Offset": str(i * len(chunk)),
                "Content-Type": "application/offset+octet-stream"}))
        except BaseException as exc:  # reported by the caller
            failures.append(exc)

    threads = [threading.Thread(target=upload, args=(location,)) for location in locations]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    if failures:
        raise RuntimeError(f"an upload failed: {failures[0]!r}")
    return elapsed


def main() -> int:
    args = parse_args()
    sink = DiscardingSink()
    upstream = f"http://127.0.0.1:{sink.port}"
    chunk = os.urandom(args.chunk_mib * MIB)
    count = max(1, args.size_mib // args.chunk_mib)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as folder:
        for setup in SETUPS:
            with instances(setup, upstream, Path(folder)) as balancer:
                speeds = [args.clients * count * args.chunk_mib
                          / one_run(balancer.port, args.clients, chunk, count)
                          for _ in range(args.repeat)]
            figures[setup] = round(statistics.median(speeds), 1)
    expected = args.clients * args.repeat * count * len(chunk)
    delivered = {setup: sink.delivered[setup] for setup in SETUPS}
    if any(size != expected for size in delivered.values()):
        raise SystemExit(f"the sink did not get every upload once: {delivered}, "
                         f"expected {expected} bytes each")
    ratios = {"redis-3 / redis-1": round(figures["redis-3"] / figures["redis-1"], 2),
              "redis-3 / local-1": round(figures["redis-3"] / figures["local-1"], 2),
              "redis-1 / local-1": round(figures["redis-1"] / figures["local-1"], 2)}
    print(f"aggregate ingest MiB/s, {args.clients} tus clients at once, {args.size_mib} MiB "
          f"each in {args.chunk_mib} MiB chunks, median of {args.repeat}, {os.cpu_count()} cores")
    print("| " + " | ".join(SETUPS) + " | " + " | ".join(ratios) + " |")
    print("|---" * (len(SETUPS) + len(ratios)) + "|")
    print("| " + " | ".join(f"{figures[s]:,.1f}" for s in SETUPS) + " | "
          + " | ".join(f"{r:.2f}" for r in ratios.values()) + " |")
    write_figures({"clients": args.clients, "size_mib": args.size_mib,
                   "chunk_mib": args.chunk_mib, "repeat": args.repeat, "cores": os.cpu_count(),
                   "mib_per_s": figures, "ratios": ratios,
                   "delivered_mib": {s: round(b / MIB, 1) for s, b in delivered.items()}},
                  args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
