"""Paired-by-seed comparison of runs against a reference method (markdown on stdout).

Runs of the same seed share their partitions. Runs made with seeded sampling (the server draws
the round's partitions from (seed, round); their metrics rows have `sampled_partitions`) also
share the clients sampled each round, so the per-seed difference (method - reference) removes
most of a short non-IID run's round-to-round noise. Runs whose rows lack `sampled_partitions`
(Flower sampled node ids itself) or whose sampled partitions differ in some round do not share
them: the table then opens with a warning line per such pair, and their differences keep the
sampling noise. For each run: the final round's accuracy and the mean accuracy over round
windows; per method the mean over seeds, and the mean paired difference ± its 95 % Student-t
interval over the seeds both have (fedbat_tools/stats.py).

    python scripts/paired_seeds.py --reference fedavg \\
        fedavg=results/cpu-fmnist/runs/fedavg-shard-n100-s{seed} \\
        fedbat=results/cpu-fmnist/runs/fedbat-shard-n100-s{seed} --seeds 0 1 2

A run that is missing or has fewer rounds than the windows need is listed as such, never filled.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedbat_flwr.results import read_metrics
from fedbat_tools.stats import mean_ci, parse_window, window_mean

Rows = list[dict[str, Any]]


def figures(rows: Rows, windows: Sequence[tuple[int, int]]) -> list[float] | None:
    """[final, mean of each window] in %, or None if the run is shorter than a window."""
    evaluated = [float(r["test_accuracy"]) for r in rows if r.get("test_accuracy") is not None]
    means = [window_mean(rows, lo, hi) for lo, hi in windows]
    if not evaluated or any(m is None for m in means):
        return None
    return [100 * evaluated[-1]] + [100 * m for m in means if m is not None]


def sampling_mismatch(rows: Rows, reference: Rows) -> str | None:
    """Why two runs did not sample the same partitions (None when every round both have did):
    a round without `sampled_partitions` in either run, or the rounds where they differ."""
    theirs = {int(r["round"]): r.get("sampled_partitions") for r in reference}
    common = [r for r in rows if int(r["round"]) in theirs]
    if any(r.get("sampled_partitions") is None or theirs[int(r["round"])] is None for r in common):
        return "no sampled_partitions recorded (not seeded sampling)"
    differ = [int(r["round"]) for r in common if r["sampled_partitions"] != theirs[int(r["round"])]]
    if not differ:
        return None
    shown = ", ".join(map(str, differ[:5])) + (", ..." if len(differ) > 5 else "")
    return f"sampled_partitions differ in {len(differ)} round(s): {shown}"


def sampling_warnings(rows: Mapping[tuple[str, int], Rows], reference: str) -> list[str]:
    """Markdown warning lines: one per (method, seed) whose run and the reference's of that
    seed did not sample the same partitions (nothing when all did)."""
    lines = []
    for method, seed in rows:
        mine, ref = rows[(method, seed)], rows.get((reference, seed), [])
        why = sampling_mismatch(mine, ref) if method != reference and mine and ref else None
        if why is not None:
            lines.append(f"> - {method} seed {seed} vs {reference}: {why}")
    if not lines:
        return []
    head = "> **Warning: some paired runs did not sample the same clients each round**"
    return [head, ">", *lines, ""]


def table(
    runs: dict[str, str], reference: str, seeds: list[int], windows: list[tuple[int, int]]
) -> str:
    """The warning lines (if any), then a row per run and a mean row per method."""
    rows = {(m, s): read_metrics(Path(p.format(seed=s))) for m, p in runs.items() for s in seeds}
    values = {k: figures(r, windows) for k, r in rows.items()}
    names = ["final"] + [f"rounds {lo}-{hi}" for lo, hi in windows]
    head = "| method | seed | " + " | ".join(names)
    head += " | " + " | ".join(f"{n}, minus {reference}" for n in names) + " |"
    lines = [*sampling_warnings(rows, reference), head, "|---|---:|" + "---:|" * (2 * len(names))]
    for method in runs:
        lines += _method_lines(method, reference, seeds, values)
    return "\n".join(lines)


def _method_lines(
    method: str,
    reference: str,
    seeds: Sequence[int],
    values: Mapping[tuple[str, int], list[float] | None],
) -> list[str]:
    """A row per seed, then the mean over seeds and the mean difference ± its 95 % interval."""
    lines, own, diffs = [], [], []
    for seed in seeds:
        mine, ref = values[(method, seed)], values[(reference, seed)]
        if mine is None:
            lines.append(f"| {method} | {seed} | not run (or unfinished) |")
            continue
        own.append(mine)
        diff = [a - b for a, b in zip(mine, ref, strict=True)] if ref else None
        if diff:
            diffs.append(diff)
        lines.append(_row(method, str(seed), mine, _signed(diff)))
    if own:
        mean = [statistics.fmean(col) for col in zip(*own, strict=True)]
        intervals = [mean_ci(col) for col in zip(*diffs, strict=True)]
        cells = [i.text(scale=1, signed=True) for i in intervals] or None
        lines.append(_row(f"**{method}**", f"mean of {len(own)}", mean, cells))
    return lines


def _signed(diff: list[float] | None) -> list[str] | None:
    return [f"{d:+.1f}" for d in diff] if diff else None


def _row(method: str, seed: str, values: list[float], diff: list[str] | None) -> str:
    cells = [f"{v:.1f}" for v in values] + (diff or ["–"] * len(values))
    return f"| {method} | {seed} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=PATH with {seed} in PATH")
    parser.add_argument("--reference", required=True, help="the NAME others are compared with")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument(
        "--windows", nargs="+", type=parse_window, default=[(41, 50), (31, 50)], help="LO-HI"
    )
    args = parser.parse_args()
    runs = dict(item.split("=", 1) for item in args.runs)
    if args.reference not in runs:
        parser.error(f"--reference {args.reference!r} is not one of {sorted(runs)}")
    print(table(runs, args.reference, args.seeds, args.windows))


if __name__ == "__main__":
    main()
