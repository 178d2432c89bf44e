"""Smoke run of bench/scale_attack.py --quick, so that the attack cannot rot: uploads through
a dropping link across three instances on one Redis, one instance SIGKILLed and restarted
meanwhile; every file reaches the legacy server exactly once, whole. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.harness import REPO_ROOT, subprocess_env


def test_scale_attack_quick_delivers_every_file_once(tmp_path: Path) -> None:
    out = tmp_path / "attack.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.scale_attack", "--quick", "--json", str(out)],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=240,
        check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == figures
    assert figures["uploads"] == 4
    assert (figures["whole_once"], figures["duplicates"], figures["lost"],
            figures["corrupt"]) == (4, 0, 0, 0)
    assert figures["cuts"] > 0 and figures["kills"] >= 1
    assert sum(figures["connections_per_instance"].values()) > figures["cuts"]
