"""A real Redis for tests: `RedisServer` runs Debian's ``redis-server`` as a subprocess.

It listens on 127.0.0.1 only, on a free port, with its working directory (where a dump or an
append-only file would go) in a folder the test gives, and without persistence unless the test
asks for it (``save=``, ``appendonly=``, ``extra_args=``). Readiness is a PING answered with
``+PONG`` by the process we started (its ``INFO server`` names our pid), polled until a
deadline: no fixed sleep. The helper speaks RESP over a raw socket so that it needs nothing
but the standard library.

Picking a free port (bind to port 0, close, hand the number to redis) races with every other
process on the machine, pytest-xdist workers included; when redis-server exits because the
port was taken meanwhile, another port is tried, a few times.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

__all__ = ["REDIS_SERVER", "RedisServer", "RedisServerMissingError"]

REDIS_SERVER = Path(shutil.which("redis-server") or "/usr/bin/redis-server")
START_TIMEOUT = 10.0
"""Seconds for redis-server to answer PING after it was started."""
STOP_TIMEOUT = 5.0
"""Seconds ``stop()`` waits after SIGTERM before it sends SIGKILL."""
PORT_ATTEMPTS = 5
"""Free ports tried when redis-server exits because the one picked was taken meanwhile."""
_PORT_TAKEN = "Address already in use"


class RedisServerMissingError(RuntimeError):
    """``redis-server`` is not installed (Debian: ``apt-get install redis-server``)."""


class _PortTakenError(RuntimeError):
    """redis-server could not bind the port it was given: another process took it."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _command(port: int, *args: str, timeout: float = 1.0) -> bytes:
    """Send one RESP command to 127.0.0.1:port and return its raw reply (a bulk string's
    payload, or a simple reply's whole line such as ``+PONG`` / ``-LOADING ...``)."""
    request = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(arg.encode())}\r\n{arg}\r\n".encode() for arg in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(request)
        reply = b""
        while b"\r\n" not in reply:
            data = conn.recv(65536)
            if not data:
                raise ConnectionError("closed before answering")
            reply += data
        line, rest = reply.split(b"\r\n", 1)
        if not line.startswith(b"$"):
            return line
        size = int(line[1:])
        while len(rest) < size + 2:
            data = conn.recv(65536)
            if not data:
                raise ConnectionError("closed in the middle of a reply")
            rest += data
        return rest[:size]


class RedisServer:
    """A ``redis-server`` process on 127.0.0.1; ``start()`` (or ``with``) before use.

    ``start()`` after ``stop()``/``kill()`` runs it again on the same port and in the same
    directory, so a test can restart it under clients that keep its URL (and, with
    persistence asked for, find the data again).
    """

    def __init__(
        self,
        directory: Path,
        *,
        save: str = "",
        appendonly: bool = False,
        extra_args: Sequence[str] = (),
        binary: Path = REDIS_SERVER,
    ) -> None:
        """Prepare (but do not start) a server working in ``directory`` (created if needed).

        ``save`` is redis' ``save`` setting ("" disables RDB snapshots, "60 1" snapshots
        after 60 s with a change); ``extra_args`` are appended to the command line, e.g.
        ``["--appendfsync", "always"]``.
        """
        self.directory = directory
        self.save = save
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self.binary = binary
        self._port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError("redis-server was never started")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """Process id of the current (or last) run."""
        if self._proc is None:
            raise RuntimeError("redis-server was never started")
        return self._proc.pid

    @property
    def log_path(self) -> Path:
        """Where redis-server's output goes (all runs, appended)."""
        return self.directory / "redis-server.log"

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self, port: int) -> list[str]:
        return [
            str(self.binary),
            *("--bind", "127.0.0.1"),
            *("--port", str(port)),
            *("--protected-mode", "no"),  # bound to 127.0.0.1 only
            *("--dir", str(self.directory)),
            *("--save", self.save),
            *("--appendonly", "yes" if self.appendonly else "no"),
            *("--daemonize", "no"),
            *("--logfile", ""),  # stdout, which goes to log_path
            *self.extra_args,
        ]

    def start(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Start redis-server and return once it answers PING; raise if it does not."""
        if not self.binary.exists():
            raise RedisServerMissingError(
                f"{self.binary} not found: install Debian's redis-server "
                "(apt-get install redis-server; .ci/run does this)"
            )
        if self.is_running():
            raise RuntimeError("redis-server is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._port:
            self._launch(self._port, timeout)  # a restart keeps its port
            return self
        for attempt in range(PORT_ATTEMPTS):
            try:
                self._launch(_free_port(), timeout)
                return self
            except _PortTakenError:
                if attempt == PORT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _launch(self, port: int, timeout: float) -> None:
        if self._log is None:
            self._log = self.log_path.open("ab", buffering=0)
        log_start = self.log_path.stat().st_size
        self._proc = subprocess.Popen(
            self.command(port),
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                output = self._output(log_start)
                if _PORT_TAKEN in output and not self._port:
                    raise _PortTakenError(output)
                raise RuntimeError(
                    f"redis-server exited with {self._proc.returncode}; output:\n{output}"
                )
            if self._answers(port):
                self._port = port
                return
            # Poll again; each failed attempt took a connect or read timeout, or was refused.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(0.02)
        self.kill()
        raise RuntimeError(
            f"redis-server did not answer PING within {timeout}s; output:\n{self._output(log_start)}"
        )

    def _answers(self, port: int) -> bool:
        """Whether our process answers PING on ``port`` (and not another one that took it)."""
        assert self._proc is not None
        try:
            if _command(port, "PING") != b"+PONG":
                return False  # e.g. -LOADING while a dump is read back
            info = _command(port, "INFO", "server")
        except OSError:
            return False
        return f"process_id:{self._proc.pid}\r\n".encode() in info

    def _output(self, start: int = 0) -> str:
        with contextlib.suppress(OSError), self.log_path.open("rb") as log:
            log.seek(start)
            return log.read().decode(errors="replace")
        return ""

    def output(self) -> str:
        """Everything redis-server printed so far, across all runs."""
        return self._output()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (redis saves first if persistence is on), wait up to ``timeout`` s, then
        SIGKILL. Return the exit status (None if it never ran)."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """SIGKILL at once, like a crash, and reap it. Return the exit status."""
        return self._end(signal.SIGKILL, STOP_TIMEOUT)

    def _end(self, sig: signal.Signals, timeout: float) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def close(self) -> None:
        """Stop it and close the log."""
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> RedisServer:
        """Start it (unless running already)."""
        if not self.is_running():
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
