"""Smoke run of bench/perf.py, the one command behind the README's Performance table, so that
it cannot rot: every benchmark runs (tiny sizes), and every figure the issue names is in the
table with its target. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.harness import REPO_ROOT, subprocess_env


def test_perf_runs_every_bench_and_tables_every_figure_with_its_target(tmp_path: Path) -> None:
    out, markdown = tmp_path / "perf.json", tmp_path / "perf.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench.perf", "--quick", "--json", str(out), "--markdown",
         str(markdown)], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
        timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    assert figures == json.loads(done.stdout.strip().splitlines()[-1])
    assert {"ingest", "load", "resources"} <= figures.keys() and figures["quick"] is True
    table = markdown.read_text()
    assert table in done.stdout
    for figure, target in (
            ("shim / mitmproxy, 1 MiB", ">= 0.8"), ("shim / mitmproxy, 8 MiB", ">= 0.8"),
            ("shim / @tus/server, 8 MiB", ">= 1.5"), ("shim / tuspyserver, 8 MiB", ">= 1.5"),
            ("uploads in flight", "p99 < 10"), ("slow uploads", "all"),
            ("shim peak RSS MB", "< 300"), ("HEAD p50 / p99 ms meanwhile", "p99 < 50"),
            ("CPU s per GiB ingested", "<= 1.3"), ("delivery MiB/s", ">= 0.8"),
            ("peak RSS MB: 256 MiB / 2 GiB upload", "< 150 and flat")):
        [line] = [line for line in table.splitlines() if figure in line and target in line]
        assert line.rstrip().endswith(("| yes |", "| **no** |")), line
    for name in ("shim-content-range", "shim-ietf"):
        assert f"{name} MiB/s, 8 MiB chunks" in table
    # The slow uploads all completed and reached the legacy server (the sink) once each.
    slow = figures["load"]["slow_1000"]
    assert slow["completed"] == slow["delivered"] == slow["uploads"] > 0
