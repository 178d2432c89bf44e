"""The tus servers people would pick instead of the shim, run for bench/ingest.py (issue 12).

- `@tus/server` with `@tus/file-store` (npm), by node: `bench/js/tus_server.mjs`, with the
  packages from `tests/js/node_modules` (`cd tests/js && npm ci`);
- `tuspyserver` (PyPI), the FastAPI tus router, served by uvicorn (plain: h11, asyncio loop):
  this module run as `python -m bench.tus_servers tuspyserver DIRECTORY`.

Both listen on 127.0.0.1, port 0, store into a folder of their own, and print
`listening at 127.0.0.1:PORT`; neither fsyncs (their default). Uploads are created by
`POST /files/`.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

from tests.harness import JS_DIR, REPO_ROOT, subprocess_env

NODE_SCRIPT = Path(__file__).resolve().parent / "js" / "tus_server.mjs"
NODE_PACKAGES = ("@tus/server", "@tus/file-store")
LISTENING = re.compile(r"listening at 127\.0\.0\.1:(\d+)")


def tus_node_problem() -> str | None:
    """Why @tus/server cannot run here (no node, or packages missing), or None."""
    if shutil.which("node") is None:
        return "node is not installed"
    for package in NODE_PACKAGES:
        if not (JS_DIR / "node_modules" / package / "package.json").is_file():
            return f"tests/js/node_modules/{package} is missing (run: cd tests/js && npm ci)"
    return None


def start_listening(command: list[str], what: str) -> tuple[subprocess.Popen[str], int]:
    """Start `command` and wait for its `listening at 127.0.0.1:PORT` line; (process, port).
    Its further output is drained in a thread so that it never blocks."""
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env())
    assert proc.stdout is not None
    seen: list[str] = []
    for line in proc.stdout:
        found = LISTENING.search(line)
        if found:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, int(found.group(1))
        seen.append(line)
    proc.wait()
    raise RuntimeError(f"{what} did not start (exit {proc.returncode}):\n{''.join(seen[-30:])}")


def tus_node(directory: Path) -> tuple[subprocess.Popen[str], int]:
    """@tus/server with its file store in `directory`; (process, port)."""
    problem = tus_node_problem()
    if problem is not None:
        raise RuntimeError(f"@tus/server cannot run: {problem}")
    node = shutil.which("node") or "node"
    return start_listening([node, str(NODE_SCRIPT), str(directory), str(JS_DIR)], "@tus/server")


def tuspyserver(directory: Path) -> tuple[subprocess.Popen[str], int]:
    """tuspyserver under uvicorn, storing into `directory`; (process, port)."""
    return start_listening([sys.executable, "-m", "bench.tus_servers", "tuspyserver",
                            str(directory)], "tuspyserver")


def serve_tuspyserver(directory: Path) -> None:
    """Serve tuspyserver's router at /files on a socket bound here to port 0 (so that the port
    is known before uvicorn starts), as its README sets it up."""
    import uvicorn
    from fastapi import FastAPI
    from tuspyserver import create_tus_router

    app = FastAPI()
    app.include_router(create_tus_router(prefix="files", files_dir=str(directory)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(f"listening at 127.0.0.1:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "tuspyserver":
        raise SystemExit("usage: python -m bench.tus_servers tuspyserver DIRECTORY")
    serve_tuspyserver(Path(sys.argv[2]))
