"""End to end: issue 12's changes attacked with real shim processes and real sockets.

Delivery by sendfile in growing slices, write-behind, the creation caps counted in one store
step, the take-over lookup memo, PutObject retries waiting for an earlier identical one, and
SIGKILL while a big file is being sent. Every test counts, at the legacy server, the requests
accepted and the bytes (size and SHA-256) of each: a finished file reaches it once, whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.harness import ShimLauncher, ShimProcess, wait_until
from tests.legacy_servers import LegacyServer, Received
from tests.links import MakeProxy
from tests.test_e2e_s3_faults import signed

pytestmark = pytest.mark.timeout(120)

KIB = 1024
MIB = 1024 * KIB
TIMEOUT = 30.0
TUS = {"Tus-Resumable": "1.0.0"}
CHUNK_TYPE = "application/offset+octet-stream"
KEY_ID, SECRET = "AKIDISSUE12ATTACK", "issue-12-attack-secret"


def config(wait: float = 0.5, timeout: float = 2.0, on_unknown: str = "hold",
           **extra: Any) -> dict[str, Any]:
    merged: dict[str, Any] = {
        "delivery": {"wait": wait, "on_unknown": on_unknown},
        "upstream": {"timeout": timeout},
        "storage": {"fsync": False},
    }
    merged.update(extra)
    return merged


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def show(response: requests.Response) -> str:
    return f"{response.status_code} {dict(response.headers)} {response.text[:300]!r}"


def create(url: str, length: int, fields: dict[str, str] | None = None) -> requests.Response:
    return requests.post(url + "/files/", timeout=TIMEOUT,
                         headers={**TUS, "Upload-Length": str(length), **(fields or {})})


def created(url: str, length: int) -> str:
    response = create(url, length)
    assert response.status_code == 201, show(response)
    return str(response.headers["Location"])


def patch(url: str, path: str, offset: int, data: bytes) -> requests.Response:
    headers = {**TUS, "Upload-Offset": str(offset), "Content-Type": CHUNK_TYPE}
    return requests.patch(url + path, data=data, headers=headers, timeout=TIMEOUT)


def head(url: str, path: str) -> requests.Response:
    return requests.head(url + path, headers=TUS, timeout=TIMEOUT)


def wait_for_head(url: str, path: str, status: int, timeout: float = TIMEOUT) -> requests.Response:
    answers: list[requests.Response] = []

    def answered() -> bool:
        answers.append(head(url, path))
        return answers[-1].status_code == status

    wait_until(answered, timeout, f"HEAD {status}", interval=0.1)
    return answers[-1]


def holds_for(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(0.1)
    return predicate()


def whole(request: Received, data: bytes) -> bool:
    return (request.complete, request.size, request.sha256) == (True, len(data), sha256(data))


def assert_accepted_once(server: LegacyServer, data: bytes) -> None:
    """Exactly one request answered 2xx, and it carried exactly ``data``."""
    accepted = server.accepted()
    assert len(accepted) == 1, server.requests()
    assert whole(accepted[0], data), accepted[0]


@pytest.fixture
def front(shim: ShimLauncher, recording_legacy: LegacyServer) -> Callable[..., ShimProcess]:
    return lambda **kwargs: shim(config(**kwargs), upstream_url=recording_legacy.url)


# --- big files through a misbehaving legacy server ------------------------------------------


def upload_all_but_tail(url: str, data: bytes, tail: int = 1000) -> str:
    path = created(url, len(data))
    stored = patch(url, path, 0, data[:-tail])
    assert stored.status_code == 204, show(stored)
    return path


def finish(url: str, path: str, data: bytes, tail: int = 1000) -> requests.Response:
    return patch(url, path, len(data) - tail, data[-tail:])


def finish_quietly(url: str, path: str, data: bytes) -> None:
    """The final PATCH from a thread, whose shim is about to be killed."""
    with contextlib.suppress(requests.RequestException):
        finish(url, path, data)


def test_big_file_late_answer_is_one_delivery(front: Callable[..., ShimProcess],
                                              recording_legacy: LegacyServer) -> None:
    proc = front(wait=0.5, timeout=10.0)
    recording_legacy.late = 2.0
    data = os.urandom(24 * MIB + 13)
    path = upload_all_but_tail(proc.url, data)
    recording_legacy.set_mode("late")
    final = finish(proc.url, path, data)
    assert final.status_code in (204, 503), show(final)
    done = wait_for_head(proc.url, path, 200)
    assert done.headers["Shim-Upstream-Status"] == "201", show(done)
    assert holds_for(lambda: len(recording_legacy.requests()) == 1, 1.0)
    assert_accepted_once(recording_legacy, data)


@pytest.mark.parametrize("mode", ["close-after-body", "hang", "status:503"])
def test_big_file_unknown_or_busy_then_ok_is_accepted_once(
        front: Callable[..., ShimProcess], recording_legacy: LegacyServer, mode: str) -> None:
    """on_unknown: retry: attempts that got no answer (or 503) are whole; once the legacy
    server is ok, exactly one attempt is accepted and no other follows."""
    proc = front(wait=0.5, timeout=1.0, on_unknown="retry")
    data = os.urandom(32 * MIB + 5)
    path = upload_all_but_tail(proc.url, data)
    recording_legacy.set_mode(mode)
    final = finish(proc.url, path, data)
    assert final.status_code in (204, 503), show(final)
    recording_legacy.wait_for(2, TIMEOUT)
    recording_legacy.set_mode("ok")
    wait_for_head(proc.url, path, 200)
    assert holds_for(lambda: len(recording_legacy.accepted()) == 1, 2.0)
    assert_accepted_once(recording_legacy, data)
    for request in recording_legacy.requests():
        assert whole(request, data), request


def test_big_file_early_413_is_refused_once_and_never_resent(
        front: Callable[..., ShimProcess], recording_legacy: LegacyServer) -> None:
    proc = front(wait=3.0, timeout=2.0, on_unknown="retry")
    data = os.urandom(40 * MIB + 1)
    path = upload_all_but_tail(proc.url, data)
    recording_legacy.set_mode("early-413")
    final = finish(proc.url, path, data)
    assert final.status_code in (413, 502, 503), show(final)
    recording_legacy.set_mode("ok")
    assert holds_for(lambda: len(recording_legacy.requests()) == 1, 3.0), \
        recording_legacy.requests()
    assert recording_legacy.accepted() == []
    [refused] = recording_legacy.requests()
    assert refused.status == 413 and refused.size < len(data), refused


# --- a legacy server that is fast at first, then slow but steady ----------------------------


class ThrottledLegacy:
    """Reads the first ``fast`` body bytes at full speed, then ``rate`` bytes/s in 64 KiB
    reads (never idle for more than 1/16 s), then answers 201. Optionally stalls once
    ``gate`` body bytes were read, until ``release`` is set."""

    def __init__(self, fast: int, rate: int, gate: int | None = None) -> None:
        self.fast, self.rate, self.gate = fast, rate, gate
        self.release = threading.Event()
        self.gated = threading.Event()
        self.seen: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._listener = socket.socket()
        # A small receive buffer: what the shim sent is (nearly) what was read, so the
        # answer follows the last byte closely and early slices are not absorbed by it.
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KIB)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def accepted(self) -> list[dict[str, Any]]:
        with self._lock:
            return [s for s in self.seen if s["status"] == 201]

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.seen)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        entry: dict[str, Any] = {"size": 0, "sha256": "", "status": 0, "complete": False}
        with self._lock:
            self.seen.append(entry)
        try:
            reader = conn.makefile("rb")
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            digest = hashlib.sha256()
            got = 0
            while got < length:
                if self.gate is not None and got >= self.gate and not self.release.is_set():
                    self.gated.set()
                    self.release.wait()
                    self.gate = None
                piece = reader.read1(min(64 * KIB, length - got))
                if not piece:
                    return
                digest.update(piece)
                got += len(piece)
                entry["size"] = got
                if got > self.fast:
                    time.sleep(len(piece) / self.rate)
            entry.update(sha256=digest.hexdigest(), complete=True)
            conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")
            entry["status"] = 201
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self._listener.close()
        self.release.set()


@pytest.fixture
def throttled() -> Iterator[Callable[..., ThrottledLegacy]]:
    made: list[ThrottledLegacy] = []

    def make(fast: int, rate: int, gate: int | None = None) -> ThrottledLegacy:
        made.append(ThrottledLegacy(fast, rate, gate))
        return made[-1]

    yield make
    for server in made:
        server.stop()


def test_legacy_server_that_slows_down_but_stays_steady_gets_the_file(
        shim: ShimLauncher, throttled: Callable[..., ThrottledLegacy]) -> None:
    """upstream.timeout is an idle timeout, counted on the bytes the legacy server takes: one
    that reads 32 MiB fast and then a steady 4 MiB/s never idles 2 s, so the first attempt is
    the one accepted (it was cut off when the timeout bounded each whole sendfile slice)."""
    server = throttled(fast=32 * MIB, rate=4 * MIB)
    proc = shim(config(wait=0.5, timeout=2.0, on_unknown="hold"), upstream_url=server.url)
    data = os.urandom(48 * MIB)
    path = upload_all_but_tail(proc.url, data)
    finish(proc.url, path, data)

    def first_attempt_ended() -> bool:
        seen = server.all()
        return len(seen) > 1 or (len(seen) == 1 and seen[0]["status"] == 201)

    wait_until(first_attempt_ended, 40.0, "the first attempt to end")
    assert len(server.all()) == 1, f"the first attempt was cut off: {server.all()}"
    [done] = server.all()
    assert (done["size"], done["sha256"], done["status"]) == (len(data), sha256(data), 201)


def test_steady_slow_legacy_server_gets_big_file_once(
        shim: ShimLauncher, throttled: Callable[..., ThrottledLegacy]) -> None:
    """Slow from the first byte (12 MiB/s, timeout 2 s): slices stay small enough."""
    server = throttled(fast=0, rate=12 * MIB)
    proc = shim(config(wait=0.5, timeout=2.0, on_unknown="hold"), upstream_url=server.url)
    data = os.urandom(24 * MIB + 3)
    path = upload_all_but_tail(proc.url, data)
    finish(proc.url, path, data)
    wait_until(lambda: len(server.accepted()) == 1, 20.0, "one accepted delivery")
    assert [(s["size"], s["sha256"]) for s in server.all()] == [(len(data), sha256(data))]


# --- SIGKILL mid-delivery -----------------------------------------------------------------


@pytest.mark.parametrize("on_unknown", ["hold", "retry"])
def test_sigkill_mid_body_of_big_delivery_then_restart_delivers_once(
        shim: ShimLauncher, throttled: Callable[..., ThrottledLegacy], on_unknown: str) -> None:
    """Killed while the legacy server has read 10 of 30 MiB: the last bytes were never
    sent, so either policy sends the file again after the restart, and it is accepted once."""
    server = throttled(fast=1 << 40, rate=1, gate=10 * MIB)
    proc = shim(config(wait=0.5, timeout=30.0, on_unknown=on_unknown), upstream_url=server.url)
    data = os.urandom(30 * MIB + 9)
    path = upload_all_but_tail(proc.url, data)
    threading.Thread(target=finish_quietly, args=(proc.url, path, data), daemon=True).start()
    assert server.gated.wait(TIMEOUT)
    proc.kill()
    server.release.set()
    proc.restart()
    wait_until(lambda: len(server.accepted()) == 1, TIMEOUT, "the delivery after restart")
    done = wait_for_head(proc.url, path, 200)
    assert done.headers["Shim-Upstream-Status"] == "201", show(done)
    assert holds_for(lambda: len(server.accepted()) == 1, 1.5)
    [accepted] = server.accepted()
    assert (accepted["size"], accepted["sha256"]) == (len(data), sha256(data))
    assert all(not s["complete"] for s in server.all() if s is not accepted)


@pytest.mark.parametrize("on_unknown", ["hold", "retry"])
def test_sigkill_after_whole_body_sent_follows_on_unknown(
        front: Callable[..., ShimProcess], recording_legacy: LegacyServer,
        on_unknown: str) -> None:
    proc = front(wait=0.5, timeout=30.0, on_unknown=on_unknown)
    data = os.urandom(24 * MIB + 1)
    path = upload_all_but_tail(proc.url, data)
    recording_legacy.set_mode("hang")
    threading.Thread(target=finish_quietly, args=(proc.url, path, data), daemon=True).start()
    wait_until(lambda: any(r.complete for r in recording_legacy.requests()), TIMEOUT,
               "the whole body at the legacy server")
    proc.kill()
    recording_legacy.set_mode("ok")
    proc.restart()
    if on_unknown == "hold":
        wait_for_head(proc.url, path, 502)
        assert holds_for(lambda: recording_legacy.accepted() == [], 2.0), \
            recording_legacy.requests()
        assert len(recording_legacy.requests()) == 1
    else:
        wait_for_head(proc.url, path, 200)
        assert holds_for(lambda: len(recording_legacy.accepted()) == 1, 1.5)
        assert_accepted_once(recording_legacy, data)


# --- racing writers, cut links, caps ------------------------------------------------------


def test_two_racing_patches_on_one_upload_deliver_once(front: Callable[..., ShimProcess],
                                                       recording_legacy: LegacyServer) -> None:
    proc = front(wait=2.0, timeout=5.0)
    data = os.urandom(20 * MIB + 77)
    path = created(proc.url, len(data))
    first_half = data[: 8 * MIB]
    barrier = threading.Barrier(2)

    def racer(_: int) -> int:
        barrier.wait()
        try:
            return patch(proc.url, path, 0, first_half).status_code
        except requests.ConnectionError:
            return -1

    with ThreadPoolExecutor(2) as pool:
        statuses = list(pool.map(racer, range(2)))
    assert (statuses.count(204) <= 2 and 204 in statuses) or -1 in statuses or 409 in statuses, \
        statuses
    for _ in range(20):
        offset = int(head(proc.url, path).headers["Upload-Offset"])
        if offset == len(data):
            break
        response = patch(proc.url, path, offset, data[offset:])
        assert response.status_code in (204, 409, 503), show(response)
    wait_for_head(proc.url, path, 200)
    assert holds_for(lambda: len(recording_legacy.requests()) == 1, 1.0)
    assert_accepted_once(recording_legacy, data)


@pytest.mark.parametrize("seed", [1, 2])
def test_tus_upload_cut_at_random_bytes_resumes_to_one_delivery(
        front: Callable[..., ShimProcess], recording_legacy: LegacyServer,
        cutting_proxy: MakeProxy, seed: int) -> None:
    proc = front(wait=2.0, timeout=5.0)
    rng = random.Random(seed)
    data = rng.randbytes(20 * MIB + rng.randrange(1, MIB))
    link = cutting_proxy(proc.port, rng.randrange(3 * MIB, 5 * MIB))
    path = created(proc.url, len(data))
    seen: list[int] = []
    for _ in range(60):
        try:
            inquiry = head(link.url, path)
            seen.append(inquiry.status_code)
            if "Upload-Offset" not in inquiry.headers:
                continue
            offset = int(inquiry.headers["Upload-Offset"])
            if offset == len(data):
                break
            seen.append(patch(link.url, path, offset, data[offset:]).status_code)
        except requests.ConnectionError:
            seen.append(-1)
    assert link.cuts >= 3, seen
    done = wait_for_head(proc.url, path, 200)
    assert done.headers["Shim-Upstream-Status"] == "201", (show(done), seen)
    assert holds_for(lambda: len(recording_legacy.requests()) == 1, 1.0), seen
    assert_accepted_once(recording_legacy, data)


def test_content_range_upload_cut_at_random_bytes_resumes_to_one_delivery(
        front: Callable[..., ShimProcess], recording_legacy: LegacyServer,
        cutting_proxy: MakeProxy) -> None:
    proc = front(wait=2.0, timeout=5.0)
    rng = random.Random(12)
    data = rng.randbytes(20 * MIB + 4321)
    total = len(data)
    link = cutting_proxy(proc.port, rng.randrange(3 * MIB, 5 * MIB))
    target = "/cr/upload-issue12.bin"
    finished = None
    for _ in range(60):
        try:
            inquiry = requests.put(link.url + target, headers={"Content-Range": f"bytes */{total}",
                                   "Content-Length": "0"}, timeout=TIMEOUT)
            if inquiry.status_code in (200, 201, 204):
                finished = inquiry
                break
            assert inquiry.status_code in (308, 404), show(inquiry)
            have = inquiry.headers.get("Range")
            start = int(have.rpartition("-")[2]) + 1 if have else 0
            answer = requests.put(link.url + target, data=data[start:], timeout=TIMEOUT,
                                  headers={"Content-Range": f"bytes {start}-{total - 1}/{total}"})
            if answer.status_code in (200, 201, 204):
                finished = answer
                break
        except requests.ConnectionError:
            continue
    assert finished is not None and link.cuts >= 3
    assert holds_for(lambda: len(recording_legacy.requests()) == 1, 1.0), \
        recording_legacy.requests()
    assert_accepted_once(recording_legacy, data)
    assert recording_legacy.accepted()[0].path == target


def test_concurrent_creations_admit_exactly_the_cap(shim: ShimLauncher,
                                                    recording_legacy: LegacyServer) -> None:
    proc = shim(config(limits={"uploads_per_owner": 4, "uploads_total": 1000}),
                upstream_url=recording_legacy.url)
    owner = {"Authorization": "Bearer issue12-cap-owner"}
    barrier = threading.Barrier(40)

    def one(_: int) -> int:
        barrier.wait()
        return create(proc.url, 100, owner).status_code

    with ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(one, range(40)))
    assert statuses.count(201) == 4, statuses
    assert set(statuses) <= {201, 429, 403, 507, 503}, statuses
    assert create(proc.url, 100, owner).status_code != 201
    other = create(proc.url, 100, {"Authorization": "Bearer issue12-other-owner"})
    assert other.status_code == 201, show(other)


# --- S3 PutObject retried concurrently ----------------------------------------------------


def s3_shim(shim: ShimLauncher, legacy: LegacyServer) -> ShimProcess:
    return shim(config(wait=5.0, timeout=10.0,
                       s3={"paths": ["/s3/"], "credentials": [
                           {"access_key": KEY_ID, "secret": SECRET}]}),
                upstream_url=legacy.url)


def raw_put(port: int, target: str, data: bytes, keep: int) -> socket.socket:
    """A signed PutObject on a raw connection, all but its last ``keep`` bytes sent."""
    fields = signed(port, "PUT", target, [("Content-Length", str(len(data)))], body=data,
                    key_id=KEY_ID, secret=SECRET)
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    head_bytes = f"PUT {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields)
    sock.sendall(head_bytes.encode() + b"\r\n" + data[:len(data) - keep])
    return sock


def status_of(sock: socket.socket) -> int:
    answer = b""
    while b"\r\n" not in answer and (got := sock.recv(4096)):
        answer += got
    sock.close()
    return int(answer.split(b" ", 2)[1]) if answer else 0


def test_putobject_retried_while_first_answer_is_late_is_delivered_once(
        shim: ShimLauncher, recording_legacy: LegacyServer) -> None:
    """The retry arrives after the first body was whole (its delivery is being answered)."""
    proc = s3_shim(shim, recording_legacy)
    recording_legacy.late = 2.0
    recording_legacy.set_mode("late")
    data = os.urandom(6 * MIB + 11)
    first = raw_put(proc.port, "/s3/evidence/retry/late.bin", data, 0)
    recording_legacy.wait_for(1, TIMEOUT)
    second = raw_put(proc.port, "/s3/evidence/retry/late.bin", data, 0)
    assert (status_of(first), status_of(second)) == (200, 200)
    assert holds_for(lambda: len(recording_legacy.requests()) == 1, 2.0), \
        recording_legacy.requests()
    assert_accepted_once(recording_legacy, data)


def test_many_big_patches_at_once_past_the_early_budget_each_delivered_once(
        front: Callable[..., ShimProcess], recording_legacy: LegacyServer) -> None:
    """12 uploads of 3 MiB whose PATCHes all start at once (more than EARLY_BUDGET, 16 MiB,
    may wait for their requests to begin): every file reaches the legacy server once."""
    proc = front(wait=5.0, timeout=5.0)
    files = [os.urandom(3 * MIB + n) for n in range(12)]
    paths = [created(proc.url, len(data)) for data in files]
    barrier = threading.Barrier(len(files))

    def send(index: int) -> int:
        barrier.wait()
        return patch(proc.url, paths[index], 0, files[index]).status_code

    with ThreadPoolExecutor(len(files)) as pool:
        statuses = list(pool.map(send, range(len(files))))
    assert set(statuses) <= {204, 503}, statuses
    for path in paths:
        wait_for_head(proc.url, path, 200)
    assert holds_for(lambda: len(recording_legacy.requests()) == len(files), 1.0)
    got = sorted((r.size, r.sha256) for r in recording_legacy.accepted() if r.complete)
    assert got == sorted((len(data), sha256(data)) for data in files)
