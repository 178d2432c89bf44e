"""Smoke run of bench/resources.py with tiny sizes, so that the benchmark cannot rot.

No timing or memory threshold is asserted: only that it runs, reports every figure as a
positive number (a CPU split of a tiny run may be zero: /proc counts in clock ticks), and
that the sink got each upload exactly once, whole.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.harness import REPO_ROOT, subprocess_env

TICK_PROOF = {"shim_s_per_gib", "mitmproxy_s_per_gib", "ratio", "shim_nofsync_s_per_gib",
              "mitmproxy_mib_per_s"}
"""CPU figures of whole ingest runs, many clock ticks long even in a quick run; the delivery's
and the system-time splits of a tiny run may round to no tick at all."""


def test_resources_bench_reports_cpu_delivery_and_memory(tmp_path: Path) -> None:
    """`python -m bench.resources --quick`: CPU per GiB of the shim and of mitmproxy, delivery
    speed of the shim and of a raw socket copy, the shim's peak RSS for each upload, printed
    and as JSON; every request reached the sink once with its byte count."""
    out = tmp_path / "resources.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.resources", "--quick", "--json", str(out)],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180,
        check=False)
    assert done.returncode == 0, done.stdout + done.stderr

    figures = json.loads(out.read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == figures
    assert figures["quick"] is True and figures["repeat"] == 1
    required = {
        "cpu": {"shim_s_per_gib", "mitmproxy_s_per_gib", "ratio", "shim_delivery_s_per_gib"},
        "delivery": {"shim_mib_per_s", "raw_copy_mib_per_s", "ratio"},
        "rss_mb": {"idle", "upload_256mib", "upload_2gib", "passthrough_put_1gib"},
    }
    for section, keys in required.items():
        assert keys <= set(figures[section]), (section, figures[section])
        for key, value in figures[section].items():
            assert isinstance(value, float) and value >= 0, (section, key, value)
            if section != "cpu" or key in TICK_PROOF:
                assert value > 0, (section, key, value)
    assert all(isinstance(ok, bool) for ok in figures["targets"].values())

    received = figures["received"]
    uploads = ["cpu_upload_1", "cpu_upload_1_nofsync", "upload_256mib", "upload_2gib", "passthrough_put_1gib",
               "raw_copy_sendfile_0", "raw_copy_loop_0"]
    assert set(uploads) | {"mitmproxy_chunks"} == set(received)
    sizes = figures["sizes_mib"]
    expected_mib = {"cpu_upload_1": sizes["cpu"], "cpu_upload_1_nofsync": sizes["cpu"],
                    "upload_256mib": sizes["small"],
                    "upload_2gib": sizes["big"], "passthrough_put_1gib": sizes["passthrough"],
                    "raw_copy_sendfile_0": sizes["delivery"], "raw_copy_loop_0": sizes["delivery"]}
    for name in uploads:
        assert received[name]["requests"] == received[name]["expected_requests"] == 1, name
        assert received[name]["bytes"] == expected_mib[name] * 1024 * 1024, name
    chunks = received["mitmproxy_chunks"]
    assert chunks["requests"] == chunks["expected_requests"] > 0
    assert chunks["bytes"] == chunks["expected_bytes"] == sizes["cpu"] * 1024 * 1024

    for line in ("CPU s per GiB ingested", "Delivery MiB/s from disk", "Peak RSS MB"):
        assert line in done.stdout, done.stdout
