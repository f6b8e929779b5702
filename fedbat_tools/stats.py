"""Uncertainty over seeds: mean with a 95 % Student-t interval, a run's mean accuracy over a
window of rounds, and differences paired by seed (numpy only; scipy is not a dependency).

The interval of n values is mean ± t(0.975, n - 1) · s / sqrt(n), s their sample standard
deviation (ddof=1): it treats the seeds as independent draws of a roughly normal quantity.
One value has no interval (nan half-width, shown as "1 seed"); no value has a nan mean.
A window that a run did not reach is None, never filled from other rounds.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Two-sided 95 % quantiles t(0.975, df) of Student's t for df = 1..30 (any printed t table);
# beyond 30 degrees of freedom the normal quantile Z_975 is used (it is 4 % smaller at df=31).
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
Z_975 = 1.96
DEFAULT_WINDOW = 10  # rounds: the tables' window is the last 10 rounds unless told otherwise


def t_975(df: int) -> float:
    """t(0.975, df) from T_975, Z_975 beyond its end; df >= 1."""
    if df < 1:
        raise ValueError(f"degrees of freedom = {df} must be >= 1")
    return T_975[df - 1] if df <= len(T_975) else Z_975


@dataclass(frozen=True)
class Interval:
    """A mean over n values and the half-width of its 95 % interval (nan for n < 2)."""

    mean: float
    half_width: float
    n: int

    def text(self, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
        """'86.4 ± 1.2 (n=3)', '86.4 (1 seed)' or '–' (no value); scale 100: fractions -> %."""
        if self.n == 0 or not math.isfinite(self.mean):
            return "–"
        mean = f"{scale * self.mean:{'+' if signed else ''}.{digits}f}"
        if self.n == 1:
            return f"{mean} (1 seed)"
        return f"{mean} ± {scale * self.half_width:.{digits}f} (n={self.n})"


def mean_ci(values: Iterable[float | None]) -> Interval:
    """Mean and 95 % Student-t half-width of the finite values (None and nan are left out)."""
    vals = np.array([float(v) for v in values if v is not None and math.isfinite(v)])
    n = len(vals)
    if n == 0:
        return Interval(float("nan"), float("nan"), 0)
    if n == 1:
        return Interval(float(vals[0]), float("nan"), 1)
    half = t_975(n - 1) * float(np.std(vals, ddof=1)) / math.sqrt(n)
    return Interval(float(np.mean(vals)), half, n)


def window_mean(rows: Sequence[Mapping[str, Any]], lo: int, hi: int) -> float | None:
    """Mean test_accuracy of a run's metrics rows with lo <= round <= hi (unevaluated rounds
    left out); None if the run has no round hi (shorter than the window) or none evaluated."""
    if not rows or max(int(r["round"]) for r in rows) < hi:
        return None
    values = [
        float(r["test_accuracy"])
        for r in rows
        if lo <= int(r["round"]) <= hi and r.get("test_accuracy") is not None
    ]
    return float(np.mean(values)) if values else None


def last_rounds(num_rounds: int, size: int = DEFAULT_WINDOW) -> tuple[int, int]:
    """The window of the last `size` rounds of `num_rounds` (all of them when fewer)."""
    return max(1, num_rounds - size + 1), max(1, num_rounds)


def parse_window(text: str) -> tuple[int, int]:
    """'LO-HI' (command-line form) -> (lo, hi), 1 <= lo <= hi; argparse shows the message."""
    lo, sep, hi = text.partition("-")
    if not (sep and lo.isdigit() and hi.isdigit()) or not 1 <= int(lo) <= int(hi):
        raise argparse.ArgumentTypeError(f"window {text!r}: expected LO-HI with 1 <= LO <= HI")
    return int(lo), int(hi)


@dataclass(frozen=True)
class Paired:
    """Per-seed differences (value - reference) over the seeds both have, and their interval."""

    by_seed: dict[int, float]
    interval: Interval


def paired(values: Mapping[int, float | None], reference: Mapping[int, float | None]) -> Paired:
    """Differences seed by seed, for the seeds where both values are finite (sorted by seed)."""
    both = sorted(
        s for s in values if s in reference and _finite(values[s]) and _finite(reference[s])
    )
    diffs = {s: float(values[s]) - float(reference[s]) for s in both}  # type: ignore[arg-type]
    return Paired(diffs, mean_ci(diffs.values()))


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
