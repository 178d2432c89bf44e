"""Test harness: run the shim as a real process, make payloads, drive tus-js-client.

Everything here talks to real sockets on 127.0.0.1 and binds port 0 only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal

import pytest
import yaml

from shim.demo_server import WholeFileServer

__all__ = [
    "ADDON_PATH",
    "JS_DIR",
    "REPO_ROOT",
    "START_TIMEOUT",
    "TUS_SCRIPT",
    "PayloadFactory",
    "ShimKind",
    "ShimLauncher",
    "ShimProcess",
    "in_ci",
    "last_event",
    "mitmdump_path",
    "node_problem",
    "require_node",
    "run_tus_js",
    "sha256_of",
    "start_tus_js",
    "subprocess_env",
    "tus_js_command",
    "tus_js_events",
    "wait_until",
    "write_random_file",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
ADDON_PATH = REPO_ROOT / "shim" / "addon.py"
JS_DIR = REPO_ROOT / "tests" / "js"
TUS_SCRIPT = JS_DIR / "tus_upload.mjs"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
MIB = 1024 * 1024

ShimKind = Literal["mitmdump", "python-m-shim"]

LISTENING_RE = re.compile(r"listening at (?:https?://)?127\.0\.0\.1:(\d+)")


def sha256_of(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as src:
        while data := src.read(MIB):
            digest.update(data)
    return digest.hexdigest()


def write_random_file(path: Path, size: int) -> Path:
    """Write ``size`` random bytes to ``path`` in 1 MiB pieces and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        remaining = size
        while remaining > 0:
            piece = os.urandom(min(MIB, remaining))
            out.write(piece)
            remaining -= len(piece)
    return path


class PayloadFactory:
    """Makes random payload files in one folder: ``payload(size) -> Path``."""

    def __init__(self, directory: Path) -> None:
        """Write payloads into ``directory``."""
        self.directory = directory
        self._count = 0

    def __call__(self, size: int, name: str | None = None) -> Path:
        """Write a new file of ``size`` random bytes and return its path."""
        self._count += 1
        filename = name or f"payload-{self._count}-{size}.bin"
        return write_random_file(self.directory / filename, size)


def mitmdump_path() -> Path:
    """The mitmdump executable installed next to the running Python."""
    return Path(sys.executable).parent / "mitmdump"


def subprocess_env() -> dict[str, str]:
    """Environment for child Python processes: unbuffered output."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class OutputLog:
    """Collects the merged output of child processes, line by line, in a thread-safe list."""

    def __init__(self) -> None:
        """Start empty."""
        self._lines: list[str] = []
        self._eof = True
        self._condition = threading.Condition()

    def drain(self, pipe: IO[bytes]) -> threading.Thread:
        """Read ``pipe`` to its end in a daemon thread, appending each line."""
        with self._condition:
            self._eof = False
        thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        thread.start()
        return thread

    def _pump(self, pipe: IO[bytes]) -> None:
        """Append every line of ``pipe``, then mark end of output."""
        with pipe:
            for raw in iter(pipe.readline, b""):
                self.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
        with self._condition:
            self._eof = True
            self._condition.notify_all()

    def append(self, line: str) -> None:
        """Add one line and wake up waiters."""
        with self._condition:
            self._lines.append(line)
            self._condition.notify_all()

    def __len__(self) -> int:
        """Number of lines so far."""
        with self._condition:
            return len(self._lines)

    def text(self, start: int = 0) -> str:
        """All lines from index ``start`` on, joined with newlines."""
        with self._condition:
            return "\n".join(self._lines[start:])

    def wait_for(
        self, pattern: re.Pattern[str], start: int, timeout: float
    ) -> re.Match[str] | None:
        """Wait until a line from index ``start`` matches, the output ends, or time runs out."""
        match: re.Match[str] | None = None

        def ready() -> bool:
            nonlocal match
            match = next(filter(None, map(pattern.search, self._lines[start:])), None)
            return match is not None or self._eof

        with self._condition:
            self._condition.wait_for(ready, timeout)
        return match


def write_config(config: Mapping[str, Any], workdir: Path) -> Path:
    """Write ``config`` as YAML into ``workdir``; ``storage.dir`` defaults to workdir/store."""
    merged = dict(config)
    storage = dict(merged.get("storage") or {})
    storage.setdefault("dir", str(workdir / "store"))
    merged["storage"] = storage
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    return path


class ShimProcess:
    """The shim running as a real child process (mitmdump or ``python -m shim``).

    Create and start it with :meth:`start`.  Its output (stdout and stderr merged) is drained
    continuously by a thread; read it with :meth:`output`.  After :meth:`restart` the shim
    listens on a new port: re-read :attr:`url`.
    """

    def __init__(
        self,
        kind: ShimKind,
        upstream_url: str,
        config: Mapping[str, Any],
        workdir: Path,
        *,
        addon: Path = ADDON_PATH,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Prepare (but do not start) a shim whose files live in ``workdir``."""
        self.kind: ShimKind = kind
        self.upstream_url = upstream_url
        self.workdir = workdir
        self.addon = addon
        self.extra_args = list(extra_args)
        self.confdir = workdir / "confdir"
        self.confdir.mkdir(parents=True, exist_ok=True)
        self.config_path = write_config(config, workdir)
        self.config: dict[str, Any] = yaml.safe_load(self.config_path.read_text())
        self.storage_dir = Path(self.config["storage"]["dir"])
        self._log = OutputLog()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._port: int | None = None
        self._run_start = 0

    @classmethod
    def start(
        cls,
        kind: ShimKind,
        upstream_url: str,
        config: Mapping[str, Any] | None,
        tmp_path: Path,
        *,
        addon: Path = ADDON_PATH,
        extra_args: Sequence[str] = (),
        timeout: float = START_TIMEOUT,
    ) -> ShimProcess:
        """Start a shim in a fresh folder below ``tmp_path``; return once it is listening."""
        workdir = Path(tempfile.mkdtemp(prefix=f"shim-{kind}-", dir=tmp_path))
        shim = cls(kind, upstream_url, config or {}, workdir, addon=addon, extra_args=extra_args)
        shim.launch(timeout)
        return shim

    def command(self) -> list[str]:
        """The command line that starts this shim on port 0."""
        if self.kind == "mitmdump":
            return [
                str(mitmdump_path()),
                *("--mode", f"reverse:{self.upstream_url}"),
                *("-s", str(self.addon)),
                *("--set", f"shim_config={self.config_path}"),
                *("--set", f"confdir={self.confdir}"),
                *("--set", "shim_admin=127.0.0.1:0"),
                *("--listen-host", "127.0.0.1", "--listen-port", "0"),
                *self.extra_args,
            ]
        return [
            sys.executable,
            *("-m", "shim"),
            *("--upstream", self.upstream_url),
            *("--config", str(self.config_path)),
            *("--listen", "127.0.0.1:0"),
            *("--confdir", str(self.confdir)),
            *("--admin", "127.0.0.1:0"),
            *self.extra_args,
        ]

    def launch(self, timeout: float = START_TIMEOUT) -> None:
        """Start the process and wait until it prints its listening line."""
        if self.is_running():
            raise RuntimeError("shim is already running")
        self._port = None
        self._run_start = len(self._log)
        self._proc = subprocess.Popen(
            self.command(),
            cwd=REPO_ROOT,
            env=subprocess_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert self._proc.stdout is not None
        self._reader = self._log.drain(self._proc.stdout)
        self._port = self._await_port(timeout)

    def _await_port(self, timeout: float) -> int:
        """Wait for the listening line and return its port; kill the process on failure."""
        match = self._log.wait_for(LISTENING_RE, self._run_start, timeout)
        if match is not None:
            return int(match.group(1))
        exited = self._proc is not None and self._proc.poll() is not None
        self.kill()
        reason = f"exited with {self.returncode}" if exited else f"not listening after {timeout}s"
        raise RuntimeError(f"shim ({self.kind}) {reason}; output:\n{self.output()}")

    @property
    def port(self) -> int:
        """The port the shim listens on (changes with every restart)."""
        if self._port is None or not self.is_running():
            raise RuntimeError("shim is not running")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` of the running shim."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the current run, if any."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last run, None while running or never started."""
        return self._proc.returncode if self._proc is not None else None

    def is_running(self) -> bool:
        """Whether the process of the current run is alive."""
        return self._proc is not None and self._proc.poll() is None

    def output(self) -> str:
        """Everything the shim printed so far, across all runs."""
        return self._log.text()

    def wait_for_output(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until a line of the current run matches regex ``pattern``; return the match."""
        match = self._log.wait_for(re.compile(pattern), self._run_start, timeout)
        if match is None:
            raise TimeoutError(f"no output matching {pattern!r}; output:\n{self.output()}")
        return match

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Stop gracefully: SIGTERM, wait up to ``timeout`` s, then SIGKILL. Return exit code."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """Kill at once (SIGKILL), like a crash, and wait for it. Return exit code."""
        return self._end(signal.SIGKILL, STOP_TIMEOUT)

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        """Start again with the same config, confdir and storage dir, on a new port.

        A still running process is stopped (SIGTERM) first.  Re-read :attr:`url` afterwards.
        """
        self.stop()
        self._log.append(f"---- harness: restarting {self.kind} ----")
        self.launch(timeout)

    def _end(self, sig: signal.Signals, timeout: float) -> int | None:
        """Send ``sig`` to the current run, escalate to SIGKILL, reap it and its reader."""
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
        if self._reader is not None:
            self._reader.join(timeout)
            self._reader = None
        return proc.returncode

    def __enter__(self) -> ShimProcess:
        """Use as a context manager that kills the shim on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Kill the shim."""
        self.kill()


class ShimLauncher:
    """Factory behind the ``shim`` fixture: ``shim(config=None, kind="mitmdump")``."""

    def __init__(self, upstream_url: str, tmp_path: Path) -> None:
        """Start shims in front of ``upstream_url``, with their files below ``tmp_path``."""
        self.upstream_url = upstream_url
        self.tmp_path = tmp_path
        self.started: list[ShimProcess] = []

    def __call__(
        self,
        config: Mapping[str, Any] | None = None,
        kind: ShimKind = "mitmdump",
        *,
        upstream_url: str | None = None,
        addon: Path = ADDON_PATH,
        extra_args: Sequence[str] = (),
        timeout: float = START_TIMEOUT,
    ) -> ShimProcess:
        """Start a shim and return it once it listens."""
        workdir = Path(tempfile.mkdtemp(prefix=f"shim-{kind}-", dir=self.tmp_path))
        shim = ShimProcess(
            kind,
            upstream_url or self.upstream_url,
            config or {},
            workdir,
            addon=addon,
            extra_args=extra_args,
        )
        self.started.append(shim)
        shim.launch(timeout)
        return shim

    def kill_all(self) -> None:
        """Kill every shim this launcher started."""
        for shim in self.started:
            shim.kill()

    def report(self, max_lines: int = 300) -> str:
        """The tail of every shim's output, for failure reports."""
        parts = []
        for shim in self.started:
            tail = shim.output().splitlines()[-max_lines:]
            parts.append(f"==== {shim.kind} in {shim.workdir} ====\n" + "\n".join(tail))
        return "\n".join(parts)


def shared_shim(tmp_path_factory: pytest.TempPathFactory, name: str,
                config: Mapping[str, Any] | None = None,
                ) -> Iterator[tuple[ShimProcess, WholeFileServer]]:
    """One legacy server and one shim in front of it, for a module-scoped fixture: starting
    mitmdump is most of an e2e test's time. Each test then uses its own paths, so tests share
    no upload, and looks only at its own paths on the legacy side."""
    tmp = tmp_path_factory.mktemp(name)
    legacy = WholeFileServer(tmp / "legacy")
    legacy.start()
    launcher = ShimLauncher(legacy.url, tmp)
    try:
        yield launcher(config), legacy
    finally:
        launcher.kill_all()
        legacy.stop()
        print(launcher.report())


def in_ci() -> bool:
    """Whether we run under CI (environment variable CI set to something true-ish)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def node_problem() -> str | None:
    """Why the node tests cannot run (missing node or tus-js-client), or None."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (JS_DIR / "node_modules" / "tus-js-client" / "package.json").is_file():
        return "tests/js/node_modules/tus-js-client is missing (run: cd tests/js && npm ci)"
    return None


def require_node() -> None:
    """Skip the calling test if node is unusable; under CI fail instead of skipping."""
    problem = node_problem()
    if problem is None:
        return
    if in_ci():
        pytest.fail(f"node tests cannot run under CI: {problem}", pytrace=False)
    pytest.skip(problem)


def tus_js_command(args: Mapping[str, Any]) -> list[str]:
    """The command running tests/js/tus_upload.mjs with ``args`` (Paths become strings)."""
    node = shutil.which("node") or "node"
    return [node, str(TUS_SCRIPT), json.dumps(dict(args), default=str)]


def run_tus_js(args: Mapping[str, Any], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run the tus-js-client driver to its end (skips/fails first if node is unusable)."""
    require_node()
    return subprocess.run(
        tus_js_command(args),
        cwd=JS_DIR,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_tus_js(args: Mapping[str, Any]) -> subprocess.Popen[str]:
    """Start the tus-js-client driver with stdout/stderr piped (text), for tests to steer."""
    require_node()
    return subprocess.Popen(
        tus_js_command(args),
        cwd=JS_DIR,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def tus_js_events(stdout: str) -> list[dict[str, Any]]:
    """Parse the JSON-lines events the driver printed (non-JSON lines are ignored)."""
    events: list[dict[str, Any]] = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            parsed = json.loads(line)
            if isinstance(parsed, dict):
                events.append(parsed)
    return events


def last_event(stdout: str, kind: str) -> dict[str, Any]:
    """The last event of type ``kind`` in the driver's output (KeyError if none)."""
    matching = [e for e in tus_js_events(stdout) if e.get("event") == kind]
    if not matching:
        raise KeyError(f"no {kind!r} event in output:\n{stdout}")
    return matching[-1]


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str = "condition", interval: float = 0.02
) -> None:
    """Poll ``predicate`` until it is true; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        time.sleep(interval)
