"""Benchmark: one large tus upload through a real mitmdump shim, cut off on the way.

Measures what issue 2 names: the shim's peak resident memory (VmHWM from /proc) while a
large file goes through it, the throughput, and that the legacy server got the file once,
byte-exact. Everything runs on 127.0.0.1; the legacy server is `python -m shim.demo_server`.

    .venv/bin/python bench/tus_bench.py --size-mib 1024 --chunk-mib 8 --cuts 2
    .venv/bin/python bench/tus_bench.py --size-mib 50 --chunk-mib 1 --cuts 2 --client tuspy
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import ShimProcess, write_random_file

TUS = {"Tus-Resumable": "1.0.0"}
MIB = 1024 * 1024


def start_legacy(directory: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "shim.demo_server", "--dir", str(directory), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
    if not match:
        raise RuntimeError(f"demo server did not start: {line!r}")
    return proc, match.group(1)


def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match
    return int(match.group(1))


def request(port: int, method: str, path: str, headers: dict[str, str]) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    response.read()
    return response


def offset_of(port: int, path: str) -> int:
    return int(request(port, "HEAD", path, TUS).headers["Upload-Offset"])


def wait_for_offset(port: int, path: str, expected: int, timeout: float = 30.0) -> int:
    """The shim notices the vanished client when the closed socket reaches it; poll till then."""
    deadline = time.monotonic() + timeout
    while (offset := offset_of(port, path)) < expected and time.monotonic() < deadline:
        time.sleep(0.005)
    if offset != expected:
        raise AssertionError(f"the shim kept {offset} bytes of the {expected} sent")
    return offset


def patch(port: int, path: str, file: Path, offset: int, size: int) -> http.client.HTTPResponse:
    """One PATCH whose body is streamed from the file, 1 MiB at a time."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.blocksize = MIB
    with open(file, "rb") as source:
        source.seek(offset)
        conn.putrequest("PATCH", path)
        for name, value in {**TUS, "Upload-Offset": str(offset), "Content-Length": str(size),
                            "Content-Type": "application/offset+octet-stream"}.items():
            conn.putheader(name, value)
        conn.endheaders()
        remaining = size
        while remaining:
            piece = source.read(min(MIB, remaining))
            conn.send(piece)
            remaining -= len(piece)
    response = conn.getresponse()
    response.read()
    return response


def cut_off(port: int, path: str, file: Path, offset: int, send: int, announce: int) -> None:
    """A client that announces `announce` bytes, sends `send` of them, and vanishes."""
    head = (f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
            f"Upload-Offset: {offset}\r\nContent-Type: application/offset+octet-stream\r\n"
            f"Content-Length: {announce}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port)) as sock, open(file, "rb") as source:
        source.seek(offset)
        sock.sendall(head)
        remaining = send
        while remaining:
            piece = source.read(min(MIB, remaining))
            sock.sendall(piece)
            remaining -= len(piece)


def upload_raw(port: int, file: Path, size: int, chunk: int, cuts: int) -> str:
    created = request(port, "POST", "/files/", {**TUS, "Upload-Length": str(size)})
    assert created.status == 201, created.status
    path = created.headers["Location"]
    cut_points = [size * (k + 1) // (cuts + 1) for k in range(cuts)]
    offset = 0
    while offset < size:
        if cut_points and offset + chunk > cut_points[0]:
            point = cut_points.pop(0)
            cut_off(port, path, file, offset, point - offset, min(chunk, size - offset) + chunk)
            offset = wait_for_offset(port, path, point)
            print(f"  cut off; the shim kept {offset} bytes (sent up to {point})", flush=True)
            continue
        length = min(chunk, size - offset)
        response = patch(port, path, file, offset, length)
        assert response.status == 204, (response.status, response.read())
        offset = int(response.headers["Upload-Offset"])
    return path


def upload_tuspy(port: int, file: Path, size: int, chunk: int, cuts: int) -> str:
    from tusclient import client

    uploader = client.TusClient(f"http://127.0.0.1:{port}/files/").uploader(str(file), chunk_size=chunk)
    uploader.set_url(uploader.create_url())
    url = str(uploader.url)
    path = "/" + url.split("/", 3)[3]
    cut_points = [size * (k + 1) // (cuts + 1) for k in range(cuts)]
    for point in cut_points:  # tuspy until just before the cut, then a client that vanishes
        uploader.stop_at = max(uploader.offset, point - point % chunk)
        uploader.upload(stop_at=uploader.stop_at)
        cut_off(port, path, file, uploader.offset, (point - uploader.offset) or 1, chunk)
        wait_for_offset(port, path, max(point, uploader.offset + 1))
        uploader = client.TusClient(f"http://127.0.0.1:{port}/files/").uploader(
            str(file), chunk_size=chunk, url=url)
        print(f"  cut off; tuspy resumes at {uploader.get_offset()}", flush=True)
    uploader.upload()
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--chunk-mib", type=int, default=8)
    parser.add_argument("--cuts", type=int, default=2)
    parser.add_argument("--client", choices=["raw", "tuspy"], default="raw")
    parser.add_argument("--no-fsync", action="store_true")
    args = parser.parse_args()
    size, chunk = args.size_mib * MIB, args.chunk_mib * MIB
    with tempfile.TemporaryDirectory(prefix="shim-bench-") as tmp:
        work = Path(tmp)
        file = write_random_file(work / "payload.bin", size)
        digest = hashlib.sha256(file.read_bytes() if size <= 64 * MIB else b"").hexdigest()
        if size > 64 * MIB:
            digest = _sha256(file)
        legacy, legacy_url = start_legacy(work / "legacy")
        config = {"storage": {"dir": str(work / "store"), "fsync": not args.no_fsync}}
        try:
            shim = ShimProcess.start("mitmdump", legacy_url, config, work,
                                     extra_args=["--set", "flow_detail=0"])
        except Exception:
            legacy.terminate()
            raise
        try:
            idle = peak_rss_kib(shim.pid or 0)
            started = time.monotonic()
            upload = upload_raw if args.client == "raw" else upload_tuspy
            path = upload(shim.port, file, size, chunk, args.cuts)
            elapsed = time.monotonic() - started
            peak = peak_rss_kib(shim.pid or 0)
        finally:
            shim.stop()
            legacy.terminate()
            legacy.wait()
        received = work / "legacy" / "uploads" / path.rsplit("/", 1)[1]
        result = {
            "client": args.client, "size_mib": args.size_mib, "chunk_mib": args.chunk_mib,
            "cuts": args.cuts, "fsync": not args.no_fsync, "seconds": round(elapsed, 2),
            "mib_per_s": round(args.size_mib / elapsed, 1), "shim_idle_peak_rss_mib": round(idle / 1024, 1),
            "shim_peak_rss_mib": round(peak / 1024, 1),
            "delivered_byte_exact": received.exists() and _sha256(received) == digest,
            "legacy_files": sum(1 for p in (work / "legacy").rglob("*") if p.is_file()),
        }
    print(json.dumps(result), flush=True)
    return 0 if result["delivered_byte_exact"] and result["legacy_files"] == 1 else 1


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        while piece := file.read(MIB):
            hasher.update(piece)
    return hasher.hexdigest()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
