"""Start-up errors of `python -m shim`: each is one line naming what is wrong, exit code 2,
and nothing is served. Real processes on 127.0.0.1, ports chosen by the OS."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import yaml

from shim.demo_server import WholeFileServer
from tests.harness import ShimLauncher, subprocess_env

TIMEOUT = 60


def start(tmp_path: Path, legacy: WholeFileServer, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m shim` in front of `legacy`, until it exits."""
    return subprocess.run(
        [sys.executable, "-m", "shim", "--upstream", legacy.url, "--confdir",
         str(tmp_path / "confdir"), *args],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)


def config_file(tmp_path: Path, config: dict[str, object]) -> str:
    path = tmp_path / "shim.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def refused(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_a_second_shim_on_the_same_storage_folder_refuses_to_start(
        shim: ShimLauncher, legacy: WholeFileServer, tmp_path: Path) -> None:
    first = shim({"storage": {"dir": str(tmp_path / "shared")}}, kind="python-m-shim")
    assert first.pid is not None
    second = start(tmp_path, legacy, "--listen", "127.0.0.1:0",
                   "--config", config_file(tmp_path, {"storage": {"dir": str(tmp_path / "shared")}}))
    [line] = refused(second)
    assert "storage.dir" in line and "in use by another shim" in line and str(first.pid) in line


def test_an_unusable_storage_folder_is_one_line(tmp_path: Path, legacy: WholeFileServer) -> None:
    occupied = tmp_path / "a-file"
    occupied.write_text("not a folder")
    result = start(tmp_path, legacy, "--listen", "127.0.0.1:0",
                   "--config", config_file(tmp_path, {"storage": {"dir": str(occupied)}}))
    [line] = refused(result)
    assert "storage.dir" in line and str(occupied) in line


def test_a_busy_port_is_one_line(tmp_path: Path, legacy: WholeFileServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = start(tmp_path, legacy, "--listen", f"127.0.0.1:{port}")
    [line] = refused(result)
    assert f"127.0.0.1:{port}" in line and "in use" in line


def test_every_config_error_is_named_at_once(tmp_path: Path, legacy: WholeFileServer) -> None:
    result = start(tmp_path, legacy, "--listen", "127.0.0.1:0", "--config", config_file(
        tmp_path, {"tus": {"endpoint": "files"}, "limits": {"header_bytes": -1}, "bogus": 1}))
    text = "\n".join(refused(result))
    for key in ("tus.endpoint", "limits.header_bytes", "bogus"):
        assert key in text, text

