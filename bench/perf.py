"""Every performance figure of issue 12 from one run, with each target checked (one command).

    .venv/bin/python -m bench.perf [--quick] [--json FILE] [--markdown FILE]

Runs the three benchmarks one after another, each in its own process, so that none disturbs
another's figures, and assembles what they print:
- `bench.ingest`: ingest MiB/s at 1, 8 and 64 MiB tus PATCH chunks for a discarding sink,
  mitmproxy pass-through, the shim (fsync on and off), @tus/server and tuspyserver; the
  shim's Content-Range and IETF protocols at 8 MiB;
- `bench.load`: HEAD latency idle and with 200 throttled uploads in flight; 1,000 concurrent
  slow uploads (64 KiB/s each) with their completions, aggregate MiB/s, peak RSS and HEAD
  latency meanwhile;
- `bench.resources`: CPU seconds per GiB ingested against mitmproxy pass-through's; delivery
  MiB/s against a raw sendfile copy; peak RSS for 256 MiB and 2 GiB uploads and a 1 GiB
  pass-through PUT.
Prints one Markdown table of every figure with its target (the README's "Performance" section
shows the last one), and writes the figures as JSON. About 6 minutes on 2 cores; `--quick`
(tiny sizes, one repetition, about 40 s) is the smoke test's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.ingest import write_figures

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ("ingest", "load", "resources")
CHUNKS = ("1", "8", "64")

Figures = dict[str, Any]


def run_bench(name: str, quick: bool, folder: Path) -> Figures:
    """One benchmark in its own process; its JSON."""
    out = folder / f"{name}.json"
    command = [sys.executable, "-m", f"bench.{name}", "--json", str(out),
               *(["--quick"] if quick else [])]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench.{name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    figures: Figures = json.loads(out.read_text())
    return figures


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure, what it is compared with, and its target."""

    figure: str
    value: str
    target: str
    met: bool | None
    """None: a figure shown for reference, with no target of its own."""


def _num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def ingest_rows(ingest: Figures) -> list[Row]:
    speeds, ratios = ingest["mib_per_s"], ingest["ratios"]
    rows = []
    for chunk in (c for c in CHUNKS if c in speeds):
        row = speeds[chunk]
        cells = ", ".join(f"{name} {_num(speed)}" for name, speed in row.items())
        rows.append(Row(f"ingest MiB/s, {chunk} MiB chunks", cells, "", None))
        to_mitm = ratios[chunk]["mitmproxy"]["shim"]
        rows.append(Row(f"shim / mitmproxy, {chunk} MiB", f"{to_mitm:.2f}", ">= 0.8",
                        to_mitm >= 0.8))
        for server in ("@tus/server", "tuspyserver"):
            if server in ratios[chunk]:
                ratio = ratios[chunk][server]["shim"]
                rows.append(Row(f"shim / {server}, {chunk} MiB", f"{ratio:.2f}", ">= 1.5",
                                ratio >= 1.5))
    for name in ("shim-content-range", "shim-ietf"):
        for chunk, row in speeds.items():
            if name in row:
                rows.append(Row(f"{name} MiB/s, {chunk} MiB chunks",
                                f"{_num(row[name])} ({row[name] / row['mitmproxy']:.2f} of "
                                "mitmproxy)", "", None))
    return rows


def load_rows(load: Figures) -> list[Row]:
    idle, busy, slow = load["idle"], load["with_200_uploads"], load["slow_1000"]
    completed = slow["completed"] == slow["uploads"]
    return [
        Row("HEAD p50 / p99 ms, idle", f"{idle['p50_ms']:.1f} / {idle['p99_ms']:.1f}", "", None),
        Row(f"HEAD p50 / p99 ms, {busy['uploads']} uploads in flight",
            f"{busy['p50_ms']:.1f} / {busy['p99_ms']:.1f}", "p99 < 10", busy["p99_ms"] < 10),
        Row(f"{slow['uploads']} slow uploads ({slow['rate_kib_per_s']} KiB/s): completed",
            f"{slow['completed']} in {slow['seconds']:.1f} s (ideal {slow['ideal_seconds']:.1f})",
            "all", completed),
        Row("  their aggregate MiB/s", f"{slow['aggregate_mib_per_s']:.1f}", "", None),
        Row("  shim peak RSS MB", f"{slow['peak_rss_mb']:.0f}", "< 300", slow["peak_rss_mb"] < 300),
        Row("  HEAD p50 / p99 ms meanwhile", f"{slow['head_p50_ms']:.1f} / "
            f"{slow['head_p99_ms']:.1f}", "p99 < 50", slow["head_p99_ms"] < 50),
    ]


def resource_rows(resources: Figures) -> list[Row]:
    cpu, delivery, rss = resources["cpu"], resources["delivery"], resources["rss_mb"]
    peak = max(rss["upload_256mib"], rss["upload_2gib"], rss["passthrough_put_1gib"])
    flat = resources["targets"]["rss_flat"]
    return [
        Row("CPU s per GiB ingested: shim / mitmproxy",
            f"{cpu['shim_s_per_gib']:.2f} / {cpu['mitmproxy_s_per_gib']:.2f} = "
            f"{cpu['ratio']:.2f}", "<= 1.3", cpu["ratio"] <= 1.3),
        Row("  shim's delivery, CPU s per GiB (apart)", f"{cpu['shim_delivery_s_per_gib']:.2f}",
            "", None),
        Row("delivery MiB/s: shim / raw sendfile copy",
            f"{_num(delivery['shim_mib_per_s'])} / {_num(delivery['raw_copy_mib_per_s'])} = "
            f"{delivery['ratio']:.2f}", ">= 0.8", delivery["ratio"] >= 0.8),
        Row("peak RSS MB: 256 MiB / 2 GiB upload, 1 GiB pass-through PUT",
            f"{rss['upload_256mib']:.0f} / {rss['upload_2gib']:.0f}, "
            f"{rss['passthrough_put_1gib']:.0f} (idle {rss['idle']:.0f})",
            "< 150 and flat", peak < 150 and flat),
    ]


SECTIONS: dict[str, Callable[[Figures], list[Row]]] = {
    "ingest": ingest_rows, "load": load_rows, "resources": resource_rows}


def table(figures: dict[str, Figures]) -> str:
    lines = ["| figure | measured | target | met |", "|---|---|---|---|"]
    for name, rows_of in SECTIONS.items():
        for row in rows_of(figures[name]):
            met = "" if row.met is None else ("yes" if row.met else "**no**")
            lines.append(f"| {row.figure} | {row.value} | {row.target} | {met} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        figures = {name: run_bench(name, args.quick, Path(folder)) for name in BENCHES}
    rendered = table(figures)
    minutes = (time.monotonic() - started) / 60
    print(rendered)
    print(f"\n{minutes:.1f} minutes; .venv/bin/python -m bench.perf{' --quick' if args.quick else ''}")
    result = {"quick": args.quick, "minutes": round(minutes, 2), **figures}
    if args.markdown is not None:
        args.markdown.write_text(rendered + "\n")
    write_figures(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
