"""A legacy server for fault tests: records every request, misbehaves on command.

``LegacyServer`` is a small threaded HTTP/1.1 server on 127.0.0.1 (port 0 on first start).
Each connection gets a thread; each request is recorded as a :class:`Received` as soon as its
head arrives, and its body size, sha256 and completeness are filled in as the body is read.
What it answers is the :attr:`LegacyServer.mode`, which a test may switch at any time:

* ``"ok"``: read the body, answer ``201 Created`` with JSON ``{"path", "size", "sha256"}``;
* ``"late"``: read the body, answer 201 after :attr:`LegacyServer.late` seconds;
* ``"hang"``: read the body, then answer nothing while the mode stays ``"hang"``; once it is
  switched, answer as the new mode says (the peer closing ends the wait, unanswered);
* ``"early-413"``: read only the head, answer 413 with ``Connection: close`` and close the
  way nginx does past ``client_max_body_size`` (stop sending, drain a while, close);
* ``"status:<n>"``: read the body, answer status ``n`` with a short text body;
* ``"close-after-body"``: read the whole body, close without an answer.

:meth:`LegacyServer.down` stops listening and closes every connection (the mode reads
``"down"``); :meth:`LegacyServer.back` listens again on the same port, in mode ``"ok"``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

__all__ = ["LegacyServer", "Received"]

CHUNK = 64 * 1024
LINGER = 2.0
"""Seconds an early answer's connection is drained before it is closed (nginx lingers)."""
_MAX_HEAD_LINES = 200


@dataclass
class Received:
    """One request as the legacy server saw it; the body fields grow while it is read."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    size: int = 0
    """Body bytes read so far."""
    sha256: str = hashlib.sha256().hexdigest()
    """The sha256 of the body bytes read (of the whole body once ``complete``)."""
    complete: bool = False
    """The whole body (as its framing announced it) arrived."""
    status: int = 0
    """The status answered; 0 while (or if never) answered."""
    mode: str = ""
    """The mode the request met when its head arrived."""
    _hasher: hashlib._Hash = field(default_factory=hashlib.sha256, repr=False)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)

    def _update(self, data: bytes) -> None:
        self._hasher.update(data)
        self.size += len(data)
        self.sha256 = self._hasher.hexdigest()


class _Closed(Exception):
    """The peer closed the connection (or the server is going down)."""


class LegacyServer:
    """See the module docstring. ``start()`` before use, ``stop()`` at the end."""

    def __init__(self, late: float = 1.0) -> None:
        self.mode = "ok"
        self.late = late
        """Seconds a ``"late"`` answer takes after the body."""
        self.received: list[Received] = []
        self._port = 0
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._changed = threading.Condition()
        """Notified on every new request, body end, answer, mode change and stop."""

    # --- running --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> None:
        """Listen (again, on the same port once one was chosen) and serve in threads."""
        listener = socket.create_server(("127.0.0.1", self._port))
        listener.settimeout(0.05)
        self._port = listener.getsockname()[1]
        self._listener = listener
        self._switch("ok")
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), daemon=True,
                                          name=f"legacy:{self._port}")
        self._acceptor.start()

    def stop(self) -> None:
        """Stop listening and close every open connection (requests in flight get nothing)."""
        self._switch("down")
        listener, self._listener = self._listener, None
        if self._acceptor is not None:
            self._acceptor.join(5.0)
            self._acceptor = None
        if listener is not None:
            listener.close()
        with self._changed:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    down = stop

    def back(self) -> None:
        """Listen again on the same port, in mode ``"ok"``."""
        self.start()

    def set_mode(self, mode: str) -> None:
        """Switch what the next (and every hanging) request gets; ``"down"`` stops the
        server, ``"back"`` starts it again on the same port (then it is ``"ok"``)."""
        if mode == "down":
            self.stop()
        elif mode == "back":
            self.start()
        else:
            self._switch(mode)

    def _switch(self, mode: str) -> None:
        with self._changed:
            self.mode = mode
            self._changed.notify_all()

    # --- what it saw ----------------------------------------------------------------------

    def requests(self, path_prefix: str = "") -> list[Received]:
        """The requests so far (those whose path starts with ``path_prefix``), oldest first."""
        with self._changed:
            return [r for r in self.received if r.path.startswith(path_prefix)]

    def accepted(self, path_prefix: str = "") -> list[Received]:
        """The requests answered 2xx: the deliveries that count."""
        return [r for r in self.requests(path_prefix) if 200 <= r.status < 300]

    def wait_for(self, count: int, timeout: float, path_prefix: str = "") -> list[Received]:
        """Wait until ``count`` requests arrived (their heads); TimeoutError otherwise."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.requests(path_prefix)) >= count,
                                          timeout):
                raise TimeoutError(f"{len(self.requests(path_prefix))} of {count} requests "
                                   f"reached the legacy server within {timeout}s")
        return self.requests(path_prefix)

    # --- serving --------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self._changed:
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            while self._serve_one(conn, reader):
                pass
        except (_Closed, OSError, ValueError):
            pass
        finally:
            with self._changed:
                self._connections.discard(conn)
            with contextlib.suppress(OSError):
                reader.close()
                conn.close()

    def _serve_one(self, conn: socket.socket, reader: io.BufferedReader) -> bool:
        """Serve one request; whether the connection stays open for another."""
        line = reader.readline(65536)
        if not line.strip():
            return False
        method, target, _ = line.decode("latin-1").split(" ", 2)
        headers = _read_headers(reader)
        with self._changed:
            mode = self.mode
            request = Received(method, target, headers, mode=mode)
            self.received.append(request)
            self._changed.notify_all()
        if mode == "early-413":
            self._answer(conn, request, 413, b"413 Request Entity Too Large\n", close=True)
            _linger(conn)
            return False
        self._read_body(reader, request)
        mode = self._after_hanging(conn, mode)
        if mode == "late":
            self._wait_until(lambda: self.mode == "down", self.late)
            mode = "ok" if self.mode != "down" else "down"
        if mode.startswith("status:"):
            status = int(mode.partition(":")[2])
            self._answer(conn, request, status, f"the legacy server says {status}\n".encode())
        elif mode == "ok":
            body = json.dumps({"path": target, "size": request.size, "sha256": request.sha256})
            self._answer(conn, request, 201, body.encode() + b"\n", location=target)
        else:  # close-after-body, down, or a mode it does not know
            return False
        return (request.header("connection") or "").lower() != "close"

    def _read_body(self, reader: io.BufferedReader, request: Received) -> None:
        """Read the body as its framing says, accounting for every byte; _Closed if cut."""
        if "chunked" in (request.header("transfer-encoding") or "").lower():
            while size := int(reader.readline(1024).split(b";")[0].strip() or b"x", 16):
                self._read_exact(reader, request, size)
                reader.readline(1024)
            while reader.readline(65536).strip():
                pass
        else:
            self._read_exact(reader, request, int(request.header("content-length") or 0))
        with self._changed:
            request.complete = True
            self._changed.notify_all()

    def _read_exact(self, reader: io.BufferedReader, request: Received, size: int) -> None:
        while size > 0:
            data = reader.read1(min(CHUNK, size))
            if not data:
                raise _Closed
            with self._changed:
                request._update(data)
                self._changed.notify_all()
            size -= len(data)

    def _after_hanging(self, conn: socket.socket, mode: str) -> str:
        """While the mode is ``"hang"``, answer nothing; the new mode once it changes."""
        while mode == "hang":
            with self._changed:
                self._changed.wait_for(lambda: self.mode != "hang", 0.05)
                mode = self.mode
            if _peer_closed(conn):  # nobody is waiting for this answer any more
                raise _Closed
        return mode

    def _wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        with self._changed:
            self._changed.wait_for(predicate, timeout)

    def _answer(self, conn: socket.socket, request: Received, status: int, body: bytes,
                location: str | None = None, close: bool = False) -> None:
        reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Status"
        head = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}",
                "Content-Type: " + ("application/json" if status == 201 else "text/plain")]
        if location is not None:
            head.append(f"Location: {location}")
        if close:
            head.append("Connection: close")
        with self._changed:  # recorded first: a client that has the answer sees it recorded
            request.status = status
            self._changed.notify_all()
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)


def _read_headers(reader: io.BufferedReader) -> list[tuple[str, str]]:
    headers = []
    for _ in range(_MAX_HEAD_LINES):
        line = reader.readline(65536)
        if not line:
            raise _Closed
        if not line.strip():
            return headers
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    raise _Closed


def _peer_closed(conn: socket.socket) -> bool:
    """Whether the peer closed its side (a waiting request is then over)."""
    readable, _, _ = select.select([conn], [], [], 0)
    if not readable:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _linger(conn: socket.socket) -> None:
    """Stop sending and read what the peer still sends, for a while, before the close: a
    close with unread bytes would reset the connection and could lose the answer."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(0.1)
        deadline = time.monotonic() + LINGER
        while time.monotonic() < deadline:
            try:
                if not conn.recv(CHUNK):
                    return
            except TimeoutError:
                continue
