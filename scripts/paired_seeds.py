"""Paired-by-seed comparison of runs against a reference method (markdown on stdout).

Runs of the same seed share partitions and sampled clients, so the per-seed difference
(method - reference) removes most of a short non-IID run's round-to-round noise. For each run:
the final round's accuracy and the mean accuracy over two round windows; per method the mean
over seeds and the mean paired difference.

    python scripts/paired_seeds.py --reference fedavg \\
        fedavg=results/cpu-fmnist/runs/fedavg-shard-n100-s{seed} \\
        fedbat=results/cpu-fmnist/runs/fedbat-shard-n100-s{seed} --seeds 0 1 2

A run that is missing or has fewer rounds than the windows need is listed as such, never filled.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def accuracies(run_dir: Path) -> list[float] | None:
    """Test accuracy per round (metrics.jsonl), or None if the run has no metrics."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [float(r["test_accuracy"]) for r in rows if r.get("test_accuracy") is not None]


def figures(acc: list[float], windows: list[tuple[int, int]]) -> list[float] | None:
    """[final, mean of each window] in %, or None if the run is shorter than a window."""
    if any(len(acc) < hi for _, hi in windows):
        return None
    return [100 * acc[-1]] + [100 * statistics.fmean(acc[lo - 1 : hi]) for lo, hi in windows]


def table(
    runs: dict[str, str], reference: str, seeds: list[int], windows: list[tuple[int, int]]
) -> str:
    names = ["final"] + [f"rounds {lo}-{hi}" for lo, hi in windows]
    head = "| method | seed | " + " | ".join(names)
    head += " | " + " | ".join(f"{n}, minus {reference}" for n in names) + " |"
    lines = [head, "|---|---:|" + "---:|" * (2 * len(names))]
    values = {
        (m, s): figures(accuracies(Path(p.format(seed=s))) or [], windows)
        for m, p in runs.items()
        for s in seeds
    }
    for method in runs:
        diffs, own = [], []
        for seed in seeds:
            mine, ref = values[(method, seed)], values[(reference, seed)]
            if mine is None:
                lines.append(f"| {method} | {seed} | not run (or unfinished) |")
                continue
            own.append(mine)
            diff = [a - b for a, b in zip(mine, ref, strict=True)] if ref else None
            if diff:
                diffs.append(diff)
            lines.append(_row(method, str(seed), mine, diff))
        if own:
            mean = [statistics.fmean(col) for col in zip(*own, strict=True)]
            dmean = [statistics.fmean(col) for col in zip(*diffs, strict=True)] if diffs else None
            lines.append(_row(f"**{method}**", f"mean of {len(own)}", mean, dmean))
    return "\n".join(lines)


def _row(method: str, seed: str, values: list[float], diff: list[float] | None) -> str:
    cells = [f"{v:.1f}" for v in values]
    cells += [f"{d:+.1f}" for d in diff] if diff else ["–"] * len(values)
    return f"| {method} | {seed} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=PATH with {seed} in PATH")
    parser.add_argument("--reference", required=True, help="the NAME others are compared with")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--windows", nargs="+", default=["41-50", "31-50"], help="LO-HI rounds")
    args = parser.parse_args()
    runs = dict(item.split("=", 1) for item in args.runs)
    if args.reference not in runs:
        parser.error(f"--reference {args.reference!r} is not one of {sorted(runs)}")
    windows = [tuple(int(x) for x in w.split("-")) for w in args.windows]
    print(table(runs, args.reference, args.seeds, windows))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
