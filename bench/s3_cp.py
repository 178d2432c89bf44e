"""`aws s3 cp` of a large file through the shim, against the same file PUT straight to the
legacy server, and the shim's peak memory meanwhile.

    .venv/bin/python -m bench.s3_cp [--size-mib 1024] [--fsync | --no-fsync]

Everything on 127.0.0.1: the demo whole-file server, `python -m shim` in front of it with an
S3 prefix, the AWS CLI (from the venv, its default 8 MiB parts, 10 at a time, its own config
in a temporary HOME), and for comparison one streamed PUT of the same file to the demo server
(curl -T). The shim's peak RSS is VmHWM of its process. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shim.demo_server import WholeFileServer
from tests.harness import ShimProcess, sha256_of, write_random_file

MIB = 1024 * 1024
KEY_ID, SECRET = "AKIDBENCH", "bench-secret"


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set size so far (Linux: VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return -1.0


def aws_env(home: Path) -> dict[str, str]:
    config = home / "aws-config"
    config.write_text("[default]\nregion = us-east-1\ns3 =\n  addressing_style = path\n")
    return {**os.environ, "HOME": str(home), "AWS_CONFIG_FILE": str(config),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "none"), "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    return time.monotonic() - started, done.returncode, done.stderr[-2000:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        source = write_random_file(work / "big.bin", args.size_mib * MIB)
        expected = sha256_of(source)
        legacy = WholeFileServer(work / "legacy")
        legacy.start()
        config = {"storage": {"fsync": args.fsync}, "s3": {
            "paths": ["/s3/"], "credentials": [{"access_key": KEY_ID, "secret": SECRET}]}}
        shim = ShimProcess.start("python-m-shim", legacy.url, config, work)
        try:
            direct_s, direct_code, _ = timed(["curl", "-sS", "-o", "/dev/null", "-T",
                                              str(source), f"{legacy.url}/direct/big.bin"])
            aws = [sys.executable, "-m", "awscli", "s3", "cp", str(source),
                   "s3://bench/big.bin", "--endpoint-url", f"{shim.url}/s3", "--only-show-errors"]
            shim_s, shim_code, problem = timed(aws, aws_env(work))
            assert shim.pid is not None
            rss = peak_rss_mib(shim.pid)
            received = [r for r in legacy.received if r.path == "/uploads/bench/big.bin"]
            print(json.dumps({
                "size_mib": args.size_mib, "fsync": args.fsync,
                "aws_s3_cp_seconds": round(shim_s, 2), "aws_exit_code": shim_code,
                "direct_put_seconds": round(direct_s, 2), "direct_exit_code": direct_code,
                "ratio_shim_to_direct": round(shim_s / direct_s, 2) if direct_s else None,
                "shim_peak_rss_mib": rss, "deliveries": len(received),
                "byte_exact": len(received) == 1 and received[0].sha256 == expected,
                "aws_stderr": problem.strip()[-500:] or None,
            }))
        finally:
            shim.kill()
            legacy.stop()
    return 0 if shim_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
