"""Tables and plots of a suite's finished runs (read from the results contract, never from logs).

A suite's runs are grouped by everything that varies except the seed: method, partitioner, the
number of clients N, and any other gridded keys ("extras"). Each group becomes one table cell
(mean ± std over seeds, like Table 1 of the FedBAT paper) and one curve per plot panel.
Standard deviations are population std (numpy's default, ddof=0) over seeds; one seed gives 0.
The headline tables give the mean ± its 95 % Student-t interval over seeds (`fedbat_tools.stats`)
for a window of rounds (default: the last 10) and for the final round, paired by seed against a
reference method when one is named. A table whose runs differ in provenance (code, libraries,
threads: `fedbat_flwr.provenance`) opens with a warning naming the runs.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedbat_flwr.provenance import differences
from fedbat_flwr.results import read_metrics

from .stats import Interval, Paired, last_rounds, mean_ci, paired, parse_window, window_mean

MB = 1e6  # bytes per MB in every table and plot (decimal, like network traffic)
LAST_K = 5  # final_mean_last5: short non-IID runs are noisy, so also average the last rounds

Extras = tuple[tuple[str, Any], ...]
Row = tuple[str, Extras]  # (method, extras)
Column = tuple[int, str]  # (num_clients, partitioner)
# paper[method][num_clients][partitioner] = (mean %, std %) as printed in the paper's table.
Paper = Mapping[str, Mapping[int, Mapping[str, Sequence[float]]]]

CSV_COLUMNS = (
    "method",
    "label",
    "partitioner",
    "num_clients",
    "extras",
    "num_seeds",
    "rounds",
    "final_accuracy_mean",
    "final_accuracy_std",
    "final_mean_last5",
    "final_mean_last5_std",
    "best_accuracy_mean",
    "uplink_mb",
    "downlink_mb",
    "uplink_bits_per_param",
    "paper_accuracy_mean",
    "paper_accuracy_std",
    # Added later, so after the older columns: readers that index by position keep working.
    "downlink_bits_per_param",
    "final_model_sparsity",  # fraction of zeros of the final evaluated model (FedPM, FedBiF)
    # 95 % Student-t intervals over seeds (half-widths), for the window of rounds lo..hi and the
    # final round; empty with one seed.
    "window_lo",
    "window_hi",
    "window_mean",
    "window_ci95",
    "final_accuracy_ci95",
    # Rows of another method than the suite's reference: the window mean minus the reference's,
    # seed by seed (fractions), its mean and 95 % half-width, and the seeds both have ("0;1;2").
    "paired_diff_mean",
    "paired_diff_ci95",
    "paired_seeds",
)


@dataclass(frozen=True)
class GroupKey:
    """What identifies a group of runs that differ only by seed."""

    method: str
    partitioner: str
    num_clients: int
    extras: Extras = ()

    @property
    def column(self) -> Column:
        """The table column / plot panel: N outer, partitioner inner (the paper's layout)."""
        return (self.num_clients, self.partitioner)

    @property
    def row(self) -> Row:
        return (self.method, self.extras)


@dataclass(frozen=True)
class RunResult:
    """One finished run: its group, seed, per-round rows and summary."""

    key: GroupKey
    seed: int
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    name: str = ""  # the run folder's name (what provenance warnings call the run)

    @property
    def evaluated(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("test_accuracy") is not None]


@dataclass(frozen=True)
class GroupStats:
    """Aggregates over the seeds of one group; accuracies are fractions in [0, 1]."""

    key: GroupKey
    num_seeds: int
    rounds: int
    final_accuracy_mean: float
    final_accuracy_std: float
    final_mean_last5: float
    final_mean_last5_std: float
    best_accuracy_mean: float
    uplink_mb: float
    downlink_mb: float
    uplink_bits_per_param: float
    downlink_bits_per_param: float = float("nan")
    final_model_sparsity: float = float("nan")  # nan for methods that do not report it
    window: tuple[int, int] = (1, 1)  # rounds lo..hi of window_by_seed
    # (seed, value) of the seeds that have one: mean accuracy of the window, final accuracy.
    window_by_seed: tuple[tuple[int, float], ...] = ()
    final_by_seed: tuple[tuple[int, float], ...] = ()

    @property
    def window_interval(self) -> Interval:
        return mean_ci(v for _, v in self.window_by_seed)

    @property
    def final_interval(self) -> Interval:
        return mean_ci(v for _, v in self.final_by_seed)


def load_run(run_dir: Path, key: GroupKey, seed: int) -> RunResult:
    """Read a finished run directory (summary.json + metrics.jsonl)."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    rows = read_metrics(run_dir)
    return RunResult(key=key, seed=seed, rows=rows, summary=summary, name=Path(run_dir).name)


def aggregate(runs: Iterable[RunResult], window: tuple[int, int] | None = None) -> list[GroupStats]:
    """One GroupStats per group, in first-seen order; `window` (rounds lo..hi, default the last
    10 of the longest run) is the window of `GroupStats.window_by_seed`."""
    groups: dict[GroupKey, list[RunResult]] = {}
    for run in runs:
        groups.setdefault(run.key, []).append(run)
    if window is None:
        window = last_rounds(
            max((_last_round(r.rows) for g in groups.values() for r in g), default=1)
        )
    return [_group_stats(key, members, window) for key, members in groups.items()]


def _last_round(rows: Iterable[Mapping[str, Any]]) -> int:
    """The number of the last round a run's metrics rows reach (0 for none)."""
    return max((int(r["round"]) for r in rows), default=0)


def _group_stats(key: GroupKey, runs: list[RunResult], window: tuple[int, int]) -> GroupStats:
    final = [_final_accuracy(r) for r in runs]
    in_window = [(r.seed, window_mean(r.rows, *window)) for r in runs]
    last5 = [_mean([row["test_accuracy"] for row in r.evaluated[-LAST_K:]]) for r in runs]
    best = [_float(r.summary.get("best_accuracy")) for r in runs]
    return GroupStats(
        key=key,
        num_seeds=len(runs),
        rounds=min(int(r.summary.get("rounds_completed", len(r.rows))) for r in runs),
        final_accuracy_mean=_mean(final),
        final_accuracy_std=_std(final),
        final_mean_last5=_mean(last5),
        final_mean_last5_std=_std(last5),
        best_accuracy_mean=_mean(best),
        uplink_mb=_mean([_total(r, "uplink_bytes") / MB for r in runs]),
        downlink_mb=_mean([_total(r, "downlink_bytes") / MB for r in runs]),
        uplink_bits_per_param=_mean([_mean_bits(r) for r in runs]),
        downlink_bits_per_param=_mean([_mean_bits(r, "downlink") for r in runs]),
        final_model_sparsity=_mean([_last(r, "model_sparsity") for r in runs]),
        window=window,
        window_by_seed=tuple((s, v) for s, v in in_window if v is not None),
        final_by_seed=tuple(
            (r.seed, v) for r, v in zip(runs, final, strict=True) if np.isfinite(v)
        ),
    )


def _final_accuracy(run: RunResult) -> float:
    """The last evaluated round's accuracy (the server always evaluates the last round)."""
    value = run.summary.get("final_accuracy")
    if value is None and run.evaluated:
        value = run.evaluated[-1]["test_accuracy"]
    return _float(value)


def _total(run: RunResult, key: str) -> float:
    value = run.summary.get(f"total_{key}")
    return float(value) if value is not None else float(sum(r[key] for r in run.rows))


def _mean_bits(run: RunResult, link: str = "uplink") -> float:
    return _mean([r.get(f"{link}_bits_per_param") for r in run.rows])


def _last(run: RunResult, key: str) -> float | None:
    """``key`` of the last evaluated round that has it (None if no round has it)."""
    values = [r[key] for r in run.evaluated if r.get(key) is not None]
    return values[-1] if values else None


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _mean(values: Iterable[Any]) -> float:
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _std(values: Iterable[Any]) -> float:
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.std(vals)) if vals else float("nan")


# --- labels and layout ----------------------------------------------------------------------


def row_label(method: str, extras: Extras, labels: Mapping[str, str]) -> str:
    """The method's pretty name, plus the other gridded values when there are any."""
    name = labels.get(method, method)
    if not extras:
        return name
    return f"{name} ({', '.join(f'{k}={v}' for k, v in extras)})"


def column_label(column: Column) -> str:
    num_clients, partitioner = column
    return f"{partitioner}, N={num_clients}"


def columns_of(stats: Iterable[GroupStats]) -> list[Column]:
    """Table columns / plot panels: N ascending, partitioners in first-seen order."""
    seen: list[Column] = []
    for s in stats:
        if s.key.column not in seen:
            seen.append(s.key.column)
    order = {p: i for i, p in enumerate(dict.fromkeys(p for _, p in seen))}
    return sorted(seen, key=lambda c: (c[0], order[c[1]]))


def rows_of(stats: Iterable[GroupStats]) -> list[Row]:
    return list(dict.fromkeys(s.key.row for s in stats))


def paper_value(paper: Paper, method: str, column: Column) -> tuple[float, float] | None:
    """(mean %, std %) for one table cell, or None when the paper has no such number."""
    num_clients, partitioner = column
    value = paper.get(method, {}).get(num_clients, {}).get(partitioner)
    return None if value is None else (float(value[0]), float(value[1]))


# --- paired by seed -------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedRow:
    """A group beside the reference method's group of the same column and extras: per-seed
    differences (group - reference, fractions) of the window mean and of the final accuracy."""

    stats: GroupStats
    reference: GroupStats
    window: Paired
    final: Paired


def paired_rows(stats: Sequence[GroupStats], reference: str) -> list[PairedRow]:
    """Every group of another method that has a `reference` group in its column with its
    extras, in `stats` order (groups without one are left out)."""
    by_key = {s.key: s for s in stats}
    out = []
    for s in stats:
        ref = by_key.get(replace(s.key, method=reference))
        if s.key.method == reference or ref is None:
            continue
        window = paired(dict(s.window_by_seed), dict(ref.window_by_seed))
        final = paired(dict(s.final_by_seed), dict(ref.final_by_seed))
        out.append(PairedRow(s, ref, window, final))
    return out


def provenance_warning(environments: Mapping[str, Mapping[str, Any] | None]) -> list[str]:
    """Markdown lines that open a table of runs (named by folder) differing in provenance: one
    per `provenance.differences` line. None when they agree, or for a single run."""
    lines = differences(environments) if len(environments) > 1 else []
    if not lines:
        return []
    head = "> **WARNING: these runs differ in provenance; their numbers may not be comparable.**"
    return [head, ">", *(f"> - {line}" for line in lines), ""]


# --- CSV ------------------------------------------------------------------------------------


def write_csv(
    stats: Sequence[GroupStats],
    path: Path,
    labels: Mapping[str, str],
    paper: Paper,
    reference: str | None = None,
) -> Path:
    """One row per group; accuracies as fractions (the unit of summary.json), traffic in MB;
    with a `reference` method, the paired_* columns of the groups paired with one of its."""
    pairs = {p.stats.key: p for p in paired_rows(stats, reference)} if reference else {}
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for s in stats:
            writer.writerow(_csv_row(s, labels, paper, pairs.get(s.key)))
    return path


def _csv_row(
    s: GroupStats, labels: Mapping[str, str], paper: Paper, pair: PairedRow | None
) -> dict[str, Any]:
    ref = paper_value(paper, s.key.method, s.key.column) if not s.key.extras else None
    diff = pair.window.interval if pair is not None else None
    return {
        "method": s.key.method,
        "label": row_label(s.key.method, s.key.extras, labels),
        "partitioner": s.key.partitioner,
        "num_clients": s.key.num_clients,
        "extras": ";".join(f"{k}={v}" for k, v in s.key.extras),
        "num_seeds": s.num_seeds,
        "rounds": s.rounds,
        "final_accuracy_mean": _fmt(s.final_accuracy_mean, 6),
        "final_accuracy_std": _fmt(s.final_accuracy_std, 6),
        "final_mean_last5": _fmt(s.final_mean_last5, 6),
        "final_mean_last5_std": _fmt(s.final_mean_last5_std, 6),
        "best_accuracy_mean": _fmt(s.best_accuracy_mean, 6),
        "uplink_mb": _fmt(s.uplink_mb, 4),
        "downlink_mb": _fmt(s.downlink_mb, 4),
        "uplink_bits_per_param": _fmt(s.uplink_bits_per_param, 4),
        "paper_accuracy_mean": "" if ref is None else _fmt(ref[0] / 100, 4),
        "paper_accuracy_std": "" if ref is None else _fmt(ref[1] / 100, 4),
        "downlink_bits_per_param": _fmt(s.downlink_bits_per_param, 4),
        "final_model_sparsity": _fmt(s.final_model_sparsity, 6),
        "window_lo": s.window[0],
        "window_hi": s.window[1],
        "window_mean": _fmt(s.window_interval.mean, 6),
        "window_ci95": _fmt(s.window_interval.half_width, 6),
        "final_accuracy_ci95": _fmt(s.final_interval.half_width, 6),
        "paired_diff_mean": "" if diff is None else _fmt(diff.mean, 6),
        "paired_diff_ci95": "" if diff is None else _fmt(diff.half_width, 6),
        "paired_seeds": "" if pair is None else ";".join(map(str, pair.window.by_seed)),
    }


def _fmt(value: float, digits: int) -> str:
    return "" if not np.isfinite(value) else f"{value:.{digits}f}"


# --- Markdown -------------------------------------------------------------------------------


def write_markdown(
    stats: Sequence[GroupStats],
    path: Path,
    *,
    title: str,
    labels: Mapping[str, str],
    paper: Paper,
    notes: Sequence[str] = (),
    reference: str | None = None,
    environments: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> Path:
    """table.md: a warning first if the runs' `environments` (by run name) differ; the window's
    and the final round's mean ± 95 % interval; with a `reference` method, the differences
    paired by seed; then final accuracy (± std) beside the paper's, best, last-5 mean, traffic."""
    table = _Cells(stats, labels)
    parts = [*provenance_warning(environments or {}), f"# {title}", ""]
    parts += [*notes, INTERVAL_NOTE, ""]
    lo, hi = stats[0].window if stats else (1, 1)
    parts += table.simple(
        f"Mean accuracy of rounds {lo}-{hi} (%), mean ± 95 % interval over seeds",
        lambda s: s.window_interval.text(),
    )
    parts += table.simple(
        "Final-round accuracy (%), mean ± 95 % interval over seeds",
        lambda s: s.final_interval.text(),
    )
    if reference is not None:
        parts += _paired_table(table, paired_rows(stats, reference), reference)
    parts += _final_table(table, paper)
    parts += table.simple(
        "Best accuracy (%), mean over seeds", lambda s: _pct(s.best_accuracy_mean)
    )
    parts += table.simple(
        f"Mean accuracy of the last {LAST_K} evaluated rounds (%), mean ± std over seeds",
        lambda s: _pct_pm(s.final_mean_last5, s.final_mean_last5_std),
    )
    parts += _traffic_table(table)
    path.write_text("\n".join(parts) + "\n")
    return path


class _Cells:
    """Groups indexed by (row, column), with the row and column order of the tables."""

    def __init__(self, stats: Sequence[GroupStats], labels: Mapping[str, str]) -> None:
        self.stats = stats
        self.labels = labels
        self.rows = rows_of(stats)
        self.columns = columns_of(stats)
        self.by_cell = {(s.key.row, s.key.column): s for s in stats}

    def label(self, row: Row) -> str:
        return row_label(row[0], row[1], self.labels)

    def render(self, row: Row, column: Column, how: Callable[[GroupStats], str]) -> str:
        stats = self.by_cell.get((row, column))
        return "–" if stats is None else how(stats)

    def simple(self, heading: str, how: Callable[[GroupStats], str]) -> list[str]:
        lines = [f"## {heading}", "", *_md_header(["method", *map(column_label, self.columns)])]
        for row in self.rows:
            cells = [self.render(row, c, how) for c in self.columns]
            lines.append(_md_row([self.label(row), *cells]))
        return [*lines, ""]


INTERVAL_NOTE = (
    "± 95 % interval: mean ± t(0.975, n-1) · s / √n over the n seeds (s with ddof=1; "
    "fedbat_tools/stats.py); one seed has none. A run that did not reach the window's last "
    "round is left out of the window's cells, never filled."
)


def _paired_table(table: _Cells, pairs: Sequence[PairedRow], reference: str) -> list[str]:
    """A line per (column, row): differences to the reference group of the same column and
    extras, seed by seed, then their mean ± 95 % interval, over the window and the final round."""
    name = table.labels.get(reference, reference)
    lines = [f"## Paired by seed against {name} (points, method − {name})", ""]
    if not pairs:
        return [*lines, f"No group has a {name} group of the same column and extras.", ""]
    lo, hi = pairs[0].stats.window
    header = ["column", "method", f"rounds {lo}-{hi}, per seed", "mean ± 95 % interval"]
    header += ["final round, per seed", "mean ± 95 % interval"]
    lines += [
        f"Each run's accuracy minus the {name} run's of the same seed; only seeds both have.",
        "",
        _md_row(header),
        _md_row(["---", "---", *["---:"] * 4]),  # column and method left-aligned
    ]
    place = {(r, c): (j, i) for i, r in enumerate(table.rows) for j, c in enumerate(table.columns)}
    for pair in sorted(pairs, key=lambda p: place[(p.stats.key.row, p.stats.key.column)]):
        key = pair.stats.key
        cells = [column_label(key.column), table.label(key.row)]
        for diff in (pair.window, pair.final):
            cells += [_per_seed(diff), diff.interval.text(signed=True)]
        lines.append(_md_row(cells))
    return [*lines, ""]


def _per_seed(diff: Paired) -> str:
    return ", ".join(f"s{seed} {100 * d:+.1f}" for seed, d in diff.by_seed.items()) or "–"


def _final_table(table: _Cells, paper: Paper) -> list[str]:
    """Final accuracy; a '(paper)' column follows each column the paper reports."""
    with_paper = {c for c in table.columns if any(paper_value(paper, m, c) for m in paper)}
    header = ["method"]
    for c in table.columns:
        header += [column_label(c)] + ([f"{column_label(c)} (paper)"] if c in with_paper else [])
    # Methods the paper reports but the suite did not run still get a row, for reference.
    rows = table.rows + [(m, ()) for m in paper if (m, ()) not in table.rows]
    lines = ["## Final accuracy (%), mean ± std over seeds", "", *_md_header(header)]
    for row in rows:
        cells = [table.label(row)]
        for c in table.columns:
            cells.append(table.render(row, c, _final_cell))
            if c in with_paper:
                cells.append(_paper_cell(paper, row, c))
        lines.append(_md_row(cells))
    return [*lines, ""]


def _traffic_table(table: _Cells) -> list[str]:
    """Traffic per run, averaged over every run of the method (it hardly depends on the column)."""
    sparse = any(np.isfinite(s.final_model_sparsity) for s in table.stats)
    header = ["method", "uplink MB / run", "uplink bit/param", "downlink MB / run"]
    header += ["downlink bit/param", "rounds"] + (["final mask density"] if sparse else [])
    lines = ["## Communication (MB = 10^6 bytes)", "", *_md_header(header)]
    for row in table.rows:
        members = [s for s in table.stats if s.key.row == row]
        cells = [
            table.label(row),
            f"{_mean(s.uplink_mb for s in members):.1f}",
            f"{_mean(s.uplink_bits_per_param for s in members):.3f}",
            f"{_mean(s.downlink_mb for s in members):.1f}",
            f"{_mean(s.downlink_bits_per_param for s in members):.3f}",
            str(min(s.rounds for s in members)),
        ]
        if sparse:
            density = 1 - _mean(s.final_model_sparsity for s in members)
            cells.append("–" if not np.isfinite(density) else f"{density:.3f}")
        lines.append(_md_row(cells))
    return [*lines, ""]


def _final_cell(s: GroupStats) -> str:
    text = _pct_pm(s.final_accuracy_mean, s.final_accuracy_std)
    return text if s.num_seeds > 1 else f"{text} (1 seed)"


def _paper_cell(paper: Paper, row: Row, column: Column) -> str:
    value = paper_value(paper, row[0], column) if not row[1] else None
    return "–" if value is None else f"{value[0]:.1f} ± {value[1]:.1f}"


def _pct(value: float) -> str:
    return "–" if not np.isfinite(value) else f"{100 * value:.1f}"


def _pct_pm(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _md_header(cells: Sequence[str]) -> list[str]:
    return [_md_row(cells), _md_row(["---"] + ["---:"] * (len(cells) - 1))]


def _md_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


# --- plots ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """One group's mean-over-seeds curve: x per evaluated round, accuracy in %, and the
    seeds' spread (min and max over the seeds that have the round, and how many do)."""

    rounds: np.ndarray
    uplink_mb: np.ndarray  # cumulative uplink at the end of each of those rounds
    accuracy: np.ndarray
    low: np.ndarray
    high: np.ndarray
    seeds: np.ndarray

    @property
    def banded(self) -> bool:
        """True when some round has two or more seeds, so a min-max band can be drawn."""
        return bool((self.seeds >= 2).any())


BAND_NOTE = "shaded: min-max over seeds"


def curves(runs: Iterable[RunResult]) -> dict[GroupKey, Curve]:
    """Average the runs of each group round by round (seeds that lack a round are skipped);
    low / high are the seeds' min / max accuracy of the round."""
    per_round: dict[GroupKey, dict[int, list[tuple[float, float]]]] = {}
    for run in runs:
        cumulative = np.cumsum([row["uplink_bytes"] for row in run.rows]) / MB
        points = per_round.setdefault(run.key, {})
        for row, up in zip(run.rows, cumulative, strict=True):
            if row.get("test_accuracy") is not None:
                points.setdefault(int(row["round"]), []).append((up, row["test_accuracy"]))
    out = {}
    for key, points in per_round.items():
        rounds = sorted(points)
        accuracy = [100 * np.array([acc for _, acc in points[r]]) for r in rounds]
        out[key] = Curve(
            rounds=np.array(rounds),
            uplink_mb=np.array([np.mean([up for up, _ in points[r]]) for r in rounds]),
            accuracy=np.array([a.mean() for a in accuracy]),
            low=np.array([a.min() for a in accuracy]),
            high=np.array([a.max() for a in accuracy]),
            seeds=np.array([len(a) for a in accuracy]),
        )
    return out


@dataclass(frozen=True)
class XAxis:
    """What a plot puts on x: the Curve field, its label (with units), its scale."""

    field: str
    label: str
    name: str
    log: bool = False


ROUND_AXIS = XAxis("rounds", "round", "round")
UPLINK_AXIS = XAxis("uplink_mb", "cumulative uplink (MB, log scale)", "uplink", log=True)


def write_plots(
    runs: Sequence[RunResult],
    stats: Sequence[GroupStats],
    out_dir: Path,
    *,
    title: str,
    labels: Mapping[str, str],
) -> list[Path]:
    """accuracy_vs_round.png, accuracy_vs_uplink.png (from the runs' rows) and
    accuracy_vs_bits.png (from their `aggregate` stats): a panel per (N, partitioner)."""
    by_group = curves(runs)
    if not by_group:
        return []
    return [
        _plot(by_group, out_dir / "accuracy_vs_round.png", ROUND_AXIS, title, labels),
        _plot(by_group, out_dir / "accuracy_vs_uplink.png", UPLINK_AXIS, title, labels),
        _tradeoff_plot(stats, out_dir / "accuracy_vs_bits.png", title, labels),
    ]


def _tradeoff_plot(
    stats: Sequence[GroupStats], path: Path, title: str, labels: Mapping[str, str]
) -> Path:
    """One point per group: mean accuracy over the last rounds against the mean uplink bits per
    parameter, with the seeds' standard deviation as error bar -- the trade-off a setting buys
    (e.g. a regulariser's strength), where accuracy_vs_uplink shows it round by round."""
    from matplotlib.figure import Figure

    columns = columns_of(stats)
    colours = _colours(rows_of(stats))
    fig = Figure(figsize=(max(4.2 * len(columns), 6.4), 4.3), layout="constrained")
    axes = fig.subplots(1, len(columns), squeeze=False, sharey=True)[0]
    for ax, column in zip(axes, columns, strict=True):
        for s in (s for s in stats if s.key.column == column):
            ax.errorbar(
                s.uplink_bits_per_param,
                100 * s.final_mean_last5,
                yerr=100 * s.final_mean_last5_std if s.num_seeds > 1 else None,
                fmt="o",
                capsize=3,
                color=colours[s.key.row],
                label=row_label(s.key.method, s.key.extras, labels),
            )
        ax.set_xscale("log")
        ax.set_title(column_label(column))
        ax.set_xlabel("uplink bit/param, mean over rounds (log)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"test accuracy, mean of the last {LAST_K} rounds (%)")
    handles, names = _legend_entries(axes)
    fig.legend(handles, names, loc="outside lower center", ncols=min(len(names), 4))
    fig.suptitle(f"{title}: accuracy vs uplink bits (mean ± std over seeds)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _plot(
    by_group: Mapping[GroupKey, Curve],
    path: Path,
    x: XAxis,
    title: str,
    labels: Mapping[str, str],
) -> Path:
    """Rows of panels = N, columns = partitioners; a method keeps its colour in every panel."""
    # A Figure without pyplot: no global state, no GUI backend (savefig renders through Agg).
    from matplotlib.figure import Figure

    keys = list(by_group)
    sizes = sorted({k.num_clients for k in keys})
    partitioners = list(dict.fromkeys(k.partitioner for k in keys))
    colours = _colours(list(dict.fromkeys(k.row for k in keys)))
    width = max(4.2 * len(partitioners), 6.4)  # room for the title and a 4-column legend
    fig = Figure(figsize=(width, 3.4 * len(sizes) + 0.9), layout="constrained")
    axes = fig.subplots(len(sizes), len(partitioners), squeeze=False, sharey=True)
    for i, n in enumerate(sizes):
        for j, part in enumerate(partitioners):
            members = {k: by_group[k] for k in keys if k.column == (n, part)}
            _panel(axes[i][j], (n, part), members, x, colours, labels)
        axes[i][0].set_ylabel("test accuracy (%)")  # shared y: label the left column only
    handles, names = _legend_entries(axes)
    fig.legend(handles, names, loc="outside lower center", ncols=min(len(names), 4))
    band = f"; {BAND_NOTE}" if any(c.banded for c in by_group.values()) else ""
    fig.suptitle(f"{title}: test accuracy vs {x.name} (mean over seeds{band})")
    fig.savefig(path, dpi=110, bbox_inches="tight")  # never clip the legend or title
    return path


def _panel(
    ax: Any,
    column: Column,
    members: Mapping[GroupKey, Curve],
    x: XAxis,
    colours: Mapping[Row, str],
    labels: Mapping[str, str],
) -> None:
    if not members:
        ax.set_visible(False)
        return
    for key, curve in members.items():
        xs = getattr(curve, x.field)
        ax.plot(
            xs,
            curve.accuracy,
            "o-" if len(curve.rounds) <= 20 else "-",
            markersize=3,
            color=colours[key.row],
            label=row_label(key.method, key.extras, labels),
        )
        if curve.banded:  # rounds of a single seed have no band
            where = curve.seeds >= 2
            ax.fill_between(
                xs,
                curve.low,
                curve.high,
                where=where,
                color=colours[key.row],
                alpha=0.2,
                linewidth=0,
            )
    if x.log:
        ax.set_xscale("log")
    else:  # rounds are whole numbers
        from matplotlib.ticker import MaxNLocator  # matplotlib loads only when plotting

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(column_label(column))
    ax.set_xlabel(x.label)
    ax.grid(True, alpha=0.3)


# matplotlib's tab20 (dark/light pairs reordered so neighbours differ), for more than 10 methods.
_TAB20 = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
]  # fmt: skip


def _colours(rows: Sequence[Row]) -> dict[Row, str]:
    """One colour a method (row), the same in every panel."""
    palette = [f"C{i}" for i in range(10)] if len(rows) <= 10 else _TAB20
    return {row: palette[i % len(palette)] for i, row in enumerate(rows)}


def _legend_entries(axes: Any) -> tuple[list[Any], list[str]]:
    """One legend entry per method across all panels (panels may miss some methods)."""
    entries: dict[str, Any] = {}
    for ax in np.ravel(axes):
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(name, handle)
    return list(entries.values()), list(entries)


# --- everything at once ---------------------------------------------------------------------


def write_report(
    runs: Sequence[RunResult],
    out_dir: Path,
    *,
    title: str,
    labels: Mapping[str, str],
    paper: Paper,
    notes: Sequence[str] = (),
    window: tuple[int, int] | None = None,
    reference: str | None = None,
) -> list[Path]:
    """table.md, table.csv and the plots in `out_dir`; returns the files written. `window`:
    rounds lo..hi of the interval tables (default the last 10); `reference`: a method to pair
    the others with by seed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = aggregate(runs, window)
    if not stats:
        return []
    environments = {
        r.name or str(r.summary.get("run_name")): r.summary.get("environment") for r in runs
    }
    written = [
        write_markdown(
            stats,
            out_dir / "table.md",
            title=title,
            labels=labels,
            paper=paper,
            notes=notes,
            reference=reference,
            environments=environments,
        ),
        write_csv(stats, out_dir / "table.csv", labels, paper, reference),
    ]
    return written + write_plots(runs, stats, out_dir, title=title, labels=labels)


# --- fedbat-report: one or several run folders side by side ---------------------------------


class RunDirError(ValueError):
    """A folder given to fedbat-report / fedbat-eval is not a run's results."""


@dataclass(frozen=True)
class RunView:
    """One run folder as fedbat-report shows it: label, rows, summary (None while unfinished)."""

    label: str
    run_dir: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any] | None
    config: dict[str, Any]

    @property
    def status(self) -> str:
        if self.summary is not None:
            return "finished"
        failed = self.run_dir / "FAILED"
        return f"failed: {failed.read_text().strip()}" if failed.exists() else "unfinished"


def load_run_view(run_dir: Path) -> RunView:
    """A run folder with at least one round (metrics.jsonl); summary.json when it finished."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a folder")
    rows = read_metrics(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    if not rows and summary is None:
        failed = run_dir / "FAILED"
        why = f" (it failed: {failed.read_text().strip()})" if failed.exists() else ""
        raise RunDirError(
            f"{run_dir} holds no results{why}; a run folder has metrics.jsonl after round 1 "
            "and summary.json at the end"
        )
    config = dict((summary or {}).get("config") or {})
    return RunView(run_dir.name, run_dir, rows, summary, config)


def _labels_unique(views: Sequence[RunView]) -> list[RunView]:
    """Folder names; runs that share one get as many parent folders as tell them apart
    (suites/a/runs/x and suites/b/runs/x: a/runs/x and b/runs/x)."""
    parts = [Path(os.path.abspath(v.run_dir)).parts for v in views]  # symlinks kept as named
    names = [v.label for v in views]
    labels = list(names)
    for i, name in enumerate(names):
        twins = [j for j, other in enumerate(names) if other == name]
        if len(twins) == 1:
            continue
        for depth in range(2, len(parts[i]) + 1):
            suffixes = {parts[j][-depth:] for j in twins}
            if len(suffixes) == len(twins) or depth == len(parts[i]):
                labels[i] = "/".join(parts[i][-depth:])
                break
    return [
        RunView(label, v.run_dir, v.rows, v.summary, v.config)
        for label, v in zip(labels, views, strict=True)
    ]


TABLE_KEYS = ("method", "dataset", "partitioner", "aggregator", "num-server-rounds")
UNCOMPARED_KEYS = ("output-dir", "run-name", "resume-from")  # differ between any two runs


def comparison_table(
    views: Sequence[RunView],
    *,
    window: tuple[int, int] | None = None,
    reference: str | None = None,
) -> str:
    """Markdown: a column per run; figures first, then every config key whose value differs.
    It opens with a warning when the runs differ in provenance. `window`: rounds lo..hi of the
    window row (default: the last 10 rounds of the shortest run); `reference`: the label of a
    run whose window mean the others' is compared with."""
    evaluated = [[r for r in v.rows if r.get("test_accuracy") is not None] for v in views]
    window = window or last_rounds(min(_last_round(v.rows) for v in views))
    lines: list[tuple[str, list[str]]] = [
        ("status", [v.status for v in views]),
        *((key, [str(v.config.get(key, "–")) for v in views]) for key in TABLE_KEYS),
        ("rounds done", [str(len(v.rows)) for v in views]),
        ("final accuracy (%)", [_pct(_last_acc(e)) for e in evaluated]),
        ("best accuracy (%)", [_pct(_best_acc(e)) for e in evaluated]),
        (
            f"mean of last {LAST_K} evaluated (%)",
            [_pct(_mean([r["test_accuracy"] for r in e[-LAST_K:]])) for e in evaluated],
        ),
        *_window_lines(views, window, reference),
        ("uplink MB", [f"{_sum_mb(v, 'uplink_bytes'):.2f}" for v in views]),
        ("downlink MB", [f"{_sum_mb(v, 'downlink_bytes'):.2f}" for v in views]),
        ("uplink bit/param", [_fmt(_mean_bits_of(v), 3) for v in views]),
        ("wall time (s)", [_seconds(v) for v in views]),
    ]
    keys = sorted({k for v in views for k in v.config} - {*TABLE_KEYS, *UNCOMPARED_KEYS})
    differing = [k for k in keys if len({repr(v.config.get(k)) for v in views}) > 1]
    lines += [(k, [str(v.config.get(k, "–")) for v in views]) for k in differing]
    header = _md_header(["", *(v.label for v in views)])
    warning = provenance_warning({v.label: (v.summary or {}).get("environment") for v in views})
    return "\n".join([*warning, *header, *(_md_row([name, *cells]) for name, cells in lines)])


def _window_lines(
    views: Sequence[RunView], window: tuple[int, int], reference: str | None
) -> list[tuple[str, list[str]]]:
    """The window's mean accuracy per run ('–' for a run without every round of it), and with
    a `reference` label each run's difference to that run's in points."""
    lo, hi = window
    means = {v.label: window_mean(v.rows, lo, hi) for v in views}
    lines = [(f"mean of rounds {lo}-{hi} (%)", [_pct(_float(m)) for m in means.values()])]
    if reference is None:
        return lines
    if reference not in means:
        raise RunDirError(f"--reference {reference!r} is not one of the runs: {', '.join(means)}")
    ref = means[reference]
    diffs = ["–" if m is None or ref is None else f"{100 * (m - ref):+.1f}" for m in means.values()]
    return [*lines, (f"rounds {lo}-{hi} minus {reference} (points)", diffs)]


def _last_acc(evaluated: list[dict[str, Any]]) -> float:
    return float(evaluated[-1]["test_accuracy"]) if evaluated else float("nan")


def _best_acc(evaluated: list[dict[str, Any]]) -> float:
    return max((float(r["test_accuracy"]) for r in evaluated), default=float("nan"))


def _mean_bits_of(view: RunView) -> float:
    return _mean(r.get("uplink_bits_per_param") for r in view.rows)


def _sum_mb(view: RunView, key: str) -> float:
    return sum(float(r[key]) for r in view.rows) / MB


def _seconds(view: RunView) -> str:
    seconds = (view.summary or {}).get("wall_seconds")
    if seconds is None:
        seconds = sum(float(r.get("round_seconds") or 0.0) for r in view.rows)
    return f"{float(seconds):.0f}"


RUN_AXES = (
    XAxis("round", "round", "round"),
    XAxis("traffic_mb", "cumulative uplink + downlink (MB, log scale)", "traffic", log=True),
)


def run_curve(view: RunView) -> dict[str, np.ndarray]:
    """Per evaluated round: round, cumulative uplink + downlink MB, accuracy in %."""
    traffic = np.cumsum([r["uplink_bytes"] + r["downlink_bytes"] for r in view.rows]) / MB
    points = [
        (r["round"], mb, 100 * r["test_accuracy"])
        for r, mb in zip(view.rows, traffic, strict=True)
        if r.get("test_accuracy") is not None
    ]
    array = np.array(points, dtype=float).reshape(-1, 3)
    return {"round": array[:, 0], "traffic_mb": array[:, 1], "accuracy": array[:, 2]}


def write_run_plots(views: Sequence[RunView], out_dir: Path) -> list[Path]:
    """accuracy_vs_round.png and accuracy_vs_traffic.png, one line per run."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    curves_by_run = [(v.label, run_curve(v)) for v in views]
    written = []
    for axis in RUN_AXES:
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.subplots()
        for label, curve in curves_by_run:
            style = "o-" if len(curve["round"]) <= 20 else "-"
            ax.plot(curve[axis.field], curve["accuracy"], style, markersize=3, label=label)
        if axis.log:
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(axis.label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        ax.set_title(f"test accuracy vs {axis.name}")
        path = out_dir / f"accuracy_vs_{axis.name}.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def report_main(argv: Sequence[str] | None = None) -> int:
    """fedbat-report RUN_DIR [RUN_DIR ...]: a side-by-side table on the console, two plots."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="fedbat-report",
        description="Compare run folders: accuracy vs round and vs uplink+downlink bytes "
        "(PNG) and a side-by-side table (printed).",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument(
        "--output",
        type=Path,
        help="folder for the plots and table.md (default: the run folder for one run, "
        "<first run's parent>/report for several)",
    )
    parser.add_argument(
        "--window",
        type=parse_window,
        metavar="LO-HI",
        help="rounds of the 'mean of rounds' row (default: the last 10 of the shortest run)",
    )
    parser.add_argument(
        "--reference",
        metavar="RUN_LABEL",
        help="a run's column label: add each run's window mean minus that run's",
    )
    args = parser.parse_args(argv)
    try:
        views = _labels_unique([load_run_view(d) for d in args.run_dirs])
        table = comparison_table(views, window=args.window, reference=args.reference)
    except RunDirError as exc:
        print(f"fedbat-report: {exc}", file=sys.stderr)
        return 2
    out_dir = args.output or (
        args.run_dirs[0] if len(views) == 1 else args.run_dirs[0].resolve().parent / "report"
    )
    print(table)
    written = write_run_plots(views, out_dir)
    (out_dir / "table.md").write_text(table + "\n")
    for path in [*written, out_dir / "table.md"]:
        print(f"wrote {path}")
    return 0
