"""End to end: delivery through a real mitmdump shim to a legacy server that misbehaves.

The legacy server is tests/legacy_servers.py's LegacyServer, switched at run time: it answers
late, hangs, refuses early with 413 and closes, answers 500 or 503, closes after the body, or
goes down and comes back on the same port. Clients are tus (POST /files/, then PATCH) and the
Content-Range protocol (PUT <url> with Content-Range), over requests or raw sockets.

The promise every test checks at the legacy server, by counting requests and hashing bodies:
each finished file is accepted exactly once, or (delivery.on_unknown: hold) never, with a
FAILED record whose 502 the client is told. Waits are short because the shims here run with
small delivery.wait and upstream.timeout values; every wait polls against a deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.harness import ShimLauncher, ShimProcess, wait_until
from tests.legacy_servers import LegacyServer, Received

pytestmark = pytest.mark.timeout(60)

KIB = 1024
TIMEOUT = 15.0
"""Deadline for any one request or wait; they normally take well under it."""
TUS = {"Tus-Resumable": "1.0.0"}
CHUNK_TYPE = "application/offset+octet-stream"
TAIL = 1000
"""The final PATCH carries this many bytes; the rest of the file goes before it."""


def config(wait: float = 0.5, timeout: float = 1.0, on_unknown: str = "hold") -> dict[str, Any]:
    """Shim configuration with short delivery waits and upstream idle timeout."""
    return {
        "delivery": {"wait": wait, "on_unknown": on_unknown},
        "upstream": {"timeout": timeout},
        "storage": {"fsync": False},
    }


@pytest.fixture
def faulty(recording_legacy: LegacyServer) -> LegacyServer:
    """The legacy server these tests make fail (conftest's recording_legacy)."""
    return recording_legacy


@pytest.fixture
def front(shim: ShimLauncher, faulty: LegacyServer) -> Callable[..., ShimProcess]:
    """``front(**config_args) -> ShimProcess``: a shim in front of ``faulty``."""
    return lambda **kwargs: shim(config(**kwargs), upstream_url=faulty.url)


# --- talking to the shim ------------------------------------------------------------------


def show(response: requests.Response) -> str:
    """A response in one line, for assertion messages."""
    return f"{response.status_code} {dict(response.headers)} {response.text[:300]!r}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def create(proc: ShimProcess, length: int) -> str:
    """Create a tus upload of ``length`` bytes; its path."""
    response = requests.post(proc.url + "/files/", headers={**TUS, "Upload-Length": str(length)},
                             timeout=TIMEOUT)
    assert response.status_code == 201, show(response)
    return str(response.headers["Location"])


def patch(proc: ShimProcess, path: str, offset: int, data: bytes) -> requests.Response:
    """A tus PATCH of ``data`` at ``offset``."""
    headers = {**TUS, "Upload-Offset": str(offset), "Content-Type": CHUNK_TYPE}
    return requests.patch(proc.url + path, data=data, headers=headers, timeout=TIMEOUT)


def head(proc: ShimProcess, path: str) -> requests.Response:
    return requests.head(proc.url + path, headers=TUS, timeout=TIMEOUT)


def delete(proc: ShimProcess, path: str) -> requests.Response:
    return requests.delete(proc.url + path, headers=TUS, timeout=TIMEOUT)


def all_but_tail(proc: ShimProcess, data: bytes) -> str:
    """Create an upload of ``data`` and store all of it but the last TAIL bytes."""
    path = create(proc, len(data))
    stored = patch(proc, path, 0, data[:-TAIL])
    assert stored.status_code == 204, show(stored)
    return path


def final_patch(proc: ShimProcess, path: str, data: bytes) -> requests.Response:
    """The PATCH with the last TAIL bytes: the one that completes the file."""
    return patch(proc, path, len(data) - TAIL, data[-TAIL:])


def retry_final(proc: ShimProcess, path: str, data: bytes) -> requests.Response:
    """A retried final PATCH, the way tus clients send it: empty, at the final offset."""
    return patch(proc, path, len(data), b"")


def put_range(proc: ShimProcess, target: str, data: bytes, headers: Mapping[str, str] | None = None
              ) -> requests.Response:
    """A Content-Range PUT of the whole of ``data`` as ``bytes 0-(N-1)/N``."""
    fields = {"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}", **(headers or {})}
    return requests.put(proc.url + target, data=data, headers=fields, timeout=TIMEOUT)


def assert_pending(response: requests.Response) -> None:
    """503 with Retry-After: complete, the delivery is still going on."""
    assert response.status_code == 503, show(response)
    assert int(response.headers["Retry-After"]) >= 1, show(response)
    assert "Shim-Upstream-Status" not in response.headers, show(response)


def wait_for_head(proc: ShimProcess, path: str, status: int, what: str) -> requests.Response:
    """Poll HEAD until it answers ``status``; the last answer. Meanwhile only 503 (pending)."""
    answers: list[requests.Response] = []

    def answered() -> bool:
        answers.append(head(proc, path))
        assert answers[-1].status_code in (status, 503), show(answers[-1])
        return answers[-1].status_code == status

    wait_until(answered, TIMEOUT, what, interval=0.1)
    return answers[-1]


def assert_accepted_by_head(response: requests.Response, data: bytes) -> None:
    """A HEAD of a delivered upload: 200, complete, the legacy server's 201."""
    assert response.status_code == 200, show(response)
    assert response.headers["Shim-Upstream-Status"] == "201", show(response)
    assert response.headers["Upload-Offset"] == str(len(data)), show(response)


def holds_for(predicate: Callable[[], bool], seconds: float, interval: float = 0.1) -> bool:
    """Whether ``predicate`` stays true for ``seconds`` (it is checked all along): for what
    must NOT happen, such as a second delivery, within a window longer than the backoff."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(interval)
    return predicate()


# --- what the legacy server saw -----------------------------------------------------------


def deliveries(server: LegacyServer) -> list[Received]:
    """Every request that reached the legacy server, whatever it answered."""
    return server.requests()


def assert_whole(request: Received, data: bytes) -> None:
    """The legacy server got the whole of ``data``, byte for byte."""
    assert (request.complete, request.size, request.sha256) == (True, len(data), sha256(data)), request


def assert_delivered_once(server: LegacyServer, data: bytes, refused: int = 0) -> Received:
    """One request accepted (201) with exactly ``data``; ``refused`` attempts before it,
    each of the whole file too; nothing else."""
    seen = deliveries(server)
    assert [r.status for r in seen] == [r.status for r in seen[:refused]] + [201], seen
    assert len(seen) == refused + 1, seen
    for request in seen:
        assert_whole(request, data)
        assert request.method == "PUT", request
    return seen[-1]


# --- the legacy server answers late, or not at all ----------------------------------------


def test_late_answer_is_awaited_not_resent(front: Callable[..., ShimProcess],
                                           faulty: LegacyServer) -> None:
    """The legacy server answers only after delivery.wait: the final PATCH gets 503 with
    Retry-After; a HEAD and a retried final PATCH meanwhile get 503 too and send nothing;
    once the answer is in, HEAD shows it (Shim-Upstream-Status 201). One request in all."""
    proc = front(wait=0.5, timeout=10.0)
    faulty.late = 4.0
    data = os.urandom(300 * KIB + 7)
    path = all_but_tail(proc, data)
    faulty.set_mode("late")

    assert_pending(final_patch(proc, path, data))
    assert_pending(head(proc, path))
    assert_pending(retry_final(proc, path, data))
    [request] = deliveries(faulty)
    assert request.status == 0, "the legacy server answered already: nothing was tested"

    assert_accepted_by_head(wait_for_head(proc, path, 200, "the late answer"), data)
    retried = retry_final(proc, path, data)
    assert retried.status_code == 204 and retried.headers["Shim-Upstream-Status"] == "201", \
        show(retried)
    assert_delivered_once(faulty, data)


def test_hang_past_timeout_with_hold_fails_once(front: Callable[..., ShimProcess],
                                                faulty: LegacyServer) -> None:
    """The legacy server took the whole file and never answers (past upstream.timeout), with
    on_unknown: hold: the client is told 502 with a reason, HEAD and a retried final PATCH
    keep saying 502, and the file is never sent again, even once the server would accept."""
    proc = front(wait=0.5, timeout=1.0, on_unknown="hold")
    data = os.urandom(200 * KIB + 3)
    path = all_but_tail(proc, data)
    faulty.set_mode("hang")

    final = final_patch(proc, path, data)
    assert final.status_code in (502, 503), show(final)
    failed = wait_for_head(proc, path, 502, "the delivery to fail")
    assert failed.headers["Upload-Offset"] == str(len(data)), show(failed)
    [request] = deliveries(faulty)
    assert_whole(request, data)

    faulty.set_mode("ok")  # a second attempt would now be accepted: there must be none
    retried = retry_final(proc, path, data)
    assert retried.status_code == 502, show(retried)
    assert "not delivered" in retried.text, show(retried)
    assert holds_for(lambda: head(proc, path).status_code == 502, 3.0), show(head(proc, path))
    assert [(r.status, r.complete) for r in deliveries(faulty)] == [(0, True)]


def test_hang_past_timeout_with_retry_delivers_again(front: Callable[..., ShimProcess],
                                                     faulty: LegacyServer) -> None:
    """The same hang with on_unknown: retry: the shim sends the file again (at-least-once);
    once the legacy server answers, HEAD says 201. Every request carried the whole file."""
    proc = front(wait=0.5, timeout=1.0, on_unknown="retry")
    data = os.urandom(200 * KIB + 5)
    path = all_but_tail(proc, data)
    faulty.set_mode("hang")

    assert_pending(final_patch(proc, path, data))
    faulty.wait_for(2, TIMEOUT)
    faulty.set_mode("ok")  # answers the request now hanging, and any later one

    assert_accepted_by_head(wait_for_head(proc, path, 200, "the second attempt"), data)
    seen = deliveries(faulty)
    assert len(seen) >= 2, seen
    assert seen[0].status == 0, seen
    assert [r.status for r in seen].count(201) == 1, seen
    for request in seen:
        assert_whole(request, data)
        assert request.header("Idempotency-Key") == seen[0].header("Idempotency-Key"), seen


def test_retry_during_hanging_delivery_joins_it(front: Callable[..., ShimProcess],
                                                faulty: LegacyServer) -> None:
    """While a delivery hangs (within upstream.timeout), retried final PATCHes and a HEAD
    join it: 503 each, and still one request at the legacy server; its late 201 is then what
    every request gets."""
    proc = front(wait=0.5, timeout=8.0)
    data = os.urandom(100 * KIB + 1)
    path = all_but_tail(proc, data)
    faulty.set_mode("hang")

    assert_pending(final_patch(proc, path, data))
    for _ in range(2):
        assert_pending(retry_final(proc, path, data))
    assert_pending(head(proc, path))
    [request] = deliveries(faulty)
    assert request.status == 0, request

    faulty.set_mode("ok")
    assert_accepted_by_head(wait_for_head(proc, path, 200, "the delayed answer"), data)
    assert_delivered_once(faulty, data)


# --- the legacy server refuses ------------------------------------------------------------


def test_early_413_is_relayed_and_never_resent(front: Callable[..., ShimProcess],
                                               faulty: LegacyServer) -> None:
    """The legacy server answers 413 after the head and closes (nginx past
    client_max_body_size): the client gets that 413 with the server's words, HEAD and a
    retried final PATCH repeat it, and nothing is sent again, even once it would accept."""
    proc = front(wait=3.0, timeout=3.0)
    data = os.urandom(2 * 1024 * KIB + 9)
    path = all_but_tail(proc, data)
    faulty.set_mode("early-413")

    final = final_patch(proc, path, data)
    assert final.status_code == 413, show(final)
    assert final.headers["Shim-Upstream-Status"] == "413", show(final)
    assert "413 Request Entity Too Large" in final.text, show(final)
    [request] = deliveries(faulty)
    assert (request.status, request.complete) == (413, False), request

    faulty.set_mode("ok")
    assert head(proc, path).status_code == 413
    again = retry_final(proc, path, data)
    assert (again.status_code, again.text) == (413, final.text), show(again)
    assert holds_for(lambda: len(deliveries(faulty)) == 1, 1.5), deliveries(faulty)


def test_500_is_relayed_and_replayed(front: Callable[..., ShimProcess],
                                     faulty: LegacyServer) -> None:
    """A 500 is the legacy server's last word: a tus client gets 502 naming it
    (Shim-Upstream-Status: 500), a Content-Range client gets the 500 itself; HEAD, a retried
    final request and an inquiry replay it; each file reached the legacy server once."""
    proc = front(wait=3.0, timeout=3.0)
    data = os.urandom(64 * KIB + 1)
    path = all_but_tail(proc, data)
    faulty.set_mode("status:500")

    final = final_patch(proc, path, data)
    assert final.status_code == 502 and final.headers["Shim-Upstream-Status"] == "500", show(final)
    other = os.urandom(50)
    relayed = put_range(proc, "/cr/refused.bin", other)
    assert (relayed.status_code, relayed.text) == (500, "the legacy server says 500\n"), \
        show(relayed)

    faulty.set_mode("ok")
    for replay in (head(proc, path), retry_final(proc, path, data)):
        assert replay.status_code == 502, show(replay)
        assert replay.headers["Shim-Upstream-Status"] == "500", show(replay)
    inquiry = requests.put(proc.url + "/cr/refused.bin", headers={"Content-Range": "bytes */50"},
                           timeout=TIMEOUT)
    assert (inquiry.status_code, inquiry.text) == (500, relayed.text), show(inquiry)
    seen = deliveries(faulty)
    assert [(r.path.startswith("/uploads/"), r.status) for r in seen] == \
        [(True, 500), (False, 500)], seen
    assert_whole(seen[0], data)
    assert_whole(seen[1], other)


def test_503_then_ok_is_delivered_once(front: Callable[..., ShimProcess],
                                       faulty: LegacyServer) -> None:
    """503 is not the legacy server's last word: the client gets 503 with Retry-After, the
    shim tries again in the background, and the file is accepted exactly once."""
    proc = front(wait=0.5, timeout=3.0)
    data = os.urandom(100 * KIB + 2)
    path = all_but_tail(proc, data)
    faulty.set_mode("status:503")

    assert_pending(final_patch(proc, path, data))
    faulty.set_mode("ok")
    assert_accepted_by_head(wait_for_head(proc, path, 200, "the retry after 503"), data)
    accepted = assert_delivered_once(faulty, data, refused=len(deliveries(faulty)) - 1)
    assert {r.status for r in deliveries(faulty)[:-1]} <= {503}
    assert accepted.path.startswith("/uploads/")
    assert holds_for(lambda: len(faulty.accepted()) == 1, 1.0), deliveries(faulty)


def test_close_after_body_with_hold_is_failed_and_told(front: Callable[..., ShimProcess],
                                                       faulty: LegacyServer) -> None:
    """The legacy server reads the whole file and closes without an answer: it may have
    stored it, so under on_unknown: hold the shim never sends it again and tells 502."""
    proc = front(wait=2.0, timeout=3.0, on_unknown="hold")
    data = os.urandom(50 * KIB + 4)
    path = all_but_tail(proc, data)
    faulty.set_mode("close-after-body")

    final = final_patch(proc, path, data)
    assert final.status_code == 502, show(final)
    assert "not delivered" in final.text, show(final)
    faulty.set_mode("ok")
    assert holds_for(lambda: head(proc, path).status_code == 502, 2.0)
    assert [(r.status, r.complete) for r in deliveries(faulty)] == [(0, True)]


def test_down_then_back_is_delivered_once(front: Callable[..., ShimProcess],
                                          faulty: LegacyServer) -> None:
    """The legacy server is down when the file completes: 503 with Retry-After; once it is
    back on the same port the shim delivers the file by itself, exactly once."""
    proc = front(wait=0.5, timeout=2.0)
    data = os.urandom(150 * KIB + 6)
    path = all_but_tail(proc, data)
    faulty.set_mode("down")

    assert_pending(final_patch(proc, path, data))
    assert_pending(head(proc, path))
    assert deliveries(faulty) == []
    faulty.set_mode("back")

    assert_accepted_by_head(wait_for_head(proc, path, 200, "delivery after the server is back"),
                            data)
    assert_delivered_once(faulty, data)


# --- Content-Range: the same file twice, and two writers ---------------------------------


def test_same_whole_file_twice_is_delivered_once(front: Callable[..., ShimProcess],
                                                 faulty: LegacyServer) -> None:
    """The same whole file PUT twice with ``bytes 0-49/50`` (a client that did not see the
    first answer): one delivery, and the second PUT gets the recorded answer, same status
    and body."""
    proc = front(wait=3.0, timeout=3.0)
    data = os.urandom(50)
    target = "/cr/twice.bin"

    answer = put_range(proc, target, data)
    assert answer.status_code == 201, show(answer)
    assert json.loads(answer.text)["sha256"] == sha256(data), show(answer)
    again = put_range(proc, target, data)
    assert (again.status_code, again.text) == (answer.status_code, answer.text), show(again)
    assert_delivered_once(faulty, data)


def test_different_file_of_same_size_is_delivered_as_new(front: Callable[..., ShimProcess],
                                                         faulty: LegacyServer) -> None:
    """A different whole file of the same size PUT to the same URL after the first was
    delivered is a new file: delivered as such, with its own bytes, and answered with the
    legacy server's answer to it."""
    proc = front(wait=3.0, timeout=3.0)
    first, second = os.urandom(50), os.urandom(50)
    target = "/cr/replaced.bin"

    assert put_range(proc, target, first).status_code == 201
    new = put_range(proc, target, second)
    assert new.status_code == 201, show(new)
    assert json.loads(new.text)["sha256"] == sha256(second), show(new)
    seen = deliveries(faulty)
    assert [(r.path, r.status) for r in seen] == [(target, 201), (target, 201)], seen
    assert_whole(seen[0], first)
    assert_whole(seen[1], second)


def read_response(sock: socket.socket, deadline: float) -> bytes:
    """Whatever the shim sends on ``sock`` until it closes it or the deadline passes."""
    received = b""
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            if b"\r\n\r\n" in received:
                return received
            continue
        except OSError:
            return received
        if not data:
            return received
        received += data
    return received


def test_two_writers_on_one_url_never_splice(front: Callable[..., ShimProcess],
                                             faulty: LegacyServer) -> None:
    """Two writers with the same credentials PUT different files of the same size to one URL,
    both from byte 0; the second starts while the first still streams slowly. The legacy
    server gets exactly one of the two files, whole, never a mix of them."""
    proc = front(wait=3.0, timeout=3.0)
    size = 256 * KIB
    slow, fast = os.urandom(size), os.urandom(size)
    target = "/cr/contested.bin"
    auth = {"Authorization": "Bearer same-user"}
    data_dir = Path(proc.storage_dir) / "data"

    with socket.create_connection(("127.0.0.1", proc.port), timeout=TIMEOUT) as sock:
        fields = {"Host": "127.0.0.1", **auth, "Content-Range": f"bytes 0-{size - 1}/{size}",
                  "Content-Length": str(size)}
        head_bytes = f"PUT {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        sock.sendall(head_bytes.encode() + b"\r\n" + slow[: 64 * KIB])
        wait_until(lambda: any(f.stat().st_size >= 64 * KIB for f in data_dir.iterdir()),
                   TIMEOUT, "the slow writer's first bytes on the shim's disk")

        second = put_range(proc, target, fast, auth)
        assert second.status_code in (201, 423), show(second)
        try:  # the rest of the slow body, slowly; the shim may have closed this request
            for start in range(64 * KIB, size, 32 * KIB):
                sock.sendall(slow[start:start + 32 * KIB])
                time.sleep(0.01)
        except OSError:
            pass
        first = read_response(sock, time.monotonic() + TIMEOUT)

    wait_until(lambda: bool(faulty.accepted()), TIMEOUT, "a delivery")
    assert holds_for(lambda: len(deliveries(faulty)) == 1, 1.0), deliveries(faulty)
    [delivered] = deliveries(faulty)
    assert delivered.complete and delivered.size == size, delivered
    assert delivered.sha256 in (sha256(slow), sha256(fast)), "a splice of the two files"
    winner = fast if second.status_code == 201 else slow
    assert delivered.sha256 == sha256(winner), (second.status_code, first[:200])
    if second.status_code == 201:
        assert json.loads(second.text)["sha256"] == sha256(fast), show(second)
    else:
        assert first.startswith(b"HTTP/1.1 201"), first[:300]


def test_delete_during_hanging_delivery_is_refused(front: Callable[..., ShimProcess],
                                                   faulty: LegacyServer) -> None:
    """A tus DELETE while the file is being delivered gets 409: the upload is neither
    reverted nor lost; HEAD still shows every byte, and the delivery goes on to its 201."""
    proc = front(wait=0.5, timeout=8.0)
    data = os.urandom(120 * KIB + 8)
    path = all_but_tail(proc, data)
    faulty.set_mode("hang")

    assert_pending(final_patch(proc, path, data))
    refused = delete(proc, path)
    assert refused.status_code == 409, show(refused)
    assert refused.text.strip(), show(refused)
    status = head(proc, path)
    assert_pending(status)
    assert status.headers["Upload-Offset"] == str(len(data)), show(status)

    faulty.set_mode("ok")
    assert_accepted_by_head(wait_for_head(proc, path, 200, "the delivery after the DELETE"), data)
    assert_delivered_once(faulty, data)


# --- a request the shim cannot answer as asked --------------------------------------------

NON_UTF8_HOST = (b"POST /upload HTTP/1.1\r\nHost: \xff\xfe\r\nUpload-Draft-Interop-Version: 8\r\n"
                 b"Upload-Complete: ?0\r\nContent-Length: 5\r\n\r\nhello")


def final_status(raw: bytes) -> tuple[int, list[bytes], bytes]:
    """The first non-1xx status in ``raw``, the Location values of every response, the body
    that follows the final head."""
    locations: list[bytes] = []
    rest = raw
    while b"\r\n\r\n" in rest:
        head_bytes, _, rest = rest.partition(b"\r\n\r\n")
        status_line, *lines = head_bytes.split(b"\r\n")
        status = int(status_line.split()[1])
        locations += [line.partition(b":")[2].strip() for line in lines
                      if line.lower().startswith(b"location:")]
        if status >= 200:
            return status, locations, rest
    raise AssertionError(f"no final response in {raw!r}")


def patch_until_unlocked(proc: ShimProcess, upload_id: str) -> requests.Response:
    """Finish the 5-byte IETF upload ``upload_id`` with an interop-8 PATCH, asking again
    while it is 423 Locked; the first other answer (TimeoutError if there is none)."""
    answers: list[requests.Response] = []

    def unlocked() -> bool:
        answers.append(requests.patch(
            f"{proc.url}/.well-known/resumable-uploads/{upload_id}", data=b" world",
            headers={"Upload-Draft-Interop-Version": "8", "Upload-Offset": "5",
                     "Upload-Complete": "?1", "Content-Type": "application/partial-upload"},
            timeout=TIMEOUT))
        return answers[-1].status_code != 423

    wait_until(unlocked, TIMEOUT, f"upload {upload_id} to be unlocked", interval=0.1)
    return answers[-1]


def test_non_utf8_host_on_ietf_creation_leaves_no_lease(front: Callable[..., ShimProcess],
                                                        faulty: LegacyServer) -> None:
    """An IETF creation with a Host that is not UTF-8 is served without echoing that Host
    (a relative Location) or refused with a reason; the shim keeps working (a normal tus
    upload is delivered) and holds no lease on whatever it created: a PATCH to that upload
    is answered, not 423 Locked for ever."""
    proc = front(wait=3.0, timeout=3.0)
    with socket.create_connection(("127.0.0.1", proc.port), timeout=TIMEOUT) as sock:
        sock.sendall(NON_UTF8_HOST)
        raw = read_response(sock, time.monotonic() + TIMEOUT)
    status, locations, body = final_status(raw)
    if status < 300:
        assert status == 201 and locations, raw
        assert all(location.startswith(b"/") for location in locations), raw
    else:
        assert 400 <= status < 600 and body.strip(), raw

    data = os.urandom(20 * KIB)
    path = create(proc, len(data))
    done = patch(proc, path, 0, data)
    assert done.status_code == 204 and done.headers["Shim-Upstream-Status"] == "201", show(done)
    assert_delivered_once(faulty, data)

    created = {Path(f.name) for f in (Path(proc.storage_dir) / "data").iterdir()}
    created |= {Path(loc.decode("latin-1").rsplit("/", 1)[1]) for loc in locations}
    created -= {Path(path.rsplit("/", 1)[1])}
    for upload_id in sorted(str(p) for p in created):
        answer = patch_until_unlocked(proc, upload_id)
        assert answer.status_code < 500, show(answer)


def test_other_file_while_one_is_delivered_never_gets_its_answer(front: Callable[..., ShimProcess],
                                                                 faulty: LegacyServer) -> None:
    """While a whole file is being delivered (the legacy server is slow), a different file of
    the same size PUT to the same URL is refused with 409, never answered with the first
    file's answer; the same file again joins the delivery. Once the first is delivered, the
    other file is a new upload, delivered with its own bytes."""
    proc = front(wait=0.5, timeout=10.0)
    faulty.late = 3.0
    first, other = os.urandom(64 * KIB), os.urandom(64 * KIB)
    target = "/cr/busy.bin"
    faulty.set_mode("late")

    assert_pending(put_range(proc, target, first))
    refused = put_range(proc, target, other)
    assert refused.status_code == 409, show(refused)
    assert_pending(put_range(proc, target, first))  # the same bytes: joins, sends nothing
    assert len(deliveries(faulty)) == 1

    def answered(data: bytes) -> Callable[[], bool]:
        return lambda: put_range(proc, target, data).status_code == 201

    wait_until(answered(first), TIMEOUT, "the first file's answer")
    faulty.set_mode("ok")
    again = put_range(proc, target, other)
    assert again.status_code == 201 and json.loads(again.text)["sha256"] == sha256(other), show(again)
    assert [r.sha256 for r in deliveries(faulty)] == [sha256(first), sha256(other)]
