"""A round-robin TCP load balancer for tests: `RoundRobinBalancer`.

Several shims share uploads through one store behind a load balancer, and a client's next
connection may land on another shim. This balancer does what nginx's ``upstream`` block does
with keep-alive off, at the connection level: each NEW client connection is piped to the next
backend in turn, bytes are copied both ways until either side closes, and then the other side
is closed too (after what was already read from the first is delivered), so a client that
cuts its upload makes the backend see the request body end early. There is no half-close: a
client that shuts down its sending side loses its answer.

As nginx's ``proxy_next_upstream`` does for connect errors, a backend that refuses the
connection (a SIGKILLed instance) is passed over for the next one, so the client does not
notice; :meth:`RoundRobinBalancer.skip` takes one out of rotation altogether.

It runs an asyncio server on 127.0.0.1, port 0, in an event loop of its own in a daemon
thread; it starts listening when built and stops with :meth:`RoundRobinBalancer.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence

__all__ = ["RoundRobinBalancer"]

CHUNK = 64 * 1024
CONNECT_TIMEOUT = 5.0
"""Seconds to connect to a backend before the next one is tried."""
FLUSH_TIMEOUT = 5.0
"""Seconds a closing side gets to take the bytes still buffered for it before it is aborted."""
CLOSE_TIMEOUT = 10.0
"""Seconds ``close()`` waits for the loop to end the connections and stop."""


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF or an error on either side (both end the pipe)."""
    with contextlib.suppress(OSError):
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()


class RoundRobinBalancer:
    """See the module docstring. Listening once built; ``close()`` (or ``with``) at the end."""

    def __init__(self, backends: Sequence[tuple[str, int]],
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.connect_timeout = connect_timeout
        self.connections: list[int | None] = []
        """For each accepted client connection, in accept order, the index of the backend it
        is piped to; None while connecting, or if no backend could be reached (then the client
        connection was closed)."""
        self._backends = list(backends)
        self._skipped: set[int] = set()
        self._next = 0
        self._lock = threading.Lock()
        """Guards the rotation, which tests change from their own thread."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="round-robin-balancer")
        self._thread.start()
        try:
            self._server = asyncio.run_coroutine_threadsafe(
                asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
            ).result(CLOSE_TIMEOUT)
        except BaseException:
            self._stop_loop()
            raise
        self._port: int = self._server.sockets[0].getsockname()[1]

    # --- where it listens -----------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self._port}"

    # --- the rotation ---------------------------------------------------------------------

    @property
    def backends(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._backends)

    def set_backends(self, backends: Sequence[tuple[str, int]]) -> None:
        """Replace the backends for new connections (open pipes stay); the rotation starts
        again at index 0 and nothing is skipped."""
        with self._lock:
            self._backends = list(backends)
            self._skipped.clear()
            self._next = 0

    def skip(self, index: int) -> None:
        """Take backend ``index`` out of rotation (new connections only)."""
        with self._lock:
            self._skipped.add(index)

    def restore(self, index: int) -> None:
        """Put backend ``index`` back into rotation."""
        with self._lock:
            self._skipped.discard(index)

    def _pick(self, tried: set[int]) -> tuple[int, tuple[str, int]] | None:
        """The next backend in rotation not yet tried for this connection; advances the
        rotation past it, so that the next connection goes to the one after."""
        with self._lock:
            count = len(self._backends)
            for step in range(count):
                index = (self._next + step) % count
                if index not in self._skipped and index not in tried:
                    self._next = index + 1
                    return index, self._backends[index]
            return None

    # --- the pipes ------------------------------------------------------------------------

    async def _connect(self) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter] | None:
        tried: set[int] = set()
        while (picked := self._pick(tried)) is not None:
            index, (host, port) = picked
            tried.add(index)
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                        self.connect_timeout)
            except (OSError, TimeoutError):
                continue  # proxy_next_upstream error timeout
            return index, reader, writer
        return None

    async def _handle(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_writer)
        slot = len(self.connections)
        self.connections.append(None)
        writers = [client_writer]
        try:
            connected = await self._connect()
            if connected is None:
                return
            index, backend_reader, backend_writer = connected
            writers.append(backend_writer)
            self._writers.add(backend_writer)
            self.connections[slot] = index
            up = asyncio.create_task(_copy(client_reader, backend_writer))
            down = asyncio.create_task(_copy(backend_reader, client_writer))
            try:
                await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                up.cancel()
                down.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
        except asyncio.CancelledError:
            # Only close() cancels a pipe, and this task is ours to end. Not re-raised: the
            # callback asyncio.start_server wraps around it calls task.exception(), which
            # raises on a cancelled task and gets logged as an error (Python 3.12.1).
            pass
        finally:
            await self._close(writers)
            self._writers.difference_update(writers)
            self._tasks.discard(task)

    @staticmethod
    async def _close(writers: list[asyncio.StreamWriter]) -> None:
        """Close both sides: each gets what is still buffered for it, then EOF; one that does
        not take it within FLUSH_TIMEOUT is aborted."""
        for writer in writers:
            writer.close()
        with contextlib.suppress(OSError, TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(
                asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True),
                FLUSH_TIMEOUT,
            )
        for writer in writers:
            writer.transport.abort()  # a no-op once closed

    # --- stopping -------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CLOSE_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()

    def close(self) -> None:
        """Stop listening, cut every open pipe (both sides), stop the loop and its thread."""
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(CLOSE_TIMEOUT)
        finally:
            self._stop_loop()

    def __enter__(self) -> RoundRobinBalancer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
