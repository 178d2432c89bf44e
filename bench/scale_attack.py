"""Uploads across three shim instances on one Redis while the link drops and instances are
SIGKILLed: what reaches the legacy server (issue 13's figures).

    .venv/bin/python -m bench.scale_attack [--quick] [--uploads 24] [--parallel 4]
        [--size-kib 3072] [--cut-kib 700] [--kill-every 4] [--json FILE]

Three shims (mitmdump, fsync on, `storage.lease_ttl` 2 s, `delivery.on_unknown: hold`) share
a redis-server and a folder behind a round-robin TCP balancer (tests/balancer.py); tuspy
clients (retrying every 0.3 s) upload `--uploads` random files of about `--size-kib`,
`--parallel` at a time, through a link that cuts the connection carrying every `--cut-kib`
KiB (tests/links.py), so their requests keep landing on other instances. Every
`--kill-every` seconds one instance, chosen at random, is SIGKILLed (mid-upload or
mid-delivery, wherever it is), taken out of the balancer, restarted (a new port) and put back.
The recording legacy server (tests/legacy_servers.py) counts, per file: deliveries accepted
(must be one), whether the one was byte-exact, and partial requests (delivery bodies a kill
cut short; never accepted). Printed and as JSON (last line; also `--json`). A client that is
told its upload's outcome is unknown (a kill after the last byte went to the legacy server:
502, held for an operator) counts as `held`; its file is still checked at the legacy server.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError, TusUploadFailed

from bench.ingest import write_figures
from tests.balancer import RoundRobinBalancer
from tests.harness import ShimProcess
from tests.legacy_servers import LegacyServer
from tests.links import CuttingProxy
from tests.redis_server import RedisServer

KIB = 1024
INSTANCES = 3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="4 uploads of 512 KiB, 2 at a time, a kill every 2 s (the smoke test)")
    parser.add_argument("--uploads", type=int, default=24)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--size-kib", type=int, default=3072)
    parser.add_argument("--cut-kib", type=int, default=700)
    parser.add_argument("--kill-every", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.uploads, args.parallel, args.size_kib, args.cut_kib, args.kill_every = 4, 2, 512, 200, 2.0
    return args


class Killer:
    """SIGKILLs a random instance every `every` seconds, then restarts it, until stopped."""

    def __init__(self, shims: list[ShimProcess], balancer: RoundRobinBalancer, every: float,
                 rng: random.Random) -> None:
        self.shims, self.balancer, self.every, self.rng = shims, balancer, every, rng
        self.kills = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Killer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            victim = self.rng.randrange(len(self.shims))
            self.balancer.skip(victim)
            self.shims[victim].kill()
            self.kills += 1
            self.shims[victim].launch()
            self.balancer.set_backends([("127.0.0.1", s.port) for s in self.shims])


@contextmanager
def cluster(work: Path, legacy: LegacyServer) -> Iterator[tuple[list[ShimProcess], RoundRobinBalancer]]:
    with ExitStack() as stack:
        redis = stack.enter_context(RedisServer(work / "redis"))
        config = {"storage": {"backend": "redis", "redis_url": redis.url,
                              "dir": str(work / "shared"), "lease_ttl": 2.0},
                  "delivery": {"on_unknown": "hold"},
                  "tus": {"forward": {"path": "/uploads/{filename}"}}}
        shims = [ShimProcess.start("mitmdump", legacy.url, config, work) for _ in range(INSTANCES)]
        for shim in shims:
            stack.callback(shim.kill)
        balancer = stack.enter_context(RoundRobinBalancer([("127.0.0.1", s.port) for s in shims]))
        yield shims, balancer


def upload(url: str, source: Path) -> str:
    """One tuspy upload to its end: "done", or "held" when the shim says the delivery's
    outcome is unknown (a kill after its last byte went out)."""
    tus = tus_client.TusClient(f"{url}/files/")
    uploader = tus.uploader(file_path=str(source), chunk_size=256 * KIB, retries=200,
                            retry_delay=0.3, metadata={"filename": source.name})
    try:
        uploader.upload()
    except (TusCommunicationError, TusUploadFailed) as exc:
        if getattr(exc, "status_code", None) == 502:
            return "held"
        raise
    return "done"


def main() -> int:
    args = parse_args()
    rng = random.Random(args.seed)
    legacy = LegacyServer()
    legacy.start()
    with tempfile.TemporaryDirectory(prefix="bench-scale-attack-") as folder:
        work = Path(folder)
        files = {}
        for index in range(args.uploads):
            source = work / f"file-{index}.bin"
            source.write_bytes(os.urandom(args.size_kib * KIB + rng.randrange(KIB)))
            files[source.name] = hashlib.sha256(source.read_bytes()).hexdigest()
        with cluster(work, legacy) as (shims, balancer):
            link = CuttingProxy(balancer.port, cut_every=args.cut_kib * KIB)
            try:
                with Killer(shims, balancer, args.kill_every, rng) as killer, \
                        ThreadPoolExecutor(args.parallel) as pool:
                    results = list(pool.map(lambda name: upload(link.url, work / name), files))
            finally:
                link.stop()
            served = {i: balancer.connections.count(i) for i in range(INSTANCES)}
    legacy.stop()
    figures = tally(files, legacy, results)
    figures.update(cuts=link.cuts, kills=killer.kills, connections_per_instance=served,
                   uploads=args.uploads, size_kib=args.size_kib)
    print(f"{args.uploads} uploads of ~{args.size_kib} KiB across {INSTANCES} instances, link cut "
          f"{link.cuts} times, {killer.kills} instances SIGKILLed: {figures['whole_once']} "
          f"delivered once and whole, {figures['duplicates']} duplicate deliveries, "
          f"{figures['lost']} lost, {figures['held']} held as unknown, "
          f"{figures['partial_requests']} partial requests (never accepted)")
    write_figures(figures, args.json)
    return 0 if figures["lost"] == figures["duplicates"] == figures["corrupt"] == 0 else 1


def tally(files: dict[str, str], legacy: LegacyServer, results: list[str]) -> dict[str, Any]:
    """Per file, what the legacy server accepted, against what was sent."""
    whole_once = duplicates = lost = corrupt = 0
    for name, digest in files.items():
        accepted = legacy.accepted(f"/uploads/{name}")
        whole_once += len(accepted) == 1 and accepted[0].sha256 == digest
        duplicates += max(0, len(accepted) - 1)
        lost += not accepted
        corrupt += any(request.sha256 != digest for request in accepted)
    partial = sum(not request.complete for request in legacy.requests("/uploads/"))
    return {"whole_once": whole_once, "duplicates": duplicates, "lost": lost,
            "corrupt": corrupt, "held": results.count("held"), "partial_requests": partial}


if __name__ == "__main__":
    raise SystemExit(main())
