"""The test harness for several shims sharing one store: tests/redis_server.py (a real
redis-server per test) and tests/balancer.py (round robin over the shims)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests import redis_server as redis_server_module
from tests.balancer import RoundRobinBalancer
from tests.redis_server import RedisServer, RedisServerMissingError

DEADLINE = 5.0
"""Seconds anything here may take; every wait is on an event, this only bounds failures."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- redis-server -----------------------------------------------------------------------------


def test_redis_fixture_answers_ping_set_get(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis.Redis.from_url(redis_server.url, socket_timeout=DEADLINE)
    try:
        assert client.ping() is True
        assert client.set("upload:1", b"offset=42") is True
        assert client.get("upload:1") == b"offset=42"
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("save")["save"] == ""
        assert client.config_get("appendonly")["appendonly"] == "no"
        assert client.config_get("dir")["dir"] == str(redis_server.directory)
    finally:
        client.close()


def test_two_redis_servers_get_different_ports(redis_server: RedisServer, tmp_path: Path) -> None:
    with RedisServer(tmp_path / "second") as second:
        assert second.port != redis_server.port
        assert second.pid != redis_server.pid
        for server in (redis_server, second):
            client = redis.Redis.from_url(server.url, socket_timeout=DEADLINE)
            try:
                assert client.ping() is True
                assert client.info("server")["process_id"] == server.pid
            finally:
                client.close()
    assert not _alive(second.pid)


def test_redis_server_stops_and_restarts_on_its_port(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True)
    try:
        server.start()
        port, first_pid = server.port, server.pid
        client = redis.Redis.from_url(server.url, socket_timeout=DEADLINE)
        assert client.set("kept", b"yes") is True
        client.close()
        assert server.stop() == 0
        assert not _alive(first_pid)
        server.start()
        assert (server.port, server.pid != first_pid) == (port, True)
        client = redis.Redis.from_url(server.url, socket_timeout=DEADLINE)
        assert client.get("kept") == b"yes"  # the append-only file was asked for
        client.close()
        assert server.kill() == -9
    finally:
        server.close()


def test_redis_server_retries_a_port_taken_meanwhile(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The race of the free-port pick, made certain: the first port handed out is taken."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        ports = iter([taken.getsockname()[1], redis_server_module._free_port()])
        monkeypatch.setattr(redis_server_module, "_free_port", lambda: next(ports))
        with RedisServer(tmp_path / "redis") as server:
            assert server.port != taken.getsockname()[1]
            assert "Address already in use" in server.output()
            client = redis.Redis.from_url(server.url, socket_timeout=DEADLINE)
            assert client.ping() is True
            client.close()


def test_redis_server_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RedisServerMissingError, match="apt-get install redis-server"):
        RedisServer(tmp_path, binary=tmp_path / "no-redis-server").start()


# --- the balancer -----------------------------------------------------------------------------


class _Backend:
    """A TCP server on 127.0.0.1, port 0, that greets each connection with its name and a
    newline, then reads until EOF; each connection's bytes and EOF are recorded."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[bytearray] = []
        self.ended: list[threading.Event] = []
        """Per connection: set once it read EOF (or an error) from the balancer."""
        self.accepted = threading.Semaphore(0)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name=f"backend:{name}").start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self._listener.getsockname()[1])

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            received, ended = bytearray(), threading.Event()
            self._conns.append(conn)
            self.received.append(received)
            self.ended.append(ended)
            self.accepted.release()
            threading.Thread(target=self._serve, args=(conn, received, ended), daemon=True).start()

    def _serve(self, conn: socket.socket, received: bytearray, ended: threading.Event) -> None:
        try:
            conn.sendall(self.name.encode() + b"\n")
            while data := conn.recv(65536):
                received += data
        except OSError:
            pass
        ended.set()

    def stop(self) -> None:
        # shutdown() first: close() alone does not wake the accept() blocked in the other
        # thread on Linux, and the port would go on accepting.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


@pytest.fixture
def backends() -> Iterator[list[_Backend]]:
    made = [_Backend(name) for name in ("a", "b", "c")]
    try:
        yield made
    finally:
        for backend in made:
            backend.stop()


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port that refuses connections: bound, so nobody else gets it, but not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _greeting(port: int) -> str:
    """Connect through the balancer, return the backend's name, close."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as conn:
        return conn.makefile("rb").readline().decode().strip()


def test_balancer_sends_successive_connections_round_robin(backends: list[_Backend]) -> None:
    with RoundRobinBalancer([b.address for b in backends]) as balancer:
        assert balancer.url == f"http://127.0.0.1:{balancer.port}"
        assert [_greeting(balancer.port) for _ in range(4)] == ["a", "b", "c", "a"]
        assert balancer.connections == [0, 1, 2, 0]


def test_balancer_passes_over_a_refusing_backend(backends: list[_Backend],
                                                 refusing_port: int) -> None:
    a, _, c = backends
    with RoundRobinBalancer([a.address, ("127.0.0.1", refusing_port), c.address]) as balancer:
        assert [_greeting(balancer.port) for _ in range(3)] == ["a", "c", "a"]
        assert balancer.connections == [0, 2, 0]


def test_balancer_passes_over_a_stopped_backend_and_skips(backends: list[_Backend]) -> None:
    a, b, c = backends
    with RoundRobinBalancer([a.address, b.address, c.address]) as balancer:
        assert _greeting(balancer.port) == "a"
        b.stop()  # as a SIGKILLed instance: its port refuses now
        assert [_greeting(balancer.port) for _ in range(2)] == ["c", "a"]
        balancer.skip(0)
        assert [_greeting(balancer.port) for _ in range(2)] == ["c", "c"]
        balancer.restore(0)
        balancer.set_backends([c.address, a.address])
        assert [_greeting(balancer.port) for _ in range(2)] == ["c", "a"]
        assert balancer.connections == [0, 2, 0, 2, 2, 0, 1]


def test_balancer_with_no_reachable_backend_closes_the_client(refusing_port: int) -> None:
    with RoundRobinBalancer([("127.0.0.1", refusing_port)]) as balancer:
        assert _greeting(balancer.port) == ""
        assert balancer.connections == [None]


def test_client_cut_reaches_the_backend_as_eof(backends: list[_Backend]) -> None:
    a = backends[0]
    with RoundRobinBalancer([a.address]) as balancer:
        client = socket.create_connection(("127.0.0.1", balancer.port), timeout=DEADLINE)
        assert client.recv(2) == b"a\n"  # the pipe is up
        client.sendall(b"PUT /f HTTP/1.1\r\nContent-Length: 1000\r\n\r\npartial")
        client.close()  # mid-body
        assert a.ended[0].wait(DEADLINE), "the backend did not see the client's cut"
        assert bytes(a.received[0]) == b"PUT /f HTTP/1.1\r\nContent-Length: 1000\r\n\r\npartial"


def test_backend_close_reaches_the_client_and_close_cuts_pipes(backends: list[_Backend]) -> None:
    a = backends[0]
    with RoundRobinBalancer([a.address]) as balancer:
        first = socket.create_connection(("127.0.0.1", balancer.port), timeout=DEADLINE)
        second = socket.create_connection(("127.0.0.1", balancer.port), timeout=DEADLINE)
        with first, second:
            assert first.recv(2) == b"a\n"
            assert second.recv(2) == b"a\n"
            a._conns[0].shutdown(socket.SHUT_RDWR)  # the backend ends the first
            assert first.recv(1) == b""
            balancer.close()  # cuts the second, both sides
            assert a.ended[1].wait(DEADLINE), "close() left the backend side open"
            assert second.recv(1) == b""
