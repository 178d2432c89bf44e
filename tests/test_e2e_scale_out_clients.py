"""Issue 13, end to end with more clients: three shim instances share one Redis and one folder
behind a round-robin balancer (the `cluster` fixture, tests/scale_out.py).

- tus-js-client (node) and google-resumable-media upload through a link that is cut every
  400 KiB, so that every reconnection lands on the next instance; the legacy server must get
  each file once, byte-exact.
- Two requests of one upload that meet at the write lease at two instances (made
  deterministic with Redis' CLIENT PAUSE WRITE): the newer one takes over, never 423.
- A body that stalls at one instance is taken over by a request at another one (a HEAD, or
  a PATCH at the committed offset): the stalled write ends, its bytes count, the upload
  finishes elsewhere.
- The operator's command line, pointed at one instance's config, sees and purges an upload
  that other instances made and wrote.

Nothing waits on a timer: every wait polls a condition under a deadline.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from google import resumable_media
from google.resumable_media.requests import ResumableUpload

from tests.harness import (
    REPO_ROOT,
    PayloadFactory,
    ShimProcess,
    run_tus_js,
    subprocess_env,
    tus_js_events,
    wait_until,
)
from tests.links import MakeProxy
from tests.scale_out import KIB, MIB, TIMEOUT, Cluster, accepted_once

pytestmark = pytest.mark.timeout(240)

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"
CUT_EVERY = 400 * KIB
CLIENT_TIMEOUT = 150.0
"""Seconds tus-js-client (node) may take for its cut upload."""
RETRY_DELAYS = [0, 100, 250, 500, 1000, 1000, 2000, 2000, 3000, 3000, 5000, 5000]
"""tus-js-client's waits (ms) between retries; it starts again from the first after progress."""
GCS_PATH = "/upload/storage/v1/b/bucket/o"
CHUNK = 256 * KIB
"""Chunks of the Content-Range uploads (google-resumable-media wants a multiple of 256 KiB)."""
RECOVER_ATTEMPTS = 10


# --- tus, by hand ---------------------------------------------------------------------------


def create_tus(url: str, size: int, name: str) -> str:
    """POST a tus creation of `size` bytes named `name`; the upload's path (/files/<id>)."""
    created = requests.post(f"{url}/files/", headers={
        **TUS, "Upload-Length": str(size),
        "Upload-Metadata": "filename " + base64.b64encode(name.encode()).decode()},
        timeout=TIMEOUT)
    assert created.status_code == 201, (created.status_code, dict(created.headers), created.text)
    return "/files/" + created.headers["Location"].rsplit("/files/", 1)[1]


def upload_id_of(path: str) -> str:
    return path.rsplit("/", 1)[1]


def patch(url: str, path: str, offset: int, body: bytes) -> requests.Response:
    return requests.patch(f"{url}{path}", data=body, headers={
        **TUS, "Upload-Offset": str(offset), "Content-Type": OCTETS}, timeout=TIMEOUT)


def head(url: str, path: str) -> requests.Response:
    return requests.head(f"{url}{path}", headers=TUS, timeout=TIMEOUT)


def show(response: requests.Response) -> str:
    return f"{response.status_code} {dict(response.headers)} {response.text[:300]!r}"


def stalled_patch(shim: ShimProcess, path: str, length: int, part: bytes) -> socket.socket:
    """A raw connection to `shim` with a tus PATCH (at offset 0) that announces `length` body
    bytes and sends only `part` of them; the caller keeps it open (a stalled client)."""
    head_lines = [f"PATCH {path} HTTP/1.1", f"Host: 127.0.0.1:{shim.port}",
                  "Tus-Resumable: 1.0.0", "Upload-Offset: 0", f"Content-Type: {OCTETS}",
                  f"Content-Length: {length}"]
    sock = socket.create_connection(("127.0.0.1", shim.port), timeout=TIMEOUT)
    sock.sendall(("\r\n".join(head_lines) + "\r\n\r\n").encode("latin-1") + part)
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes the connection (a reset counts as closed)."""
    sock.settimeout(TIMEOUT)
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while data := sock.recv(64 * KIB):
            received += data
    return received


def answered(sock: socket.socket) -> bool:
    """The peer sent something (an early answer) or closed the connection."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def wait_stored(sock: socket.socket, stored: Path, size: int) -> None:
    """Wait until `size` bytes of a stalled body are in `stored`; a refusal of the request
    (an early answer on `sock`) fails at once, with that answer."""
    wait_until(lambda: stored_size(stored) >= size or answered(sock), TIMEOUT,
               f"{size} bytes of the stalled body in {stored}")
    if stored_size(stored) < size:
        raise AssertionError(f"the stalled PATCH was answered early: {read_to_end(sock)[:500]!r}")
    assert stored_size(stored) == size


def data_file(group: Cluster, upload_id: str) -> Path:
    """Where the shared folder keeps an upload's bytes (shim/data_folder.py)."""
    return group.shims[0].storage_dir / "data" / upload_id


def stored_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def taken_over_at(shim: ShimProcess, upload_id: str) -> bool:
    """The shim logged the upload event "taken over" for `upload_id` (shim/metrics.py)."""
    pattern = rf"event=taken over id={re.escape(upload_id)}(?:\s|$)"  # ids may end in "-"
    return re.search(pattern, shim.output(), re.MULTILINE) is not None


# --- 1. tus-js-client ----------------------------------------------------------------------


def test_tus_js_client_cut_across_three_instances_arrives_once(
        cluster: Callable[..., Cluster], cutting_proxy: MakeProxy, payload: PayloadFactory,
        node: None) -> None:
    """tus-js-client through a link cut every 400 KiB in front of the balancer: after each
    cut it asks (HEAD) and goes on (PATCH) at whatever instance its new connection reaches,
    which finds the upload in Redis and its bytes in the shared folder. One upload URL, one
    delivery, byte-exact."""
    group = cluster()
    source = payload(3 * MIB + 4321, "js.bin")
    link = cutting_proxy(group.balancer.port, CUT_EVERY)
    result = run_tus_js({"endpoint": f"{link.url}/files/", "file": source, "chunkSize": MIB,
                         "metadata": {"filename": "js.bin"}, "retryDelays": RETRY_DELAYS,
                         "traceResponses": True}, timeout=CLIENT_TIMEOUT)
    report = f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, report
    events = tus_js_events(result.stdout)
    assert events[-1]["event"] == "success", report
    # The same upload all along: an instance that did not know it would have answered 404,
    # and tus-js-client would have made a new one (a second "url").
    assert len([e for e in events if e["event"] == "url"]) == 1, report
    assert link.cuts >= 5, report
    assert group.served_by() == {0, 1, 2}, group.balancer.connections
    accepted_once(group.legacy, "/uploads/js.bin", source.read_bytes())


# --- 2. google-resumable-media -------------------------------------------------------------


def recover(upload: ResumableUpload, transport: requests.Session) -> int:
    """upload.recover() (an inquiry, `bytes */*`), asked again if the link cuts it too; the
    bytes the shim holds."""
    for _ in range(RECOVER_ATTEMPTS):
        try:
            upload.recover(transport)
        except requests.exceptions.ConnectionError:
            continue
        return int(upload.bytes_uploaded)
    raise AssertionError(f"recover() was cut off {RECOVER_ATTEMPTS} times in a row")


def test_google_resumable_media_cut_across_three_instances_arrives_once(
        cluster: Callable[..., Cluster], cutting_proxy: MakeProxy, payload: PayloadFactory) -> None:
    """A Google-style session (POST ?uploadType=resumable, then PUTs with Content-Range) in
    256 KiB chunks through a link cut every 400 KiB: after each cut, recover() asks the next
    instance what is stored (308 + Range) and the chunks go on from there. The file is
    delivered once, as a POST to the path the session was opened on. No chunk is answered
    423 Locked, which the library does not retry (see the test after this one)."""
    group = cluster(content_range={"enabled": True, "paths": ["/upload/"]})
    size = 3 * MIB + 777
    source = payload(size, "gcs.bin")
    link = cutting_proxy(group.balancer.port, CUT_EVERY)
    upload = ResumableUpload(f"{link.url}{GCS_PATH}?uploadType=resumable", chunk_size=CHUNK)
    upload._retry_strategy = resumable_media.RetryStrategy(max_retries=0)  # we recover()
    recovered: list[int] = []
    response: requests.Response | None = None
    with requests.Session() as transport, source.open("rb") as stream:
        initiated = upload.initiate(transport, stream, metadata={"name": "gcs.bin"},
                                    content_type="application/octet-stream")
        assert initiated.status_code == 200, show(initiated)
        assert upload.resumable_url.startswith(f"{link.url}{GCS_PATH}?"), upload.resumable_url
        for _ in range(200):  # 13 chunks and ~8 cuts; a bound, not an expectation
            if upload.finished:
                break
            try:
                response = upload.transmit_next_chunk(transport)
            except requests.exceptions.ConnectionError:
                assert not upload.invalid
                recovered.append(recover(upload, transport))
    assert upload.finished, (recovered, upload.bytes_uploaded)
    assert response is not None
    assert response.status_code == 200, show(response)  # the legacy 201, as 200 in a session
    assert upload.bytes_uploaded == size
    assert link.cuts >= 5 and len(recovered) >= 5, (link.cuts, recovered)
    assert recovered == sorted(recovered) and all(0 < n < size for n in recovered), recovered
    assert group.served_by() == {0, 1, 2}, group.balancer.connections
    delivered = accepted_once(group.legacy, GCS_PATH, source.read_bytes())
    assert delivered.method == "POST"
    assert json.loads(response.content)["sha256"] == delivered.sha256


def open_session(shim: ShimProcess, size: int) -> str:
    """POST ?uploadType=resumable at `shim`: the session URI's path and query."""
    opened = requests.post(f"{shim.url}{GCS_PATH}?uploadType=resumable",
                           headers={"X-Upload-Content-Length": str(size)}, timeout=TIMEOUT)
    assert opened.status_code == 200, show(opened)
    return GCS_PATH + "?" + opened.headers["Location"].split("?", 1)[1]


def blocked_writes(control: redis.Redis) -> int:
    """Commands Redis holds back (CLIENT PAUSE WRITE): the writes the instances wait on."""
    return int(control.info("clients")["blocked_clients"])


def race(group: Cluster) -> tuple[requests.Response, str, bytes]:
    """Two requests with the same chunk of one session meet at the write lease, the older
    one at instance 0, the newer at instance 1, each having found no holder. Deterministic
    through Redis' CLIENT PAUSE WRITE, which holds every write back while reads go on: the
    older chunk (its head and half its body sent) gets to its `store.acquire` and waits
    there; only then is the newer, whole chunk sent (to instance 1), which finds no holder
    and waits at its own acquire; Redis then runs the two in order, so the older one gets
    the lease. The older chunk's client leaves (its connection is closed once the older
    chunk waits, as a cut link leaves it) before the newer one is sent. A first chunk goes
    first (whole, at instance 2), which also loads the lease scripts into Redis. Returns
    the newer chunk's answer, the session's path and query, and the file."""
    older_at, newer_at, third = group.shims
    chunk = CHUNK
    size = 3 * chunk + 999
    data = os.urandom(size)
    session = open_session(older_at, size)
    first = requests.put(f"{third.url}{session}", data=data[:chunk], headers={
        "Content-Range": f"bytes 0-{chunk - 1}/{size}"}, timeout=TIMEOUT)
    assert first.status_code == 308 and first.headers["Range"] == f"bytes=0-{chunk - 1}", \
        show(first)
    span = f"bytes {chunk}-{2 * chunk - 1}/{size}"
    control = redis.Redis.from_url(group.redis.url, socket_timeout=TIMEOUT)
    older: socket.socket | None = None
    try:
        control.client_pause(int(TIMEOUT * 1000), all=False)  # writes only
        fields = [f"PUT {session} HTTP/1.1", f"Host: 127.0.0.1:{older_at.port}",
                  f"Content-Range: {span}", f"Content-Length: {chunk}"]
        older = socket.create_connection(("127.0.0.1", older_at.port), timeout=TIMEOUT)
        older.sendall(("\r\n".join(fields) + "\r\n\r\n").encode("latin-1")
                      + data[chunk:chunk + chunk // 2])
        wait_until(lambda: blocked_writes(control) >= 1, TIMEOUT,
                   "the older chunk waiting at its acquire of the write lease")
        older.close()
        with ThreadPoolExecutor(1) as pool:
            newer = pool.submit(requests.put, f"{newer_at.url}{session}",
                                data=data[chunk:2 * chunk], headers={"Content-Range": span},
                                timeout=TIMEOUT)
            wait_until(lambda: blocked_writes(control) >= 2, TIMEOUT,
                       "the newer chunk waiting at its acquire too")
            control.client_unpause()
            answer = newer.result(TIMEOUT)
    finally:
        control.client_unpause()
        control.close()
        if older is not None:
            older.close()
    return answer, session, data


def test_a_newer_chunk_takes_over_an_older_one_that_took_the_lease_after_it_looked(
        cluster: Callable[..., Cluster]) -> None:
    """A chunk cut off at instance 0 can begin there only after the client's next chunk
    began at instance 1 (as a cut link makes happen by itself): both find no holder, the
    older takes the lease first. The newer must not be answered 423 Locked (which
    google-resumable-media does not retry: the upload would fail) but end the older write,
    as it would at one instance, and store its chunk (commit a762bf5 fixed this)."""
    group = cluster(content_range={"enabled": True, "paths": ["/upload/"]})
    answer, session, data = race(group)
    assert answer.status_code != 423, show(answer)
    chunk, size = CHUNK, len(data)
    assert answer.status_code == 308, show(answer)
    assert answer.headers["Range"] == f"bytes=0-{2 * chunk - 1}", show(answer)
    rest = requests.put(f"{group.shims[2].url}{session}", data=data[2 * chunk:], headers={
        "Content-Range": f"bytes {2 * chunk}-{size - 1}/{size}"}, timeout=TIMEOUT)
    assert rest.status_code == 200, show(rest)
    accepted_once(group.legacy, GCS_PATH, data)


# --- 3. take-over across instances ---------------------------------------------------------


@pytest.mark.parametrize("taker", ["HEAD", "PATCH"])
def test_a_request_at_another_instance_takes_over_a_stalled_write(
        cluster: Callable[..., Cluster], taker: str) -> None:
    """A PATCH body stalls at instance 0 (its client sends nothing more, the connection stays
    open). A request of the same upload at instance 1 ends that write first (a signal over
    Redis), so it sees every byte instance 0 received: a HEAD reports them as the offset (and
    instance 2 finishes the upload from there), a PATCH at that offset goes on at once. The
    stalled client is disconnected; the file is delivered once, whole."""
    group = cluster()
    first, second, third = group.shims
    size = 1 * MIB + 555
    sent = 300 * KIB + 17
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    name = f"taken-{taker.lower()}.bin"
    path = create_tus(first.url, size, name)
    upload_id = upload_id_of(path)
    stored = data_file(group, upload_id)

    stalled = stalled_patch(first, path, size, data[:sent])
    try:
        wait_stored(stalled, stored, sent)
        assert not taken_over_at(first, upload_id)
        if taker == "HEAD":
            seen = head(second.url, path)
            assert seen.status_code == 200, show(seen)
            assert seen.headers["Upload-Offset"] == str(sent), show(seen)
        else:  # a client that knows what it sent goes on from there
            done = patch(second.url, path, sent, data[sent:])
            assert done.status_code == 204, f"instance 1: {show(done)}"
        wait_until(lambda: taken_over_at(first, upload_id), TIMEOUT,
                   "instance 0 logging the upload taken over")
        # Instance 0 lets its stalled client go, without an answer that claims success.
        left = read_to_end(stalled)
        assert not left.startswith(b"HTTP/1.1 2"), left[:300]
    finally:
        stalled.close()
    if taker == "HEAD":
        done = patch(third.url, path, sent, data[sent:])
        assert done.status_code == 204, f"instance 2: {show(done)}"
    assert done.headers["Upload-Offset"] == str(size), show(done)
    accepted_once(group.legacy, f"/uploads/{name}", data)
    assert not [s for s in (second, third) if taken_over_at(s, upload_id)]


# --- 4. the operator's command line --------------------------------------------------------


def operator(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    """`python -m shim ARGS --config CONFIG`, to its end."""
    return subprocess.run([sys.executable, "-m", "shim", *args, "--config", str(config)],
                          cwd=REPO_ROOT, env=subprocess_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


def listed(config: Path) -> dict[str, Mapping[str, Any]]:
    """`uploads --json`, by id."""
    result = operator("uploads", "--json", config=config)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return {entry["id"]: entry for entry in json.loads(result.stdout)}


def test_operator_lists_and_purges_an_upload_of_the_shared_store(
        cluster: Callable[..., Cluster]) -> None:
    """Created through instance 0 and written through instance 1, an upload is listed by
    `python -m shim uploads --json` run with instance 0's config (Redis and the shared
    folder); `purge` removes it, and instance 2 no longer knows it."""
    group = cluster()
    first, second, third = group.shims
    size, written = 300 * KIB, 100 * KIB + 3
    data = bytes(reversed(range(256))) * (size // 256)
    path = create_tus(first.url, size, "operated.bin")
    upload_id = upload_id_of(path)
    sent = patch(second.url, path, 0, data[:written])
    assert sent.status_code == 204, show(sent)
    stored = data_file(group, upload_id)
    assert stored_size(stored) == written

    config = first.config_path
    entry = listed(config)[upload_id]
    assert (entry["protocol"], entry["state"], entry["bytes"], entry["total"]) == \
        ("tus", "receiving", written, size), entry
    assert entry["destination"] == "PUT /uploads/operated.bin", entry

    purged = operator("purge", upload_id, config=config)
    assert purged.returncode == 0, (purged.stdout, purged.stderr)
    assert upload_id in purged.stdout and "purged" in purged.stdout, purged.stdout

    gone = head(third.url, path)
    assert gone.status_code in (404, 410), show(gone)
    assert not stored.exists()
    assert upload_id not in listed(config)
    again = operator("purge", upload_id, config=config)
    assert again.returncode == 1, (again.stdout, again.stderr)
    assert group.legacy.requests() == []

