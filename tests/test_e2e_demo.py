"""The README's first command: `python -m shim` with no upstream starts the embedded demo
server, and a tus upload ends up as a whole file in its folder."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tusclient import client

from tests.harness import OutputLog, sha256_of, subprocess_env, wait_until, write_random_file


def test_python_m_shim_alone_runs_the_demo_end_to_end(tmp_path: Path) -> None:
    received = tmp_path / "received"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shim", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
         "--demo-dir", str(received),
         "--confdir", str(tmp_path / "confdir")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=subprocess_env(),
    )
    log = OutputLog()
    assert proc.stdout is not None
    log.drain(proc.stdout)
    try:
        line = log.wait_for(re.compile(r"listening at 127\.0\.0\.1:(\d+)"), 0, 30.0)
        port = int(line.group(1))
        source = write_random_file(tmp_path / "photo.jpg", 3 * 1024 * 1024 + 5)
        uploader = client.TusClient(f"http://127.0.0.1:{port}/files/").uploader(
            str(source), chunk_size=1024 * 1024, metadata={"filename": "photo.jpg"})
        uploader.upload()
        upload_id = str(uploader.url).rsplit("/", 1)[1]
        stored = received / "uploads" / upload_id
        wait_until(stored.exists, 10.0, "the demo server to store the file")
        assert sha256_of(stored) == sha256_of(source)
        assert (tmp_path / "shim-data").is_dir()  # the default storage.dir, relative to cwd
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0, log.text()
