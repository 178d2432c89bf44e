"""`python -m shim upload`: a resumable upload client for a link that keeps dropping.

    python -m shim upload FILE URL [--protocol tus|ietf|content-range] [--chunk-size N]
                          [--header "K: V"]... [--state FILE] [--method PUT|POST]
                          [--timeout S] [--retry-initial S] [--retry-max S]
                          [--give-up-after S] [--new] [--quiet]

URL is the tus endpoint for tus (`http://127.0.0.1:8000/files/`), and the legacy server's
own URL for the file for ietf and content-range (`http://127.0.0.1:8000/uploads/big.iso`).

The person at the far end of a weak link needs a client that just keeps going: every
network error, timeout and 5xx is retried with exponential backoff, each time from the
offset the server reports; the upload URL is remembered in a state file, so a client that
was killed and is run again with the same arguments resumes instead of starting over. A 4xx
is the server's word: the client stops with it. Exit status: 0 delivered (the final status
and the legacy server's Location on stdout), 1 refused, 2 bad arguments, 3 gave up after
`--give-up-after` seconds without progress, 130 interrupted.

tus goes through tuspy (`tusclient`): its uploader keeps the offset, builds the creation
request and its metadata, the per-chunk checksum, and stores the upload URL through its
storage and fingerprint interfaces. tuspy sends its requests with `requests` and no timeout,
which hangs for good on a link that goes silent instead of failing, so its three requests
are overridden to go through this module's transport. That transport is h11 on a socket
(h11 comes with mitmproxy): `requests`/`http.client` take the IETF draft's `104` interim
response for the final one and leave the real answer to be read as the next request's.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import http
import json
import mimetypes
import os
import re
import select
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urljoin, urlsplit

import h11
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from tusclient.client import TusClient
from tusclient.fingerprint.interface import Fingerprint
from tusclient.request import BaseTusRequest
from tusclient.storage.interface import Storage
from tusclient.uploader.uploader import Uploader

__all__ = ["DEFAULT_CHUNK_SIZE", "IETF_INTEROP_VERSION", "default_state_path", "main"]

DESCRIPTION = "A resumable upload client for a link that keeps dropping."

KIB = 1024
MIB = 1024 * KIB
DEFAULT_CHUNK_SIZE = 8 * MIB
"""Bytes per request. With tus checksums a chunk cut off is discarded whole by the server, so
a chunk must be smaller than the distance between drops."""
IETF_INTEROP_VERSION = 8
"""Upload-Draft-Interop-Version spoken (draft-ietf-httpbis-resumable-upload -09..-11)."""
PIECE = 64 * KIB
"""Bytes written to the socket at a time (and the progress bar's step)."""
ANSWER_CAP = 64 * KIB
"""An answer's body is kept up to this size (for the message on a refusal)."""
USER_AGENT = "resumable-shim-client/0.1"
FRAMING_FIELDS = frozenset({"content-length", "transfer-encoding", "connection", "upgrade"})
"""Fields this client sets itself; `--header` may not set them."""
RESYNC = frozenset({408, 409, 416, 423, 425, 429, 460})
"""4xx answers that mean "ask for the offset again, then go on": a timeout, an offset that
moved (409, the gap of 416), a request that still holds the upload (423), a chunk that was
corrupted on the way (tus 460), too many requests (429)."""
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_GAVE_UP, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SIZE = re.compile(r"(\d+)\s*([kmg]i?b?)?", re.IGNORECASE)


# --- outcomes -------------------------------------------------------------------------------


class Retry(Exception):
    """Worth trying again from the server's offset: no answer, a 5xx, or a RESYNC status."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Gone(Exception):
    """The remembered upload URL no longer exists (404/410, expired): start over."""


class Refused(Exception):
    """A final answer, or a problem retrying cannot fix: the client stops with it."""


class GaveUp(Exception):
    """No progress for `--give-up-after` seconds."""


@dataclass(frozen=True)
class Answer:
    """One HTTP response: status, reason, fields (names lower-cased, in order), body."""

    status: int
    reason: str
    fields: tuple[tuple[str, str], ...]
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def header(self, name: str) -> str | None:
        wanted = name.lower()
        return next((v for k, v in self.fields if k == wanted), None)

    def describe(self) -> str:
        """`413 Payload Too Large: <the server's text>`, on one line."""
        head = f"{self.status} {self.reason or _phrase(self.status)}".strip()
        text = self._text()
        return f"{head}: {text}" if text else head

    def _text(self) -> str:
        raw = self.body.decode("utf-8", "replace")
        if "json" in (self.header("content-type") or ""):
            with contextlib.suppress(ValueError):
                document = json.loads(raw)
                if isinstance(document, dict):  # RFC 9457 problem details, or any object
                    picked = document.get("detail") or document.get("title") or document.get("message")
                    raw = str(picked) if picked else json.dumps(document)
        line = " ".join(raw.split())
        return line[:300] + ("..." if len(line) > 300 else "")

    def retry_after(self) -> float | None:
        value = self.header("retry-after")
        if value is None:
            return None
        if value.strip().isdigit():
            return float(value.strip())
        with contextlib.suppress(TypeError, ValueError):
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        return None


@dataclass(frozen=True)
class Done:
    """How an upload ended: the legacy server's status and Location, where known."""

    status: int
    reason: str
    location: str | None
    upload_url: str | None


def _phrase(status: int) -> str:
    with contextlib.suppress(ValueError):
        return http.HTTPStatus(status).phrase
    return ""


def judge(answer: Answer, what: str, *, gone: bool = False) -> Answer:
    """A 2xx answer back; else the exception saying what to do about it. `gone`: a 404 or
    410 means the upload this request named is gone (it expired): start over."""
    if answer.ok:
        return answer
    message = f"{what}: {answer.describe()}"
    if answer.status >= 500 or answer.status in RESYNC:
        raise Retry(message, answer.retry_after())
    if gone and answer.status in (404, 410):
        raise Gone(message)
    raise Refused(message)


def parse_offset(value: str | None, what: str, size: int) -> int:
    if value is None or not value.strip().isdigit():
        raise Refused(f"{what}: the server sent no valid offset ({value!r})")
    offset = int(value)
    if offset > size:
        raise Refused(f"{what}: the server holds {offset} bytes, more than the file's {size}: "
                      "another file was uploaded to this URL")
    return offset


# --- transport ------------------------------------------------------------------------------


class FileChanged(Refused):
    """The file got shorter while it was being sent."""


class Transport:
    """One HTTP/1.1 request per connection, with h11 on a socket.

    `timeout` is an idle timeout: connecting, each write and each read must make progress
    within it, so a link that goes silent fails (and is retried) instead of hanging. The
    answer may come before the body is all sent (a refusal from the head alone): sending
    stops and the answer is returned. Informational (1xx) answers are skipped."""

    def __init__(self, timeout: float, cafile: Path | None = None) -> None:
        self.timeout = timeout
        self.tls = ssl.create_default_context(cafile=cafile)

    def request(self, method: str, url: str, fields: Iterable[tuple[str, str]] = (),
                body: Iterable[bytes] = (), length: int | None = None,
                on_sent: Callable[[int], None] | None = None) -> Answer:
        """Send one request (`length` bytes of `body`) and return the answer. Raises Retry
        when there is no answer."""
        parts = urlsplit(url)
        try:
            sock = self._connect(parts.scheme, parts.hostname or "", parts.port)
        except ssl.SSLCertVerificationError as exc:
            raise Refused(f"{parts.netloc}: {exc.verify_message or exc}") from exc
        except OSError as exc:
            raise Retry(f"cannot connect to {parts.netloc}: {_why(exc)}") from exc
        try:
            conn = h11.Connection(h11.CLIENT)
            target = quote(parts.path or "/", safe=_PATH_SAFE) + \
                (f"?{quote(parts.query, safe=_QUERY_SAFE)}" if parts.query else "")
            named = [("Host", parts.netloc.rpartition("@")[2]), ("User-Agent", USER_AGENT),
                     *fields]
            if length is not None:
                named.append(("Content-Length", str(length)))
            # Values as UTF-8 bytes (h11 would take str as ASCII only): obs-text, as curl sends.
            head = [(k.encode("ascii"), v.encode("utf-8")) for k, v in named]
            broke: Exception | None = None
            try:
                sock.sendall(conn.send(h11.Request(method=method, target=target, headers=head)))
                if self._send_body(sock, conn, body, on_sent):
                    sock.sendall(conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError as exc:  # a field h11 will not send
                raise Refused(f"{method} {url}: cannot be sent: {exc}") from exc
            except OSError as exc:
                broke = exc  # the server may have answered before it closed: read first
            try:
                return self._read_answer(conn, sock)
            except (OSError, h11.RemoteProtocolError) as exc:
                raise Retry(f"{method} {url}: {_why(broke or exc)}") from exc
        finally:
            sock.close()

    def _connect(self, scheme: str, host: str, port: int | None) -> socket.socket:
        sock = socket.create_connection((host, port or (443 if scheme == "https" else 80)),
                                        timeout=self.timeout)
        if scheme == "https":
            return self.tls.wrap_socket(sock, server_hostname=host)
        return sock

    def _send_body(self, sock: socket.socket, conn: h11.Connection, body: Iterable[bytes],
                   on_sent: Callable[[int], None] | None) -> bool:
        """Send the body; False when the server answered early (stop sending: it does not
        want the rest)."""
        for piece in body:
            if _answer_began(sock, conn):
                return False
            sock.sendall(conn.send(h11.Data(data=piece)))
            if on_sent is not None:
                on_sent(len(piece))
        return True

    def _read_answer(self, conn: h11.Connection, sock: socket.socket) -> Answer:
        response: h11.Response | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                if not data and response is None:
                    raise Broken("the connection closed before an answer")
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data[: max(0, ANSWER_CAP - len(body))]
            elif isinstance(event, h11.EndOfMessage) and response is not None:
                fields = tuple((k.decode("latin-1").lower(), v.decode("latin-1"))
                               for k, v in response.headers)
                return Answer(response.status_code, response.reason.decode("latin-1"), fields,
                              bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                raise Broken("the connection closed before an answer")
            # h11.InformationalResponse (100, the IETF draft's 104): the answer follows


def _answer_began(sock: socket.socket, conn: h11.Connection) -> bool:
    """Whether the server has begun to answer (or closed); what arrived is given to `conn`.
    Over TLS a socket may be readable with no answer in it: a TLS 1.3 server sends session
    tickets after the handshake (RFC 8446 section 4.6.1), which the TLS layer takes."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        data = sock.recv(65536)
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    finally:
        sock.settimeout(timeout)
    conn.receive_data(data)  # b"": the server closed, which the answer's reader reports
    return True


class Broken(ConnectionError):
    """The connection ended before a whole answer came."""


def _why(exc: BaseException) -> str:
    if isinstance(exc, Broken):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def file_pieces(path: Path, start: int, length: int) -> Iterator[bytes]:
    """`length` bytes of the file from `start`, PIECE at a time, never all in memory."""
    with path.open("rb") as src:
        src.seek(start)
        left = length
        while left:
            piece = src.read(min(PIECE, left))
            if not piece:
                raise FileChanged(f"{path} is shorter than when the upload began")
            left -= len(piece)
            yield piece


def memory_pieces(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), PIECE):
        yield data[start : start + PIECE]


# --- patience, progress, state ---------------------------------------------------------------


class Patience:
    """Exponential backoff (`initial` doubling to `maximum`) with a deadline that progress
    moves: a server offset past the best one seen restarts both, so a link that drops every
    few minutes never runs out of patience, while one that is down for `give_up_after`
    seconds (or an upload that never gets further) does."""

    def __init__(self, initial: float, maximum: float, give_up_after: float,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.initial, self.maximum, self.give_up_after = initial, maximum, give_up_after
        self.clock, self.sleep = clock, sleep
        self.delay = initial
        self.since = clock()
        self.best = -1

    def reached(self, offset: int) -> None:
        if offset > self.best:
            self.best = offset
            self.delay = self.initial
            self.since = self.clock()

    def wait(self, reason: Retry, note: Callable[[str], None]) -> None:
        delay = max(self.delay, reason.retry_after or 0.0)
        silent = self.clock() - self.since
        if silent + delay > self.give_up_after:
            raise GaveUp(f"no progress for {silent:.0f} s (--give-up-after "
                         f"{self.give_up_after:g}); last error: {reason}")
        note(f"{reason}; retrying in {delay:.3g} s")
        self.sleep(delay)
        self.delay = min(self.delay * 2, self.maximum)


class Meter:
    """The progress bar (bytes, rate, ETA) and notes, on stderr."""

    def __init__(self, label: str, total: int, quiet: bool) -> None:
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), disable=quiet,
        )
        self.task: TaskID = self.progress.add_task(label, total=total)

    def __enter__(self) -> Meter:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def sent(self, count: int) -> None:
        self.progress.advance(self.task, count)

    def at(self, offset: int) -> None:
        """The server's offset: the bar goes back to it after bytes were lost on the way."""
        if self.progress.tasks[0].completed != offset:
            self.progress.reset(self.task, completed=offset)

    def note(self, message: str) -> None:
        if not self.quiet:
            self.progress.console.print(message, markup=False, highlight=False, soft_wrap=True)


def default_state_path() -> Path:
    """$XDG_CACHE_HOME/resumable-shim/uploads.json (~/.cache when unset)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "resumable-shim" / "uploads.json"


class StateFile:
    """Upload URLs by key, in one small JSON file: `{"uploads": {key: {"url": ..., "saved":
    unix time}}}`. Every change is a locked read-modify-write and an atomic replace, so
    clients running at once, or one killed mid-write, never corrupt it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            uploads = self._read()
            before = dict(uploads)
            yield uploads
            if uploads != before:
                self._write(uploads)

    def _read(self) -> dict[str, Any]:
        try:
            document = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            return {}  # a damaged state file costs a fresh start, not the upload
        uploads = document.get("uploads") if isinstance(document, dict) else None
        return dict(uploads) if isinstance(uploads, dict) else {}

    def _write(self, uploads: dict[str, Any]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"uploads": uploads}, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    def get(self, key: str) -> str | None:
        with self._locked() as uploads:
            entry = uploads.get(key)
        url = entry.get("url") if isinstance(entry, dict) else None
        return url if isinstance(url, str) else None

    def put(self, key: str, url: str) -> None:
        with self._locked() as uploads:
            uploads[key] = {"url": url, "saved": int(time.time())}

    def forget(self, key: str) -> None:
        with self._locked() as uploads:
            uploads.pop(key, None)


# --- the job ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What to upload, where, and how."""

    path: Path
    size: int
    url: str
    protocol: str
    method: str
    chunk_size: int
    headers: tuple[tuple[str, str], ...]
    key: str
    """The state file's key: the same file (path, size, mtime) to the same URL the same way."""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def media_type(self) -> str:
        return mimetypes.guess_type(self.path.name)[0] or "application/octet-stream"

    def fields(self, *own: tuple[str, str]) -> list[tuple[str, str]]:
        """The protocol's own fields, then the user's `--header`s that do not clash."""
        taken = {name.lower() for name, _ in own}
        return [*own, *((k, v) for k, v in self.headers if k.lower() not in taken)]


@dataclass
class Link:
    """What every protocol driver shares: transport, patience, progress, state."""

    job: Job
    transport: Transport
    patience: Patience
    meter: Meter
    state: StateFile
    last: Answer | None = None
    """The latest answer: after the last request, the one that ended the upload."""

    def request(self, method: str, url: str, fields: Sequence[tuple[str, str]],
                body: Iterable[bytes] = (), length: int | None = None) -> Answer:
        on_sent = self.meter.sent if length else None
        answer = self.transport.request(method, url, fields, body, length, on_sent)
        self.last = answer
        return answer

    def reached(self, offset: int) -> None:
        """The server holds `offset` bytes."""
        self.meter.at(offset)
        self.patience.reached(offset)


# --- tus, with tuspy -------------------------------------------------------------------------


class _Key(Fingerprint):
    """tuspy's fingerprint: the job's key (path, size, mtime, URL), not a hash of the first
    64 KiB, so that an edited file is a new upload."""

    def __init__(self, key: str) -> None:
        self.key = key

    def get_fingerprint(self, fs: IO[bytes]) -> str:
        return self.key


class _StateStorage(Storage):
    """tuspy's URL storage, kept in the state file."""

    def __init__(self, state: StateFile) -> None:
        self.state = state

    def get_item(self, key: str) -> str | None:
        return self.state.get(key)

    def set_item(self, key: str, value: str) -> None:
        self.state.put(key, value)

    def remove_item(self, key: str) -> None:
        self.state.forget(key)


class _TusUploader(Uploader):
    """tuspy's uploader with its three requests sent through `Link` (idle timeout, progress,
    the answer kept), sha256 checksums, and the server's offset reported to the link."""

    CHECKSUM_ALGORITHM_PAIR = ("sha256", hashlib.sha256)

    def __init__(self, link: Link, **kwargs: Any) -> None:
        self.link = link
        super().__init__(**kwargs)  # HEADs a stored URL (our get_offset)

    def get_offset(self) -> int:
        """tus core "HEAD"."""
        fields = list(self.get_headers().items())  # type: ignore[no-untyped-call]
        answer = self.link.request("HEAD", str(self.url), fields)
        judge_tus(answer, "HEAD", self.link.job.size, gone=True)
        return parse_offset(answer.header("upload-offset"), "HEAD", self.link.job.size)

    def create_url(self) -> str:
        """tus "Creation": POST to the endpoint, with the length and the metadata."""
        fields = list(self.get_url_creation_headers().items())  # type: ignore[no-untyped-call]
        endpoint = self.link.job.url
        answer = self.link.request("POST", endpoint, fields, (), 0)
        judge_tus(answer, "creating the upload", self.link.job.size)
        location = answer.header("location")
        if not location:
            raise Refused(f"creating the upload: {answer.describe()} without a Location")
        return urljoin(endpoint, location)

    def _do_request(self) -> None:
        patch = _TusPatch(self)
        self.request = patch  # type: ignore[assignment]  # tuspy reads its response_headers
        patch.perform()

    def upload_chunk(self) -> None:
        super().upload_chunk()  # type: ignore[no-untyped-call]
        self.link.reached(self.offset)


class _TusPatch(BaseTusRequest):
    """tus core "PATCH": tuspy's request (offset, length, fields, checksum) sent by the link."""

    def __init__(self, uploader: _TusUploader) -> None:
        super().__init__(uploader)  # type: ignore[no-untyped-call]
        self.link = uploader.link

    def perform(self) -> None:
        with self.file:
            chunk = self.file.read(self._content_length)
        if len(chunk) != self._content_length:
            raise FileChanged(f"{self.link.job.path} is shorter than when the upload began")
        self.add_checksum(chunk)
        answer = self.link.request("PATCH", self._url, list(self._request_headers.items()),
                                   memory_pieces(chunk), len(chunk))
        judge_tus(answer, "PATCH", self.link.job.size, gone=True)
        parse_offset(answer.header("upload-offset"), "PATCH", self.link.job.size)
        self.status_code = answer.status
        self.response_content = answer.body
        self.response_headers = dict(answer.fields)


def judge_tus(answer: Answer, what: str, size: int, *, gone: bool = False) -> None:
    """`judge`, plus the shim's delivery outcome: an answer with `Shim-Upstream-Status` that
    is not 2xx, or a 5xx saying all bytes are stored without a Retry-After (the delivery
    FAILED, held for an operator), is the last word and is replayed to every retry."""
    upstream = answer.header("shim-upstream-status")
    if not answer.ok and upstream:
        if answer.body:  # the shim's text names the legacy server's answer
            raise Refused(answer.describe())
        phrase = _phrase(int(upstream)) if upstream.isdigit() else ""
        raise Refused(f"{answer.describe()}: the legacy server answered {upstream} {phrase}")
    if answer.status >= 500 and answer.header("retry-after") is None \
            and answer.header("upload-offset") == str(size):
        raise Refused(f"the upload is complete but was not delivered: {answer.describe()}")
    judge(answer, what, gone=gone)


class TusDriver:
    """tus 1.0.0: creation, core, checksum (sha256, when the server offers it)."""

    def __init__(self, link: Link) -> None:
        self.link = link
        job = link.job
        self.client = TusClient(job.url, headers=dict(job.headers))
        self.checksum: bool | None = None

    def attempt(self) -> Done:
        job, link = self.link.job, self.link
        if self.checksum is None:
            self.checksum = self._offers_sha256()
        uploader = _TusUploader(
            link, file_path=str(job.path), client=self.client, chunk_size=job.chunk_size,
            metadata={"filename": job.name, "filetype": job.media_type},
            store_url=True, url_storage=_StateStorage(link.state), fingerprinter=_Key(job.key),
            upload_checksum=self.checksum,
        )
        if uploader.url:
            link.meter.note(f"resuming {uploader.url} at {uploader.offset} bytes")
            link.reached(uploader.offset)
        uploader.upload()
        last = link.last
        assert last is not None  # the uploader asked the server at least once
        upstream = last.header("shim-upstream-status")
        if upstream and upstream.isdigit():
            return Done(int(upstream), _phrase(int(upstream)),
                        last.header("shim-upstream-location"), uploader.url)
        return Done(last.status, last.reason, None, uploader.url)

    def _offers_sha256(self) -> bool:
        """tus core "OPTIONS": the checksum extension with sha256."""
        answer = self.link.request("OPTIONS", self.link.job.url, self.link.job.fields())
        if answer.status >= 500:
            judge(answer, "OPTIONS")
        extensions = _words(answer.header("tus-extension"))
        algorithms = _words(answer.header("tus-checksum-algorithm"))
        return answer.ok and "checksum" in extensions and "sha256" in algorithms


def _words(value: str | None) -> set[str]:
    return {word.strip().lower() for word in (value or "").split(",") if word.strip()}


# --- the IETF draft --------------------------------------------------------------------------


class IetfDriver:
    """draft-ietf-httpbis-resumable-upload, interop version 8: a creation with
    `Upload-Complete: ?0` and the whole file's `Repr-Digest` (RFC 9530) to the legacy URL,
    then PATCHes to the upload resource; HEAD for the offset after a break. The request that
    completes the upload gets the legacy server's own answer."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.digest: str | None = None

    def _fields(self, *own: tuple[str, str]) -> list[tuple[str, str]]:
        return self.link.job.fields(("Upload-Draft-Interop-Version", str(IETF_INTEROP_VERSION)),
                                    *own)

    def attempt(self) -> Done:
        job, link = self.link.job, self.link
        resource = link.state.get(job.key)
        if resource is None:
            resource = self._create()
            if resource is None:  # an empty file: the creation was the whole upload
                assert link.last is not None
                return self._final(link.last, None)
            offset = 0
        else:
            answer = judge(link.request("HEAD", resource, self._fields()), "HEAD", gone=True)
            offset = parse_offset(answer.header("upload-offset"), "HEAD", job.size)
            link.meter.note(f"resuming {resource} at {offset} bytes")
        link.reached(offset)
        while True:
            length = min(job.chunk_size, job.size - offset)
            last = offset + length == job.size
            fields = self._fields(("Upload-Offset", str(offset)),
                                  ("Upload-Complete", "?1" if last else "?0"),
                                  ("Content-Type", "application/partial-upload"))
            answer = link.request("PATCH", resource, fields,
                                  file_pieces(job.path, offset, length), length)
            if last:
                return self._final(answer, resource)
            judge(answer, "PATCH", gone=True)
            offset = parse_offset(answer.header("upload-offset"), "PATCH", job.size)
            link.reached(offset)

    def _create(self) -> str | None:
        """"Upload Creation" with no body; the resource's URL, saved before any byte goes."""
        job, link = self.link.job, self.link
        if self.digest is None:
            self.digest = _sha256_b64(job.path)
        complete = job.size == 0
        fields = self._fields(("Upload-Complete", "?1" if complete else "?0"),
                              ("Upload-Length", str(job.size)),
                              ("Repr-Digest", f"sha-256=:{self.digest}:"),
                              ("Content-Type", job.media_type))
        answer = link.request(job.method, job.url, fields, (), 0)
        if complete:
            return None
        judge(answer, "creating the upload")
        location = answer.header("location")
        if not location or answer.header("upload-draft-interop-version") is None:
            raise Refused(f"creating the upload: {answer.describe()} without a Location: does "
                          "the server speak the IETF resumable upload draft?")
        resource = urljoin(job.url, location)
        link.state.put(job.key, resource)
        return resource

    def _final(self, answer: Answer, resource: str | None) -> Done:
        """The legacy server's answer to the whole file. A non-2xx one that says the upload
        is complete (`Upload-Complete: ?1`) is its last word, replayed to every retry."""
        if not answer.ok and answer.header("upload-complete") == "?1":
            raise Refused(f"the legacy server refused the file: {answer.describe()}")
        judge(answer, "completing the upload", gone=resource is not None)
        return Done(answer.status, answer.reason, answer.header("location"), resource)


def _sha256_b64(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while data := src.read(MIB):
            digest.update(data)
    return base64.b64encode(digest.digest()).decode()


# --- Content-Range and 308 -------------------------------------------------------------------


_RANGE = re.compile(r"\s*bytes=0-(\d+)\s*")


class ContentRangeDriver:
    """PUT/POST chunks with `Content-Range: bytes S-E/TOTAL` to the legacy URL; `308 Resume
    Incomplete` with `Range: bytes=0-LAST` until the last one, which gets the legacy server's
    answer. After a break, an empty request with `Content-Range: bytes */TOTAL` asks how far
    the server got. The upload is named by the URL itself, so the state file only records
    that this file was begun here: a fresh run sends from 0 (the server compares the bytes
    it already holds), a resumed one asks first."""

    def __init__(self, link: Link) -> None:
        self.link = link

    def attempt(self) -> Done:
        job, link = self.link.job, self.link
        if job.size == 0:
            fields = job.fields(("Content-Type", job.media_type))
            return self._final(link.request(job.method, job.url, fields, (), 0), job.method)
        if link.state.get(job.key) is None:
            link.state.put(job.key, job.url)
            offset = 0
        else:
            inquiry = link.request(job.method, job.url,
                                   job.fields(("Content-Range", f"bytes */{job.size}")), (), 0)
            if inquiry.status != 308:
                return self._final(inquiry, "inquiry")  # complete: the recorded answer
            offset = self._stored(inquiry)
            link.meter.note(f"resuming {job.url} at {offset} bytes")
        link.reached(offset)
        while True:
            length = min(job.chunk_size, job.size - offset)
            end = offset + length - 1
            fields = job.fields(("Content-Range", f"bytes {offset}-{end}/{job.size}"),
                                ("Content-Type", job.media_type))
            answer = link.request(job.method, job.url, fields,
                                  file_pieces(job.path, offset, length), length)
            if answer.status != 308:
                if end + 1 < job.size and answer.ok:
                    raise Refused(f"the server answered {answer.describe()} to a partial "
                                  "chunk: it does not speak Content-Range/308")
                return self._final(answer, f"{job.method} bytes {offset}-{end}/{job.size}")
            offset = self._stored(answer)
            link.reached(offset)

    def _stored(self, answer: Answer) -> int:
        """308's `Range: bytes=0-LAST` (none: nothing stored)."""
        value = answer.header("range")
        if value is None:
            return 0
        match = _RANGE.fullmatch(value)
        if match is None:
            raise Refused(f"the server sent a Range this client cannot use: {value!r}")
        return parse_offset(str(int(match.group(1)) + 1), "308", self.link.job.size)

    def _final(self, answer: Answer, what: str) -> Done:
        judge(answer, what)
        return Done(answer.status, answer.reason, answer.header("location"), None)


# --- the command line ------------------------------------------------------------------------


DRIVERS: dict[str, Callable[[Link], TusDriver | IetfDriver | ContentRangeDriver]] = {
    "tus": TusDriver, "ietf": IetfDriver, "content-range": ContentRangeDriver,
}
MAX_RESTARTS = 3
"""Times an upload whose URL vanished (expired) is started over within one run."""


def size_arg(text: str) -> int:
    """`8388608`, `512k`, `8M`, `1GiB` (binary units)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    unit = (match.group(2) or " ")[0].lower()
    value = int(match.group(1)) * {" ": 1, "k": KIB, "m": MIB, "g": 1024 * MIB}[unit]
    if value <= 0:
        raise argparse.ArgumentTypeError("must be at least 1 byte")
    return value


def header_arg(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not _TOKEN.fullmatch(name):
        raise argparse.ArgumentTypeError(f"expected 'Name: value', not {text!r}")
    if name.lower() in FRAMING_FIELDS:
        raise argparse.ArgumentTypeError(f"{name} is set by the client itself")
    if any((ord(ch) < 0x20 and ch != "\t") or ord(ch) == 0x7F for ch in value):
        raise argparse.ArgumentTypeError(f"the value of {name} has a control character")
    return name, value


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m shim upload", description=DESCRIPTION,
        epilog="Exit status: 0 delivered, 1 refused, 2 bad arguments, 3 gave up, "
               "130 interrupted. Run the same command again to resume.")
    parser.add_argument("file", type=Path, help="the file to upload")
    parser.add_argument("url", help="tus: the endpoint (http://HOST/files/); ietf and "
                        "content-range: the legacy server's URL for the file")
    parser.add_argument("--protocol", choices=sorted(DRIVERS), default="tus",
                        help="resumable upload protocol (default: tus)")
    parser.add_argument("--chunk-size", type=size_arg, default=DEFAULT_CHUNK_SIZE, metavar="N",
                        help="bytes per request, e.g. 4M (default 8M); with tus checksums keep "
                             "it below the distance between drops")
    parser.add_argument("-H", "--header", type=header_arg, action="append", default=[],
                        metavar="'K: V'",
                        help="'Name: value' sent with every request (repeatable)")
    parser.add_argument("--cacert", type=Path, default=None, metavar="FILE",
                        help="trust the CA certificates in this PEM file for https:// (a "
                             "shim with a certificate from a private CA), instead of the "
                             "system's")
    parser.add_argument("--state", type=Path, default=None, metavar="FILE",
                        help=f"where upload URLs are remembered (default {default_state_path()})")
    parser.add_argument("--method", choices=("PUT", "POST"), default="PUT",
                        help="ietf and content-range: the method the legacy server takes "
                             "the file with (default PUT)")
    parser.add_argument("--timeout", type=positive, default=60.0, metavar="S",
                        help="seconds a connection may make no progress (default 60)")
    parser.add_argument("--retry-initial", type=positive, default=1.0, metavar="S",
                        help="first wait after an error, doubling (default 1 s)")
    parser.add_argument("--retry-max", type=positive, default=30.0, metavar="S",
                        help="longest wait between attempts (default 30 s)")
    parser.add_argument("--give-up-after", type=positive, default=3600.0, metavar="S",
                        help="seconds without progress before giving up (default 3600)")
    parser.add_argument("--new", action="store_true",
                        help="forget a remembered upload of this file and start a new one "
                             "(after a refusal the server replays to every retry)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar and no notes, only the outcome")
    return parser.parse_args(argv)


def make_job(args: argparse.Namespace) -> Job:
    path = args.file.resolve()
    stat = path.stat()
    if not path.is_file():
        raise ValueError(f"{args.file} is not a regular file")
    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {args.url!r}")
    method = "POST" if args.protocol == "tus" else args.method
    key = " ".join((args.protocol, method, args.url, str(path), str(stat.st_size),
                    str(stat.st_mtime_ns)))
    return Job(path, stat.st_size, args.url, args.protocol, method, args.chunk_size,
               tuple(args.header), key)


def run(driver: TusDriver | IetfDriver | ContentRangeDriver, link: Link) -> Done:
    """Attempts until one ends the upload: each resumes from the server's offset."""
    restarts = 0
    while True:
        try:
            return driver.attempt()
        except Gone as exc:
            restarts += 1
            if restarts > MAX_RESTARTS:
                raise Refused(f"{exc} (after starting over {MAX_RESTARTS} times)") from exc
            link.state.forget(link.job.key)
            link.meter.note(f"{exc}: the upload is gone on the server; starting over")
            link.patience.best = -1
        except Retry as exc:
            link.patience.wait(exc, link.meter.note)


def fail(message: str) -> None:
    print(f"upload failed: {' '.join(message.split())}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    """`python -m shim upload ...`: `argv` are the arguments after `python -m shim`,
    starting with `upload` (which may also be left out). Returns the exit status."""
    if argv[:1] == ["upload"]:
        argv = argv[1:]
    args = parse_args(argv)
    try:
        job = make_job(args)
    except (OSError, ValueError) as exc:
        fail(str(exc))
        return EXIT_USAGE
    if args.retry_max < args.retry_initial:
        args.retry_max = args.retry_initial
    state = StateFile(args.state or default_state_path())
    patience = Patience(args.retry_initial, args.retry_max, args.give_up_after)
    try:
        if args.new:
            state.forget(job.key)
        with Meter(job.name, job.size, args.quiet) as meter:
            link = Link(job, Transport(args.timeout, args.cacert), patience, meter, state)
            done = run(DRIVERS[job.protocol](link), link)
    except Refused as exc:
        fail(str(exc))
        return EXIT_REFUSED
    except GaveUp as exc:
        fail(f"{exc}; run the same command again to resume")
        return EXIT_GAVE_UP
    except KeyboardInterrupt:
        fail("interrupted; run the same command again to resume")
        return EXIT_INTERRUPTED
    except OSError as exc:  # the state file or the file itself
        fail(_why(exc))
        return EXIT_REFUSED
    state.forget(job.key)
    print(f"{done.status} {done.reason or _phrase(done.status)}".strip())
    if done.location:
        print(f"Location: {done.location}")
    sys.stdout.flush()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
