"""Issue 13, end to end: three shim processes share one Redis (a real redis-server of the
test's own) and one folder, behind a round-robin TCP balancer (tests/balancer.py), so each new
connection of a client lands on the next instance. Real clients upload through the balancer,
their connections cut several times; the legacy server (tests/legacy_servers.py) counts what
it got. Every upload must arrive once, byte-exact, whatever instance served which request.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
import yaml
from tusclient import client as tus_client

from tests.balancer import RoundRobinBalancer
from tests.harness import REPO_ROOT, ShimLauncher, in_ci, wait_until
from tests.legacy_servers import LegacyServer
from tests.links import CuttingProxy
from tests.redis_server import RedisServer
from tests.scale_out import KIB, MIB, TIMEOUT, Cluster, accepted_once, shared_config

README = REPO_ROOT / "README.md"
NGINX_CONF = REPO_ROOT / "docker" / "nginx-scale.conf"


def tuspy_upload(url: str, data_file: Path, chunk: int, name: str) -> str:
    """Upload with tuspy (retrying on every error, as its users configure it on a bad link);
    the upload URL."""
    tus = tus_client.TusClient(f"{url}/files/")
    uploader = tus.uploader(file_path=str(data_file), chunk_size=chunk, retries=30,
                            retry_delay=0.2, metadata={"filename": name})
    uploader.upload()
    return str(uploader.url)


def test_tuspy_upload_cut_across_three_instances_arrives_once(
        cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    """A tus upload through a link cut every 300 KiB: each reconnection lands on the next
    instance, which finds the upload in Redis and its bytes in the shared folder."""
    group = cluster()
    data = os.urandom(3 * MIB + 123)
    source = tmp_path / "cut.bin"
    source.write_bytes(data)
    link = CuttingProxy(group.balancer.port, cut_every=300 * KIB)
    try:
        tuspy_upload(link.url, source, 512 * KIB, "cut.bin")
    finally:
        link.stop()
    assert link.cuts >= 5
    assert group.served_by() == {0, 1, 2}
    accepted_once(group.legacy, "/uploads/cut.bin", data)


def test_an_upload_created_at_one_instance_is_seen_and_finished_at_another(
        cluster: Callable[..., Cluster]) -> None:
    """Creation at instance 0, HEAD at 1, the rest at 2, each straight to the instance."""
    group = cluster()
    data = os.urandom(200 * KIB)
    head = {"Tus-Resumable": "1.0.0"}
    first, second, third = (s.url for s in group.shims)
    created = requests.post(f"{first}/files/", headers={
        **head, "Upload-Length": str(len(data)),
        "Upload-Metadata": "filename " + base64.b64encode(b"seen.bin").decode()},
        timeout=TIMEOUT)
    assert created.status_code == 201, created.text
    path = "/files/" + created.headers["Location"].rsplit("/files/", 1)[1]
    sent = requests.patch(f"{first}{path}", data=data[:50 * KIB], headers={
        **head, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
        timeout=TIMEOUT)
    assert sent.status_code == 204, sent.text
    seen = requests.head(f"{second}{path}", headers=head, timeout=TIMEOUT)
    assert seen.headers["Upload-Offset"] == str(50 * KIB)
    done = requests.patch(f"{third}{path}", data=data[50 * KIB:], headers={
        **head, "Upload-Offset": str(50 * KIB), "Content-Type": "application/offset+octet-stream"},
        timeout=TIMEOUT)
    assert done.status_code == 204, done.text
    accepted_once(group.legacy, "/uploads/seen.bin", data)
    wait_until(lambda: requests.head(f"{first}{path}", headers=head,
                                     timeout=TIMEOUT).status_code in (404, 410, 200),
               TIMEOUT, "the upload's end seen at the first instance")


def test_the_readme_config_for_several_instances_serves_a_cut_upload(
        shim: ShimLauncher, recording_legacy: LegacyServer, redis_server: RedisServer,
        tmp_path: Path) -> None:
    """The README's `storage:` block for several instances, as written but for where Redis
    and the shared folder are: two instances started with it share a tus upload whose
    connection is cut between them."""
    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.DOTALL)
               if "backend: redis" in b]
    config = yaml.safe_load(block)
    assert set(config["storage"]) == {"backend", "redis_url", "dir", "lease_ttl"}
    config["storage"].update(redis_url=redis_server.url, dir=str(tmp_path / "shared"))
    config["tus"] = {"forward": {"path": "/uploads/{filename}"}}
    shims = [shim(config, upstream_url=recording_legacy.url) for _ in range(2)]
    data = os.urandom(MIB + 7)
    source = tmp_path / "readme.bin"
    source.write_bytes(data)
    with RoundRobinBalancer([("127.0.0.1", s.port) for s in shims]) as balancer:
        link = CuttingProxy(balancer.port, cut_every=300 * KIB)
        try:
            tuspy_upload(link.url, source, 256 * KIB, "readme.bin")
        finally:
            link.stop()
        assert link.cuts >= 3
        assert {i for i in balancer.connections if i is not None} == {0, 1}
    accepted_once(recording_legacy, "/uploads/readme.bin", data)


# --- nginx, with the compose file's own config ------------------------------------------------


class Nginx:
    """nginx run with docker/nginx-scale.conf, changed only where Docker is not here: the
    upstream servers are the given instances on 127.0.0.1, it listens on 127.0.0.1 and a
    free port, and its pid, logs and temporary files are in `folder`."""

    def __init__(self, folder: Path, backends: list[int]) -> None:
        binary = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
        if binary is None:
            if in_ci():
                pytest.fail(".ci/run installs nginx", pytrace=False)
            pytest.skip("nginx is not installed")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        text = NGINX_CONF.read_text()
        servers = iter(backends)
        text, replaced = re.subn(r"(?m)^(\s*server\s+)[\w.-]+:\d+[^;]*;",
                                 lambda m: f"{m.group(1)}127.0.0.1:{next(servers)};", text)
        assert replaced == len(backends)
        text = re.sub(r"(?m)^\s*(resolver|zone)\s[^;]*;", "", text)  # Docker's DNS only
        text = text.replace("listen 8000;", f"listen 127.0.0.1:{self.port};")
        temp = "".join(f"    {name}_temp_path {folder / name};\n"
                       for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        text = text.replace("http {\n", "http {\n" + temp, 1)
        text = text.replace("access_log /dev/stdout;", f"access_log {folder / 'access.log'};")
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "nginx.conf"
        conf.write_text(text)
        self.proc = subprocess.Popen(
            [binary, "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(conf),
             "-g", f"daemon off; pid {folder / 'nginx.pid'};"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._listening, TIMEOUT, "nginx listening")

    def _listening(self) -> bool:
        assert self.proc.poll() is None, "nginx exited"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
            return True
        return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_nginx_with_the_compose_config_spreads_a_cut_upload_over_the_instances(
        cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    """docker/nginx-scale.conf in front of three instances (round robin, bodies streamed): a
    tuspy upload through a link cut every 300 KiB reaches the legacy server once, whole, and
    every instance served part of it."""
    group = cluster()
    nginx = Nginx(tmp_path / "nginx", [s.port for s in group.shims])
    data = os.urandom(2 * MIB + 5)
    source = tmp_path / "nginx.bin"
    source.write_bytes(data)
    try:
        link = CuttingProxy(nginx.port, cut_every=300 * KIB)
        try:
            tuspy_upload(link.url, source, 256 * KIB, "nginx.bin")
        finally:
            link.stop()
    finally:
        nginx.close()
    assert link.cuts >= 5
    served = [s for s in group.shims if "] client connect" in s.output()]  # from nginx
    assert len(served) == 3, [s.output()[-2000:] for s in group.shims]
    accepted_once(group.legacy, "/uploads/nginx.bin", data)


def test_an_instance_started_before_redis_waits_says_why_and_then_serves(
        shim: ShimLauncher, recording_legacy: LegacyServer, redis_server: RedisServer,
        tmp_path: Path) -> None:
    """Redis is not up yet (a compose file starting everything at once): the instance
    listens, /readyz says the store cannot be reached, and once Redis is up it recovers,
    becomes ready and takes an upload."""
    redis_server.stop()
    config = shared_config(redis_server, tmp_path / "shared")
    proc = shim(config, upstream_url=recording_legacy.url)
    admin = proc.wait_for_output(r"admin \(/healthz, /readyz, /metrics\) at (http://\S+)").group(1)
    proc.wait_for_output(r"the store cannot be reached", TIMEOUT)
    waiting = requests.get(f"{admin}/readyz", timeout=TIMEOUT)
    assert waiting.status_code == 503 and "the store cannot be reached" in waiting.text
    redis_server.start()
    wait_until(lambda: requests.get(f"{admin}/readyz", timeout=TIMEOUT).status_code == 200,
               TIMEOUT, "/readyz answering 200 once Redis is up")
    data = os.urandom(100 * KIB)
    source = tmp_path / "late-redis.bin"
    source.write_bytes(data)
    tuspy_upload(proc.url, source, 64 * KIB, "late-redis.bin")
    accepted_once(recording_legacy, "/uploads/late-redis.bin", data)
