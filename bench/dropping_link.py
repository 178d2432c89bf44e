"""Push a file through the shim with `python -m shim upload` over a link that drops every N
bytes, and say how long it took, how many times it was cut and how much was sent again.

    .venv/bin/python -m bench.dropping_link [--size-mib 1024] [--drop-every-mib 50]
        [--protocol tus|ietf|content-range]

Everything on 127.0.0.1: the demo whole-file server, `python -m shim` in front of it, the
cutting proxy from the client tests in front of that, and the client. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shim.demo_server import WholeFileServer
from tests.harness import ShimProcess, sha256_of, write_random_file
from tests.links import CuttingProxy

MIB = 1024 * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--drop-every-mib", type=int, default=50)
    parser.add_argument("--protocol", default="tus", choices=("tus", "ietf", "content-range"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        source = write_random_file(work / "big.bin", args.size_mib * MIB)
        legacy = WholeFileServer(work / "legacy")
        legacy.start()
        shim = ShimProcess.start("python-m-shim", legacy.url,
                                 {"storage": {"fsync": True}}, work)
        proxy = CuttingProxy(int(shim.url.rsplit(":", 1)[1]), args.drop_every_mib * MIB)
        target = f"{proxy.url}/files/" if args.protocol == "tus" else f"{proxy.url}/in/big.bin"
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "shim", "upload", str(source), target, "--protocol",
             args.protocol, "--state", str(work / "state.json"), "-q"],
            capture_output=True, text=True, check=False)
        elapsed = time.monotonic() - started
        received = legacy.wait_for(1, 120)
        expected = sha256_of(source)
        print(json.dumps({
            "protocol": args.protocol, "size_mib": args.size_mib,
            "drop_every_mib": args.drop_every_mib, "exit_code": done.returncode,
            "seconds": round(elapsed, 1), "cuts": proxy.cuts,
            "sent_mib": round(proxy.carried / MIB, 1),
            "sent_again_mib": round((proxy.carried - source.stat().st_size) / MIB, 1),
            "deliveries": len(received),
            "byte_exact": bool(received) and received[0].sha256 == expected,
        }))
        proxy.stop()
        shim.kill()
        legacy.stop()
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
