"""End to end: SIGKILL the shim at random points of a tus upload, restart it, resume.

One ``python -m shim`` process (it restarts faster than mitmdump) is killed and restarted in
every trial.  Between the shim and the real WholeFileServer sits a small TCP relay, defined
here, that a trial can make slow: it lets through only so many body bytes of a delivery (the
legacy server then waits for the rest), or holds back the legacy server's answer, so that
the kill lands exactly mid-delivery or between the legacy server's answer and the shim's
record of it.  After each kill the relay cuts the connections of the dead shim, as the
network would, so that the legacy server sees a broken-off body.

Kill points, each in a third of the trials, with seeded random parameters:

* ``mid-body``: a PATCH carrying the rest of the file is killed after a random number of its
  bytes were sent (after the shim reported them, or straight away);
* ``mid-delivery``: the final PATCH was sent; the kill comes straight away, or once the legacy
  server has received a random number of the delivered file's bytes;
* ``after-answer``: the legacy server received the whole file and stored it (it logged its
  201), but its answer has not reached the shim.

After the restart the client does what a tus client does: HEAD, then PATCH the rest, until
the upload is delivered or the shim reports a FAILED delivery with 502 (``on_unknown: hold``
makes an unknown outcome FAILED rather than sending the file twice).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import pytest
import requests

from shim.demo_server import ReceivedRequest, WholeFileServer
from tests.harness import ShimLauncher, ShimProcess, wait_until

MIB = 1024 * 1024
TIMEOUT = 15.0
"""Seconds any single request or wait may take before the test fails."""
SEED = int(os.environ.get("SHIM_SIGKILL_SEED", "20240808"))
"""Seed of the trial plan; set SHIM_SIGKILL_SEED to replay another one."""
TRIALS_PER_KIND = 7
TUS = {"Tus-Resumable": "1.0.0"}
CHUNK_TYPE = "application/offset+octet-stream"
CONFIG = {
    "delivery": {"wait": 10.0, "on_unknown": "hold"},
    "upstream": {"timeout": 10.0},
    "tus": {"expiration": 0},
}

Kind = Literal["mid-body", "mid-delivery", "after-answer"]
KINDS: tuple[Kind, ...] = ("mid-body", "mid-delivery", "after-answer")
Ending = Literal["delivered", "failed"]


# --- a relay between the shim and the legacy server that a test can slow down -------------


class Pipe:
    """One relayed connection: shim -> relay -> legacy server and the answer back."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        """Relay between the shim's ``client`` socket and the legacy ``upstream`` socket."""
        self.client = client
        self.upstream = upstream
        self.head = bytearray()
        self.head_length: int | None = None
        """Length of the request head, once its blank line was seen."""
        self.forwarded = 0
        """Bytes of the request passed on to the legacy server."""
        self.closed = False

    @property
    def body_forwarded(self) -> int:
        """Body bytes of the request passed on to the legacy server."""
        return 0 if self.head_length is None else max(0, self.forwarded - self.head_length)

    def saw(self, data: bytes) -> None:
        """Look for the end of the request head in ``data``, the next bytes from the shim."""
        if self.head_length is not None:
            return
        start = len(self.head)
        self.head += data
        end = self.head.find(b"\r\n\r\n", max(0, start - 3))
        if end >= 0:
            self.head_length = end + 4

    def close(self) -> None:
        """Cut both sides at once (a blocked recv returns)."""
        self.closed = True
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class Relay:
    """A TCP relay on 127.0.0.1:0 in front of ``target``.

    ``gate``: how many body bytes of each request it passes on (None: all); the rest waits in
    the relay.  ``hold``: answers from the legacy server wait in the relay.  Both can change
    at any time; waiting bytes move on as soon as they are allowed to.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        """Listen on a free port; relay every connection to ``target``."""
        self.target = target
        self.gate: int | None = None
        self.hold = False
        self.pipes: list[Pipe] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._thread = threading.Thread(target=self._accept, name="relay", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` of the relay."""
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def configure(self, gate: int | None, hold: bool) -> None:
        """Change what is let through; waiting bytes move on if they now may."""
        with self._cond:
            self.gate, self.hold = gate, hold
            self._cond.notify_all()

    def body_forwarded(self) -> int:
        """The most body bytes any open connection passed on."""
        with self._cond:
            return max((p.body_forwarded for p in self.pipes if not p.closed), default=-1)

    def cut(self) -> None:
        """Close every relayed connection, as the network does when the shim dies."""
        with self._cond:
            pipes, self.pipes = self.pipes, []
            for pipe in pipes:
                pipe.closed = True
            self._cond.notify_all()
        for pipe in pipes:
            pipe.close()

    def stop(self) -> None:
        """Stop accepting and cut everything."""
        self._stopped = True
        self._thread.join(5.0)
        self._listener.close()
        self.cut()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=TIMEOUT)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            pipe = Pipe(client, upstream)
            with self._cond:
                self.pipes.append(pipe)
            for pump in (self._pump_request, self._pump_answer):
                threading.Thread(target=pump, args=(pipe,), daemon=True).start()

    def _allowance(self, pipe: Pipe, available: int) -> int:
        """How many of the ``available`` next request bytes may go on now."""
        if pipe.closed:
            return 0
        if self.gate is None or pipe.head_length is None:
            return available  # everything, or only head bytes so far
        return max(0, min(available, pipe.head_length + self.gate - pipe.forwarded))

    def _await_allowance(self, pipe: Pipe, available: int) -> int:
        """Wait (a bounded time) until some of the next ``available`` bytes may go on."""
        with self._cond:
            self._cond.wait_for(lambda: self._allowance(pipe, available) > 0 or pipe.closed,
                                timeout=60.0)
            return self._allowance(pipe, available)

    def _pump_request(self, pipe: Pipe) -> None:
        """Shim -> legacy server, up to the gate."""
        try:
            while data := pipe.client.recv(65536):
                pipe.saw(data)
                view = memoryview(data)
                while view:
                    count = self._await_allowance(pipe, len(view))
                    if pipe.closed or count == 0:
                        return
                    pipe.upstream.sendall(view[:count])
                    with self._cond:
                        pipe.forwarded += count
                        self._cond.notify_all()
                    view = view[count:]
        except OSError:
            pass
        finally:
            self._drop(pipe)

    def _pump_answer(self, pipe: Pipe) -> None:
        """Legacy server -> shim, unless answers are held."""
        try:
            while data := pipe.upstream.recv(65536):
                with self._cond:
                    self._cond.wait_for(lambda: not self.hold or pipe.closed, timeout=60.0)
                if pipe.closed or self.hold:
                    return
                pipe.client.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(pipe)

    def _drop(self, pipe: Pipe) -> None:
        with self._cond:
            if pipe in self.pipes:
                self.pipes.remove(pipe)
            self._cond.notify_all()
        pipe.close()


@pytest.fixture
def relay(legacy: WholeFileServer) -> Iterator[Relay]:
    """A relay in front of the legacy server; stopped at teardown."""
    server = Relay((legacy.host, legacy.port))
    try:
        yield server
    finally:
        server.stop()


# --- a tus client that remembers every offset it was told --------------------------------


def show(response: requests.Response) -> str:
    """A response in one line, for assertion messages."""
    return f"{response.status_code} {dict(response.headers)} {response.text[:300]!r}"


@dataclass
class Trial:
    """One upload and what happened to it."""

    number: int
    kind: Kind
    data: bytes
    path: str = ""
    reported: list[int] = field(default_factory=list)
    """Every Upload-Offset the shim reported, in order."""
    before_kill: int = 0
    """How many offsets were reported before the kill."""
    ending: Ending | None = None
    note: str = ""

    @property
    def size(self) -> int:
        """The file's length."""
        return len(self.data)

    @property
    def target(self) -> str:
        """Where the shim delivers the finished file (tus.forward.path: /uploads/{id})."""
        return "/uploads/" + self.path.rsplit("/", 1)[1]

    def note_offset(self, response: requests.Response) -> None:
        """Remember the Upload-Offset of a response, if it has one."""
        value = response.headers.get("Upload-Offset")
        if value is not None:
            self.reported.append(int(value))

    @property
    def lost(self) -> int:
        """Bytes reported before the kill that the first report after the restart lacks."""
        before, after = self.reported[: self.before_kill], self.reported[self.before_kill:]
        if not before or not after:
            return 0
        return max(0, max(before) - after[0])

    @property
    def went_back(self) -> int:
        """How often an offset was lower than the one reported just before it."""
        return sum(1 for a, b in zip(self.reported, self.reported[1:], strict=False) if b < a)


def create(shim: ShimProcess, trial: Trial) -> None:
    """POST a tus upload of the trial's size."""
    response = requests.post(shim.url + "/files/", timeout=TIMEOUT,
                             headers={**TUS, "Upload-Length": str(trial.size)})
    assert response.status_code == 201, show(response)
    trial.path = response.headers["Location"]


def head(shim: ShimProcess, trial: Trial) -> requests.Response:
    """A tus HEAD; its offset is remembered."""
    response = requests.head(shim.url + trial.path, headers=TUS, timeout=TIMEOUT)
    trial.note_offset(response)
    return response


def patch(shim: ShimProcess, trial: Trial, offset: int, data: bytes) -> requests.Response:
    """A tus PATCH of ``data`` at ``offset``; its offset is remembered."""
    headers = {**TUS, "Upload-Offset": str(offset), "Content-Type": CHUNK_TYPE}
    response = requests.patch(shim.url + trial.path, data=data, headers=headers, timeout=TIMEOUT)
    trial.note_offset(response)
    return response


def open_patch(shim: ShimProcess, trial: Trial, offset: int) -> socket.socket:
    """Start a PATCH of everything from ``offset`` on a raw socket; only its head is sent."""
    sock = socket.create_connection(("127.0.0.1", shim.port), timeout=TIMEOUT)
    head_text = (
        f"PATCH {trial.path} HTTP/1.1\r\nHost: 127.0.0.1:{shim.port}\r\n"
        f"Tus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\nContent-Type: {CHUNK_TYPE}\r\n"
        f"Content-Length: {trial.size - offset}\r\n\r\n"
    )
    sock.sendall(head_text.encode("ascii"))
    return sock


def first_patch(shim: ShimProcess, trial: Trial, rng: random.Random) -> int:
    """Upload a random first part (maybe none) with a whole PATCH; return its end."""
    end = rng.choice([0, rng.randrange(1, trial.size // 2)])
    if end:
        response = patch(shim, trial, 0, trial.data[:end])
        assert response.status_code == 204, show(response)
    return end


def resume(shim: ShimProcess, trial: Trial) -> Ending:
    """What a tus client does after the shim came back: HEAD, PATCH the rest, until the
    upload is delivered or the shim says its delivery FAILED (502)."""
    deadline = time.monotonic() + 3 * TIMEOUT
    while time.monotonic() < deadline:
        status = head(shim, trial)
        if status.status_code == 502:
            return "failed"
        assert status.status_code in (200, 503), show(status)
        offset = int(status.headers["Upload-Offset"])
        if status.status_code == 200 and offset == trial.size:
            assert status.headers.get("Shim-Upstream-Status") == "201", show(status)
            return "delivered"
        if offset < trial.size:
            answer = patch(shim, trial, offset, trial.data[offset:])
            if answer.status_code == 502:
                return "failed"
            if answer.status_code == 204:
                assert answer.headers.get("Shim-Upstream-Status") == "201", show(answer)
                return "delivered"
            assert answer.status_code in (409, 423, 503), show(answer)
        time.sleep(0.05)  # a polling interval: the next round asks again
    raise TimeoutError(f"trial {trial.number}: the upload neither finished nor failed")


# --- the kill points ------------------------------------------------------------------------


def kill_mid_body(shim: ShimProcess, trial: Trial, rng: random.Random) -> socket.socket:
    """Kill while a PATCH of the rest is arriving, after a random number of its bytes."""
    start = first_patch(shim, trial, rng)
    sock = open_patch(shim, trial, start)
    sent = rng.randrange(1, trial.size - start)
    sock.sendall(trial.data[start:start + sent])
    when = rng.choice(["all reported", "some reported", "at once"])
    if when == "all reported":  # the shim has every byte sent, and said so
        wait_until(lambda: reported(head(shim, trial)) == start + sent, TIMEOUT,
                   "the shim to report the bytes sent")
    elif when == "some reported":  # the shim is still taking the bytes in
        wait_until(lambda: reported(head(shim, trial)) > start, TIMEOUT,
                   "the shim to report some of the bytes sent")
    else:
        head(shim, trial)
    trial.note = f"{start}+{sent} of {trial.size}, {when}"
    return sock


def reported(response: requests.Response) -> int:
    """The Upload-Offset of a HEAD that must succeed."""
    assert response.status_code == 200, show(response)
    return int(response.headers["Upload-Offset"])


def kill_mid_delivery(shim: ShimProcess, trial: Trial, rng: random.Random,
                      relay: Relay) -> socket.socket:
    """Send the final PATCH; kill straight away, or once the legacy server has a random
    number of the file's bytes (the relay lets no more through)."""
    start = first_patch(shim, trial, rng)
    pick = rng.random()
    gate = (None if pick < 0.25 else 0 if pick < 0.4 else trial.size - 1 if pick < 0.55
            else rng.randrange(1, trial.size - 1))
    relay.configure(gate=gate if gate is not None else 0, hold=False)
    sock = open_patch(shim, trial, start)
    sock.sendall(trial.data[start:])
    if gate is not None:
        wait_until(lambda: relay.body_forwarded() >= gate, TIMEOUT,
                   f"the legacy server to receive {gate} bytes")
    trial.note = f"after {gate} delivered bytes" if gate is not None else "right after the PATCH"
    return sock


def kill_after_answer(shim: ShimProcess, trial: Trial, rng: random.Random, relay: Relay,
                      legacy: WholeFileServer) -> socket.socket:
    """Send the final PATCH; kill once the legacy server stored the file and logged its 201,
    while the relay holds its answer back from the shim."""
    start = first_patch(shim, trial, rng)
    relay.configure(gate=None, hold=True)
    sock = open_patch(shim, trial, start)
    sock.sendall(trial.data[start:])
    trial.note = f"final PATCH from {start}"
    wait_until(lambda: any(r.status == 201 for r in accepted(legacy, trial)), TIMEOUT,
               "the legacy server to accept the file")
    return sock


def accepted(legacy: WholeFileServer, trial: Trial) -> list[ReceivedRequest]:
    """Every request the legacy server received for this trial's file."""
    return [r for r in list(legacy.received) if r.path == trial.target]


def run_trial(shim: ShimProcess, trial: Trial, rng: random.Random, relay: Relay,
              legacy: WholeFileServer) -> None:
    """Upload, kill at the trial's point, restart, resume until delivered or FAILED."""
    create(shim, trial)
    head(shim, trial)
    if trial.kind == "mid-body":
        sock = kill_mid_body(shim, trial, rng)
    elif trial.kind == "mid-delivery":
        sock = kill_mid_delivery(shim, trial, rng, relay)
    else:
        sock = kill_after_answer(shim, trial, rng, relay, legacy)
    assert shim.kill() == -9
    trial.before_kill = len(trial.reported)
    sock.close()
    relay.cut()
    relay.configure(gate=None, hold=False)
    shim.restart()
    trial.ending = resume(shim, trial)
    if trial.ending == "failed":
        # The client is told, and told again on a retry of its final PATCH.
        retry = patch(shim, trial, trial.size, b"")
        assert retry.status_code == 502, show(retry)
        status = head(shim, trial)
        assert status.status_code == 502, show(status)
        assert status.headers["Upload-Offset"] == str(trial.size), show(status)


def partial_deliveries(legacy: WholeFileServer, trial: Trial) -> int:
    """Accepted requests, or stored files, whose bytes are not exactly the trial's file."""
    digest = hashlib.sha256(trial.data).hexdigest()
    wrong = sum(1 for r in accepted(legacy, trial)
                if 200 <= r.status < 300 and (r.size, r.sha256, r.complete) != (trial.size, digest, True))
    stored = legacy.directory / trial.target.lstrip("/")
    if stored.exists() and hashlib.sha256(stored.read_bytes()).hexdigest() != digest:
        wrong += 1
    return wrong


def test_sigkill_at_random_points_loses_nothing_and_never_delivers_twice(
    shim: ShimLauncher, legacy: WholeFileServer, relay: Relay, capsys: pytest.CaptureFixture[str],
) -> None:
    """A user whose shim is killed (SIGKILL) mid-upload, mid-delivery or just after the
    legacy server accepted the file never sees an offset go back or a reported byte lost
    after the restart; the legacy server never gets a partial file and never accepts a file
    twice; an upload whose delivery outcome the crash made unknown ends FAILED and the
    client is told so with 502, every other one is delivered once."""
    rng = random.Random(SEED)
    process = shim(CONFIG, kind="python-m-shim", upstream_url=relay.url)
    kinds = [kind for kind in KINDS for _ in range(TRIALS_PER_KIND)]
    rng.shuffle(kinds)
    trials: list[Trial] = []
    started = time.monotonic()
    for number, kind in enumerate(kinds):
        trial = Trial(number, kind, rng.randbytes(rng.randint(2 * MIB, 4 * MIB)))
        trials.append(trial)
        try:
            run_trial(process, trial, rng, relay, legacy)
        except (AssertionError, TimeoutError, OSError) as exc:
            raise AssertionError(f"trial {number} ({kind}, {trial.note}): offsets "
                                 f"{trial.reported}: {exc}") from exc

    # Let any late request reach the legacy server's log before counting.
    wait_until(lambda: not relay.pipes, TIMEOUT, "the relay to be idle")
    lost = sum(t.lost for t in trials)
    went_back = sum(t.went_back for t in trials)
    duplicates = sum(max(0, sum(1 for r in accepted(legacy, t) if r.status == 201) - 1) for t in trials)
    partial = sum(partial_deliveries(legacy, t) for t in trials)
    endings = Counter((t.kind, t.ending) for t in trials)
    failed_after_201 = sum(1 for t in trials if t.ending == "failed"
                           and any(r.status == 201 for r in accepted(legacy, t)))
    summary = (
        f"sigkill: {len(trials)} trials, seed {SEED}, {time.monotonic() - started:.1f}s: "
        f"bytes lost {lost}, offsets back {went_back}, duplicate deliveries {duplicates}, "
        f"partial files {partial}; delivered {sum(t.ending == 'delivered' for t in trials)}, "
        f"FAILED (502) {sum(t.ending == 'failed' for t in trials)} "
        f"({failed_after_201} of them accepted by the legacy server); by kill point: "
        + ", ".join(f"{kind} {endings[kind, 'delivered']}/{endings[kind, 'failed']}" for kind in KINDS)
    )
    details = "\n".join(f"  {t.number} {t.kind} {t.note}: {t.ending}, offsets {t.reported}"
                        for t in trials)
    with capsys.disabled():
        print("\n" + summary + ("\n" + details if os.environ.get("SHIM_SIGKILL_VERBOSE") else ""))
    assert (lost, went_back, duplicates, partial) == (0, 0, 0, 0), f"{summary}\n{details}"
    # A body cut off never leaves the upload complete: it always goes on and is delivered.
    assert endings["mid-body", "failed"] == 0, f"{summary}\n{details}"
    # Every delivered upload reached the legacy server exactly once; the answer that never
    # reached the shim is not replaced by a second delivery but by FAILED.
    for trial in trials:
        accepts = [r for r in accepted(legacy, trial) if r.status == 201]
        if trial.ending == "delivered":
            assert len(accepts) == 1, f"trial {trial.number}: {accepts}\n{details}"
        if trial.kind == "after-answer":
            assert (trial.ending, len(accepts)) == ("failed", 1), f"trial {trial.number}\n{details}"
