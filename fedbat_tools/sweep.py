"""Experiment suites: a YAML grid of run configs -> Flower simulation runs -> tables and plots.

    fedbat-sweep conf/<suite>.yaml [--output DIR] [--dry-run] [--report-only]

A suite file has:

    name: paper-fmnist            # the output folder is results/<name>/ unless --output
    description: ...              # optional, printed above the tables
    base: {dataset: fashion_mnist, local-epochs: 10, ...}   # run-config keys, as in pyproject
    method-base: {ef-signsgd: {bn-payload: binary}}        # optional: one method's cells only
    grid: {method: [fedavg, fedbat], partitioner: [iid, shard], num-clients: [30, 100],
           seed: [0, 1]}          # every combination is one run ("cell")
    clients-per-round: 10         # optional: fraction-train = k/N and min-train-nodes = k
    labels: {fedavg: FedAvg}      # optional pretty method names
    paper: {fedavg: {30: {iid: [92.5, 0.1]}}}   # optional reference (mean %, std %)
    window: [41, 50]              # optional: rounds of the tables' window (default: last 10)
    reference: fedavg             # optional: a grid method the others are paired with by seed

`num-clients` (in base or grid) is the number of simulated SuperNodes, which is also the number
of partitions. Every cell runs through ONE SuperLink owned by the sweep (stopped by PID at the end,
on errors and on Ctrl-C). Cells write `<DIR>/runs/<run-name>/` (the results contract plus
`log.txt`); a cell whose summary.json is complete and whose config matches is skipped, any other
existing run dir is deleted and the cell rerun, so an interrupted sweep resumes where it stopped.
An output folder inside the app folder must be git-ignored (or fab-excluded): `flwr run` packs any
*.json/*.jsonl/*.md there into each run's app bundle (the sweep refuses to run otherwise).
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import itertools
import json
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import yaml

from fedbat_flwr.config import ConfigError, RunConfig, coerce

from .localrun import (
    APP_DIR,
    LocalSuperLink,
    app_config_defaults,
    failure_reason,
    latest_run_status,
    mark_failed,
)
from .report import GroupKey, load_run, write_report
from .stats import last_rounds, parse_window

SUITE_KEYS = (
    "name",
    "description",
    "base",
    "method-base",
    "grid",
    "clients-per-round",
    "labels",
    "paper",
    "window",
    "reference",
)
NUM_CLIENTS = "num-clients"  # not a run-config key: the number of simulated SuperNodes
OWNED_KEYS = ("output-dir", "run-name")  # set by the sweep for every cell
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


class SuiteError(ValueError):
    """The suite file is wrong; the message names the key."""


# --- the suite ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Suite:
    """A validated suite file."""

    name: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    # Run-config keys for one method's cells only (over `base`, under the grid's values).
    method_base: dict[str, dict[str, Any]] = field(default_factory=dict)
    clients_per_round: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    paper: dict[str, dict[int, dict[str, tuple[float, float]]]] = field(default_factory=dict)
    description: str = ""
    # The tables' window of rounds (lo, hi), default the last 10; a method to pair others with.
    window: tuple[int, int] | None = None
    reference: str | None = None


@dataclass(frozen=True)
class Cell:
    """One run of the suite: its grid values, full run config and deterministic name."""

    index: int  # 1-based, in run order
    params: dict[str, Any]  # this cell's grid values (num-clients included)
    run_config: dict[str, Any]  # without output-dir / run-name (the sweep adds those)
    num_clients: int
    run_name: str
    key: GroupKey  # the table group (everything that varies except the seed)

    @property
    def num_rounds(self) -> int:
        return int(self.run_config["num-server-rounds"])

    @property
    def seed(self) -> int:
        return int(self.run_config["seed"])


def load_suite(path: Path, known_methods: Sequence[str] | None = None) -> Suite:
    """Read and validate a suite file; every cell's run config is checked by RunConfig too."""
    doc = _read_yaml(Path(path))
    unknown = sorted(set(doc) - set(SUITE_KEYS))
    if unknown:
        raise SuiteError(f"unknown suite key(s) {unknown}; allowed: {', '.join(SUITE_KEYS)}")
    schema = app_config_defaults()
    suite = Suite(
        name=_suite_name(doc.get("name")),
        base=_base(doc.get("base", {}), schema),
        grid=_grid(doc.get("grid", {}), schema),
        method_base=_method_base(doc.get("method-base", {}), schema),
        clients_per_round=_clients_per_round(doc),
        labels=_labels(doc.get("labels", {})),
        paper=_paper(doc.get("paper", {})),
        description=_text("description", doc.get("description", "")),
        window=_window(doc.get("window")),
        reference=None if doc.get("reference") is None else _text("reference", doc["reference"]),
    )
    _check_num_clients(suite)
    cells = expand(suite)  # checks each cell's run config and run-name uniqueness
    unused = sorted(set(suite.method_base) - {c.run_config["method"] for c in cells})
    if unused:
        raise SuiteError(f"'method-base' names method(s) {unused} that no cell runs")
    _check_methods(cells, known_methods)
    check_report_options(suite, cells)
    return suite


def with_report_options(
    suite: Suite, window: tuple[int, int] | None = None, reference: str | None = None
) -> Suite:
    """The suite with the command line's --window / --reference over its own, checked."""
    suite = replace(suite, window=window or suite.window, reference=reference or suite.reference)
    check_report_options(suite, expand(suite))
    return suite


def check_report_options(suite: Suite, cells: Sequence[Cell]) -> None:
    """`reference` is a method the grid runs; `window` lies within every cell's rounds."""
    methods = list(dict.fromkeys(str(c.run_config["method"]) for c in cells))
    if suite.reference is not None and suite.reference not in methods:
        raise SuiteError(
            f"suite 'reference' = {suite.reference!r} is not a method of the grid; "
            f"allowed: {', '.join(methods)}"
        )
    rounds = min(c.num_rounds for c in cells)
    if suite.window is not None and suite.window[1] > rounds:
        raise SuiteError(
            f"suite 'window' = {list(suite.window)}: the last round must be <= "
            f"num-server-rounds = {rounds}"
        )


def _window(value: Any) -> tuple[int, int] | None:
    """window: [lo, hi], integers with 1 <= lo <= hi (hi is checked against the cells later)."""
    if value is None:
        return None
    ints = isinstance(value, list) and len(value) == 2
    ints = ints and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ints or not 1 <= value[0] <= value[1]:
        raise SuiteError(
            f"suite 'window' = {value!r}: expected [lo, hi], integers with 1 <= lo <= hi"
        )
    return int(value[0]), int(value[1])


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SuiteError(f"cannot read suite file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SuiteError(f"suite file {path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise SuiteError(f"suite file {path} must be a mapping with keys {', '.join(SUITE_KEYS)}")
    return doc


def _suite_name(value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise SuiteError(f"suite 'name' = {value!r}: required, letters/digits/._- only")
    return value


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise SuiteError(f"suite '{key}' must be a string, got {value!r}")
    return value


def _base(base: Any, schema: Mapping[str, Any], where: str = "base") -> dict[str, Any]:
    if not isinstance(base, dict):
        raise SuiteError(f"suite '{where}' must be a mapping of run-config keys, got {base!r}")
    return {key: _value(where, key, value, schema) for key, value in base.items()}


def _method_base(value: Any, schema: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise SuiteError(
            f"suite 'method-base' must map method names to run-config keys, got {value!r}"
        )
    return {
        str(method): _base(keys, schema, f"method-base.{method}") for method, keys in value.items()
    }


def _grid(grid: Any, schema: Mapping[str, Any]) -> dict[str, list[Any]]:
    if not isinstance(grid, dict):
        raise SuiteError(
            f"suite 'grid' must be a mapping of run-config keys to lists, got {grid!r}"
        )
    out: dict[str, list[Any]] = {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SuiteError(f"grid '{key}' must be a non-empty list, got {values!r}")
        out[key] = [_value("grid", key, v, schema) for v in values]
        if len(set(map(repr, out[key]))) != len(out[key]):
            raise SuiteError(f"grid '{key}' lists a value twice: {values!r}")
    return out


def _value(where: str, key: Any, value: Any, schema: Mapping[str, Any]) -> Any:
    """Check the key is a run-config key and coerce the value to its default's type, as
    RunConfig does (YAML reads `5e-4` as a string, so floats accept that too)."""
    if key in OWNED_KEYS:
        raise SuiteError(f"{where} '{key}' is set by the sweep for every cell; remove it")
    if key == NUM_CLIENTS:  # not a run-config key
        if not isinstance(value, int) or isinstance(value, bool):
            raise SuiteError(f"{where} '{key}' = {value!r} must be an integer")
        return value
    if key not in schema:
        allowed = ", ".join([NUM_CLIENTS, *sorted(k for k in schema if k not in OWNED_KEYS)])
        raise SuiteError(f"unknown run-config key '{key}' in {where}; allowed: {allowed}")
    if isinstance(schema[key], float) and isinstance(value, str):
        with suppress(ValueError):
            value = float(value)
    try:
        return coerce(key, value, type(schema[key]))
    except ConfigError as exc:
        raise SuiteError(f"{where}: {exc}") from None


def _clients_per_round(doc: Mapping[str, Any]) -> int | None:
    value = doc.get("clients-per-round")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SuiteError(f"suite 'clients-per-round' = {value!r} must be an integer >= 1")
    for where in ("base", "grid"):
        clash = {"fraction-train", "min-train-nodes"} & set(doc.get(where) or {})
        if clash:
            raise SuiteError(
                f"{where} sets {sorted(clash)} and 'clients-per-round' derives them; keep one"
            )
    return value


def _labels(labels: Any) -> dict[str, str]:
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise SuiteError(f"suite 'labels' must map method names to strings, got {labels!r}")
    return {str(k): v for k, v in labels.items()}


def _paper(paper: Any) -> dict[str, dict[int, dict[str, tuple[float, float]]]]:
    """paper: {method: {N: {partitioner: [mean %, std %]}}} (methods need not be run)."""
    form = "paper: {method: {num-clients: {partitioner: [mean, std]}}}"
    if not isinstance(paper, dict):
        raise SuiteError(f"suite 'paper' must be a mapping ({form})")
    out: dict[str, dict[int, dict[str, tuple[float, float]]]] = {}
    for method, by_n in paper.items():
        if not isinstance(by_n, dict):
            raise SuiteError(f"paper '{method}' must map num-clients to partitioners ({form})")
        out[str(method)] = {}
        for n, by_part in by_n.items():
            if not isinstance(n, int) or not isinstance(by_part, dict):
                raise SuiteError(f"paper '{method}' key {n!r}: expected an integer N ({form})")
            out[str(method)][n] = {
                p: _mean_std(f"paper {method} {n} {p}", v) for p, v in by_part.items()
            }
    return out


def _mean_std(where: str, value: Any) -> tuple[float, float]:
    ok = isinstance(value, list) and len(value) == 2
    if not ok or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise SuiteError(f"{where} = {value!r}: expected [mean, std] in percent")
    return float(value[0]), float(value[1])


def _check_num_clients(suite: Suite) -> None:
    sizes = suite.grid.get(NUM_CLIENTS, [suite.base.get(NUM_CLIENTS)])
    if sizes == [None]:
        raise SuiteError(f"'{NUM_CLIENTS}' (simulated SuperNodes) is required in base or grid")
    for n in sizes:
        if n < 1:
            raise SuiteError(f"'{NUM_CLIENTS}' = {n} must be >= 1")
        k = suite.clients_per_round
        if k is not None and k > n:
            raise SuiteError(f"'clients-per-round' = {k} exceeds '{NUM_CLIENTS}' = {n}")


def _check_methods(cells: Sequence[Cell], known: Sequence[str] | None) -> None:
    """Every cell's method options, data keys and min-train-nodes, as the ServerApp will check
    them (`known` given: only the method names, without importing torch)."""
    if known is not None:
        unknown = sorted({c.run_config["method"] for c in cells} - set(known))
        if unknown:
            registered = ", ".join(sorted(known))
            raise SuiteError(f"unknown method(s) {unknown}; registered: {registered}")
        return
    from fedbat_flwr.preflight import (  # torch: suite is otherwise fine
        check_data,
        check_method,
        check_nodes,
    )

    for cell in cells:
        config = RunConfig.from_flower(cell.run_config)
        try:
            check_method(config)
            check_data(config, num_partitions=cell.num_clients)
            check_nodes(config, cell.num_clients)
        except ConfigError as exc:
            raise SuiteError(f"cell {cell.params}: {exc}") from None


# --- cells ----------------------------------------------------------------------------------


def expand(suite: Suite) -> list[Cell]:
    """Every grid combination, seeds outermost (a partial sweep already covers every method)."""
    keys = sorted(suite.grid, key=lambda k: k != "seed")  # stable: grid order otherwise
    varying = [k for k in suite.grid if len(suite.grid[k]) > 1]
    cells = [
        _cell(suite, index, dict(zip(keys, values, strict=True)), varying)
        for index, values in enumerate(itertools.product(*(suite.grid[k] for k in keys)), 1)
    ]
    names = [c.run_name for c in cells]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SuiteError(f"grid values give the same run-name twice: {twice}")
    return cells


def _cell(suite: Suite, index: int, params: dict[str, Any], varying: Sequence[str]) -> Cell:
    defaults = app_config_defaults()
    method = {**defaults, **suite.base, **params}["method"]
    run_config = {**suite.base, **suite.method_base.get(method, {}), **params}
    num_clients = int(run_config.pop(NUM_CLIENTS))
    if suite.clients_per_round is not None:
        # Flower samples max(int(connected * fraction-train), min-train-nodes) SuperNodes.
        run_config["fraction-train"] = suite.clients_per_round / num_clients
        run_config["min-train-nodes"] = suite.clients_per_round
    try:
        resolved = RunConfig.from_flower({**defaults, **run_config}).to_flower()
    except ConfigError as exc:
        raise SuiteError(f"cell {params}: {exc}") from None
    extras = tuple(
        (k, params[k]) for k in varying if k not in ("method", "partitioner", NUM_CLIENTS, "seed")
    )
    key = GroupKey(resolved["method"], resolved["partitioner"], num_clients, extras)
    parts = [key.method, key.partitioner, f"n{num_clients}", f"s{resolved['seed']}"]
    parts += [v if isinstance(v, str) else f"{k}{v:g}" for k, v in extras]
    run_name = "-".join(re.sub(r"[^A-Za-z0-9._]+", "_", str(p)) for p in parts)
    full = {k: v for k, v in resolved.items() if k not in OWNED_KEYS}
    return Cell(index, params, full, num_clients, run_name, key)


def cell_status(cell: Cell, runs_dir: Path) -> str:
    """'done' (complete, same config), 'pending', 'interrupted' or 'stale' (config changed)."""
    run_dir = runs_dir / cell.run_name
    if not run_dir.exists():
        return "pending"
    summary = _read_summary(run_dir)
    if summary is None or summary.get("rounds_completed") != cell.num_rounds:
        return "interrupted"
    return "stale" if config_changes(cell, summary) else "done"


# Keys added to the run config after runs were committed: a run that did not record one ran
# with this behaviour (the code before the key existed), whatever the key's default is now.
VALUE_BEFORE_KEY = {
    "bn-payload": "binary",
    "downlink-bits": 32,
    "fedpm-coding-model": "density",
    "fedpm-theta": "mean",
    "fedpm-theta-eps": 1e-3,
}


def config_changes(cell: Cell, summary: Mapping[str, Any]) -> list[str]:
    """Keys whose value differs from the finished run's. A key the run did not record counts
    as its `VALUE_BEFORE_KEY` value if it has one, and is ignored otherwise; another method's
    option (`Method.options`: FedPM's `fedpm-theta` for a FedAvg run) is ignored too."""
    recorded = {**VALUE_BEFORE_KEY, **(summary.get("config") or {})}
    unread = _options_not_read(str(cell.run_config.get("method", "")))
    return [
        f"{k}: {recorded[k]!r} -> {v!r}"
        for k, v in cell.run_config.items()
        if k in recorded and recorded[k] != v and k not in unread
    ]


def _options_not_read(method: str) -> set[str]:
    from fedbat_flwr.methods import get_method, method_names  # torch: only to compare a run

    try:
        own = set(get_method(method).options)
    except ValueError:  # an unknown method: compare every key
        return set()
    every = {key for name in method_names() for key in get_method(name).options}
    return every - own


def _read_summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


# --- running --------------------------------------------------------------------------------


class MetricsTail:
    """The rows a run appends to its metrics.jsonl (the results contract), as they arrive.

    Only complete lines are read, so a row the ServerApp is writing right now comes next time.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new_rows(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:  # no round finished yet
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


class Progress:
    """One console line per finished round (a new metrics.jsonl row), with an ETA for the
    whole sweep.

    ETA = mean wall time per round so far (startup included, so it is honest) x rounds left in
    this cell and in the cells still to run.
    """

    def __init__(self, num_cells: int, rounds_to_run: int, out: TextIO = sys.stdout) -> None:
        self.num_cells = num_cells
        self.rounds_left = rounds_to_run
        self.rounds_done = 0
        self.spent = 0.0  # seconds in finished cells
        self.out = out
        self.cell: Cell | None = None
        self.cell_started = 0.0
        self.cell_rounds = 0

    def start(self, cell: Cell) -> None:
        self.cell, self.cell_started, self.cell_rounds = cell, time.monotonic(), 0
        self._say(f"cell {cell.index}/{self.num_cells} {cell.run_name} started")

    def round_done(self, row: Mapping[str, Any]) -> None:
        """Count one metrics.jsonl row of the running cell and print its progress line."""
        if self.cell is None:
            return
        done, acc = int(row["round"]), row.get("test_accuracy")
        self.rounds_done += done - self.cell_rounds
        self.rounds_left -= done - self.cell_rounds
        self.cell_rounds = done
        acc_text = "  n/a " if acc is None else f"{acc:.4f}"
        self._say(
            f"cell {self.cell.index}/{self.num_cells} {self.cell.run_name} round "
            f"{done}/{self.cell.num_rounds} acc {acc_text} ETA {self.eta()}"
        )

    def finish(self, cell: Cell, ok: bool) -> None:
        elapsed = time.monotonic() - self.cell_started
        self.spent += elapsed
        unseen = cell.num_rounds - self.cell_rounds  # rounds whose row was not seen
        self.rounds_left -= unseen  # a failed cell's rest will not run either
        if ok:
            self.rounds_done += unseen
        self.cell = None
        outcome = "done" if ok else "FAILED"
        self._say(
            f"cell {cell.index}/{self.num_cells} {cell.run_name} {outcome} in {_mmss(elapsed)}"
        )

    def eta(self) -> str:
        if self.rounds_done == 0:
            return "--:--"
        running = time.monotonic() - self.cell_started if self.cell is not None else 0.0
        return _mmss((self.spent + running) / self.rounds_done * max(self.rounds_left, 0))

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def _mmss(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"


@contextmanager
def owned_superlink(out: TextIO = sys.stdout) -> Iterator[LocalSuperLink]:
    """One SuperLink for the whole sweep, stopped by PID however the sweep ends."""
    link = LocalSuperLink()
    try:
        link.start()
        assert link.process is not None
        print(
            f"SuperLink pid {link.process.pid} started (log {link.log_path})", file=out, flush=True
        )
        yield link
    finally:
        stragglers = link.stop()
        if link.process is not None:
            note = f" (and {len(stragglers)} stray processes)" if stragglers else ""
            print(f"SuperLink pid {link.process.pid} stopped{note}", file=out, flush=True)


def run_cell(link: LocalSuperLink, cell: Cell, runs_dir: Path, progress: Progress) -> str | None:
    """Run one cell from a clean run dir (its whole output goes to the run dir's log.txt);
    None if it wrote all its results, else the one-line reason (also in <run dir>/FAILED)."""
    run_dir = runs_dir / cell.run_name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # interrupted or stale: restart cleanly
    run_dir.mkdir(parents=True)
    run_config = {**cell.run_config, "output-dir": str(runs_dir), "run-name": cell.run_name}

    rows = MetricsTail(run_dir / "metrics.jsonl")
    progress.start(cell)
    with open(run_dir / "log.txt", "w") as log:

        def on_line(raw: str) -> None:
            log.write(ANSI_RE.sub("", raw) + "\n")
            log.flush()
            for row in rows.new_rows():  # the ServerApp prints a line after each row it writes
                progress.round_done(row)

        code = link.run(run_config, num_supernodes=cell.num_clients, on_line=on_line)
    for row in rows.new_rows():
        progress.round_done(row)
    ok = cell_status(cell, runs_dir) == "done"
    progress.finish(cell, ok)
    if ok:
        return None
    status = latest_run_status([], link.env)
    reason = failure_reason(run_dir, cell.num_rounds, code, status) or "incomplete results"
    mark_failed(run_dir, reason)
    _show_failure(run_dir / "log.txt", reason, progress.out)
    return reason


def _show_failure(log_path: Path, reason: str, out: TextIO, lines: int = 15) -> None:
    tail = log_path.read_text().splitlines()[-lines:]
    print(f"  last lines of {log_path}:", file=out)
    for text in tail:
        print(f"  | {text}", file=out)
    print(f"  failed: {reason}", file=out)
    out.flush()


# --- the sweep ------------------------------------------------------------------------------


def run_suite(
    suite: Suite,
    out_dir: Path,
    *,
    dry_run: bool = False,
    report_only: bool = False,
    fail_fast: bool = False,
    only: Sequence[str] = (),
    out: TextIO = sys.stdout,
) -> int:
    """Run every cell not done yet (of those whose run-name matches a glob of ``only``, if
    given), then write the tables and plots; 1 if a cell failed."""
    runs_dir = out_dir / "runs"
    cells = expand(suite)
    status = {c.run_name: cell_status(c, runs_dir) for c in cells}
    todo = [
        c
        for c in cells
        if status[c.run_name] != "done"
        and (not only or any(fnmatch.fnmatchcase(c.run_name, g) for g in only))
    ]
    _print_plan(suite, cells, status, todo, out_dir, out, verbose=dry_run)
    if dry_run:
        return 0
    failed: list[str] = []
    if report_only:
        todo = []
    for cell in cells:
        if status[cell.run_name] == "done":
            print(f"cell {cell.index}/{len(cells)} {cell.run_name} skipped (complete)", file=out)
    if todo:
        _check_outside_fab(out_dir)
        with _sweep_lock(out_dir):
            failed = _run_cells(cells, todo, runs_dir, fail_fast, out)
    written = write_tables(suite, cells, out_dir)
    for path in written:
        print(f"wrote {path}", file=out)
    if failed:  # the reasons come last, one line each (tracebacks are in each log.txt)
        print(f"{len(failed)} cell(s) failed:", file=out)
        for line in failed:
            print(f"  {line}", file=out)
    return 1 if failed else 0


def _run_cells(
    cells: Sequence[Cell], todo: Sequence[Cell], runs_dir: Path, fail_fast: bool, out: TextIO
) -> list[str]:
    progress = Progress(len(cells), sum(c.num_rounds for c in todo), out)
    failed: list[str] = []
    with owned_superlink(out) as link:
        for cell in todo:
            reason = run_cell(link, cell, runs_dir, progress)
            if reason is not None:
                failed.append(f"{cell.run_name}: {reason}")
                if fail_fast:
                    break
    return failed


def _print_plan(
    suite: Suite,
    cells: Sequence[Cell],
    status: Mapping[str, str],
    todo: Sequence[Cell],
    out_dir: Path,
    out: TextIO,
    verbose: bool,
) -> None:
    """The suite's cells by status and the rounds this call runs (`todo`: the cells not done
    that --only selects)."""
    counts = {
        s: list(status.values()).count(s) for s in ("done", "pending", "interrupted", "stale")
    }
    rounds = sum(c.num_rounds for c in todo)
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    not_done = len(cells) - counts["done"]
    selected = f"; {len(todo)} of them selected by --only" if len(todo) < not_done else ""
    print(
        f"suite {suite.name}: {len(cells)} cells ({summary}){selected}; {rounds} rounds to run",
        file=out,
    )
    print(f"output: {out_dir}", file=out)
    if not verbose:
        return
    for cell in cells:
        state = status[cell.run_name]
        params = " ".join(f"{k}={v}" for k, v in cell.params.items())
        print(f"  {cell.index:>3} [{state:<11}] {cell.run_name}  {params}", file=out)
        if state == "stale":
            summary = _read_summary(out_dir / "runs" / cell.run_name) or {}
            print(f"      config changed: {'; '.join(config_changes(cell, summary))}", file=out)
    out.flush()


def fab_would_include(out_dir: Path, app_dir: Path = APP_DIR) -> bool:
    """True if `flwr run` would pack this folder's results into every run's app bundle (FAB).

    `flwr run <app>` zips every *.json, *.jsonl, *.md, *.yaml under the app folder that
    .gitignore and `fab-exclude` do not exclude; results written there would make each cell's
    FAB bigger (and different, so installed anew) than the last, until it passes Flower's 10 MB
    limit.
    """
    try:
        relative = out_dir.resolve().relative_to(app_dir.resolve())
    except ValueError:
        return False
    probe = (relative / "runs" / "cell" / "summary.json").as_posix()
    try:
        from .fab import fab_contents  # Flower's build module takes seconds to import

        return probe in fab_contents(app_dir, {probe: b"{}"})
    except Exception:  # Flower's rules changed or refused the probe: cannot tell, do not block
        return False


def _check_outside_fab(out_dir: Path) -> None:
    if fab_would_include(out_dir):
        raise SuiteError(
            f"output folder {out_dir} is inside the app folder and not git-ignored, so Flower "
            "would pack its results into every run's FAB; add it to .gitignore or pass --output "
            "outside the app folder"
        )


@contextmanager
def _sweep_lock(out_dir: Path) -> Iterator[None]:
    """Refuse a second sweep on the same folder: it would delete this one's running cell."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".sweep.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SuiteError(f"another fedbat-sweep is running on {out_dir}") from None
        yield  # the lock goes with the file (and with the process, however it ends)


def write_tables(suite: Suite, cells: Sequence[Cell], out_dir: Path) -> list[Path]:
    """table.md, table.csv and the plots from the suite's finished cells (others are ignored)."""
    runs_dir = out_dir / "runs"
    done = [c for c in cells if cell_status(c, runs_dir) == "done"]
    runs = [load_run(runs_dir / c.run_name, c.key, c.seed) for c in done]
    notes = [suite.description] if suite.description else []
    notes += [
        f"{len(done)} of {len(cells)} runs complete. Final accuracy = the last round's test "
        "accuracy; std over seeds is numpy's (ddof=0). table.csv holds accuracies as fractions."
    ]
    return write_report(
        runs,
        out_dir,
        title=suite.name,
        labels=suite.labels,
        paper=suite.paper,
        notes=notes,
        window=suite.window or last_rounds(max(c.num_rounds for c in cells)),
        reference=suite.reference,
    )


# --- command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedbat-sweep",
        description="Run a YAML suite of fedbat-flwr experiments, then write tables and plots.",
    )
    parser.add_argument("suite", type=Path, help="suite file, e.g. conf/smoke.yaml")
    parser.add_argument(
        "--output", type=Path, help="suite folder (default results/<suite name>); runs go in runs/"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their status")
    parser.add_argument(
        "--report-only", action="store_true", help="only write tables/plots from finished cells"
    )
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failed cell")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="GLOB",
        help="run only cells whose run-name matches (repeatable), e.g. 'fedbat-*-s2*'",
    )
    parser.add_argument(
        "--window",
        type=parse_window,
        metavar="LO-HI",
        help="rounds of the tables' window, over the suite's 'window' (default: the last 10)",
    )
    parser.add_argument(
        "--reference",
        metavar="METHOD",
        help="pair the other methods with this one by seed, over the suite's 'reference'",
    )
    return parser


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM behaves like Ctrl-C, so the SuperLink is stopped on the way out."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        suite = with_report_options(load_suite(args.suite), args.window, args.reference)
        out_dir = (args.output or Path("results") / suite.name).resolve()
        return run_suite(
            suite,
            out_dir,
            dry_run=args.dry_run,
            report_only=args.report_only,
            fail_fast=args.fail_fast,
            only=args.only,
        )
    except SuiteError as exc:
        print(f"fedbat-sweep: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedbat-sweep: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
