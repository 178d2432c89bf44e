"""A plain PUT that no protocol claims streams through the shim at constant memory.

Before issue 9 mitmproxy buffered such a body whole: a 300 MiB PUT raised the shim's RSS
from 83 to 585 MB. The shim's peak RSS (VmHWM, which only grows) is read from /proc before
and after, and the legacy server must get the whole body, byte for byte (its SHA-256).
"""

from __future__ import annotations

import hashlib
import http.client
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.harness import ShimLauncher
from tests.legacy_servers import LegacyServer

MIB = 1024 * 1024
SIZE = 300 * MIB
ALLOWED_GROWTH = 64 * MIB
"""Far below the 500 MB a buffered body costs; above what mitmproxy's own buffers take."""


def peak_rss(pid: int) -> int:
    """VmHWM of a process, in bytes: the highest resident set it has had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def body() -> Iterator[bytes]:
    block = bytes(range(256)) * 4096  # 1 MiB, not all zeros
    for index in range(SIZE // MIB):
        yield block[index % 256:] + block[:index % 256]


def expected_sha256() -> str:
    digest = hashlib.sha256()
    for chunk in body():
        digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_a_300_mib_pass_through_put_keeps_the_shims_memory_flat(
        shim: ShimLauncher, recording_legacy: LegacyServer) -> None:
    proc = shim(upstream_url=recording_legacy.url)
    assert proc.pid is not None
    before = peak_rss(proc.pid)

    parts = urlsplit(proc.url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)
    conn.request("PUT", "/plain/big.bin", body=body(),
                 headers={"Content-Length": str(SIZE), "Content-Type": "application/octet-stream"})
    response = conn.getresponse()
    response.read()
    conn.close()
    after = peak_rss(proc.pid)

    assert response.status < 300, response.status
    [received] = recording_legacy.received
    assert (received.method, received.path, received.size) == ("PUT", "/plain/big.bin", SIZE)
    assert received.sha256 == expected_sha256()
    print(f"shim peak RSS: {before / MIB:.0f} MiB before, {after / MIB:.0f} MiB after a "
          f"{SIZE // MIB} MiB pass-through PUT")
    assert after - before < ALLOWED_GROWTH, (before, after)
