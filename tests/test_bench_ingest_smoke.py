"""Smoke run of bench/ingest.py --quick with every target, so that the benchmark cannot rot.

No timing is asserted: only that every target is measured at the chunk sizes it is meant for,
that each figure and ratio is a positive number, and that the shim targets' uploads reached the
sink whole.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.ingest import PROTOCOL_CHUNK_MIB, PROTOCOL_TARGETS, TARGETS
from bench.tus_servers import tus_node_problem
from tests.harness import REPO_ROOT, in_ci, subprocess_env

QUICK_SIZE_MIB = 8
QUICK_CHUNKS = ["1", "8"]


def test_ingest_bench_quick_measures_every_target(tmp_path: Path) -> None:
    """The sink, mitmproxy, the shim (fsync on and off, tus), @tus/server, tuspyserver and the
    shim's Content-Range and IETF protocols each get a positive MiB/s figure, their ratios are
    printed and written as JSON, and every shim upload was delivered to the sink."""
    problem = tus_node_problem()
    if problem is not None and in_ci():
        pytest.fail(f"@tus/server cannot run under CI: {problem}", pytrace=False)
    targets = [name for name in TARGETS if problem is None or name != "@tus/server"]
    out = tmp_path / "ingest.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.ingest", "--quick", "--targets", *targets,
         "--json", str(out)],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180,
        check=False)
    assert done.returncode == 0, done.stdout + done.stderr

    result = json.loads(out.read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == result
    assert (result["size_mib"], result["repeat"]) == (QUICK_SIZE_MIB, 1)
    figures = result["mib_per_s"]
    assert list(figures) == QUICK_CHUNKS
    for chunk_mib, row in figures.items():
        expected = [name for name in targets
                    if name not in PROTOCOL_TARGETS or chunk_mib == str(PROTOCOL_CHUNK_MIB)]
        assert list(row) == expected, chunk_mib
        assert all(isinstance(speed, float) and speed > 0 for speed in row.values()), row

        ratios = result["ratios"][chunk_mib]
        assert set(ratios["mitmproxy"]) == set(expected) - {"mitmproxy"}
        for server in ("@tus/server", "tuspyserver"):
            if server in expected:
                assert set(ratios[server]) == {"shim", "shim-nofsync"}
        for by_name in ratios.values():
            assert all(isinstance(ratio, float) and ratio > 0 for ratio in by_name.values())

    # each shim upload is one delivery of the whole upload (8 MiB), per chunk size it ran at
    assert result["delivered_mib"] == {
        "shim": QUICK_SIZE_MIB * len(QUICK_CHUNKS),
        "shim-nofsync": QUICK_SIZE_MIB * len(QUICK_CHUNKS),
        "shim-content-range": QUICK_SIZE_MIB,
        "shim-ietf": QUICK_SIZE_MIB,
    }
    assert "| shim / @tus/server |" in done.stdout or problem is not None, done.stdout
    assert "| shim / tuspyserver |" in done.stdout, done.stdout
    if problem is not None:
        pytest.skip(f"measured every target but @tus/server: {problem}")
