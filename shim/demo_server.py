"""A strict, whole-file-only "legacy" HTTP server.

It stands in for the old server the shim sits in front of: it accepts a file only as the
complete body of one PUT or POST and knows nothing about resumable uploads.  It is used by
``python -m shim`` as an embedded demo upstream and by the test suite.

Behaviour:

* PUT/POST with a body (``Content-Length`` or ``Transfer-Encoding: chunked``) is streamed in
  1 MiB pieces to a temporary file next to its target and renamed into place only once the
  whole body has arrived, so a broken upload never leaves a partial file behind.  The answer
  is ``201 Created`` with ``Location: <path>`` and a JSON body ``{"path", "size", "sha256"}``.
  A PUT/POST without any body framing is answered ``411 Length Required``.
* Storage layout: the URL path (query ignored, percent-decoding applied) is split on ``/``;
  empty and ``.`` segments are dropped and the rest are kept as sub-folders below the
  server's directory, so ``PUT /a/b.bin`` is stored as ``<directory>/a/b.bin``.  A path with
  a ``..`` segment, a backslash or a NUL byte, or with no segment at all, is answered 400 and
  nothing is written, so no request can reach outside the directory.
* Strictness: a PATCH, or any request carrying ``Content-Range`` or a header whose name
  starts with ``Upload-``, ``Tus-`` or ``X-Upload-`` (case-insensitive), is answered 400 with
  a text body naming the offending header.  Its body is read and discarded first, so the
  connection stays usable.
* GET/HEAD of a stored path return the file (streamed), 404 otherwise.  Any other method: 405.
* When :attr:`WholeFileServer.fail_status` is set, every PUT/POST body is read in full and
  answered with that status and a short text body; nothing is stored.
* Every request is recorded in :attr:`WholeFileServer.received`, including rejected ones.  A
  request whose body broke off before its end is recorded with ``status=0`` and
  ``complete=False``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import BinaryIO, cast
from urllib.parse import unquote, urlsplit

__all__ = ["CHUNK_SIZE", "ReceivedRequest", "WholeFileServer", "main"]

CHUNK_SIZE = 1024 * 1024
"""Bodies are read, written and served in pieces of at most this many bytes."""

_FORBIDDEN_PREFIXES = ("upload-", "tus-", "x-upload-")
_MAX_LINE = 65536
_HEX_DIGITS = b"0123456789abcdefABCDEF"


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the server saw it.

    ``size`` and ``sha256`` describe the request body (an empty body for GET and the like),
    ``status`` is the status the server answered with (0 when the body broke off and no
    answer was sent), ``complete`` tells whether the whole body arrived.
    """

    method: str
    path: str
    headers: list[tuple[str, str]]
    size: int
    sha256: str
    status: int
    complete: bool = True

    def header(self, name: str) -> str | None:
        """Return the first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)

    def header_names(self) -> list[str]:
        """Return the lower-cased names of all headers of the request."""
        return [k.lower() for k, _ in self.headers]


class BodyFramingError(Exception):
    """The request body's framing (Content-Length / chunked encoding) is malformed."""


class BodyTruncatedError(Exception):
    """The connection ended before the whole request body arrived."""


@dataclass
class _Digest:
    """Size and sha256 of the bytes seen so far."""

    size: int = 0
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)

    def update(self, data: bytes) -> None:
        """Account for ``data``."""
        self.size += len(data)
        self.hasher.update(data)

    @property
    def hexdigest(self) -> str:
        """The sha256 of everything seen, as hex."""
        return self.hasher.hexdigest()


def offending_header(method: str, headers: Sequence[tuple[str, str]]) -> str | None:
    """Return what makes a request a resumable-upload request, or None if it is plain.

    That is ``"PATCH"`` for the method, else the first header named ``Content-Range`` or
    starting with ``Upload-``, ``Tus-`` or ``X-Upload-``.
    """
    if method.upper() == "PATCH":
        return "PATCH"
    for name, _ in headers:
        lower = name.lower()
        if lower == "content-range" or lower.startswith(_FORBIDDEN_PREFIXES):
            return name
    return None


def storage_path(directory: Path, raw_path: str) -> Path | None:
    """Map a request target to a file below ``directory``, or None if it is not acceptable."""
    path = urlsplit(raw_path).path if "://" in raw_path else raw_path.split("?", 1)[0]
    segments = [s for s in unquote(path.split("#", 1)[0]).split("/") if s not in ("", ".")]
    if not segments or any(s == ".." or "\\" in s or "\x00" in s for s in segments):
        return None
    target = directory.joinpath(*segments)
    if not target.resolve().is_relative_to(directory.resolve()):
        return None
    return target


def _read_exact(rfile: BinaryIO, count: int) -> Iterator[bytes]:
    """Yield exactly ``count`` bytes from ``rfile`` in pieces of at most CHUNK_SIZE."""
    remaining = count
    while remaining > 0:
        data = rfile.read(min(CHUNK_SIZE, remaining))
        if not data:
            raise BodyTruncatedError(f"{remaining} of {count} body bytes missing")
        remaining -= len(data)
        yield data


def _read_line(rfile: BinaryIO) -> bytes:
    """Read one CRLF-terminated line of chunked framing."""
    line = rfile.readline(_MAX_LINE + 1)
    if not line:
        raise BodyTruncatedError("connection closed inside chunked body")
    if len(line) > _MAX_LINE or not line.endswith(b"\n"):
        raise BodyFramingError("chunked framing line too long")
    return line


def _chunk_size(line: bytes) -> int:
    """Parse the size of a chunk-size line (chunk extensions are ignored)."""
    text = line.split(b";", 1)[0].strip()
    if not text or any(c not in _HEX_DIGITS for c in text):
        raise BodyFramingError(f"bad chunk size {text!r}")
    return int(text, 16)


def _read_chunked(rfile: BinaryIO) -> Iterator[bytes]:
    """Yield the decoded payload of a chunked body, then consume its trailer section."""
    while (size := _chunk_size(_read_line(rfile))) > 0:
        yield from _read_exact(rfile, size)
        if _read_line(rfile).strip():
            raise BodyFramingError("chunk not followed by CRLF")
    while _read_line(rfile).strip():
        pass


def iter_body(rfile: BinaryIO, headers: Sequence[tuple[str, str]]) -> Iterator[bytes] | None:
    """Return an iterator over the request body, or None when the request has no framing."""
    values = {k.lower(): v.strip() for k, v in headers}
    encoding = values.get("transfer-encoding")
    if encoding is not None:
        if encoding.lower() != "chunked":
            raise BodyFramingError(f"unsupported Transfer-Encoding {encoding!r}")
        return _read_chunked(rfile)
    length = values.get("content-length")
    if length is None:
        return None
    if not length.isdigit():
        raise BodyFramingError(f"bad Content-Length {length!r}")
    return _read_exact(rfile, int(length))


class _Server(ThreadingHTTPServer):
    """The socket server; it remembers its WholeFileServer and its open connections."""

    daemon_threads = True

    def __init__(self, owner: WholeFileServer, address: tuple[str, int]) -> None:
        """Bind to ``address``; IPv6 when the host contains a colon."""
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.owner = owner
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, conn: socket.socket, is_open: bool) -> None:
        """Remember (or forget) an open client connection so stop() can close it."""
        with self.connections_lock:
            if is_open:
                self.connections.add(conn)
            else:
                self.connections.discard(conn)

    def close_connections(self) -> None:
        """Shut down every open client connection."""
        with self.connections_lock:
            open_connections = list(self.connections)
        for conn in open_connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    """Handles one connection; every request goes through :meth:`dispatch`."""

    protocol_version = "HTTP/1.1"
    server_version = "WholeFileServer/1.0"
    timeout = 300

    @property
    def owner(self) -> WholeFileServer:
        """The WholeFileServer this handler serves."""
        return cast(_Server, self.server).owner

    def setup(self) -> None:
        """Prepare the connection and register it with the server."""
        super().setup()
        cast(_Server, self.server).track(self.connection, True)

    def finish(self) -> None:
        """Flush the connection and unregister it."""
        cast(_Server, self.server).track(self.connection, False)
        super().finish()

    def handle_one_request(self) -> None:
        """Read one request line and headers, then dispatch (every method is accepted)."""
        try:
            self.raw_requestline = self.rfile.readline(_MAX_LINE + 1)
            if len(self.raw_requestline) > _MAX_LINE:
                self.send_error(414)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if self.parse_request():
                self.dispatch()
                self.wfile.flush()
        except (TimeoutError, ConnectionError) as exc:
            self.log_error("connection dropped: %r", exc)
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        """Log to stderr only when the server was asked to log."""
        if self.owner.log_requests:
            super().log_message(format, *args)

    @property
    def header_list(self) -> list[tuple[str, str]]:
        """The request headers in order."""
        return list(self.headers.items())

    def dispatch(self) -> None:
        """Route the request by strictness rules and method."""
        offending = offending_header(self.command, self.header_list)
        if offending is not None:
            self.drain_and_answer(400, f"resumable uploads are not supported: {offending}\n")
        elif self.command in ("PUT", "POST"):
            self.receive_upload()
        elif self.command in ("GET", "HEAD"):
            self.serve_file()
        else:
            self.drain_and_answer(405, f"method {self.command} not allowed\n", allow=True)

    def body(self) -> Iterator[bytes] | None:
        """The body iterator of the current request (None if it has no framing)."""
        return iter_body(cast(BinaryIO, self.rfile), self.header_list)

    def has_framing(self) -> bool:
        """Whether the request declares a body (malformed framing counts as declared)."""
        try:
            return self.body() is not None
        except BodyFramingError:
            return True

    def consume(self, sink: Callable[[bytes], object] | None = None) -> _Digest | None:
        """Read the whole body, feeding it to ``sink``; None if it broke off (already recorded).

        A body without framing counts as empty.  Malformed framing is answered 400.
        """
        digest = _Digest()
        try:
            for piece in self.body() or ():
                digest.update(piece)
                if sink is not None:
                    sink(piece)
        except BodyFramingError as exc:
            self.close_connection = True
            self.answer(400, f"malformed body: {exc}\n", digest)
            return None
        except (BodyTruncatedError, TimeoutError, ConnectionError):
            self.close_connection = True
            self.record(0, digest, complete=False)
            return None
        return digest

    def drain_and_answer(self, status: int, text: str, *, allow: bool = False) -> None:
        """Discard the body, then answer ``status`` with a text body."""
        digest = self.consume()
        if digest is not None:
            extra = [("Allow", "GET, HEAD, PUT, POST")] if allow else []
            self.answer(status, text, digest, extra)

    def receive_upload(self) -> None:
        """Handle a whole-file PUT/POST."""
        target = storage_path(self.owner.directory, self.path)
        fail_status = self.owner.fail_status
        if not self.has_framing():
            self.answer(411, "a body with Content-Length or chunked encoding is required\n")
        elif target is None:
            self.drain_and_answer(400, f"unacceptable path {self.path!r}\n")
        elif fail_status is not None:
            self.drain_and_answer(fail_status, f"configured to fail with {fail_status}\n")
        elif not _prepare_parent(target):
            self.drain_and_answer(409, f"cannot store at {self.path!r}\n")
        else:
            self.store(target)

    def store(self, target: Path) -> None:
        """Stream the body into a temporary file and rename it to ``target`` when complete."""
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".~partial-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                digest = self.consume(out.write)
            if digest is not None and _replace(tmp, target):
                self.answer_created(target, digest)
            elif digest is not None:
                self.answer(409, f"cannot store at {self.path!r}\n", digest)
        finally:
            tmp.unlink(missing_ok=True)

    def answer_created(self, target: Path, digest: _Digest) -> None:
        """Answer 201 with the stored file's description."""
        rel = target.relative_to(self.owner.directory).as_posix()
        info = {"path": "/" + rel, "size": digest.size, "sha256": digest.hexdigest}
        body = json.dumps(info).encode() + b"\n"
        headers = [("Location", self.path.split("?", 1)[0])]
        self.answer(201, body, digest, headers, content_type="application/json")

    def serve_file(self) -> None:
        """Answer a GET/HEAD with a stored file, streamed, or 404."""
        digest = self.consume()
        if digest is None:
            return
        target = storage_path(self.owner.directory, self.path)
        if target is None or not target.is_file():
            self.answer(404, "not found\n", digest)
            return
        self.record(200, digest)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(target.stat().st_size))
        self.end_headers()
        if self.command == "GET":
            self.stream_file(target)

    def stream_file(self, target: Path) -> None:
        """Write ``target`` to the client in CHUNK_SIZE pieces."""
        with target.open("rb") as src:
            while data := src.read(CHUNK_SIZE):
                self.wfile.write(data)

    def answer(
        self,
        status: int,
        body: str | bytes,
        digest: _Digest | None = None,
        headers: Sequence[tuple[str, str]] = (),
        content_type: str = "text/plain; charset=utf-8",
    ) -> None:
        """Record the request, then send a complete response with ``body``."""
        payload = body.encode() if isinstance(body, str) else body
        self.record(status, digest or _Digest())
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def record(self, status: int, digest: _Digest, *, complete: bool = True) -> None:
        """Add the current request to the server's ``received`` list."""
        self.owner.record(
            ReceivedRequest(
                method=self.command,
                path=self.path,
                headers=self.header_list,
                size=digest.size,
                sha256=digest.hexdigest,
                status=status,
                complete=complete,
            )
        )


def _prepare_parent(target: Path) -> bool:
    """Create the folders above ``target``; False if something is in the way."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return not target.is_dir()


def _replace(tmp: Path, target: Path) -> bool:
    """Move the finished temporary file into place; False if that is impossible."""
    try:
        os.replace(tmp, target)
    except OSError:
        return False
    return True


class WholeFileServer:
    """The legacy server: serve ``directory`` on ``host:port`` (port 0 picks a free one)."""

    def __init__(
        self,
        directory: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_requests: bool = False,
    ) -> None:
        """Prepare the server; it binds at once but only answers after :meth:`start`."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fail_status: int | None = None
        self.log_requests = log_requests
        self.received: list[ReceivedRequest] = []
        self._condition = threading.Condition()
        self._server = _Server(self, (host, port))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port the server is bound to."""
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        """The address the server is bound to."""
        return str(self._server.server_address[0])

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. ``http://127.0.0.1:PORT``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Serve requests in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"WholeFileServer:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, close open connections and release the socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.close_connections()
        self._server.server_close()

    def record(self, request: ReceivedRequest) -> None:
        """Append ``request`` to :attr:`received` and wake up waiters."""
        with self._condition:
            self.received.append(request)
            self._condition.notify_all()

    def wait_for(self, count: int, timeout: float) -> list[ReceivedRequest]:
        """Block until at least ``count`` requests were received; return a copy of them.

        Raises TimeoutError if that does not happen within ``timeout`` seconds.
        """
        with self._condition:
            if not self._condition.wait_for(lambda: len(self.received) >= count, timeout):
                got = len(self.received)
                raise TimeoutError(f"{got} of {count} requests received after {timeout}s")
            return list(self.received)

    def __enter__(self) -> WholeFileServer:
        """Start the server."""
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop the server."""
        self.stop()


def parse_listen(value: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into a pair."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m shim.demo_server",
        description="Whole-file-only demo HTTP server (accepts complete PUT/POST bodies only).",
    )
    parser.add_argument("--dir", required=True, type=Path, help="folder to store files in")
    parser.add_argument(
        "--listen",
        default=("127.0.0.1", 0),
        type=parse_listen,
        help="HOST:PORT to listen on (default 127.0.0.1:0, a free port)",
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """Yield an Event that SIGINT or SIGTERM sets (handlers installed for the duration)."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: list[str] | None = None) -> int:
    """Run the demo server until SIGINT/SIGTERM; prints one line with its URL."""
    args = _parse_args(argv)
    host, port = args.listen
    with _stop_on_signals() as stop:
        server = WholeFileServer(args.dir, host, port, log_requests=True)
        server.start()
        try:
            print(f"demo server listening at {server.url}", flush=True)
            while not stop.wait(1.0):
                pass
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
