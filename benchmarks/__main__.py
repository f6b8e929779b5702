"""`python -m benchmarks`: every benchmark, one JSON line per figure, and benchmarks/RESULTS.md.

Each module exposes `run() -> list[dict]` with {"name", "value", "unit", "goal", "pass"}; every
timing figure is a ratio against a reference measured in the same run, since machines are noisy.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from fedbat_flwr.provenance import cpu_model

MODULES = (
    "bench_uplink",  # bits per parameter from serialized replies, every method
    "bench_downlink",  # bits per parameter of what the server sends, every method
    "bench_wire",  # decode + accumulate vs a dense axpy
    "bench_training",  # FedBAT step vs plain SGD step, channels_last speed-up
    "bench_server",  # whole-round aggregation FedBAT vs FedAvg; peak memory K=100 vs K=10
    "bench_simulation",  # Flower simulation round vs pure local compute
)
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--only", nargs="*", choices=MODULES, help="run only these modules")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite RESULTS.md")
    args = parser.parse_args()
    figures: list[dict] = []
    for name in args.only or MODULES:
        started = time.monotonic()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            results = module.run()
        except Exception:  # one failing benchmark must not hide the others
            results = [{"name": f"{name}.error", "value": None, "unit": "", "goal": None,
                        "pass": False, "error": traceback.format_exc(limit=3)}]  # fmt: skip
        for figure in results:
            figure.setdefault("goal", None)
            figure.setdefault("pass", True)
            figure["module"] = name
            print(json.dumps(figure), flush=True)
        figures += results
        print(f"# {name}: {time.monotonic() - started:.0f} s", flush=True)
    if not args.no_write:
        write_results(figures)
    return 0 if all(f["pass"] for f in figures) else 1


def cpu_name() -> str:
    """The CPU model, so results say what they ran on (platform.processor() is often empty)."""
    return cpu_model() or platform.machine() or "unknown CPU"


def write_results(figures: list[dict]) -> None:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.node()} ({cpu_name()}, {os.cpu_count()} cores)"
    lines = [
        "# Benchmark results",
        "",
        f"`python -m benchmarks` on {machine}, {stamp}.",
        "Ratios are measured in the same run against their reference.",
        "",
        "| figure | value | unit | goal | pass |",
        "|---|---:|---|---|---|",
    ]
    for f in figures:
        value = f["value"]
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        ok = "" if f["goal"] is None else ("yes" if f["pass"] else "**no**")
        lines.append(f"| {f['name']} | {text} | {f['unit']} | {f['goal'] or ''} | {ok} |")
    notes = RESULTS.with_name("NOTES.md")
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
