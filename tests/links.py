"""A link that drops: `CuttingProxy`, a TCP proxy in front of a shim that cuts the connection
carrying every `cut_every`-th byte the client sends (counted over all connections), as a link
that drops every N bytes does. It can also stall once `stall_at` bytes went through, so that a
test can act at a known point without timing guesses. Used by the client, browser and
dropping-link tests and by bench/dropping_link.py."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

KIB = 1024
TIMEOUT = 30.0
"""Seconds to connect to the shim."""



class _Pair:
    """One client connection and its connection to the shim; closing either ends both."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class CuttingProxy:
    """A TCP proxy in front of the shim that behaves as a link that drops every `cut_every`
    bytes: both directions are forwarded, the client's bytes are counted over all
    connections, and the connection that carries byte k * cut_every (k = 1, 2, ...) is
    closed right after it. With `stall_at`, the client's bytes stop going through once that
    many did (`stalled` is set) until `drop_all`."""

    def __init__(self, upstream_port: int, cut_every: int, stall_at: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.cut_every = cut_every
        self.stall_at = stall_at
        self.carried = 0
        """Bytes the client sent that went through to the shim, over all connections."""
        self.cuts = 0
        self.stalled = threading.Event()
        self._released = threading.Event()
        self._next_cut = cut_every
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._stopping = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=TIMEOUT)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            server.settimeout(None)
            pair = _Pair(client, server)
            with self._lock:
                self._pairs.append(pair)
            threading.Thread(target=self._upstream, args=(pair,), daemon=True).start()
            threading.Thread(target=self._downstream, args=(pair,), daemon=True).start()

    def _account(self, size: int) -> tuple[int, bool, bool]:
        """How many of `size` arriving bytes go through, whether the connection is cut after
        them, and whether it stalls after them."""
        with self._lock:
            limit = self._next_cut
            stalling = self.stall_at is not None and not self._released.is_set()
            if stalling and self.stall_at is not None:
                limit = min(limit, self.stall_at)
            take = max(0, min(size, limit - self.carried))
            self.carried += take
            cut = self.carried >= self._next_cut
            if cut:
                self._next_cut += self.cut_every
                self.cuts += 1
            stall = stalling and self.stall_at is not None and self.carried >= self.stall_at
            return take, cut, stall

    def _upstream(self, pair: _Pair) -> None:
        try:
            while data := pair.client.recv(64 * KIB):
                take, cut, stall = self._account(len(data))
                if take:
                    pair.server.sendall(data[:take])
                if stall:
                    self.stalled.set()
                    self._released.wait()
                    break
                if cut:
                    break
        except OSError:
            pass
        pair.close()

    def _downstream(self, pair: _Pair) -> None:
        try:
            while data := pair.server.recv(64 * KIB):
                pair.client.sendall(data)
        except OSError:
            pass
        pair.close()

    def drop_all(self) -> None:
        """End the stall for good and close every connection open now."""
        self._released.set()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.close()

    def stop(self) -> None:
        self._stopping = True
        self._listener.close()
        self.drop_all()


MakeProxy = Callable[..., CuttingProxy]
"""The `cutting_proxy` fixture: `cutting_proxy(port, cut_every, stall_at=None)`."""
