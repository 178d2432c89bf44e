"""Smoke run of bench/scale.py --quick, so that the benchmark cannot rot.

No timing is asserted: only that each setup (one local shim, one and three on Redis) gets a
positive figure, the ratios are printed and written as JSON, and the sink got every upload of
every setup exactly once, whole.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.scale import SETUPS
from tests.harness import REPO_ROOT, subprocess_env

QUICK = {"clients": 2, "size_mib": 4, "chunk_mib": 1, "repeat": 1}


def test_scale_bench_quick_measures_one_and_three_instances(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--quick", "--json", str(out)],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180,
        check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == figures
    assert {key: figures[key] for key in QUICK} == QUICK
    assert set(figures["mib_per_s"]) == set(SETUPS)
    assert all(isinstance(v, float) and v > 0 for v in figures["mib_per_s"].values())
    assert set(figures["ratios"]) == {"redis-3 / redis-1", "redis-3 / local-1", "redis-1 / local-1"}
    assert all(v > 0 for v in figures["ratios"].values())
    each_setup = QUICK["clients"] * QUICK["size_mib"] * QUICK["repeat"]
    assert figures["delivered_mib"] == {setup: float(each_setup) for setup in SETUPS}
    assert "redis-3 / redis-1" in done.stdout
