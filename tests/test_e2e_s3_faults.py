"""End to end: the S3 API of a real shim (mitmdump) attacked, and broken by the network, by
the legacy server and by SIGKILL, with the legacy server counting what it gets.

The promise under test: each finished object reaches the legacy server exactly once, whole
and byte-exact; nothing the shim said it stored is lost; no client touches another's
upload; no client exhausts the shim; never a partial file or an S3 field (`x-amz-*`, the
client's Authorization) at the legacy server.

boto3 sends what it can express. Everything else goes over a raw `http.client` connection
(`Raw`), signed by botocore's own `S3SigV4Auth` over an `AWSRequest`, so that the shim sees
an authentic request and the test decides every byte and when the connection ends.

Fifteen of these tests failed when they were written (issue 11's attack on the S3 API): a
part re-sent during a waiting delivery, completions racing with different part lists, parts
expiring under a busy upload, a PutObject retried after its answer was lost, aws-chunked
bodies framed by Content-Length, the cap refusal, parts counted against the cap, parts left
on the disk, encoded slashes in a bucket, a failed delivery answered "retry", keys over
1,024 bytes, and numbers `int()` cannot read.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import http.client
import random
import re
import socket
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any
from unittest import mock

import boto3  # type: ignore[import-untyped]
import pytest
from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.client import BaseClient  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]
from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from shim.demo_server import ReceivedRequest, WholeFileServer
from tests.harness import ShimLauncher, ShimProcess, shared_shim, wait_until
from tests.legacy_servers import LegacyServer, Received

pytestmark = pytest.mark.timeout(120)

KIB = 1024
KEY_ID, SECRET = "AKIDSHIMFAULTS01", "shim-faults-secret-0001"
OTHER_ID, OTHER_SECRET = "AKIDSHIMFAULTS02", "shim-faults-secret-0002"
LEGACY_TOKEN = "Bearer legacy-token-faults"
BUCKET = "evidence"
MIN_PART = 64 * KIB
"""The shim's `s3.min_part_size` here: S3's 5 MiB would only make the tests slower."""
WAIT = 2.0
"""`delivery.wait`: how long a completion waits for the legacy server before its 503."""
SETTLE = 20.0
"""Seconds any wait for the shim or the legacy server may take before the test fails."""


def s3_config(**extra: Any) -> dict[str, Any]:
    """The shim's config: S3 under /s3/ with two access keys, small parts, a short wait."""
    config: dict[str, Any] = {
        "s3": {"paths": ["/s3/"], "min_part_size": MIN_PART, "credentials": [
            {"access_key": KEY_ID, "secret": SECRET,
             "forward_headers": {"Authorization": LEGACY_TOKEN}},
            {"access_key": OTHER_ID, "secret": OTHER_SECRET}]},
        "delivery": {"wait": WAIT},
    }
    for section, values in extra.items():
        config[section] = {**config.get(section, {}), **values}
    return config


# --- requests boto3 will not send ------------------------------------------------------------


class _Signer(S3SigV4Auth):  # type: ignore[misc]
    """botocore's S3 signer with the `x-amz-content-sha256` the test chooses (a digest,
    UNSIGNED-PAYLOAD, a STREAMING-* value, or a lie)."""

    def __init__(self, key_id: str, secret: str, payload: str) -> None:
        super().__init__(Credentials(key_id, secret), "s3", "us-east-1")
        self._payload = payload

    def payload(self, request: Any) -> str:
        return self._payload


def signed(port: int, method: str, target: str, fields: Sequence[tuple[str, str]] = (), *,
           body: bytes = b"", payload: str | None = None, key_id: str = KEY_ID,
           secret: str = SECRET, at: datetime.datetime | None = None) -> list[tuple[str, str]]:
    """The header fields of `method target` to the shim on `port`, signed (SigV4) as an SDK
    signs them, at `at` (now by default) and over `payload` (the body's SHA-256 by default)."""
    request = AWSRequest(method=method, url=f"http://127.0.0.1:{port}{target}",
                         headers=dict(fields))
    signer = _Signer(key_id, secret, payload or hashlib.sha256(body).hexdigest())
    when = at or datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    with mock.patch("botocore.auth.get_current_datetime", return_value=when):
        signer.add_auth(request)
    return [("Host", f"127.0.0.1:{port}"), *request.headers.items()]


@dataclass(frozen=True)
class Answer:
    status: int
    fields: dict[str, str]
    """Lower-case names."""
    body: bytes

    @property
    def code(self) -> str:
        """The S3 error code of an error document ("" for anything else)."""
        found = re.search(rb"<Code>([^<]*)</Code>", self.body)
        return found.group(1).decode() if found else ""


class Raw:
    """One HTTP/1.1 connection to the shim that sends what the test says, byte by byte."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=SETTLE * 2)

    def head(self, method: str, target: str, fields: Sequence[tuple[str, str]]) -> Raw:
        self.connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in fields:
            self.connection.putheader(name, value)
        self.connection.endheaders()
        return self

    def send(self, data: bytes) -> Raw:
        self.connection.send(data)
        return self

    def answer(self) -> Answer:
        response = self.connection.getresponse()
        body = response.read()
        self.connection.close()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, body)

    def cut(self) -> None:
        """End the connection as a dropping link does: no more bytes, no goodbye."""
        sock = self.connection.sock
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.connection.close()


def begin(port: int, method: str, target: str, body: bytes, fields: Sequence[tuple[str, str]] = (),
          **sign: Any) -> Raw:
    """A signed request whose head is sent, and none of its body yet."""
    framing = [*fields] if any(k.lower() in ("content-length", "transfer-encoding")
                               for k, _ in fields) else [*fields, ("Content-Length", str(len(body)))]
    return Raw(port).head(method, target, signed(port, method, target, framing, body=body, **sign))


def call(port: int, method: str, target: str, body: bytes = b"",
         fields: Sequence[tuple[str, str]] = (), **sign: Any) -> Answer:
    """One whole signed request, and the shim's answer."""
    return begin(port, method, target, body, fields, **sign).send(body).answer()


def complete_body(parts: Sequence[tuple[int, str]]) -> bytes:
    """A CompleteMultipartUpload request body listing `(number, ETag)` pairs."""
    listed = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>"
                     for n, etag in parts)
    return f'<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">{listed}' \
        "</CompleteMultipartUpload>".encode()


def part_target(key: str, upload_id: str, number: int | str) -> str:
    return f"/s3/{BUCKET}/{key}?partNumber={number}&uploadId={upload_id}"


def upload_target(key: str, upload_id: str) -> str:
    return f"/s3/{BUCKET}/{key}?uploadId={upload_id}"


def aws_chunked(data: bytes, chunk: int, trailer: str = "") -> bytes:
    """`data` as an unsigned aws-chunked body (STREAMING-UNSIGNED-PAYLOAD-TRAILER) of `chunk`
    byte chunks, then `trailer` (`name:value` lines, each ending in CRLF)."""
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n" + \
        trailer.encode() + b"\r\n"


def http_chunked(body: bytes) -> bytes:
    """`body` in one HTTP/1.1 chunk (Transfer-Encoding: chunked), as boto3 frames aws-chunked."""
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def crc32_trailer(data: bytes) -> str:
    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    return f"x-amz-checksum-crc32:{crc}\r\n"


def signed_chunks(fields: Sequence[tuple[str, str]], secret: str, data: bytes, chunk: int) -> bytes:
    """`data` as aws-chunked with chunk signatures (STREAMING-AWS4-HMAC-SHA256-PAYLOAD), chained
    from the signature of the request's `fields` (Amazon S3 API Reference, "Transferring
    Payload in Multiple Chunks"); the final chunk is signed too."""
    values = {k.lower(): v for k, v in fields}
    previous = values["authorization"].rsplit("Signature=", 1)[1]
    timestamp = values["x-amz-date"]
    scope = f"{timestamp[:8]}/us-east-1/s3/aws4_request"
    key = f"AWS4{secret}".encode()
    for part in (timestamp[:8], "us-east-1", "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    body = b""
    for piece in [data[i:i + chunk] for i in range(0, len(data), chunk)] + [b""]:
        to_sign = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", timestamp, scope, previous,
                             hashlib.sha256(b"").hexdigest(), hashlib.sha256(piece).hexdigest()])
        previous = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        body += b"%x;chunk-signature=%s\r\n%s\r\n" % (len(piece), previous.encode(), piece)
    return body


# --- boto3 and what the legacy server and the disk hold ---------------------------------------


def client(url: str, key_id: str = KEY_ID, secret: str = SECRET, attempts: int = 1) -> BaseClient:
    """A boto3 S3 client (path-style) that does not retry unless told to."""
    return boto3.client(
        "s3", endpoint_url=f"{url}/s3", aws_access_key_id=key_id, aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"},
                      retries={"max_attempts": attempts, "mode": "standard"},
                      connect_timeout=10, read_timeout=60))


def error_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def arrived(legacy: WholeFileServer, key: str) -> list[ReceivedRequest]:
    """What reached the legacy server for `key` of the bucket."""
    return [r for r in legacy.received if r.path == f"/uploads/{BUCKET}/{key}"]


def assert_delivered_once(legacy: WholeFileServer, key: str, data: bytes,
                          token: str | None = LEGACY_TOKEN) -> None:
    """`data` reached the legacy server once at `key`, byte-exact, with the access key's own
    Authorization (`token`, from its forward_headers) and no S3 field."""
    deliveries = arrived(legacy, key)
    assert [(r.size, r.sha256, r.complete) for r in deliveries] == [
        (len(data), hashlib.sha256(data).hexdigest(), True)]
    assert deliveries[0].header("Authorization") == token
    assert_no_s3_fields(deliveries[0].headers)


def assert_no_s3_fields(headers: Sequence[tuple[str, str]]) -> None:
    leaked = [name for name, value in headers if (name.lower().startswith("x-amz-") and
              not name.lower().startswith("x-amz-meta-")) or "AWS4-HMAC-SHA256" in value]
    assert leaked == []


def stored(proc: ShimProcess) -> dict[str, int]:
    """The shim's data files and their sizes. Tests compare names with a snapshot taken
    before (`set(stored(proc)) <= set(before)`: nothing new kept): the bytes of an earlier
    delivery may still be on their way out."""
    sizes = {}
    for path in (proc.storage_dir / "data").iterdir():
        with suppress(FileNotFoundError):
            sizes[path.name] = path.stat().st_size
    return sizes


def wait_for_file(proc: ShimProcess, size: int, count: int = 1) -> None:
    """Until `count` data files hold `size` bytes: a body's head was taken and its bytes are
    being written (the shim writes each chunk as it arrives)."""
    wait_until(lambda: list(stored(proc).values()).count(size) >= count, SETTLE,
               f"{count} data files of {size} bytes")


def wait_for_no_new_files(proc: ShimProcess, before: set[str], what: str) -> None:
    """Until the data files are those of `before` at most: what a delivery or a refusal
    frees goes within moments (2 s here), or never."""
    wait_until(lambda: set(stored(proc)) <= before, 2.0, what)


def wait_for_delivery(legacy: WholeFileServer, key: str) -> list[ReceivedRequest]:
    wait_until(lambda: len(arrived(legacy, key)) >= 1, SETTLE, f"a delivery of {key}")
    return arrived(legacy, key)


def wait_for_log(proc: ShimProcess, text: str, count: int) -> None:
    """Until the shim has logged `text` `count` times in all."""
    wait_until(lambda: proc.output().count(text) >= count, SETTLE, f"{count} x {text!r} logged")


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass
class Multipart:
    """A multipart upload in progress, driven through boto3."""

    s3: BaseClient
    key: str
    upload_id: str

    @classmethod
    def create(cls, s3: BaseClient, key: str) -> Multipart:
        return cls(s3, key, s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"])

    def part(self, number: int, data: bytes) -> str:
        return str(self.s3.upload_part(Bucket=BUCKET, Key=self.key, UploadId=self.upload_id,
                                       PartNumber=number, Body=data)["ETag"])

    def listed(self) -> dict[int, tuple[str, int]]:
        parts = self.s3.list_parts(Bucket=BUCKET, Key=self.key, UploadId=self.upload_id)
        return {p["PartNumber"]: (p["ETag"], p["Size"]) for p in parts.get("Parts", [])}

    def complete(self, parts: Sequence[tuple[int, str]]) -> dict[str, Any]:
        return dict(self.s3.complete_multipart_upload(
            Bucket=BUCKET, Key=self.key, UploadId=self.upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in parts]}))

    def abort(self) -> None:
        self.s3.abort_multipart_upload(Bucket=BUCKET, Key=self.key, UploadId=self.upload_id)


def refused(action: Callable[[], object]) -> str:
    """The S3 error code `action` (a boto3 call) fails with."""
    with pytest.raises(ClientError) as exc:
        action()
    return error_code(exc)


# --- one shim for the tests that need no shim of their own -------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ShimProcess, WholeFileServer]]:
    yield from shared_shim(tmp_path_factory, "s3-faults", s3_config())


@pytest.fixture
def proc(shared: tuple[ShimProcess, WholeFileServer]) -> ShimProcess:
    return shared[0]


@pytest.fixture
def whole(shared: tuple[ShimProcess, WholeFileServer]) -> WholeFileServer:
    """The legacy server behind the shared shim (each test looks at its own keys only)."""
    return shared[1]


@pytest.fixture
def s3(proc: ShimProcess) -> BaseClient:
    return client(proc.url)


# --- parts cut off, raced, and late -----------------------------------------------------------


def test_a_part_cut_off_mid_body_leaves_nothing_and_its_retry_completes(
        proc: ShimProcess, whole: WholeFileServer, s3: BaseClient) -> None:
    """A part whose connection drops at a random byte of its body: ListParts never shows it,
    the disk keeps none of its bytes, and the part sent again completes the file."""
    upload = Multipart.create(s3, "cut-part.bin")
    first, second = random_bytes(MIN_PART, 1), random_bytes(3 * MIN_PART // 2, 2)
    etag1 = upload.part(1, first)
    files = stored(proc)
    logged = proc.output().count("keeps nothing")
    for cut in sorted(random.Random(3).sample(range(len(second)), 4)):
        raw = begin(proc.port, "PUT", part_target(upload.key, upload.upload_id, 2), second)
        raw.send(second[:cut])
        if cut:
            wait_for_file(proc, cut)
        raw.cut()
        logged += 1
        wait_for_log(proc, "keeps nothing", logged)
        assert upload.listed() == {1: (etag1, len(first))}
        assert set(stored(proc)) <= set(files)
    etag2 = upload.part(2, second)
    assert upload.listed() == {1: (etag1, len(first)), 2: (etag2, len(second))}
    upload.complete([(1, etag1), (2, etag2)])
    assert_delivered_once(whole, upload.key, first + second)


def send_part_twice_at_once(proc: ShimProcess, upload: Multipart, number: int,
                            bodies: Sequence[bytes]) -> list[str]:
    """Send part `number` once per body, in parallel, their last bytes together once both
    have begun; the ETags they were answered with (both must be 200)."""
    target = part_target(upload.key, upload.upload_id, number)
    raws = [begin(proc.port, "PUT", target, body).send(body[:-1]) for body in bodies]
    wait_for_file(proc, len(bodies[0]) - 1, count=len(bodies))
    for raw, body in zip(raws, bodies, strict=True):
        raw.send(body[-1:])
    answers = [raw.answer() for raw in raws]
    assert [a.status for a in answers] == [200] * len(bodies)
    return [a.fields["etag"] for a in answers]


def test_the_same_part_sent_twice_at_once_delivers_exactly_the_one_listed(
        proc: ShimProcess, whole: WholeFileServer, s3: BaseClient) -> None:
    """Part 1 sent twice in parallel with different bytes: both are answered with their own
    ETag; ListParts shows one of them, the completion naming it delivers exactly its bytes,
    and the one naming the other is InvalidPart (S3: the last part written wins)."""
    upload = Multipart.create(s3, "same-part.bin")
    tail = random_bytes(100, 4)
    etag2 = upload.part(2, tail)
    bodies = [random_bytes(MIN_PART, 5), random_bytes(MIN_PART, 6)]
    etags = send_part_twice_at_once(proc, upload, 1, bodies)
    assert etags == [f'"{hashlib.md5(body).hexdigest()}"' for body in bodies]
    listed = upload.listed()
    assert sorted(listed) == [1, 2]
    kept = etags.index(listed[1][0])
    assert refused(lambda: upload.complete([(1, etags[1 - kept]), (2, etag2)])) == "InvalidPart"
    upload.complete([(1, etags[kept]), (2, etag2)])
    assert_delivered_once(whole, upload.key, bodies[kept] + tail)


def test_the_same_part_sent_twice_at_once_leaves_no_loser_on_the_disk(
        proc: ShimProcess, s3: BaseClient) -> None:
    """Once the file is delivered, no byte of either body of the part is left on the disk
    (each trial is a race: up to ten are run, the first leak fails the test)."""
    for trial in range(10):
        before = set(stored(proc))
        upload = Multipart.create(s3, f"same-part-disk-{trial}.bin")
        bodies = [random_bytes(MIN_PART, 20 + 2 * trial), random_bytes(MIN_PART, 21 + 2 * trial)]
        send_part_twice_at_once(proc, upload, 1, bodies)
        [(etag, _)] = upload.listed().values()
        upload.complete([(1, etag)])
        wait_for_no_new_files(proc, before, f"trial {trial}: both bodies off the disk")


def test_completion_twice_at_once_and_again_after_success_delivers_once(
        proc: ShimProcess, whole: WholeFileServer, s3: BaseClient) -> None:
    """The same CompleteMultipartUpload sent twice in parallel, then once more after it
    succeeded (its answer lost, say): one delivery, and every answer the same success."""
    upload = Multipart.create(s3, "complete-twice.bin")
    data = [random_bytes(MIN_PART, 7), random_bytes(1000, 8)]
    parts = [(n, upload.part(n, d)) for n, d in enumerate(data, 1)]
    body = complete_body(parts)
    target = upload_target(upload.key, upload.upload_id)
    raws = [begin(proc.port, "POST", target, body).send(body[:-1]) for _ in range(2)]
    for raw in raws:
        raw.send(body[-1:])
    answers = [raw.answer() for raw in raws]
    answers.append(call(proc.port, "POST", target, body))
    assert [a.status for a in answers] == [200, 200, 200]
    etags = {re.search(rb"<ETag>([^<]*)</ETag>", a.body).group(1) for a in answers}  # type: ignore[union-attr]
    assert len(etags) == 1 and etags.pop().endswith(b'-2"')
    assert_delivered_once(whole, upload.key, b"".join(data))


def test_completions_with_different_part_lists_at_once_agree_with_what_was_delivered(
        proc: ShimProcess, whole: WholeFileServer, s3: BaseClient) -> None:
    """Two completions of one upload at once, one listing parts 1-40, the other 1-39: S3
    lets one of them win. Whatever the shim answers (now, or to a retry of each), a success
    must name exactly the parts the legacy server got, and the file arrives once."""
    for trial in range(6):  # a race: the first trial that breaks the promise fails the test
        upload = Multipart.create(s3, f"two-lists-{trial}.bin")
        data = {n: random_bytes(MIN_PART, 100 * trial + n) for n in range(1, 41)}
        etags = {n: upload.part(n, d) for n, d in data.items()}
        lists = [sorted(data), sorted(data)[:-1]]
        bodies = [complete_body([(n, etags[n]) for n in listed]) for listed in lists]
        target = upload_target(upload.key, upload.upload_id)
        raws = [begin(proc.port, "POST", target, body).send(body[:-1]) for body in bodies]
        for raw, body in zip(raws, bodies, strict=True):
            raw.send(body[-1:])
        answers = [raw.answer() for raw in raws]
        answers += [call(proc.port, "POST", target, body) for body in bodies]  # retries
        [delivery] = wait_for_delivery(whole, upload.key)
        for answer, listed in zip(answers, lists * 2, strict=True):
            if answer.status == 200:
                expected = b"".join(data[n] for n in listed)
                assert (delivery.size, delivery.sha256) == (
                    len(expected), hashlib.sha256(expected).hexdigest()), \
                    f"trial {trial}: the completion of {len(listed)} parts was answered 200"


def test_a_part_still_arriving_at_completion_is_not_kept(
        proc: ShimProcess, whole: WholeFileServer, s3: BaseClient) -> None:
    """Part 3 is still arriving when parts 1 and 2 complete the file: the file is delivered
    with 1 and 2 only; part 3 then ends as a part of a finished upload (NoSuchUpload) and the
    disk keeps none of it."""
    before = set(stored(proc))
    upload = Multipart.create(s3, "late-part.bin")
    data = [random_bytes(MIN_PART, 9), random_bytes(500, 10)]
    parts = [(n, upload.part(n, d)) for n, d in enumerate(data, 1)]
    late = random_bytes(MIN_PART + 3, 11)
    raw = begin(proc.port, "PUT", part_target(upload.key, upload.upload_id, 3), late)
    raw.send(late[:-1])
    wait_for_file(proc, len(late) - 1)
    upload.complete(parts)
    assert_delivered_once(whole, upload.key, b"".join(data))
    answer = raw.send(late[-1:]).answer()
    assert (answer.status, answer.code) == (404, "NoSuchUpload")
    wait_for_no_new_files(proc, before, "no byte of the upload on the disk")


def test_an_abort_while_a_part_arrives_frees_every_byte(
        proc: ShimProcess, whole: WholeFileServer, s3: BaseClient) -> None:
    before = set(stored(proc))
    upload = Multipart.create(s3, "abort-mid-part.bin")
    upload.part(1, random_bytes(MIN_PART, 12))
    late = random_bytes(MIN_PART + 5, 13)
    raw = begin(proc.port, "PUT", part_target(upload.key, upload.upload_id, 2), late)
    raw.send(late[:-1])
    wait_for_file(proc, len(late) - 1)
    upload.abort()
    answer = raw.send(late[-1:]).answer()
    assert refused(upload.listed) == "NoSuchUpload"
    assert answer.status in (200, 404)  # S3: a part in flight "might or might not succeed"
    # Both ends are decided before their answers: the abort dropped what it found, the part
    # was kept or discarded before it was answered.
    assert set(stored(proc)) <= before
    assert arrived(whole, upload.key) == []


def test_after_completion_or_abort_the_upload_takes_no_more_parts(
        proc: ShimProcess, whole: WholeFileServer, s3: BaseClient) -> None:
    done = Multipart.create(s3, "finished.bin")
    data = random_bytes(MIN_PART, 14)
    done.complete([(1, done.part(1, data))])
    aborted = Multipart.create(s3, "aborted.bin")
    aborted.part(1, random_bytes(MIN_PART, 15))
    aborted.abort()
    files = stored(proc)
    for upload in (done, aborted):
        assert refused(partial(upload.part, 2, b"more")) == "NoSuchUpload"
        assert refused(upload.listed) == "NoSuchUpload"
    assert set(stored(proc)) <= set(files)
    assert_delivered_once(whole, done.key, data)
    assert arrived(whole, aborted.key) == []


# --- hostile requests ----------------------------------------------------------------------------


def legacy_count(legacy: WholeFileServer) -> int:
    return len(legacy.received)


def test_a_strangers_upload_id_is_no_such_upload_for_every_operation(
        proc: ShimProcess, whole: WholeFileServer, s3: BaseClient) -> None:
    """Another access key naming my upload id: every operation is NoSuchUpload, as for an
    id that does not exist, and my upload is as it was: it completes and arrives once."""
    mine = Multipart.create(s3, "mine.bin")
    data = random_bytes(MIN_PART, 30)
    etag = mine.part(1, data)
    theirs = Multipart(client(proc.url, OTHER_ID, OTHER_SECRET), mine.key, mine.upload_id)
    assert refused(lambda: theirs.part(1, b"overwritten")) == "NoSuchUpload"
    assert refused(lambda: theirs.part(2, b"added")) == "NoSuchUpload"
    assert refused(theirs.listed) == "NoSuchUpload"
    assert refused(lambda: theirs.complete([(1, etag)])) == "NoSuchUpload"
    assert refused(theirs.abort) == "NoSuchUpload"
    assert theirs.s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
    assert mine.listed() == {1: (etag, len(data))}
    mine.complete([(1, etag)])
    assert_delivered_once(whole, mine.key, data)
    assert s3.head_object(Bucket=BUCKET, Key=mine.key)["ContentLength"] == len(data)
    assert refused(partial(theirs.s3.head_object, Bucket=BUCKET, Key=mine.key)) == "404"


@pytest.mark.parametrize(("path", "code"), [
    ("/s3/evidence/a/../b", "InvalidRequest"),
    ("/s3/evidence/..", "InvalidRequest"),
    ("/s3/evidence/a/./b", "InvalidRequest"),
    ("/s3/evidence/a//b", "InvalidRequest"),
    ("/s3/evidence/a%2F..%2F..%2Fetc", "InvalidRequest"),
    ("/s3/evidence/%2E%2E", "InvalidRequest"),
    ("/s3/evidence/%252E%252E/x", "InvalidRequest"),
    ("/s3/evidence/a%00b", "InvalidArgument"),
    ("/s3/evidence/tab%09key%1F", "InvalidArgument"),
    ("/s3//key", "InvalidBucketName"),
], ids=["dotdot-segment", "dotdot-key", "dot-segment", "empty-segment", "encoded-slashes-climb",
        "encoded-dotdot", "double-encoded-dotdot", "nul", "control-chars", "no-bucket"])
def test_a_key_that_cannot_name_a_file_is_refused_and_nothing_is_sent(
        proc: ShimProcess, whole: WholeFileServer, path: str, code: str) -> None:
    """PutObject and CreateMultipartUpload alike: refused before a byte is stored."""
    before, files = legacy_count(whole), stored(proc)
    put = call(proc.port, "PUT", path, b"payload")
    create = call(proc.port, "POST", path + "?uploads")
    assert [(put.status, put.code), (create.status, create.code)] == [(400, code)] * 2
    assert legacy_count(whole) == before
    assert set(stored(proc)) <= set(files)


def test_a_key_with_cr_lf_is_delivered_percent_encoded_never_as_a_field(
        proc: ShimProcess, whole: WholeFileServer) -> None:
    """CR and LF are XML characters, so S3 takes them in a key; the delivery path carries
    them percent-encoded, and no field is injected."""
    assert call(proc.port, "PUT", f"/s3/{BUCKET}/a%0D%0AX-Injected:%201", b"payload").status == 200
    [delivery] = arrived(whole, "a%0D%0AX-Injected%3A%201")
    assert delivery.header("X-Injected") is None
    assert_no_s3_fields(delivery.headers)


@pytest.mark.parametrize("bucket", ["..%2F..%2Fetc", "a%2F..%2F..%2Fb", "a%2Fb"])
def test_a_bucket_with_an_encoded_slash_is_refused(
        proc: ShimProcess, whole: WholeFileServer, bucket: str) -> None:
    before = legacy_count(whole)
    answer = call(proc.port, "PUT", f"/s3/{bucket}/passwd", b"root::0:0::/root:/bin/sh\n")
    assert (answer.status, answer.code) == (400, "InvalidBucketName")
    assert legacy_count(whole) == before


def test_a_key_longer_than_s3_allows_is_refused(proc: ShimProcess, whole: WholeFileServer) -> None:
    before = legacy_count(whole)
    answer = call(proc.port, "POST", f"/s3/{BUCKET}/{'k' * 1025}?uploads")
    assert (answer.status, answer.code) == (400, "KeyTooLongError")
    assert legacy_count(whole) == before


@pytest.mark.parametrize("number", ["0", "10001", "-1", "1e3", "%2B1", "0x1", "", "99999999999999",
                                    "1%201", "1.0"])
def test_a_part_number_out_of_range_or_not_a_number_is_invalid(
        proc: ShimProcess, s3: BaseClient, number: str) -> None:
    upload = Multipart.create(s3, "numbers.bin")
    files = stored(proc)
    answer = call(proc.port, "PUT", part_target(upload.key, upload.upload_id, number), b"x" * 10)
    assert (answer.status, answer.code) == (400, "InvalidArgument")
    assert upload.listed() == {}
    assert set(stored(proc)) <= set(files)
    upload.abort()


def test_digits_int_cannot_read_are_invalid_arguments_not_internal_errors(
        proc: ShimProcess, s3: BaseClient) -> None:
    upload = Multipart.create(s3, "superscript.bin")
    answers = [
        call(proc.port, "PUT", part_target(upload.key, upload.upload_id, "%C2%B2"), b"x"),
        call(proc.port, "GET", upload_target(upload.key, upload.upload_id) + "&max-parts=%C2%B2"),
        call(proc.port, "PUT", f"/s3/{BUCKET}/superscript-object", b"x",
             [("Content-Encoding", "aws-chunked"), ("X-Amz-Decoded-Content-Length", "\u00b2")]),
    ]
    # The third signs a field whose value is not ASCII, which botocore's canonical form cannot
    # hold: the signature cannot be checked (403), and it is never the shim's 500.
    assert [a.status for a in answers] == [400, 400, 403]


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>&lol3;</ETag></Part>
</CompleteMultipartUpload>"""
EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE c [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>&secret;</ETag></Part>
</CompleteMultipartUpload>"""


@pytest.mark.parametrize(("body", "code"), [
    (BILLION_LAUGHS, "MalformedXML"),
    (EXTERNAL_ENTITY, "MalformedXML"),
    (b"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber>", "MalformedXML"),
    (b"", "MalformedXML"),
    (b"<CompleteMultipartUpload></CompleteMultipartUpload>", "MalformedXML"),
    (b"<Other><Part><PartNumber>1</PartNumber><ETag>x</ETag></Part></Other>", "MalformedXML"),
    (complete_body([(n, '"' + "0" * 32 + '"') for n in range(1, 10_002)]), None),
    (complete_body([(0, '"' + "0" * 32 + '"')]), None),
    (complete_body([(2, '"' + "0" * 32 + '"'), (1, '"' + "0" * 32 + '"')]), "InvalidPartOrder"),
    (complete_body([(1, '"' + "0" * 32 + '"'), (1, '"' + "0" * 32 + '"')]), "InvalidPartOrder"),
], ids=["billion-laughs", "external-entity", "truncated", "empty", "no-parts", "wrong-root",
        "10001-parts", "part-zero", "descending", "duplicate"])
def test_a_hostile_part_list_is_refused_and_the_upload_survives_it(
        proc: ShimProcess, whole: WholeFileServer, s3: BaseClient, body: bytes,
        code: str | None) -> None:
    upload = Multipart.create(s3, f"hostile-list-{hashlib.md5(body).hexdigest()[:8]}.bin")
    data = random_bytes(2000, 31)
    etag = upload.part(1, data)
    answer = call(proc.port, "POST", upload_target(upload.key, upload.upload_id), body)
    assert answer.status == 400
    assert answer.code == code or (code is None and answer.code in (
        "MalformedXML", "InvalidArgument", "InvalidPart"))
    assert b"root:" not in answer.body
    assert arrived(whole, upload.key) == []
    upload.complete([(1, etag)])
    assert_delivered_once(whole, upload.key, data)


def test_a_part_list_larger_than_the_limit_or_unframed_is_refused_unread(
        proc: ShimProcess, s3: BaseClient) -> None:
    """A completion body is read into memory only when it says it is small."""
    upload = Multipart.create(s3, "huge-list.bin")
    target = upload_target(upload.key, upload.upload_id)
    raw = begin(proc.port, "POST", target, b"", [("Content-Length", str(1024**3))],
                payload="UNSIGNED-PAYLOAD")
    answer = raw.send(b"<" * 65536).answer()
    assert (answer.status, answer.code) == (400, "MaxMessageLengthExceeded")
    raw = begin(proc.port, "POST", target, b"", [("Transfer-Encoding", "chunked")],
                payload="UNSIGNED-PAYLOAD")
    answer = raw.send(b"10000\r\n" + b"<" * 65536 + b"\r\n").answer()
    assert (answer.status, answer.code) == (400, "MaxMessageLengthExceeded")
    assert upload.listed() == {}


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


CHUNKED = (("Content-Encoding", "aws-chunked"), ("X-Amz-Trailer", "x-amz-checksum-crc32"))
"""The fields of an unsigned aws-chunked body with a trailing CRC32 (what boto3 sends)."""


def bad_bodies(data: bytes) -> list[tuple[str, list[tuple[str, str]], bytes, str, str]]:
    """(name, fields, body, x-amz-content-sha256, expected code): bodies that must not be
    kept, each with the S3 error code it gets."""
    other = bytes([data[0] ^ 1]) + data[1:]
    decoded = ("X-Amz-Decoded-Content-Length", str(len(data)))
    good_chunks = aws_chunked(data, 1000, crc32_trailer(data))
    return [
        ("content-md5-wrong", [("Content-MD5", md5_b64(other))], data,
         hashlib.sha256(data).hexdigest(), "BadDigest"),
        ("content-md5-not-base64", [("Content-MD5", "not base64!")], data,
         hashlib.sha256(data).hexdigest(), "InvalidDigest"),
        ("sha256-not-the-body", [], data, hashlib.sha256(other).hexdigest(),
         "XAmzContentSHA256Mismatch"),
        ("checksum-field-wrong", [("x-amz-checksum-crc32", crc32_trailer(other)[21:-2])], data,
         "UNSIGNED-PAYLOAD", "BadDigest"),
        ("trailer-checksum-wrong", [*CHUNKED, decoded],
         aws_chunked(data, 1000, crc32_trailer(other)), "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
         "BadDigest"),
        ("trailer-missing", [*CHUNKED, decoded], aws_chunked(data, 1000),
         "STREAMING-UNSIGNED-PAYLOAD-TRAILER", "InvalidRequest"),
        ("chunk-shorter-than-its-size", [*CHUNKED, decoded],
         good_chunks.replace(b"3e8\r\n", b"400\r\n", 1), "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
         "InvalidChunkSizeError"),
        ("chunk-longer-than-its-size", [*CHUNKED, decoded],
         good_chunks.replace(b"3e8\r\n", b"300\r\n", 1), "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
         "InvalidChunkSizeError"),
        ("decoded-length-lie", [*CHUNKED, ("X-Amz-Decoded-Content-Length", str(len(data) + 1))],
         good_chunks, "STREAMING-UNSIGNED-PAYLOAD-TRAILER", "IncompleteBody"),
        ("chunks-unsigned-but-said-signed", [*CHUNKED[:1], decoded], aws_chunked(data, 1000),
         "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", "SignatureDoesNotMatch"),
    ]


BAD_BODY_NAMES = [case[0] for case in bad_bodies(b"x")]


@pytest.mark.parametrize("case", BAD_BODY_NAMES)
def test_a_body_that_fails_its_own_digests_is_kept_nowhere(
        proc: ShimProcess, whole: WholeFileServer, s3: BaseClient, case: str) -> None:
    """The same bad body as a part and as a PutObject: refused with S3's code, no part listed,
    no byte on the disk, nothing at the legacy server; the good body afterwards is taken."""
    data = random_bytes(5000, 40)
    [(_, fields, body, payload, code)] = [c for c in bad_bodies(data) if c[0] == case]
    upload = Multipart.create(s3, f"bad-part-{case}.bin")
    files, before = stored(proc), legacy_count(whole)
    if ("Content-Encoding", "aws-chunked") in fields:  # framed as boto3 frames it
        fields, body = [*fields, ("Transfer-Encoding", "chunked")], http_chunked(body)
    for target in (part_target(upload.key, upload.upload_id, 1), f"/s3/{BUCKET}/bad-object-{case}"):
        answer = call(proc.port, "PUT", target, body, fields, payload=payload)
        assert (answer.status // 100, answer.code) == (4, code), target
    assert upload.listed() == {}
    assert set(stored(proc)) <= set(files)
    assert legacy_count(whole) == before
    upload.complete([(1, upload.part(1, data))])
    assert_delivered_once(whole, upload.key, data)


def test_signed_chunks_are_checked_one_by_one(
        proc: ShimProcess, whole: WholeFileServer) -> None:
    """aws-chunked with chunk signatures over Transfer-Encoding: chunked: taken as signed,
    refused when one chunk's bytes change after signing."""
    data = random_bytes(3000, 41)
    fields = [("Content-Encoding", "aws-chunked"), ("X-Amz-Decoded-Content-Length", str(len(data))),
              ("Transfer-Encoding", "chunked")]
    for key, tamper in (("signed-chunks.bin", False), ("tampered-chunks.bin", True)):
        target = f"/s3/{BUCKET}/{key}"
        head = signed(proc.port, "PUT", target, fields, payload="STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
        body = signed_chunks(head, SECRET, data, 1024)
        if tamper:
            body = body.replace(data[2000:2010], bytes(10), 1)
        answer = Raw(proc.port).head("PUT", target, head).send(http_chunked(body)).answer()
        if tamper:
            assert (answer.status, answer.code) == (403, "SignatureDoesNotMatch")
            assert arrived(whole, key) == []
        else:
            assert answer.status == 200
            assert_delivered_once(whole, key, data)


@pytest.mark.parametrize("payload", ["STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                                     "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"])
def test_an_aws_chunked_body_with_a_content_length_is_taken(
        proc: ShimProcess, whole: WholeFileServer, payload: str) -> None:
    data = random_bytes(3000, 42)
    key = f"framed-{payload.lower()}.bin"
    target = f"/s3/{BUCKET}/{key}"
    fields = [("Content-Encoding", "aws-chunked"), ("X-Amz-Decoded-Content-Length", str(len(data)))]
    if payload.endswith("TRAILER"):
        fields.append(("X-Amz-Trailer", "x-amz-checksum-crc32"))
        body = aws_chunked(data, 1024, crc32_trailer(data))
        head = signed(proc.port, "PUT", target, [*fields, ("Content-Length", str(len(body)))],
                      payload=payload)
    else:
        # The signed chunks' length is known before they are signed: each size line has the
        # same length whatever the signature.
        length = len(signed_chunks([("Authorization", "Signature=" + "0" * 64),
                                    ("X-Amz-Date", "20260101T000000Z")], SECRET, data, 1024))
        head = signed(proc.port, "PUT", target, [*fields, ("Content-Length", str(length))],
                      payload=payload)
        body = signed_chunks(head, SECRET, data, 1024)
        assert len(body) == length
    answer = Raw(proc.port).head("PUT", target, head).send(body).answer()
    assert (answer.status, answer.code) == (200, "")
    assert_delivered_once(whole, key, data)


def test_a_put_object_whose_body_never_comes_whole_leaves_nothing(
        proc: ShimProcess, whole: WholeFileServer) -> None:
    """Content-Length promises more than the client sends before it closes: nothing is
    delivered, nothing stays on the disk, and the same object sent whole arrives once."""
    data = random_bytes(200 * KIB, 43)
    key = "short-body.bin"
    files = stored(proc)
    logged = proc.output().count("keeps nothing")
    raw = begin(proc.port, "PUT", f"/s3/{BUCKET}/{key}", data, payload="UNSIGNED-PAYLOAD")
    raw.send(data[:150 * KIB])
    wait_for_file(proc, 150 * KIB)
    raw.cut()
    wait_for_log(proc, "keeps nothing", logged + 1)
    assert set(stored(proc)) <= set(files)
    assert arrived(whole, key) == []
    assert call(proc.port, "PUT", f"/s3/{BUCKET}/{key}", data).status == 200
    assert_delivered_once(whole, key, data)


@pytest.mark.parametrize(("method", "target", "fields"), [
    ("POST", "/s3/evidence/obj?restore", ()),
    ("POST", "/s3/evidence/obj?select&select-type=2", ()),
    ("PUT", "/s3/evidence/obj?acl", ()),
    ("PUT", "/s3/evidence/obj?tagging", ()),
    ("PUT", "/s3/evidence/obj", (("x-amz-copy-source", "/evidence/other"),)),
    ("POST", "/s3/evidence/obj", ()),
    ("PATCH", "/s3/evidence/obj", ()),
    ("DELETE", "/s3/evidence/obj", ()),
    ("POST", "/s3/evidence?delete", ()),
    ("PUT", "/s3/evidence?policy", ()),
], ids=["restore", "select", "acl", "tagging", "copy", "post-object", "patch", "delete-object",
        "delete-objects", "bucket-policy"])
def test_a_body_under_the_s3_paths_that_is_no_known_operation_never_reaches_the_legacy_server(
        proc: ShimProcess, whole: WholeFileServer, method: str, target: str,
        fields: Sequence[tuple[str, str]]) -> None:
    before, files = legacy_count(whole), stored(proc)
    answer = call(proc.port, method, target, b"<Body>payload</Body>" * 100, fields)
    assert (answer.status, answer.code) == (501, "NotImplemented")
    assert legacy_count(whole) == before
    assert set(stored(proc)) <= set(files)


def test_unsigned_forged_and_replayed_requests_are_refused(
        proc: ShimProcess, whole: WholeFileServer) -> None:
    """With `auth: sigv4`: no signature, a signature by an unknown or wrong secret, a
    request signed 20 minutes ago (a replay) or 20 minutes ahead, a field added after
    signing, and a body other than the one signed: all refused, none stored or sent."""
    before, files = legacy_count(whole), stored(proc)
    target, body = f"/s3/{BUCKET}/forged.bin", b"forged payload"
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    minutes = datetime.timedelta(minutes=20)

    def put(fields: Sequence[tuple[str, str]], data: bytes = body) -> Answer:
        return Raw(proc.port).head("PUT", target, [*fields, ("Content-Length", str(len(data)))]) \
            .send(data).answer()

    fields = signed(proc.port, "PUT", target, body=body)
    answers = {
        "unsigned": put([("Host", f"127.0.0.1:{proc.port}")]),
        "unknown-key": put(signed(proc.port, "PUT", target, body=body, key_id="AKIDNOBODY")),
        "wrong-secret": put(signed(proc.port, "PUT", target, body=body, secret="guess")),
        "replayed": put(signed(proc.port, "PUT", target, body=body, at=now - minutes)),
        "from-the-future": put(signed(proc.port, "PUT", target, body=body, at=now + minutes)),
        "field-added": put([*fields, ("x-amz-meta-added", "later")]),
        "other-body": put(fields, b"FORGED PAYLOAD"),
        "other-key": Raw(proc.port).head("PUT", target + "2", [
            *fields, ("Content-Length", str(len(body)))]).send(body).answer(),
    }
    assert {name: a.code for name, a in answers.items()} == {
        "unsigned": "AccessDenied", "unknown-key": "InvalidAccessKeyId",
        "wrong-secret": "SignatureDoesNotMatch", "replayed": "RequestTimeTooSkewed",
        "from-the-future": "RequestTimeTooSkewed", "field-added": "AccessDenied",
        "other-body": "XAmzContentSHA256Mismatch", "other-key": "SignatureDoesNotMatch"}
    assert all(400 <= a.status < 500 for a in answers.values())
    assert legacy_count(whole) == before
    assert set(stored(proc)) <= set(files)


# --- the legacy server slow, down, refusing; parts replaced while a delivery waits -------------


def legacy_deliveries(legacy: LegacyServer, key: str) -> list[Received]:
    return legacy.requests(f"/uploads/{BUCKET}/{key}")


def assert_accepted_once(legacy: LegacyServer, key: str, data: bytes) -> None:
    """The legacy server accepted `data` once at `key`, whole and byte-exact, with no S3
    field; other requests it got for `key` (refused with 503, or never answered) do not count."""
    accepted = [r for r in legacy_deliveries(legacy, key) if 200 <= r.status < 300]
    assert [(r.size, r.sha256, r.complete) for r in accepted] == [
        (len(data), hashlib.sha256(data).hexdigest(), True)]
    for request in legacy_deliveries(legacy, key):
        assert_no_s3_fields(request.headers)
        assert request.header("Authorization") == LEGACY_TOKEN


def completed_in_the_end(port: int, upload: Multipart, body: bytes) -> Answer:
    """Send the completion again (as an SDK retrying a 503 does) until it is final."""
    answers: list[Answer] = []

    def final() -> bool:
        answers.append(call(port, "POST", upload_target(upload.key, upload.upload_id), body))
        return answers[-1].status != 503

    wait_until(final, SETTLE * 2, "a final answer to the completion", interval=0.5)
    return answers[-1]


@pytest.mark.parametrize("mode", ["hang", "down", "status:503", "late"])
def test_the_legacy_server_down_or_slow_at_completion_gets_503_then_one_delivery(
        shim: ShimLauncher, recording_legacy: LegacyServer, mode: str) -> None:
    """While the legacy server hangs, is down, answers 503 or answers after the shim's wait,
    the completion is 503 with Retry-After (the SDKs retry it); once it is back, a retried
    completion gets the success, with the same ETag every time, and the file arrived once."""
    proc = shim(s3_config(), upstream_url=recording_legacy.url)
    upload = Multipart.create(client(proc.url), f"legacy-{mode.replace(':', '-')}.bin")
    data = [random_bytes(MIN_PART, 50), random_bytes(777, 51)]
    body = complete_body([(n, upload.part(n, d)) for n, d in enumerate(data, 1)])
    recording_legacy.late = WAIT + 1.5
    recording_legacy.set_mode(mode)
    first = call(proc.port, "POST", upload_target(upload.key, upload.upload_id), body)
    assert first.status == 503 and first.code in ("SlowDown", "ServiceUnavailable")
    assert int(first.fields["retry-after"]) >= 1
    if mode != "late":
        recording_legacy.set_mode("back" if mode == "down" else "ok")
    answers = [completed_in_the_end(proc.port, upload, body)]
    answers.append(call(proc.port, "POST", upload_target(upload.key, upload.upload_id), body))
    assert [a.status for a in answers] == [200, 200]
    assert answers[0].body.split(b"<ETag>")[1] == answers[1].body.split(b"<ETag>")[1]
    assert_accepted_once(recording_legacy, upload.key, b"".join(data))


def test_a_part_sent_again_during_a_waiting_delivery_does_not_lose_the_file(
        shim: ShimLauncher, recording_legacy: LegacyServer) -> None:
    proc = shim(s3_config(), upstream_url=recording_legacy.url)
    upload = Multipart.create(client(proc.url), "replaced-while-waiting.bin")
    data = [random_bytes(MIN_PART, 52), random_bytes(999, 53)]
    parts = [(n, upload.part(n, d)) for n, d in enumerate(data, 1)]
    again = random_bytes(MIN_PART, 54)
    raw = begin(proc.port, "PUT", part_target(upload.key, upload.upload_id, 1), again)
    raw.send(again[:-1])  # a retry of part 1 (its first answer was lost, say), still arriving
    wait_for_file(proc, MIN_PART - 1)
    recording_legacy.set_mode("status:503")
    body = complete_body(parts)
    assert call(proc.port, "POST", upload_target(upload.key, upload.upload_id), body).status == 503
    raw.send(again[-1:]).answer()  # whatever it is told, the completion named the first part 1
    mark = len(proc.output())
    recording_legacy.set_mode("ok")
    wait_until(lambda: re.search(r"event=(delivered|failed)", proc.output()[mark:]) is not None,
               SETTLE, "the next delivery attempt's end")
    answer = call(proc.port, "POST", upload_target(upload.key, upload.upload_id), body)
    assert answer.status == 200, answer.body
    assert_accepted_once(recording_legacy, upload.key, b"".join(data))


def test_a_delivery_that_failed_for_good_is_not_answered_retry_later(
        shim: ShimLauncher, recording_legacy: LegacyServer) -> None:
    proc = shim(s3_config(delivery={"on_unknown": "hold"}), upstream_url=recording_legacy.url)
    upload = Multipart.create(client(proc.url), "failed-for-good.bin")
    data = random_bytes(MIN_PART, 55)
    body = complete_body([(1, upload.part(1, data))])
    recording_legacy.set_mode("close-after-body")
    target = upload_target(upload.key, upload.upload_id)
    answers = [call(proc.port, "POST", target, body) for _ in range(2)]
    assert len(legacy_deliveries(recording_legacy, upload.key)) == 1
    assert [(a.status, "retry-after" in a.fields) for a in answers] == [(502, False)] * 2


# --- caps: no one exhausts the shim ------------------------------------------------------------


@pytest.fixture
def capped(shim: ShimLauncher) -> ShimProcess:
    """A shim that takes two uploads in progress per owner."""
    return shim(s3_config(limits={"uploads_per_owner": 2}))


def test_more_multipart_uploads_than_the_cap_are_refused_for_that_owner_only(
        capped: ShimProcess, legacy: WholeFileServer) -> None:
    """Past `limits.uploads_per_owner`, the owner's new uploads are refused and nothing is
    stored; another owner goes on as before; an abort frees a place."""
    mine, theirs = client(capped.url), client(capped.url, OTHER_ID, OTHER_SECRET)
    uploads = [Multipart.create(mine, f"capped-{n}.bin") for n in range(2)]
    files = stored(capped)
    with pytest.raises(ClientError) as refusal:
        Multipart.create(mine, "capped-2.bin")
    assert refusal.value.response["ResponseMetadata"]["HTTPStatusCode"] in (429, 503)
    with pytest.raises(ClientError):
        mine.put_object(Bucket=BUCKET, Key="capped.bin", Body=b"x")
    assert set(stored(capped)) <= set(files)
    other = Multipart.create(theirs, "not-capped.bin")
    data = random_bytes(1000, 56)
    other.complete([(1, other.part(1, data))])
    assert_delivered_once(legacy, other.key, data, token=None)
    assert arrived(legacy, "capped.bin") == []
    uploads[0].abort()
    Multipart.create(mine, "capped-3.bin")


def test_the_cap_refusal_is_slow_down_which_sdks_back_off_and_retry(capped: ShimProcess) -> None:
    s3 = client(capped.url)
    for n in range(2):
        Multipart.create(s3, f"slow-down-{n}.bin")
    with pytest.raises(ClientError) as refusal:
        Multipart.create(s3, "slow-down-2.bin")
    metadata = refusal.value.response["ResponseMetadata"]
    assert (error_code(refusal), metadata["HTTPStatusCode"]) == ("SlowDown", 503)
    assert int(metadata["HTTPHeaders"]["retry-after"]) > 0


def test_an_owner_at_the_cap_can_still_finish_the_uploads_it_has(
        capped: ShimProcess, legacy: WholeFileServer) -> None:
    s3 = client(capped.url)
    uploads = [Multipart.create(s3, f"at-cap-{n}.bin") for n in range(2)]
    data = random_bytes(1000, 57)
    uploads[0].complete([(1, uploads[0].part(1, data))])
    assert_delivered_once(legacy, uploads[0].key, data)


# --- SIGKILL -----------------------------------------------------------------------------------


def test_sigkill_mid_part_keeps_only_whole_parts_and_the_file_arrives_once(
        shim: ShimLauncher, legacy: WholeFileServer) -> None:
    """The shim is killed while part 2's body arrives: after the restart ListParts shows
    part 1 only, no byte of part 2 is on the disk, and part 2 sent again completes the file."""
    proc = shim(s3_config(), kind="python-m-shim")
    upload = Multipart.create(client(proc.url), "killed-mid-part.bin")
    first, second = random_bytes(MIN_PART, 60), random_bytes(2 * MIN_PART, 61)
    etag1 = upload.part(1, first)
    raw = begin(proc.port, "PUT", part_target(upload.key, upload.upload_id, 2), second)
    cut = random.Random(62).randrange(1, len(second))
    raw.send(second[:cut])
    wait_for_file(proc, cut)
    proc.kill()
    raw.cut()
    proc.restart()
    upload = Multipart(client(proc.url), upload.key, upload.upload_id)
    assert upload.listed() == {1: (etag1, len(first))}
    assert sorted(size for size in stored(proc).values() if size) == [len(first)]
    upload.complete([(1, etag1), (2, upload.part(2, second))])
    assert_delivered_once(legacy, upload.key, first + second)


def test_sigkill_mid_delivery_then_restart_delivers_once(
        shim: ShimLauncher, recording_legacy: LegacyServer) -> None:
    """The shim is killed while the legacy server holds the delivery unanswered (the whole
    file sent): after the restart, with `on_unknown: retry`, the parts are still there, the
    file is sent again, and the legacy server accepts it once."""
    proc = shim(s3_config(delivery={"on_unknown": "retry"}), kind="python-m-shim",
                upstream_url=recording_legacy.url)
    upload = Multipart.create(client(proc.url), "killed-mid-delivery.bin")
    data = [random_bytes(MIN_PART, 63), random_bytes(4321, 64)]
    body = complete_body([(n, upload.part(n, d)) for n, d in enumerate(data, 1)])
    recording_legacy.set_mode("hang")
    raw = begin(proc.port, "POST", upload_target(upload.key, upload.upload_id), body).send(body)
    [held] = recording_legacy.wait_for(1, SETTLE, f"/uploads/{BUCKET}/{upload.key}")
    wait_until(lambda: held.complete, SETTLE, "the whole file at the legacy server")
    proc.kill()
    raw.cut()
    recording_legacy.set_mode("ok")
    proc.restart()
    answer = completed_in_the_end(proc.port, upload, body)
    assert answer.status == 200, answer.body
    assert held.status == 0  # never answered: the shim was gone
    assert_accepted_once(recording_legacy, upload.key, b"".join(data))


def test_sigkill_mid_part_leaves_no_upload_in_progress_behind(shim: ShimLauncher) -> None:
    proc = shim(s3_config(limits={"uploads_per_owner": 2}), kind="python-m-shim")
    upload = Multipart.create(client(proc.url), "killed-part-counts.bin")
    body = random_bytes(MIN_PART, 65)
    raw = begin(proc.port, "PUT", part_target(upload.key, upload.upload_id, 1), body)
    raw.send(body[:1000])
    wait_for_file(proc, 1000)
    proc.kill()
    raw.cut()
    proc.restart()
    Multipart.create(client(proc.url), "second-upload.bin")  # one upload in progress so far


# --- time and retries -------------------------------------------------------------------------


def test_the_parts_of_an_active_upload_do_not_expire_before_it(shim: ShimLauncher) -> None:
    """`s3.expiration: 6`: part 1 at 0 s, part 2 at 3.5 s (the upload is active), a restart
    at 6.5 s (its sweep runs at start): the upload was never idle for 6 s, so both parts are
    listed and complete it. (Before the restart ListParts already leaves part 1 out.)"""
    proc = shim(s3_config(s3={"expiration": 6}), kind="python-m-shim")
    upload = Multipart.create(client(proc.url), "slow-but-busy.bin")
    started = time.monotonic()
    etag1 = upload.part(1, random_bytes(MIN_PART, 66))
    time.sleep(3.5)
    etag2 = upload.part(2, random_bytes(100, 67))
    time.sleep(max(0.0, started + 6.5 - time.monotonic()))
    proc.kill()  # the quickest restart: the sweep runs as the shim starts
    proc.restart()
    upload = Multipart(client(proc.url), upload.key, upload.upload_id)
    assert sorted(upload.listed()) == [1, 2]
    upload.complete([(1, etag1), (2, etag2)])


def test_a_put_object_sent_again_after_its_answer_was_lost_is_delivered_once(
        proc: ShimProcess, whole: WholeFileServer) -> None:
    key, data = "answer-lost.bin", random_bytes(100 * KIB, 68)
    raw = begin(proc.port, "PUT", f"/s3/{BUCKET}/{key}", data).send(data)
    wait_until(lambda: len(arrived(whole, key)) == 1, SETTLE, "the first delivery")
    raw.cut()  # the answer never reaches the client, which sends the object again
    assert call(proc.port, "PUT", f"/s3/{BUCKET}/{key}", data).status == 200
    assert_delivered_once(whole, key, data)


def test_a_put_object_sent_again_while_its_first_answer_is_still_coming_is_delivered_once(
        shim: ShimLauncher, recording_legacy: LegacyServer) -> None:
    """The legacy server has the whole object but has not answered yet when the client, its
    connection gone, sends the same object again: the retry waits for that delivery's outcome
    and gets its answer; the legacy server gets the object once."""
    proc = shim(s3_config(), upstream_url=recording_legacy.url)
    key, data = "answer-still-coming.bin", random_bytes(100 * KIB, 69)
    recording_legacy.late = 1.5  # within delivery.wait (WAIT): the retry hears the outcome
    recording_legacy.set_mode("late")
    raw = begin(proc.port, "PUT", f"/s3/{BUCKET}/{key}", data).send(data)
    wait_until(lambda: any(r.complete for r in legacy_deliveries(recording_legacy, key)),
               SETTLE, "the whole object at the legacy server, not yet answered")
    assert all(r.status == 0 for r in legacy_deliveries(recording_legacy, key))
    raw.cut()
    assert call(proc.port, "PUT", f"/s3/{BUCKET}/{key}", data).status == 200
    assert len(legacy_deliveries(recording_legacy, key)) == 1
    assert_accepted_once(recording_legacy, key, data)
