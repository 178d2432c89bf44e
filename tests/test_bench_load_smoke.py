"""Smoke run of bench/load.py (`--quick`), so that the benchmark cannot rot.

No timing is asserted: only that every phase ran, every upload completed and reached the
legacy server once, and the figures are positive numbers, printed and as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.harness import REPO_ROOT, subprocess_env


def positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def test_load_bench_completes_every_upload_and_reports_latency_and_memory(tmp_path: Path) -> None:
    """bench.load --quick: HEADs on an idle shim, HEADs while throttled uploads are in flight,
    and concurrent slow uploads that all complete (answered and delivered), with throughput,
    the shim's peak RSS and the HEAD latency meanwhile."""
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, "-m", "bench.load", "--quick", "--json", str(out)],
                          cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == figures
    assert list(figures) == ["idle", "with_200_uploads", "slow_1000"]

    idle, busy, slow = figures["idle"], figures["with_200_uploads"], figures["slow_1000"]
    for phase in (idle, busy):
        assert positive(phase["p50_ms"]) and positive(phase["p99_ms"]), phase
        assert phase["p50_ms"] <= phase["p99_ms"] and phase["count"] > 0, phase
        assert phase["problems"] == {}, phase
    assert idle["count"] == 200
    assert busy["completed"] == busy["delivered"] == busy["uploads"] == 20, busy

    assert slow["completed"] == slow["delivered"] == slow["uploads"] == 50, slow
    assert slow["outcomes"] == {"completed": 50}, slow
    for figure in ("seconds", "aggregate_mib_per_s", "peak_rss_mb", "head_p50_ms", "head_p99_ms"):
        assert positive(slow[figure]), (figure, slow)
    assert slow["head_p50_ms"] <= slow["head_p99_ms"] and slow["head_count"] > 0, slow
    assert slow["shim_running"], slow
    assert "concurrent slow uploads" in done.stdout and "HEAD latency" in done.stdout
