"""Smoke run of bench/loop_stall.py with a tiny store, so that the benchmark cannot rot.

No timing is asserted: only that it runs, does what each phase says, and reports numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.harness import REPO_ROOT, subprocess_env

BENCH = REPO_ROOT / "bench" / "loop_stall.py"


def test_loop_stall_bench_runs_and_reports_every_phase(tmp_path: Path) -> None:
    """Someone rerunning the loop-stall benchmark gets the longest stall of every phase,
    printed and as JSON, after the sweep removed every expired upload and the REPORT-like
    lookup listed exactly the live uploads of the folder."""
    out = tmp_path / "stall.json"
    args = ["--uploads", "300", "--expired", "0.4", "--linked", "60", "--heads", "40",
            "--reports", "2", "--idle", "0.05", "--seed", "3", "--json", str(out)]
    done = subprocess.run([sys.executable, str(BENCH), *args], cwd=REPO_ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr

    figures = json.loads(out.read_text())
    phases = figures["phases"]
    assert list(phases) == ["idle", "build", "sweep", "report", "head"]
    for name, phase in phases.items():
        for figure in ("max_stall_ms", "control_ms", "unexplained_ms", "seconds"):
            assert isinstance(phase[figure], float) and phase[figure] >= 0, (name, figure)
        assert phase["unexplained_ms"] <= phase["max_stall_ms"], name
    assert figures["uploads"] == 300 and 0 < figures["expired"] < 300
    assert phases["build"]["operations"] == 300 + 60
    assert phases["sweep"]["removed"] == phases["sweep"]["expected"] == figures["expired"]
    assert phases["report"]["listed"] == phases["report"]["expected"] == figures["linked_live"]
    assert 0 < figures["linked_live"] < 60
    assert phases["head"]["operations"] == 40
    assert figures["max_stall_ms"] == max(phases[p]["max_stall_ms"] for p in ("sweep", "report", "head"))
    assert figures["max_unexplained_ms"] <= figures["max_stall_ms"]
    assert isinstance(figures["ok"], bool) and isinstance(figures["ok_without_machine_noise"], bool)
    for name in phases:
        assert f"{name}: " in done.stdout, done.stdout
    assert "longest stall in sweep, report and head" in done.stdout, done.stdout


def test_dropping_link_bench_delivers_once_and_reports_the_cuts() -> None:
    """bench/dropping_link.py, small: the client is cut several times, the file arrives once,
    byte-exact, and less than twice the file went over the link."""
    done = subprocess.run(
        # drops farther apart than the client's 8 MiB chunks, or no checksummed chunk gets through
        [sys.executable, "-m", "bench.dropping_link", "--size-mib", "24", "--drop-every-mib", "9"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180,
        check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["exit_code"] == 0 and figures["deliveries"] == 1 and figures["byte_exact"]
    assert figures["cuts"] >= 2 and 24 <= figures["sent_mib"] < 48


def test_s3_cp_bench_delivers_once_and_reports_time_and_memory() -> None:
    """bench/s3_cp.py, small: `aws s3 cp` in parts through the shim and the direct PUT both
    finish; the object arrives once, byte-exact; the figures are numbers."""
    done = subprocess.run([sys.executable, "-m", "bench.s3_cp", "--size-mib", "20", "--no-fsync"],
                          cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=180, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["aws_exit_code"] == 0 and figures["direct_exit_code"] == 0
    assert figures["deliveries"] == 1 and figures["byte_exact"]
    assert figures["aws_s3_cp_seconds"] > 0 and figures["shim_peak_rss_mib"] > 0
