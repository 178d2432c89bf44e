"""The README's commands, run as written: read from README.md itself, in a folder laid out
as a fresh clone (`.venv`, `shim/`, `config.example.yaml`), with only the port numbers
changed, since tests listen on ports the OS picks (8080 -> the test's legacy server,
8000 -> port 0, the admin listener -> port 0), and HOME pointed at the test's folder, so that
mitmproxy's CA is not written to the user's home.

Covered here: the `mitmdump` line, the embedded `python -m shim` line, the tuspy snippet, the
resumable client and the operator listing, the curl recipe, and the HTTPS lines. The first
command is run by test_e2e_demo.py, the Docker ones by test_docker_files.py (their CMD); the
test command is what CI runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from shim.demo_server import WholeFileServer
from tests.harness import REPO_ROOT, OutputLog, subprocess_env, write_random_file
from tests.pki import issue, make_ca

README = (REPO_ROOT / "README.md").read_text()
TIMEOUT = 60


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def command(starts: str) -> str:
    """The one README command line that starts with `starts`."""
    [line] = [line for block in blocks("sh") for line in block.splitlines()
              if line.startswith(starts)]
    return line


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A folder that looks like the repo after the README's first command."""
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (tmp_path / "shim").symlink_to(REPO_ROOT / "shim")
    shutil.copy(REPO_ROOT / "config.example.yaml", tmp_path / "config.example.yaml")
    return tmp_path


def env(folder: Path) -> dict[str, str]:
    return {**subprocess_env(), "HOME": str(folder)}


class Running:
    """A README command started in `folder`, until it prints where it listens."""

    def __init__(self, line: str, folder: Path) -> None:
        self.proc = subprocess.Popen(shlex.split(line), cwd=folder, env=env(folder),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.log = OutputLog()
        assert self.proc.stdout is not None
        self.log.drain(self.proc.stdout)
        match = self.log.wait_for(re.compile(r"listening at (?:http://)?127\.0\.0\.1:(\d+)"), 0,
                                  TIMEOUT)
        assert match is not None, self.log.text()
        self.url = f"http://127.0.0.1:{match.group(1)}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def started(clone: Path, legacy: WholeFileServer) -> Iterator[list[Running]]:
    running: list[Running] = []
    yield running
    for shim in running:
        shim.stop()


def with_ports(line: str, legacy: WholeFileServer) -> str:
    return line.replace("http://127.0.0.1:8080", legacy.url).replace(
        "--listen-port 8000", "--listen-port 0")


def run(line: str, folder: Path, shim_url: str,
        scheme: str = "http") -> subprocess.CompletedProcess[str]:
    return subprocess.run(shlex.split(line.replace(f"{scheme}://127.0.0.1:8000", shim_url)),
                          cwd=folder, env=env(folder), capture_output=True, text=True,
                          timeout=TIMEOUT)


def tuspy_snippet(folder: Path, shim_url: str) -> subprocess.CompletedProcess[str]:
    [snippet] = [block for block in blocks("python") if "tusclient" in block]
    script = folder / "snippet.py"
    script.write_text(snippet.replace("http://127.0.0.1:8000", shim_url))
    return subprocess.run([sys.executable, str(script)], cwd=folder, env=env(folder),
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_the_mitmdump_line_runs_a_shim_the_tuspy_snippet_uploads_through(
        clone: Path, legacy: WholeFileServer, started: list[Running]) -> None:
    line = with_ports(command(".venv/bin/mitmdump "), legacy) + " --set shim_admin=127.0.0.1:0"
    shim = Running(line, clone)
    started.append(shim)
    data = write_random_file(clone / "big.iso", 3 * 1024 * 1024).read_bytes()
    result = tuspy_snippet(clone, shim.url)
    assert result.returncode == 0, result.stderr
    [received] = legacy.wait_for(1, TIMEOUT)
    assert received.size == len(data)
    assert (clone / "tus-urls.json").exists()  # the URL store that makes a rerun resume


def test_the_embedded_line_runs_a_shim_the_client_and_the_listing_work(
        clone: Path, legacy: WholeFileServer, started: list[Running]) -> None:
    line = with_ports(command(".venv/bin/python -m shim --upstream http://127.0.0.1:8080 --config"), legacy)
    shim = Running(f"{line} --listen 127.0.0.1:0 --admin 127.0.0.1:0", clone)
    started.append(shim)
    write_random_file(clone / "big.iso", 2 * 1024 * 1024)
    uploaded = run(command(".venv/bin/python -m shim upload big.iso http:"), clone, shim.url)
    assert uploaded.returncode == 0, uploaded.stderr
    assert legacy.wait_for(1, TIMEOUT)[0].size == 2 * 1024 * 1024
    listed = run(command(".venv/bin/python -m shim uploads"), clone, shim.url)
    assert listed.returncode == 0, listed.stderr
    assert "delivered" in listed.stdout.lower(), listed.stdout  # the upload just made
    assert os.path.isdir(clone / "shim-data")  # config.example.yaml's storage.dir, here


def test_the_curl_recipe_sends_only_what_is_missing(
        clone: Path, legacy: WholeFileServer, started: list[Running]) -> None:
    """The README's curl lines, run by bash: with the first MiB already stored (a transfer
    that broke), they ask, send the rest, and the legacy server gets the file once."""
    line = with_ports(command(".venv/bin/python -m shim --upstream http://127.0.0.1:8080 --config"), legacy)
    shim = Running(f"{line} --listen 127.0.0.1:0 --admin 127.0.0.1:0", clone)
    started.append(shim)
    data = write_random_file(clone / "big.iso", 3 * 1024 * 1024).read_bytes()
    url = f"{shim.url}/api/upload/big.iso"
    first = requests.put(url, data=data[:1024 * 1024], timeout=TIMEOUT, headers={
        "Content-Range": f"bytes 0-{1024 * 1024 - 1}/{len(data)}"})
    assert first.status_code == 308, first.text
    [recipe] = [block for block in blocks("sh") if "Content-Range: bytes */" in block]
    done = run_shell(recipe.replace("http://127.0.0.1:8000", shim.url), clone)
    assert done.returncode == 0, done.stderr
    [received] = legacy.wait_for(1, TIMEOUT)
    assert (received.size, received.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert json.loads(done.stdout)["sha256"] == received.sha256  # the legacy server's answer


def run_shell(script: str, folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", script], cwd=folder, env=env(folder),
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_the_https_lines_serve_a_certificate_the_client_trusts_with_cacert(
        clone: Path, legacy: WholeFileServer, started: list[Running]) -> None:
    """`certs='*=shim.pem'` makes the shim present that certificate (for 127.0.0.1, from a
    private CA); the client given the CA with `--cacert` verifies it and uploads; without it
    the client refuses the certificate and nothing reaches the legacy server."""
    ca = make_ca(clone / "pki", "shim-test-ca")
    shutil.copy(ca.cert_pem, clone / "ca.pem")
    shutil.copy(issue(ca, clone / "pki", "shim", ip="127.0.0.1").bundle_pem, clone / "shim.pem")
    line = with_ports(command(".venv/bin/python -m shim --upstream http://127.0.0.1:8080 --set certs"),
                      legacy)
    shim = Running(f"{line} --listen 127.0.0.1:0 --admin 127.0.0.1:0", clone)
    started.append(shim)
    write_random_file(clone / "big.iso", 2 * 1024 * 1024)
    https_url = shim.url.replace("http://", "https://")
    client = command(".venv/bin/python -m shim upload big.iso https:")

    untrusting = run(client.replace(" --cacert ca.pem", ""), clone, https_url, scheme="https")
    assert untrusting.returncode == 1 and "certificate" in untrusting.stderr, untrusting.stderr
    assert legacy.received == []

    uploaded = run(client, clone, https_url, scheme="https")
    assert uploaded.returncode == 0, uploaded.stderr
    [received] = legacy.wait_for(1, TIMEOUT)
    assert received.size == 2 * 1024 * 1024
    assert (clone / ".mitmproxy" / "mitmproxy-ca.pem").is_file()  # mitmproxy's CA, in ~


def test_the_s3_config_and_boto3_snippet_deliver_the_object_once(
        clone: Path, legacy: WholeFileServer, started: list[Running]) -> None:
    """The S3 section's YAML as the config, its boto3 snippet as the client."""
    [yaml_block] = [block for block in blocks("yaml") if block.startswith("s3:")]
    (clone / "s3.yaml").write_text(yaml_block)
    line = with_ports(command(".venv/bin/python -m shim --upstream http://127.0.0.1:8080 --config"),
                      legacy).replace("config.example.yaml", "s3.yaml")
    shim = Running(f"{line} --listen 127.0.0.1:0 --admin 127.0.0.1:0", clone)
    started.append(shim)
    data = write_random_file(clone / "big.iso", 9 * 1024 * 1024).read_bytes()
    [snippet] = [block for block in blocks("python") if "boto3" in block]
    script = clone / "s3_snippet.py"
    script.write_text(snippet.replace("http://127.0.0.1:8000", shim.url))
    done = subprocess.run([sys.executable, str(script)], cwd=clone, env=env(clone),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    [received] = legacy.wait_for(1, TIMEOUT)
    assert (received.method, received.path) == ("PUT", "/uploads/site-photos/jobs/2026/big.iso")
    assert received.sha256 == hashlib.sha256(data).hexdigest()
    assert received.header("Authorization") == "Bearer token-of-the-legacy-server"
