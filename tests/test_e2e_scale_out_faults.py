"""Issue 13 under faults: three shim instances share one Redis and one folder behind a
round-robin balancer (tests/scale_out.py), and the faults a fleet meets are made to land at
known points: an instance SIGKILLed while a PATCH body streams into it, or while it delivers
a file (before or after the file's last bytes went out), many deliveries due at once on every
instance, the expiry sweep running on every instance, Redis itself restarted under the fleet,
and an instance frozen (SIGSTOP) past its leases and then thawed.

Every test counts, at the legacy server, the requests accepted and the bytes (size and
SHA-256) of each: a finished file reaches it once, whole, never partially; and nothing the
shim told a client it stored is lost (an offset once acknowledged never goes back).

Where a test needs what the `cluster` fixture cannot give (a relay per instance, so that the
instance delivering a file is known; extra `storage`/`tus` keys, which `cluster(**sections)`
would replace wholesale; a Redis with persistence) it builds its instances with the `shim`
fixture, `shared_config` and a RoundRobinBalancer of its own (`fleet` below).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import requests
from tusclient import client as tus_client

from tests.balancer import RoundRobinBalancer
from tests.harness import ShimLauncher, ShimProcess, wait_until
from tests.legacy_servers import LegacyServer
from tests.links import CuttingProxy
from tests.redis_server import RedisServer
from tests.scale_out import KIB, MIB, Cluster, accepted_once, sha256, shared_config
from tests.test_e2e_issue12_attack import holds_for, whole
from tests.test_e2e_sigkill import Relay

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 30.0
"""Seconds any single request or wait may take before the test fails."""
TUS = {"Tus-Resumable": "1.0.0"}
CHUNK_TYPE = "application/offset+octet-stream"
NS = "shim:"
"""The shared store's Redis namespace (shim.redis_store.NAMESPACE)."""


# --- a tus client ------------------------------------------------------------------------


def show(response: requests.Response) -> str:
    """A response in one line, for assertion messages."""
    return f"{response.status_code} {dict(response.headers)} {response.text[:300]!r}"


def metadata(name: str) -> str:
    return "filename " + base64.b64encode(name.encode()).decode()


def create(url: str, length: int, name: str) -> str:
    """POST a tus upload named `name` (delivered to /uploads/<name>); its path (/files/<id>)."""
    response = requests.post(f"{url}/files/", timeout=TIMEOUT, headers={
        **TUS, "Upload-Length": str(length), "Upload-Metadata": metadata(name)})
    assert response.status_code == 201, show(response)
    return "/files/" + response.headers["Location"].rsplit("/files/", 1)[1]


def upload_id(path: str) -> str:
    return path.rsplit("/", 1)[1]


def head(url: str, path: str) -> requests.Response:
    return requests.head(url + path, headers=TUS, timeout=TIMEOUT)


def patch(url: str, path: str, offset: int, data: bytes) -> requests.Response:
    return requests.patch(url + path, data=data, timeout=TIMEOUT, headers={
        **TUS, "Upload-Offset": str(offset), "Content-Type": CHUNK_TYPE})


def open_patch(port: int, path: str, offset: int, length: int) -> socket.socket:
    """A PATCH of `length` bytes from `offset` on a raw socket to one instance; only its
    head is sent: the test sends the body (or part of it) itself."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.sendall((f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  f"Tus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\n"
                  f"Content-Type: {CHUNK_TYPE}\r\nContent-Length: {length}\r\n\r\n").encode())
    return sock


def status_of(sock: socket.socket) -> int:
    """The status of the answer that arrives on a raw socket (0: none before it closed)."""
    answer = b""
    with contextlib.suppress(OSError):
        while b"\r\n" not in answer and (got := sock.recv(4096)):
            answer += got
    return int(answer.split(b" ", 2)[1]) if answer else 0


@dataclass
class Client:
    """A tus client that remembers every answer and every offset it was told."""

    url: str
    path: str
    data: bytes
    seen: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)

    def _note(self, method: str, response: requests.Response) -> requests.Response:
        self.seen.append(f"{method} {response.status_code}")
        if "Upload-Offset" in response.headers:
            self.offsets.append(int(response.headers["Upload-Offset"]))
        return response

    def head(self) -> requests.Response:
        return self._note("HEAD", head(self.url, self.path))

    def patch(self, offset: int) -> requests.Response:
        return self._note("PATCH", patch(self.url, self.path, offset, self.data[offset:]))

    def delivered(self, status: requests.Response) -> bool:
        """A HEAD that reports the whole file stored and the legacy server's answer."""
        return status.headers.get("Upload-Offset") == str(len(self.data)) and \
            "Shim-Upstream-Status" in status.headers

    def resume(self, timeout: float = TIMEOUT, until: int = 200,
               tolerate: tuple[int, ...] = ()) -> requests.Response:
        """What a tus client does after losing its connection: HEAD, PATCH the rest, until a
        HEAD answers `until` (200: delivered, with the legacy server's status; 502: the
        delivery FAILED), with a deadline. Busy answers (409, 423, 503), the statuses in
        `tolerate` (noted in `seen`) and refused connections are asked again after a
        polling interval."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.head()
                if status.status_code == until and (until != 200 or self.delivered(status)):
                    return status
                assert status.status_code in (200, 409, 423, 502, 503, *tolerate), show(status)
                offset = int(status.headers.get("Upload-Offset", len(self.data)))
                if status.status_code == 200 and offset < len(self.data):
                    answer = self.patch(offset)
                    assert answer.status_code in (204, 409, 423, 502, 503, *tolerate), \
                        show(answer)
            except requests.ConnectionError as exc:
                self.seen.append(f"connection error {type(exc).__name__}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {until} within {timeout}s; answers {self.seen}")
            time.sleep(0.1)  # a polling interval: the next round asks again


# --- what the shared store holds -----------------------------------------------------------


class Records:
    """A plain look into the shared Redis, to check preconditions and leftovers."""

    def __init__(self, server: RedisServer) -> None:
        self.client = redis.Redis.from_url(server.url, socket_timeout=5.0)

    def record(self, upload: str) -> dict[str, Any] | None:
        raw = cast(bytes | None, self.client.hget(f"{NS}u:{upload}", "j"))
        return cast(dict[str, Any], json.loads(raw)) if raw is not None else None

    def holder(self, lease: str) -> str | None:
        raw = cast(bytes | None, self.client.get(f"{NS}lease:{lease}"))
        return raw.decode() if raw is not None else None

    def indexed(self, upload: str) -> list[str]:
        """The indexes that still name `upload`."""
        found = []
        if self.client.sismember(f"{NS}ids", upload):
            found.append("ids")
        for index in ("expiry", "outbox"):
            if self.client.zscore(f"{NS}{index}", upload) is not None:
                found.append(index)
        if self.client.hexists(f"{NS}inc", upload):
            found.append("inc")
        return found

    def subscribers(self) -> int:
        """Instances listening to the signals channel (shim.backends.signals_for)."""
        counts = cast(list[tuple[bytes, int]], self.client.pubsub_numsub(f"{NS}signals"))
        return int(counts[0][1]) if counts else 0

    def close(self) -> None:
        self.client.close()


# --- a fleet the test builds itself --------------------------------------------------------


@dataclass
class Fleet:
    """Like tests/scale_out.Cluster, with a relay in front of the legacy server per instance
    (when asked), so that which instance delivers is known, and the shared folder."""

    shims: list[ShimProcess]
    balancer: RoundRobinBalancer
    legacy: LegacyServer
    redis: RedisServer
    folder: Path
    relays: list[Relay]

    @property
    def url(self) -> str:
        return self.balancer.url

    def data_file(self, path: str) -> Path:
        return self.folder / "data" / upload_id(path)

    def delivering(self) -> list[int]:
        """The instances whose relay carries a connection to the legacy server now."""
        return [index for index, relay in enumerate(self.relays) if relay.pipes]

    def kill(self, index: int) -> None:
        """SIGKILL an instance, take it out of the balancer and cut its connections to the
        legacy server, as the network does when a machine dies."""
        assert self.shims[index].kill() == -9
        self.balancer.skip(index)
        if self.relays:
            self.relays[index].cut()


FleetFactory = Callable[..., Fleet]


@pytest.fixture
def fleet(shim: ShimLauncher, recording_legacy: LegacyServer, redis_server: RedisServer,
          tmp_path: Path) -> Iterator[FleetFactory]:
    """`fleet(count=3, relays_per_instance=False, redis=None, storage=None, tus=None,
    **sections)`:
    instances on `redis` (default: the `redis_server` fixture's) and tmp_path/"shared";
    `storage` and `tus` keys are merged into those shared_config gives (not replacing them)."""
    balancers: list[RoundRobinBalancer] = []
    relays: list[Relay] = []

    def start(count: int = 3, relays_per_instance: bool = False, redis: RedisServer | None = None,
              storage: dict[str, Any] | None = None, tus: dict[str, Any] | None = None,
              **sections: Any) -> Fleet:
        server = redis or redis_server
        folder = tmp_path / "shared"
        config = shared_config(server, folder, **sections)
        config["storage"].update(storage or {})
        config["tus"].update(tus or {})
        own: list[Relay] = []
        if relays_per_instance:
            own = [Relay(("127.0.0.1", recording_legacy.port)) for _ in range(count)]
            relays.extend(own)
        upstreams = [relay.url for relay in own] or [recording_legacy.url] * count
        shims = [shim(config, upstream_url=upstream) for upstream in upstreams]
        balancer = RoundRobinBalancer([("127.0.0.1", s.port) for s in shims])
        balancers.append(balancer)
        return Fleet(shims, balancer, recording_legacy, server, folder, own)

    yield start
    for balancer in balancers:
        balancer.close()
    for relay in relays:
        relay.stop()


@pytest.fixture
def records(redis_server: RedisServer) -> Iterator[Records]:
    looking = Records(redis_server)
    try:
        yield looking
    finally:
        looking.close()


def problems(shims: list[ShimProcess]) -> list[str]:
    """Lines of the instances' output that show an error: a traceback or a failure."""
    return [line for s in shims for line in s.output().splitlines()
            if "Traceback" in line or re.search(r"\bfailed\b", line)]


def events(shims: list[ShimProcess], event: str, upload: str) -> list[int]:
    """The instances that logged `event` for `upload`, once per line."""
    pattern = re.compile(rf"upload event={re.escape(event)} id={re.escape(upload)} ")
    return [index for index, s in enumerate(shims) for line in s.output().splitlines()
            if pattern.search(line)]


# --- 1. SIGKILL while a PATCH body streams into an instance ------------------------------


def test_sigkill_mid_patch_the_survivors_finish_the_upload_after_the_lease_lapses(
        cluster: Callable[..., Cluster], records: Records, tmp_path: Path) -> None:
    """A PATCH body stalls at instance 0 once 1 MiB of its 2 MiB reached the shared data
    file; instance 0 is SIGKILLed and leaves the balancer. The client asks the survivors
    (HEAD, PATCH the rest), which may make it wait until instance 0's write lease lapses:
    the upload completes, no acknowledged offset goes back, and the legacy server accepts
    the whole file exactly once."""
    group = cluster(delivery={"wait": 5.0})
    folder = tmp_path / "shared"
    data = os.urandom(3 * MIB + 17)
    victim = group.shims[0]
    path = create(victim.url, len(data), "killed-mid-patch.bin")
    first = patch(victim.url, path, 0, data[:MIB])
    assert (first.status_code, first.headers.get("Upload-Offset")) == (204, str(MIB)), show(first)

    sock = open_patch(victim.port, path, MIB, len(data) - MIB)
    sock.sendall(data[MIB:2 * MIB])  # and then nothing: the body stalls half-way
    stored = folder / "data" / upload_id(path)
    wait_until(lambda: stored.stat().st_size >= 2 * MIB, TIMEOUT,
               "the stalled body's bytes in the shared data file")
    assert victim.kill() == -9
    group.balancer.skip(0)
    sock.close()
    assert records.holder(f"write:{upload_id(path)}") is not None, \
        "precondition: the dead instance's write lease has not lapsed yet"

    client = Client(group.url, path, data)
    client.resume()
    assert min(client.offsets) >= MIB, f"an acknowledged offset went back: {client.seen} " \
        f"{client.offsets}"
    accepted_once(group.legacy, "/uploads/killed-mid-patch.bin", data)
    assert holds_for(lambda: len(group.legacy.requests()) == 1, 1.0), group.legacy.requests()
    assert all(s.is_running() for s in group.shims[1:])


def test_sigkill_the_instance_receiving_a_tuspy_chunk(
        cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    """tuspy (retries on) uploads through the balancer in 1 MiB chunks, each on a new
    connection; the link stalls in the third chunk, the instance receiving it is SIGKILLed
    and leaves the balancer, the link drops. tuspy retries (HEAD, PATCH) at the survivors
    and the legacy server accepts the whole file exactly once."""
    group = cluster(delivery={"wait": 5.0})
    data = os.urandom(5 * MIB + 333)
    source = tmp_path / "tuspy-killed.bin"
    source.write_bytes(data)
    link = CuttingProxy(group.balancer.port, cut_every=1 << 40, stall_at=2 * MIB + 600 * KIB)
    failure: list[BaseException] = []

    def upload() -> None:
        try:
            tus = tus_client.TusClient(f"{link.url}/files/")
            tus.uploader(file_path=str(source), chunk_size=MIB, retries=60, retry_delay=0.2,
                         metadata={"filename": "tuspy-killed.bin"}).upload()
        except BaseException as exc:
            failure.append(exc)

    uploading = threading.Thread(target=upload, daemon=True)
    try:
        uploading.start()
        assert link.stalled.wait(TIMEOUT), "the link never stalled"
        data_dir = tmp_path / "shared" / "data"

        def third_chunk_arriving() -> bool:
            files = list(data_dir.iterdir())
            return len(files) == 1 and files[0].stat().st_size > 2 * MIB + 256 * KIB

        wait_until(third_chunk_arriving, TIMEOUT, "the third chunk in the shared data file")
        # Its bytes reach an instance: the balancer took (and piped) its connection, the
        # last one, since tuspy sends one request at a time, each on a new connection.
        victim = group.balancer.connections[-1]
        assert victim is not None, group.balancer.connections
        assert group.shims[victim].kill() == -9
        group.balancer.skip(victim)
        link.drop_all()
        uploading.join(3 * TIMEOUT)
    finally:
        link.stop()
    assert not uploading.is_alive(), "tuspy did not finish"
    assert not failure, failure
    accepted_once(group.legacy, "/uploads/tuspy-killed.bin", data)
    assert holds_for(lambda: len(group.legacy.requests()) == 1, 1.0), group.legacy.requests()


# --- 2. SIGKILL mid-delivery, before the file's last bytes were sent ----------------------

GATE = 2 * MIB
"""Body bytes of a delivery each relay lets through while the test holds it."""


def delivery_held_mid_body(fleet: FleetFactory, records: Records,
                           name: str) -> tuple[Fleet, bytes, str, int]:
    """A 32 MiB file whose delivery one instance has begun and its relay holds after GATE
    bytes, its last bytes not sent (checked in Redis): the fleet, the file, its path and the
    delivering instance."""
    group = fleet(relays_per_instance=True, delivery={"wait": 0.5, "on_unknown": "hold"},
                  upstream={"timeout": 30.0})
    for relay in group.relays:
        relay.configure(gate=GATE, hold=False)
    data = os.urandom(32 * MIB + 5)
    path = create(group.url, len(data), name)
    final = patch(group.url, path, 0, data)
    assert final.status_code in (204, 503), show(final)
    wait_until(lambda: any(r.body_forwarded() >= GATE for r in group.relays), TIMEOUT,
               "a delivery held by its relay")
    [victim] = [i for i, r in enumerate(group.relays) if r.body_forwarded() >= GATE]
    record = records.record(upload_id(path))
    assert record is not None and (record["state"], record["last_bytes_sent"]) == (
        "delivering", False), f"precondition: {record}"
    return group, data, path, victim


def test_sigkill_mid_delivery_before_the_last_bytes_a_survivor_delivers_once(
        fleet: FleetFactory, records: Records) -> None:
    """Instance X is sending a 32 MiB file, held by its relay after 2 MiB; X is SIGKILLed
    and its connection cut. The last bytes never went out, so even with `on_unknown: hold`
    the delivery is safe to retry: a survivor's worker takes it once X's delivery lease
    lapsed. The legacy server ends with the cut request (incomplete) and one complete,
    accepted one; a client asking again (HEAD, the final PATCH again) gets the answer."""
    group, data, path, victim = delivery_held_mid_body(fleet, records, "killed-mid-delivery.bin")

    group.kill(victim)
    for relay in group.relays:
        relay.configure(gate=None, hold=False)
    done = Client(group.url, path, data).resume()
    assert done.headers["Shim-Upstream-Status"] == "201", show(done)
    again = patch(group.url, path, len(data), b"")
    assert (again.status_code, again.headers.get("Shim-Upstream-Status")) == (204, "201"), \
        show(again)

    accepted_once(group.legacy, "/uploads/killed-mid-delivery.bin", data)
    assert holds_for(lambda: len(group.legacy.requests()) == 2, 1.0), group.legacy.requests()
    cut = [r for r in group.legacy.requests() if not 200 <= r.status < 300]
    assert len(cut) == 1 and not cut[0].complete and cut[0].size < len(data), cut
    assert group.delivering() == []


# --- 3. SIGKILL mid-delivery, after the whole body was sent -------------------------------


@pytest.mark.parametrize("on_unknown", ["hold", "retry"])
def test_sigkill_after_the_whole_body_was_sent_follows_on_unknown(
        fleet: FleetFactory, records: Records, on_unknown: str) -> None:
    """The legacy server has the whole file and hangs before answering; the instance
    delivering it is SIGKILLed. The outcome is unknown.

    hold: a survivor marks the upload FAILED once the delivery lease lapsed and never sends
    it again: the legacy server got exactly one (complete, unanswered) request, and the
    client is told 502.

    retry: a survivor sends it again (at-least-once): the legacy server gets exactly two
    complete requests, the first unanswered (its connection died with the instance), the
    second accepted; the client is told 201."""
    group = fleet(relays_per_instance=True,
                  delivery={"wait": 0.5, "on_unknown": on_unknown},
                  upstream={"timeout": 30.0})
    legacy = group.legacy
    data = os.urandom(3 * MIB + 7)
    path = create(group.url, len(data), f"unknown-{on_unknown}.bin")
    legacy.set_mode("hang")
    final = patch(group.url, path, 0, data)
    assert final.status_code == 503, show(final)
    wait_until(lambda: any(r.complete for r in legacy.requests()), TIMEOUT,
               "the whole file at the legacy server")
    [victim] = group.delivering()
    record = records.record(upload_id(path))
    assert record is not None and (record["state"], record["last_bytes_sent"]) == (
        "delivering", True), f"precondition: {record}"

    group.kill(victim)
    if on_unknown == "hold":
        failed = Client(group.url, path, data).resume(until=502)
        assert failed.headers["Upload-Offset"] == str(len(data)), show(failed)
        legacy.set_mode("ok")  # a resend would now be accepted, and seen
        again = patch(group.url, path, len(data), b"")
        assert again.status_code == 502, show(again)
        assert holds_for(lambda: len(legacy.requests()) == 1, 1.5), legacy.requests()
        [only] = legacy.requests()
        assert whole(only, data) and only.status == 0, only
        record = records.record(upload_id(path))
        assert record is not None and record["state"] == "failed", record
    else:
        wait_until(lambda: len(legacy.requests()) == 2 and legacy.requests()[1].complete,
                   TIMEOUT, "the file sent again by a survivor")
        legacy.set_mode("ok")
        done = Client(group.url, path, data).resume()
        assert done.headers["Shim-Upstream-Status"] == "201", show(done)
        assert holds_for(lambda: len(legacy.requests()) == 2, 1.5), legacy.requests()
        first, second = legacy.requests()
        assert whole(first, data) and whole(second, data), legacy.requests()
        assert (first.status, second.status) == (0, 201), legacy.requests()


# --- 4. many deliveries due at once on every instance -------------------------------------


def test_twenty_uploads_completed_at_once_are_each_delivered_by_one_instance_once(
        cluster: Callable[..., Cluster]) -> None:
    """20 tus uploads, finished at the same moment through the balancer; every instance's
    worker sees them all due. The legacy server answers each only after 2.5 s, longer than
    the 2 s lease, so each delivery lease must be renewed while it runs (else another
    worker would find it DELIVERING with its last bytes sent, and hold it as FAILED). Each
    file is accepted exactly once, byte-exact, and no file is sent a second time."""
    group = cluster(delivery={"wait": 1.0})
    group.legacy.late = 2.5
    group.legacy.set_mode("late")
    files = [os.urandom(64 * KIB + 997 * n) for n in range(20)]
    names = [f"many-{n}.bin" for n in range(20)]
    barrier = threading.Barrier(len(files))
    paths: list[str] = [""] * len(files)

    def one(n: int) -> int:
        data = files[n]
        path = paths[n] = create(group.url, len(data), names[n])
        half = len(data) // 2
        started = patch(group.url, path, 0, data[:half])
        assert started.status_code == 204, show(started)
        barrier.wait(TIMEOUT)
        final = patch(group.url, path, half, data[half:])
        assert final.status_code in (204, 503), show(final)
        done = Client(group.url, path, data).resume()
        return int(done.headers["Shim-Upstream-Status"])

    with ThreadPoolExecutor(len(files)) as pool:
        statuses = list(pool.map(one, range(len(files))))
    assert statuses == [201] * len(files)
    assert group.served_by() == {0, 1, 2}
    for name, data in zip(names, files, strict=True):
        accepted_once(group.legacy, f"/uploads/{name}", data)
    assert holds_for(lambda: len(group.legacy.requests()) == len(files), 1.0), \
        [(r.path, r.status) for r in group.legacy.requests()]
    delivered_by = [events(group.shims, "delivered", upload_id(path)) for path in paths]
    assert all(len(by) == 1 for by in delivered_by), delivered_by
    assert problems(group.shims) == []


def test_four_slow_deliveries_at_one_instance_do_not_hold_up_a_fifth_at_the_others(
        fleet: FleetFactory) -> None:
    """Four files are being delivered slowly (each relay lets 1 MiB of a delivery through,
    then holds it; the legacy server waits for the rest): every slot of one instance's
    worker (4) may be taken, but two more instances have free ones. A fifth file completed
    now must reach the legacy server while the four are still in flight."""
    group = fleet(relays_per_instance=True, delivery={"wait": 0.5}, upstream={"timeout": 30.0})
    for relay in group.relays:
        relay.configure(gate=MIB, hold=False)
    for n in range(4):
        data = os.urandom(4 * MIB + n)
        path = create(group.url, len(data), f"slow-{n}.bin")
        sent = patch(group.url, path, 0, data)
        assert sent.status_code == 503, show(sent)
    group.legacy.wait_for(4, TIMEOUT)
    fifth = os.urandom(10 * KIB)
    path = create(group.url, len(fifth), "fifth.bin")
    sent = patch(group.url, path, 0, fifth)
    assert sent.status_code in (204, 503), show(sent)
    # The outbox index keeps DELIVERING uploads, so the first due ids are the four leased
    # elsewhere; a worker must look past them (Outbox._dispatch, DUE_LOOKAHEAD) or the
    # whole fleet delivers at most `concurrency` files at a time and 4 slow ones stall all.
    wait_until(lambda: len(group.legacy.requests("/uploads/fifth.bin")) == 1, 10.0,
               "the fifth file at the legacy server while four others are in flight "
               f"(in flight: {[len(r.pipes) for r in group.relays]} per instance)")
    for relay in group.relays:
        relay.configure(gate=None, hold=False)
    done = Client(group.url, path, fifth).resume()
    assert done.headers["Shim-Upstream-Status"] == "201", show(done)
    accepted_once(group.legacy, "/uploads/fifth.bin", fifth)


# --- 5. the expiry sweep on every instance --------------------------------------------------


def test_every_instance_sweeps_each_expired_upload_goes_once_a_running_write_stays(
        fleet: FleetFactory, records: Records) -> None:
    """`tus.expiration: 1` and `storage.sweep_interval: 0.5` on three instances (merged
    into the shared config: `cluster(storage=..., tus=...)` would replace the cluster's own
    storage and tus sections). Six unfinished uploads expire: each one's record leaves Redis
    (and every index) and its data file the shared folder, logged once by one instance, with
    no error anywhere, and a HEAD then gets 404/410. An upload whose PATCH body is still
    arriving at instance 1 (stalled) expired on paper first, but is not swept while its write
    runs; its body then completes and it is delivered once."""
    group = fleet(storage={"sweep_interval": 0.5}, tus={"expiration": 1},
                  delivery={"wait": 5.0})
    writer = group.shims[1]
    running = os.urandom(64 * KIB + 1)
    kept = create(writer.url, len(running), "still-writing.bin")
    sock = open_patch(writer.port, kept, 0, len(running))
    sock.sendall(running[:16 * KIB])
    wait_until(lambda: group.data_file(kept).exists()
               and group.data_file(kept).stat().st_size >= 16 * KIB, TIMEOUT,
               "the stalled body's bytes in the shared data file")

    idle: list[str] = []
    for n in range(6):
        path = create(group.url, 100 * KIB, f"idle-{n}.bin")
        sent = patch(group.url, path, 0, os.urandom(10 * KIB))
        assert sent.status_code == 204, show(sent)
        idle.append(path)

    def swept() -> bool:
        return all(records.record(upload_id(p)) is None and not group.data_file(p).exists()
                   for p in idle)

    wait_until(swept, TIMEOUT, "the idle uploads swept")
    assert holds_for(lambda: records.record(upload_id(kept)) is not None
                     and group.data_file(kept).exists(), 1.5), "a running write was swept"
    for path in idle:
        assert records.indexed(upload_id(path)) == [], (path, records.indexed(upload_id(path)))
        assert len(events(group.shims, "expired", upload_id(path))) == 1, \
            (path, events(group.shims, "expired", upload_id(path)))
        gone = head(group.url, path)
        assert gone.status_code in (404, 410), show(gone)

    sock.sendall(running[16 * KIB:])
    assert status_of(sock) == 204
    sock.close()
    accepted_once(group.legacy, "/uploads/still-writing.bin", running)
    sweepers = {i for p in idle for i in events(group.shims, "expired", upload_id(p))}
    assert sweepers, "no instance swept"
    assert problems(group.shims) == []
    assert all(s.is_running() for s in group.shims)


# --- 6. Redis restarted under the fleet ---------------------------------------------------


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server with an append-only file (fsync always), so that a restart (SIGTERM,
    then start on the same port) finds every record again."""
    server = RedisServer(tmp_path / "redis-aof", appendonly=True,
                         extra_args=["--appendfsync", "always"])
    try:
        yield server.start()
    finally:
        server.close()
        print(f"==== redis-server in {server.directory} ====\n{server.output()}")


def test_redis_restarted_mid_upload_the_upload_completes_and_is_delivered_once(
        fleet: FleetFactory, persistent_redis: RedisServer) -> None:
    """An upload is half stored when Redis is stopped and started again (same port, its
    append-only file kept). The instances stay up (they may log warnings), the client
    resumes through the balancer, no acknowledged byte is lost, and the legacy server
    accepts the file exactly once."""
    group = fleet(redis=persistent_redis, delivery={"wait": 5.0})
    data = os.urandom(4 * MIB + 11)
    path = create(group.url, len(data), "redis-restart.bin")
    first = patch(group.url, path, 0, data[:2 * MIB])
    assert (first.status_code, first.headers.get("Upload-Offset")) == (204, str(2 * MIB)), \
        show(first)

    assert persistent_redis.stop() == 0
    persistent_redis.start()

    client = Client(group.url, path, data)
    done = client.resume(tolerate=(500,))
    assert done.headers["Shim-Upstream-Status"] == "201", show(done)
    assert min(client.offsets) >= 2 * MIB, (client.seen, client.offsets)
    accepted_once(group.legacy, "/uploads/redis-restart.bin", data)
    assert holds_for(lambda: len(group.legacy.requests()) == 1, 1.0), group.legacy.requests()
    assert all(s.is_running() for s in group.shims)
    # Every pooled connection died with Redis: without retries on a new connection
    # (RedisStore's `retry=`), each would fail its next command, and a request with it (500).
    assert "HEAD 500" not in client.seen and "PATCH 500" not in client.seen, client.seen


def test_after_a_redis_restart_a_write_is_still_taken_over_across_instances(
        fleet: FleetFactory, persistent_redis: RedisServer) -> None:
    """After Redis came back, a PATCH body stalls at instance 0 (its client's connection is
    dead but not closed) and the client resumes at instance 1: instance 1 must get instance
    0 to end that write (the take-over signal, on Redis pub/sub, which every instance must
    listen to again after the restart), so that the upload completes and is delivered once."""
    group = fleet(redis=persistent_redis, delivery={"wait": 5.0})
    data = os.urandom(2 * MIB + 3)
    first, second = group.shims[0], group.shims[1]
    path = create(first.url, len(data), "take-over-after-restart.bin")

    assert persistent_redis.stop() == 0
    persistent_redis.start()
    # All three listen again (subscribed to the signals channel: the client reconnects on
    # its own) before the write: a signal sent while one is still reconnecting is lost, and
    # only the take-over's fallback (the lease's holder, looked at) would help.
    looking = Records(persistent_redis)
    try:
        wait_until(lambda: looking.subscribers() == len(group.shims), TIMEOUT,
                   "every instance subscribed to the signals again")
    finally:
        looking.close()

    wait_until(lambda: head(first.url, path).status_code == 200, TIMEOUT,
               "instance 0 answering again")
    sock = open_patch(first.port, path, 0, len(data))
    sock.sendall(data[:MIB])
    wait_until(lambda: group.data_file(path).exists()
               and group.data_file(path).stat().st_size >= MIB, TIMEOUT,
               "the stalled body's bytes in the shared data file")
    try:
        client = Client(second.url, path, data)
        done = client.resume(timeout=25.0, tolerate=(500,))
        assert done.headers["Shim-Upstream-Status"] == "201", show(done)
    finally:
        sock.close()
    accepted_once(group.legacy, "/uploads/take-over-after-restart.bin", data)
    assert all(s.is_running() for s in group.shims)
    # The take-over went by the signal, not by the fallback that gives up waiting.
    assert "did not end in" not in second.output(), client.seen


# --- 7. an instance frozen (SIGSTOP) past its leases, then thawed -------------------------
# Not a crash: a paused VM or container, a stalled host. The leases of a frozen instance
# lapse as a dead one's do and the survivors take its work over; then it wakes up, still in
# the middle of what it was doing, with a lease it no longer holds.


def freeze(process: ShimProcess) -> None:
    assert process.pid is not None
    os.kill(process.pid, signal.SIGSTOP)


def thaw(process: ShimProcess) -> None:
    assert process.pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGCONT)


def test_an_instance_frozen_mid_patch_past_its_lease_does_not_undo_the_survivors_write(
        fleet: FleetFactory, records: Records) -> None:
    """A PATCH body stalls at instance 0 after 1 MiB; instance 0 freezes (SIGSTOP) and its
    write lease lapses. The client resumes at instance 1 (HEAD: offset 0, the recorded one;
    PATCH from there), whose body has reached 3 MiB when instance 0 thaws and ends its own,
    long superseded, write. Instance 1's body then completes: the legacy server must accept
    the file exactly once, byte-exact."""
    group = fleet(delivery={"wait": 5.0})
    data = os.urandom(4 * MIB + 5)
    frozen, survivor = group.shims[0], group.shims[1]
    path = create(frozen.url, len(data), "frozen-writer.bin")
    stored = group.data_file(path)
    stale = open_patch(frozen.port, path, 0, len(data))
    stale.sendall(data[:MIB])
    wait_until(lambda: stored.exists() and stored.stat().st_size >= MIB, TIMEOUT,
               "the stale body's bytes in the shared data file")
    freeze(frozen)
    group.balancer.skip(0)
    try:
        asked = head(survivor.url, path)  # waits until the frozen instance's lease lapsed
        assert asked.status_code == 200, show(asked)
        offset = int(asked.headers["Upload-Offset"])
        assert offset == 0, show(asked)
        fresh = open_patch(survivor.port, path, offset, len(data) - offset)
        fresh.sendall(data[offset:3 * MIB])
        wait_until(lambda: stored.stat().st_size >= 3 * MIB, TIMEOUT,
                   "the survivor's body past the frozen one's end")
    finally:
        thaw(frozen)
    frozen.wait_for_output(rf"event=taken over id={re.escape(upload_id(path))}|"
                           rf"{re.escape(upload_id(path))}: the write lease lapsed", TIMEOUT)
    stale.close()
    # A quiet period in which the thawed instance ends its write; the survivor's bytes stay.
    kept = holds_for(lambda: stored.stat().st_size >= 3 * MIB, 1.0)
    after_thaw = (stored.stat().st_size, records.record(upload_id(path)))
    fresh.sendall(data[3 * MIB:])
    final = status_of(fresh)
    fresh.close()
    done = Client(group.url, path, data).resume(tolerate=(409,))
    assert done.headers.get("Shim-Upstream-Status") == "201", show(done)
    # A write whose lease lapsed must not be committed when it ends (Engine.end_write renews
    # the lease first): otherwise the thawed instance truncates the shared data file to its
    # own end (1 MiB) and records that offset under the survivor's running write, which then
    # writes its last MiB past a hole, and the legacy server accepts bytes 1-3 MiB as zeros.
    holed = sha256(data[:MIB] + bytes(2 * MIB) + data[3 * MIB:])
    delivered = [(r.size, r.sha256 == sha256(data), r.sha256 == holed)
                 for r in group.legacy.accepted()]
    assert delivered == [(len(data), True, False)], \
        f"(size, byte-exact, bytes 1-3 MiB zeros) of each accepted delivery: {delivered}; " \
        f"data file and record once the frozen instance ended its write: {after_thaw}"
    assert kept and final == 204, (kept, final, after_thaw)
    accepted_once(group.legacy, "/uploads/frozen-writer.bin", data)


def test_an_instance_frozen_mid_delivery_past_its_lease_does_not_deliver_a_second_time(
        fleet: FleetFactory, records: Records) -> None:
    """Instance X is sending a 32 MiB file (held by its relay after 2 MiB) when it freezes
    (SIGSTOP). Its delivery lease lapses; its last bytes were not sent, so a survivor
    delivers the file (accepted). Then X thaws, its connection to the legacy server still
    open: the legacy server must not get (and accept) the file a second time."""
    group, data, path, victim = delivery_held_mid_body(fleet, records, "frozen-deliverer.bin")
    frozen = group.shims[victim]
    freeze(frozen)
    group.balancer.skip(victim)
    try:
        for index, relay in enumerate(group.relays):
            if index != victim:
                relay.configure(gate=None, hold=False)
        done = Client(group.url, path, data).resume()
        assert done.headers["Shim-Upstream-Status"] == "201", show(done)
        accepted_once(group.legacy, "/uploads/frozen-deliverer.bin", data)
    finally:
        group.relays[victim].configure(gate=None, hold=False)
        thaw(frozen)
    first = group.legacy.requests()[0]
    wait_until(lambda: first.status != 0 or not group.relays[victim].pipes, TIMEOUT,
               "the thawed instance's delivery attempt to end")
    # An attempt whose lease lapsed must not send its last bytes (Outbox._mark_last_bytes
    # renews the lease first): otherwise it completes a second request after another
    # instance delivered the file.
    accepted_once(group.legacy, "/uploads/frozen-deliverer.bin", data)
    assert not first.complete, group.legacy.requests()
