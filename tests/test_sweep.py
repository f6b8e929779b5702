"""fedbat-sweep: suite validation, cells and resume status, tables and plots, and one real sweep.

Everything but the last tests runs on synthetic run dirs written through the results contract
(`RunRecorder`), so it is fast and needs no Flower. The `e2e` tests run conf/smoke.yaml through
Flower's simulation engine with a SuperLink the sweep owns, then check that it is gone.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tomli_w
import tomllib

from fedbat_flwr.results import RunRecorder
from fedbat_tools import report, sweep
from fedbat_tools.localrun import APP_DIR, processes_under
from fedbat_tools.sweep import Suite, SuiteError, expand, load_suite
from tests.leftovers import nothing_left_behind

METHODS = ["fedavg", "fedbat"]
PAPER_METHODS = [
    "fedavg", "signsgd", "ef-signsgd", "noisy-signsgd", "stoc-signsgd", "zerofl", "topk", "fedbat"
]  # fmt: skip
REQUIRED_CSV = (
    "method",
    "partitioner",
    "num_clients",
    "final_accuracy_mean",
    "final_accuracy_std",
    "best_accuracy_mean",
    "uplink_mb",
    "num_seeds",
    "rounds",
    "downlink_mb",
    "final_mean_last5",
)


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text().splitlines()))


def md_section(md: str, heading: str) -> list[str]:
    """The lines of table.md's section `## <heading>` (up to the next heading)."""
    lines = md.splitlines()
    start = lines.index(f"## {heading}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def write_suite(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(textwrap.dedent(text))
    return path


VALID = """
name: t
base: {num-server-rounds: 3, partitioner: shard}
grid: {method: [fedavg, fedbat], num-clients: [4, 8], seed: [0, 1]}
"""


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: t\ngrids: {}\n", "unknown suite key(s) ['grids']"),
        ("grid: {num-clients: [2]}\n", "suite 'name'"),
        ("name: 'a b'\ngrid: {num-clients: [2]}\n", "suite 'name'"),
        ("name: t\nbase: {lrr: 0.1, num-clients: 2}\n", "unknown run-config key 'lrr' in base"),
        ("name: t\ngrid: {num-clients: [2], epochs: [1]}\n", "unknown run-config key 'epochs'"),
        ("name: t\nbase: {num-clients: 2, output-dir: x}\n", "'output-dir' is set by the sweep"),
        ("name: t\ngrid: {num-clients: [2], seed: 0}\n", "grid 'seed' must be a non-empty list"),
        ("name: t\ngrid: {num-clients: [2], seed: [0, 0]}\n", "grid 'seed' lists a value twice"),
        (
            "name: t\nbase: {num-clients: 2, local-epochs: ten}\n",
            "base: run-config 'local-epochs' = 'ten' has type str; allowed: int",
        ),
        ("name: t\ngrid: {num-clients: [2.5]}\n", "grid 'num-clients' = 2.5 must be an integer"),
        ("name: t\nbase: {num-clients: 2, lr: -1}\n", "'lr' = -1.0 is out of range"),
        ("name: t\nbase: {num-clients: 2, partitioner: x}\n", "'partitioner' = 'x'"),
        ("name: t\nbase: {num-clients: 2, method: nope}\n", "unknown method(s) ['nope']"),
        ("name: t\nbase: {seed: 1}\n", "'num-clients' (simulated SuperNodes) is required"),
        ("name: t\ngrid: {num-clients: [0]}\n", "'num-clients' = 0 must be >= 1"),
        ("name: t\nclients-per-round: 5\ngrid: {num-clients: [3]}\n", "exceeds 'num-clients'"),
        (
            "name: t\nclients-per-round: 2\nbase: {num-clients: 3, fraction-train: 0.5}\n",
            "keep one",
        ),
        ("name: t\nbase: {num-clients: 2}\nlabels: [a]\n", "suite 'labels'"),
        ("name: t\nbase: {num-clients: 2}\npaper: {fedavg: {x: {}}}\n", "expected an integer N"),
        ("name: t\nbase: {num-clients: 2}\npaper: {fedavg: {3: {iid: 92}}}\n", "[mean, std]"),
        ("name: t\nbase: {num-clients: 2\n", "not valid YAML"),
        (
            "name: t\nbase: {num-clients: 2}\ngrid: {method: [fedavg, fedbat]}\nreference: topk\n",
            "suite 'reference' = 'topk' is not a method of the grid; allowed: fedavg, fedbat",
        ),
        ("name: t\nbase: {num-clients: 2}\nreference: [fedbat]\n", "'reference' must be a str"),
        (
            "name: t\nbase: {num-clients: 2, num-server-rounds: 3}\nwindow: [2, 4]\n",
            "suite 'window' = [2, 4]: the last round must be <= num-server-rounds = 3",
        ),
        ("name: t\nbase: {num-clients: 2}\nwindow: [3, 2]\n", "suite 'window' = [3, 2]: expected"),
        ("name: t\nbase: {num-clients: 2}\nwindow: [0, 2]\n", "1 <= lo <= hi"),
        ("name: t\nbase: {num-clients: 2}\nwindow: 10\n", "suite 'window' = 10: expected [lo, hi]"),
        ("name: t\nbase: {num-clients: 2}\nwindow: [1.5, 2]\n", "suite 'window' = [1.5, 2]"),
        ("- a\n- b\n", "must be a mapping"),
    ],
)
def test_invalid_suites_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SuiteError) as info:
        load_suite(write_suite(tmp_path, text), known_methods=METHODS)
    assert message in str(info.value)


def test_unknown_key_error_lists_allowed_keys(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match="allowed: num-clients, aggregator, alpha-max") as info:
        load_suite(write_suite(tmp_path, "name: t\nbase: {lrr: 1}\n"), known_methods=METHODS)
    assert "local-epochs" in str(info.value)


def test_yaml_exponent_strings_become_floats(tmp_path: Path) -> None:
    """PyYAML reads `5e-4` as a string; a float key takes it as the number it means."""
    suite = load_suite(
        write_suite(tmp_path, "name: t\nbase: {num-clients: 2, alpha-min: 5e-4, lr: 1}\n"),
        known_methods=METHODS,
    )
    assert suite.base["alpha-min"] == 5e-4
    assert suite.base["lr"] == 1.0 and isinstance(suite.base["lr"], float)


def test_missing_suite_file_is_a_suite_error(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match="cannot read suite file"):
        load_suite(tmp_path / "nope.yaml")


def test_cli_reports_suite_errors_with_exit_code_2(tmp_path: Path, capsys) -> None:
    path = write_suite(tmp_path, "name: t\nbase: {lrr: 1}\n")
    assert sweep.main([str(path), "--dry-run"]) == 2
    assert "unknown run-config key 'lrr'" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((APP_DIR / "conf").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_are_valid(path: Path) -> None:
    """Every preset loads with the registered methods (load_suite checks them by default)."""
    suite = load_suite(path)
    cells = expand(suite)
    if path.name.startswith("paper-"):
        assert list(dict.fromkeys(c.run_config["method"] for c in cells)) == PAPER_METHODS
        assert len(cells) == len(PAPER_METHODS) * 3 * 2 * 5
        assert {c.run_config["local-epochs"] for c in cells} == {10}
        assert {c.run_config["min-train-nodes"] for c in cells} == {10}
        assert set(suite.paper) == set(PAPER_METHODS) - {"topk"}  # Table 1 has no plain top-k


def test_paper_numbers_match_table_1() -> None:
    """A few spot checks against the paper's Table 1 (FMNIST row FedBAT, CIFAR-100 FedAvg)."""
    fmnist = load_suite(APP_DIR / "conf/paper-fmnist.yaml")
    assert fmnist.paper["fedbat"][100]["shard"] == (89.0, 0.4)
    assert fmnist.paper["signsgd"][30]["dirichlet"] == (86.5, 1.0)
    cifar100 = load_suite(APP_DIR / "conf/paper-cifar100.yaml")
    assert cifar100.paper["fedavg"][100]["iid"] == (59.2, 0.3)
    assert cifar100.base["dirichlet-alpha"] == 0.1 and cifar100.base["labels-per-client"] == 10


# --- cells ----------------------------------------------------------------------------------


def test_cells_have_deterministic_names_seeds_outermost(tmp_path: Path) -> None:
    cells = expand(load_suite(write_suite(tmp_path, VALID), known_methods=METHODS))
    names = [c.run_name for c in cells]
    assert names[:4] == ["fedavg-shard-n4-s0", "fedavg-shard-n8-s0", "fedbat-shard-n4-s0",
                         "fedbat-shard-n8-s0"]  # fmt: skip
    assert names[4:] == [n.replace("-s0", "-s1") for n in names[:4]]
    assert [c.index for c in cells] == list(range(1, 9))
    assert cells[1].num_clients == 8 and "num-clients" not in cells[1].run_config
    assert cells[0].run_config["num-server-rounds"] == 3


def test_extra_grid_keys_join_name_and_group(tmp_path: Path) -> None:
    text = "name: t\nbase: {num-clients: 2}\ngrid: {lr: [0.1, 0.05], model: [cnn4]}\n"
    cells = expand(load_suite(write_suite(tmp_path, text), known_methods=METHODS))
    assert [c.run_name for c in cells] == ["fedbat-iid-n2-s42-lr0.1", "fedbat-iid-n2-s42-lr0.05"]
    assert cells[1].key.extras == (("lr", 0.05),)  # single-valued keys are not extras


@pytest.mark.parametrize("num_clients", [10, 30, 47, 100, 300, 999])
def test_clients_per_round_samples_exactly_k(num_clients: int) -> None:
    """Flower samples max(int(connected * fraction-train), min-train-nodes) SuperNodes."""
    suite = Suite(name="t", base={"num-clients": num_clients}, grid={}, clients_per_round=10)
    config = expand(suite)[0].run_config
    sampled = max(int(num_clients * config["fraction-train"]), config["min-train-nodes"])
    assert sampled == 10


def fake_run(
    run_dir: Path,
    accuracies: list[float | None],
    *,
    method: str = "fedbat",
    uplink: int = 1000,
    config: dict | None = None,
    finish: bool = True,
    row_extra: dict | None = None,
    environment: dict | None = None,
) -> None:
    """A run dir written through the results contract, as the ServerApp writes it (summary.json's
    `environment` is null unless given, like a run from before it was recorded)."""
    recorder = RunRecorder(
        run_dir,
        method,
        config or {},
        num_params=10,
        num_rounds=len(accuracies),
        environment=dict(environment or {}),
    )
    for i, acc in enumerate(accuracies, 1):
        row = {
            "round": i, "method": method, "test_accuracy": acc, "test_loss": 1.0,
            "uplink_bytes": uplink, "uplink_bits_per_param": 1.0, "downlink_bytes": 2 * uplink,
            "downlink_bits_per_param": 32.0, "num_replies": 2, "num_rejected": 0,
            "round_seconds": 0.1,
        }  # fmt: skip
        recorder.add_round(row | (row_extra or {}))
    if finish:
        recorder.finish({"w": np.zeros(3, np.float32)})


def test_cell_status_pending_interrupted_done_stale(tmp_path: Path) -> None:
    cell = expand(Suite(name="t", base={"num-clients": 2, "num-server-rounds": 3}, grid={}))[0]
    runs = tmp_path / "runs"
    assert sweep.cell_status(cell, runs) == "pending"
    fake_run(runs / cell.run_name, [0.1, 0.2], config=cell.run_config, finish=False)
    assert sweep.cell_status(cell, runs) == "interrupted"
    fake_run(runs / cell.run_name, [0.1, 0.2], config=cell.run_config)  # 2 of 3 rounds
    assert sweep.cell_status(cell, runs) == "interrupted"
    fake_run(runs / cell.run_name, [0.1, 0.2, 0.3], config=cell.run_config)
    assert sweep.cell_status(cell, runs) == "done"
    fake_run(runs / cell.run_name, [0.1, 0.2, 0.3], config={**cell.run_config, "lr": 0.5})
    assert sweep.cell_status(cell, runs) == "stale"
    assert sweep.config_changes(
        cell, json.loads((runs / cell.run_name / "summary.json").read_text())
    )


def test_results_inside_the_app_must_be_git_ignored(tmp_path: Path) -> None:
    """Flower zips *.json/*.md under the app folder into every run's FAB unless git-ignored."""
    app = tmp_path / "app"
    app.mkdir()
    pyproject = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    del pyproject["tool"]["flwr"]["app"]["fab-exclude"]  # its patterns name this app's folders
    (app / "pyproject.toml").write_bytes(tomli_w.dumps(pyproject).encode())
    assert sweep.fab_would_include(app / "results" / "smoke", app)
    (app / ".gitignore").write_text("results/\n")
    assert not sweep.fab_would_include(app / "results" / "smoke", app)
    assert not sweep.fab_would_include(tmp_path / "elsewhere", app)


def test_the_fab_probe_follows_this_apps_fab_exclude() -> None:
    """Flower refuses to build when a fab-exclude pattern matches nothing; the probe must still
    build with the app's own patterns, or it would never block."""
    assert sweep.fab_would_include(APP_DIR / "not-ignored" / "smoke")
    assert not sweep.fab_would_include(APP_DIR / "results" / "smoke")  # .gitignore
    assert not sweep.fab_would_include(APP_DIR / "conf" / "smoke")  # fab-exclude


# --- progress -------------------------------------------------------------------------------


def test_progress_follows_the_metrics_rows_of_the_run() -> None:
    cells = expand(Suite(name="t", base={"num-clients": 2, "num-server-rounds": 2}, grid={}))
    out = io.StringIO()
    progress = sweep.Progress(num_cells=3, rounds_to_run=6, out=out)
    progress.start(cells[0])
    progress.round_done({"round": 1, "test_accuracy": 0.8421})
    progress.round_done({"round": 2, "test_accuracy": None})
    progress.finish(cells[0], ok=True)
    lines = out.getvalue().splitlines()
    assert lines[0] == "cell 1/3 fedbat-iid-n2-s42 started"
    assert re.fullmatch(r"cell 1/3 fedbat-iid-n2-s42 round 1/2 acc 0\.8421 ETA \d\d:\d\d", lines[1])
    assert "round 2/2 acc   n/a  ETA" in lines[2]
    assert lines[3].startswith("cell 1/3 fedbat-iid-n2-s42 done in ")
    assert progress.rounds_left == 4


def test_metrics_tail_reads_only_complete_new_rows(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    tail = sweep.MetricsTail(path)
    assert tail.new_rows() == []  # no round finished yet
    path.write_text('{"round": 1}\n{"round": 2, "test_acc')  # row 2 is being written
    assert tail.new_rows() == [{"round": 1}]
    with open(path, "a") as fh:
        fh.write('uracy": 0.5}\n')
    assert tail.new_rows() == [{"round": 2, "test_accuracy": 0.5}]
    assert tail.new_rows() == []


# --- tables and plots -----------------------------------------------------------------------


def synthetic_runs(root: Path) -> list[report.RunResult]:
    """fedavg and fedbat on two columns, two seeds each; known accuracies."""
    runs = []
    for method, uplink, base_acc in (("fedavg", 32_000_000, 0.80), ("fedbat", 1_000_000, 0.82)):
        for partitioner in ("iid", "shard"):
            for seed, shift in ((0, -0.05), (1, 0.05)):
                accs = [0.1, None, 0.5, 0.6, 0.7, 0.75, base_acc + shift]
                run_dir = root / f"{method}-{partitioner}-n10-s{seed}"
                fake_run(run_dir, accs, method=method, uplink=uplink)
                key = report.GroupKey(method, partitioner, 10)
                runs.append(report.load_run(run_dir, key, seed))
    return runs


def test_aggregate_over_seeds(tmp_path: Path) -> None:
    stats = {
        (s.key.method, s.key.partitioner): s for s in report.aggregate(synthetic_runs(tmp_path))
    }
    fedbat = stats[("fedbat", "shard")]
    assert fedbat.num_seeds == 2 and fedbat.rounds == 7
    assert fedbat.final_accuracy_mean == pytest.approx(0.82)
    assert fedbat.final_accuracy_std == pytest.approx(0.05)
    assert fedbat.best_accuracy_mean == pytest.approx(0.82)
    # last 5 evaluated rounds: 0.5, 0.6, 0.7, 0.75 and 0.77 / 0.87 (round 2 was not evaluated)
    assert fedbat.final_mean_last5 == pytest.approx((0.5 + 0.6 + 0.7 + 0.75 + 0.82) / 5)
    assert fedbat.uplink_mb == pytest.approx(7.0)
    assert fedbat.downlink_mb == pytest.approx(14.0)
    assert stats[("fedavg", "iid")].uplink_mb == pytest.approx(224.0)


def test_report_files(tmp_path: Path) -> None:
    paper = {"fedbat": {10: {"shard": (89.0, 0.4)}}, "zerofl": {10: {"iid": (80.0, 0.1)}}}
    labels = {"fedbat": "FedBAT", "zerofl": "ZeroFL (paper only)"}
    written = report.write_report(
        synthetic_runs(tmp_path / "runs"), tmp_path, title="synthetic", labels=labels, paper=paper
    )
    assert {p.name for p in written} == {
        "table.md", "table.csv", "accuracy_vs_round.png", "accuracy_vs_uplink.png",
        "accuracy_vs_bits.png",
    }  # fmt: skip
    md = (tmp_path / "table.md").read_text()
    header = md_section(md, "Final accuracy (%), mean ± std over seeds")[1]
    assert header == (
        "| method | iid, N=10 | iid, N=10 (paper) | shard, N=10 | shard, N=10 (paper) |"
    )
    assert "| FedBAT | 82.0 ± 5.0 | – | 82.0 ± 5.0 | 89.0 ± 0.4 |" in md
    assert "| ZeroFL (paper only) | – | 80.0 ± 0.1 | – | – |" in md
    assert "| fedavg | 224.0 | 1.000 | 448.0 | 32.000 | 7 |" in md
    assert "mask density" not in md  # no run reports model_sparsity
    rows = read_csv(tmp_path / "table.csv")
    assert set(REQUIRED_CSV) <= set(rows[0])
    assert len(rows) == 4
    shard = next(r for r in rows if r["method"] == "fedbat" and r["partitioner"] == "shard")
    assert float(shard["final_accuracy_mean"]) == pytest.approx(0.82)
    assert float(shard["paper_accuracy_mean"]) == pytest.approx(0.89)
    for name in ("accuracy_vs_round.png", "accuracy_vs_uplink.png", "accuracy_vs_bits.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mask_density_and_downlink_bits_reach_the_tables(tmp_path: Path) -> None:
    """FedPM's rows carry model_sparsity: the tables give 1 - its final value, mean over seeds."""
    runs = []
    for seed, sparsity in ((0, 0.7), (1, 0.9)):
        run_dir = tmp_path / "runs" / f"fedpm-s{seed}"
        fake_run(run_dir, [0.3, 0.4], method="fedpm", row_extra={"model_sparsity": sparsity})
        runs.append(report.load_run(run_dir, report.GroupKey("fedpm", "shard", 10), seed))
    report.write_report(runs, tmp_path, title="t", labels={}, paper={})
    assert (
        "| fedpm | 0.0 | 1.000 | 0.0 | 32.000 | 2 | 0.200 |" in (tmp_path / "table.md").read_text()
    )
    (row,) = read_csv(tmp_path / "table.csv")
    assert float(row["final_model_sparsity"]) == pytest.approx(0.8)
    assert float(row["downlink_bits_per_param"]) == pytest.approx(32.0)


# Columns of table.csv before the intervals: their names and order are a contract.
CSV_BEFORE_INTERVALS = (
    "method", "label", "partitioner", "num_clients", "extras", "num_seeds", "rounds",
    "final_accuracy_mean", "final_accuracy_std", "final_mean_last5", "final_mean_last5_std",
    "best_accuracy_mean", "uplink_mb", "downlink_mb", "uplink_bits_per_param",
    "paper_accuracy_mean", "paper_accuracy_std", "downlink_bits_per_param",
    "final_model_sparsity",
)  # fmt: skip
CSV_INTERVALS = (
    "window_lo", "window_hi", "window_mean", "window_ci95", "final_accuracy_ci95",
    "paired_diff_mean", "paired_diff_ci95", "paired_seeds",
)  # fmt: skip
# Final (= rounds 3-4) accuracy per seed: fedbat - fedavg is +1, +3, +0 points; fedavg also ran
# seed 3, which fedbat did not (it is left out of the pairs).
PAIRED_FINALS = {"fedavg": (0.70, 0.72, 0.74, 0.76), "fedbat": (0.71, 0.75, 0.74)}


def paired_runs(root: Path, environments: dict[str, dict] | None = None) -> list[report.RunResult]:
    """Four-round runs of PAIRED_FINALS on one column; `environments` by run name."""
    runs = []
    for method, finals in PAIRED_FINALS.items():
        for seed, final in enumerate(finals):
            run_dir = root / f"{method}-shard-n10-s{seed}"
            env = (environments or {}).get(run_dir.name)
            fake_run(run_dir, [0.5, None, final, final], method=method, environment=env)
            runs.append(report.load_run(run_dir, report.GroupKey(method, "shard", 10), seed))
    return runs


def half_width(values: list[float]) -> float:
    """The 95 % Student-t half-width, written out: t(0.975, n-1) * s / sqrt(n)."""
    t = {2: 12.706, 3: 4.303, 4: 3.182}[len(values)]
    return t * float(np.std(values, ddof=1)) / np.sqrt(len(values))


def pct_pm(values: list[float], signed: bool = False) -> str:
    """How the interval tables print mean ± half-width of fractions, in points."""
    mean = f"{100 * float(np.mean(values)):{'+' if signed else ''}.1f}"
    return f"{mean} ± {100 * half_width(values):.1f} (n={len(values)})"


def test_headline_tables_give_the_95_interval_over_seeds_for_window_and_final(
    tmp_path: Path,
) -> None:
    runs = paired_runs(tmp_path / "runs")
    fake_run(tmp_path / "runs" / "topk-s0", [0.2, 0.3, 0.4, 0.61], method="topk")
    runs.append(
        report.load_run(tmp_path / "runs" / "topk-s0", report.GroupKey("topk", "shard", 10), 0)
    )
    report.write_report(runs, tmp_path, title="t", labels={}, paper={})
    md = (tmp_path / "table.md").read_text()
    # Default window: the last 10 rounds of 4, i.e. all; round 2 was not evaluated.
    window = md_section(md, "Mean accuracy of rounds 1-4 (%), mean ± 95 % interval over seeds")
    fedbat_means = [(0.5 + 2 * f) / 3 for f in PAIRED_FINALS["fedbat"]]
    assert f"| fedbat | {pct_pm(fedbat_means)} |" in window
    final = md_section(md, "Final-round accuracy (%), mean ± 95 % interval over seeds")
    assert f"| fedavg | {pct_pm(list(PAIRED_FINALS['fedavg']))} |" in final
    assert "| fedbat | 73.3 ± 5.2 (n=3) |" in final  # 4.303 * 2.08 / sqrt(3) points
    assert "| topk | 61.0 (1 seed) |" in final
    assert "Paired by seed" not in md  # no reference named


def test_paired_table_lists_differences_per_seed_and_their_interval(tmp_path: Path) -> None:
    report.write_report(
        paired_runs(tmp_path / "runs"),
        tmp_path,
        title="t",
        labels={"fedavg": "FedAvg"},
        paper={},
        window=(3, 4),
        reference="fedavg",
    )
    md = (tmp_path / "table.md").read_text()
    paired = md_section(md, "Paired by seed against FedAvg (points, method − FedAvg)")
    diffs = [0.01, 0.03, 0.0]  # seed 3: fedavg only
    per_seed = "s0 +1.0, s1 +3.0, s2 +0.0"
    interval = pct_pm(diffs, signed=True)
    assert interval == "+1.3 ± 3.8 (n=3)"
    assert f"| shard, N=10 | fedbat | {per_seed} | {interval} | {per_seed} | {interval} |" in paired
    assert not any("| FedAvg |" in line for line in paired), "the reference is not paired"
    rows = {r["method"]: r for r in read_csv(tmp_path / "table.csv")}
    fedbat, fedavg = rows["fedbat"], rows["fedavg"]
    assert (fedbat["window_lo"], fedbat["window_hi"], fedbat["paired_seeds"]) == ("3", "4", "0;1;2")
    assert float(fedbat["paired_diff_mean"]) == pytest.approx(np.mean(diffs), abs=1e-6)
    assert float(fedbat["paired_diff_ci95"]) == pytest.approx(half_width(diffs), abs=1e-6)
    assert float(fedbat["window_mean"]) == pytest.approx(np.mean(PAIRED_FINALS["fedbat"]))
    finals = list(PAIRED_FINALS["fedavg"])
    assert float(fedavg["final_accuracy_ci95"]) == pytest.approx(half_width(finals), abs=1e-6)
    assert fedavg["paired_diff_mean"] == fedavg["paired_diff_ci95"] == fedavg["paired_seeds"] == ""


def test_csv_appends_the_interval_columns_after_the_old_ones(tmp_path: Path) -> None:
    fake_run(tmp_path / "runs" / "one", [0.3, 0.4], method="fedbat")
    run = report.load_run(tmp_path / "runs" / "one", report.GroupKey("fedbat", "iid", 2), 0)
    report.write_report([run], tmp_path, title="t", labels={}, paper={})
    header = (tmp_path / "table.csv").read_text().splitlines()[0].split(",")
    assert header == [*CSV_BEFORE_INTERVALS, *CSV_INTERVALS]
    assert list(report.CSV_COLUMNS) == header
    (row,) = read_csv(tmp_path / "table.csv")
    assert (row["window_lo"], row["window_hi"], row["window_mean"]) == ("1", "2", "0.350000")
    assert row["window_ci95"] == row["final_accuracy_ci95"] == "", "one seed has no interval"


def test_provenance_warning_opens_the_table_only_when_runs_differ(tmp_path: Path) -> None:
    env = {"commit": "a" * 40, "dirty": False, "python": "3.12.3", "torch_threads": 1}
    names = [
        f"{m}-shard-n10-s{s}" for m, finals in PAIRED_FINALS.items() for s in range(len(finals))
    ]
    same = paired_runs(tmp_path / "same", dict.fromkeys(names, env))
    report.write_report(same, tmp_path / "same", title="t", labels={}, paper={})
    assert "WARNING" not in (tmp_path / "same" / "table.md").read_text()

    envs = {**dict.fromkeys(names, env), "fedbat-shard-n10-s1": {**env, "commit": "b" * 40}}
    envs["fedbat-shard-n10-s2"] = None  # a run from before environments were recorded
    differ = paired_runs(tmp_path / "differ", envs)
    report.write_report(differ, tmp_path / "differ", title="t", labels={}, paper={})
    lines = (tmp_path / "differ" / "table.md").read_text().splitlines()
    assert lines[0].startswith("> **WARNING: these runs differ in provenance")
    block = lines[: lines.index("# t")]
    assert "> - no recorded environment: fedbat-shard-n10-s2" in block
    commit = next(line for line in block if line.startswith("> - commit differs: "))
    assert "fedbat-shard-n10-s1=bbbbbbbbbb" in commit and "fedavg-shard-n10-s0=aaaaaaaaaa" in commit
    assert not any("python" in line for line in block), "only keys that differ are listed"


def finish_every_cell(suite: Suite, runs: Path) -> None:
    """Three rounds a cell; fedbat is 2 points above fedavg from round 2 on, in every seed."""
    for cell in expand(suite):
        acc = 0.5 + 0.01 * cell.seed + (0.02 if cell.key.method == "fedbat" else 0.0)
        config = cell.run_config
        fake_run(runs / cell.run_name, [0.3, acc, acc], method=cell.key.method, config=config)


def test_suite_window_and_reference_reach_the_tables(tmp_path: Path) -> None:
    """The default window is the suite's last 10 rounds; `window`, `reference` (the YAML keys,
    or --window / --reference over them) choose another window and add the paired table."""
    suite = load_suite(write_suite(tmp_path, VALID), known_methods=METHODS)
    finish_every_cell(suite, tmp_path / "out" / "runs")
    assert sweep.write_tables(suite, expand(suite), tmp_path / "out")
    md = (tmp_path / "out" / "table.md").read_text()
    assert "## Mean accuracy of rounds 1-3 (%), mean ± 95 % interval over seeds" in md
    assert "Paired by seed" not in md
    chosen = sweep.with_report_options(suite, window=(2, 3), reference="fedavg")
    sweep.write_tables(chosen, expand(chosen), tmp_path / "out")
    md = (tmp_path / "out" / "table.md").read_text()
    assert "## Mean accuracy of rounds 2-3 (%), mean ± 95 % interval over seeds" in md
    paired = md_section(md, "Paired by seed against fedavg (points, method − fedavg)")
    assert "| shard, N=4 | fedbat | s0 +2.0, s1 +2.0 | +2.0 ± 0.0 (n=2) |" in "\n".join(paired)
    with pytest.raises(SuiteError, match="'reference' = 'topk' is not a method of the grid"):
        sweep.with_report_options(suite, reference="topk")
    with pytest.raises(SuiteError, match=r"'window' = \[2, 9\]: the last round must be <= "):
        sweep.with_report_options(suite, window=(2, 9))


def test_cli_takes_window_and_reference(tmp_path: Path, capsys) -> None:
    path = write_suite(tmp_path, VALID)
    finish_every_cell(load_suite(path, known_methods=METHODS), tmp_path / "out" / "runs")
    out = ["--output", str(tmp_path / "out"), "--report-only"]
    assert sweep.main([str(path), *out, "--window", "2-3", "--reference", "fedbat"]) == 0
    md = (tmp_path / "out" / "table.md").read_text()
    paired = md_section(md, "Paired by seed against fedbat (points, method − fedbat)")
    assert "| shard, N=8 | fedavg | s0 -2.0, s1 -2.0 | -2.0 ± 0.0 (n=2) |" in "\n".join(paired)
    assert sweep.main([str(path), *out, "--reference", "nope"]) == 2
    assert "'reference' = 'nope' is not a method of the grid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main([str(path), *out, "--window", "3-2"])
    assert "window '3-2': expected LO-HI with 1 <= LO <= HI" in capsys.readouterr().err


def test_plots_shade_the_spread_of_groups_with_two_or_more_seeds(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    runs = paired_runs(tmp_path / "runs")
    fake_run(tmp_path / "runs" / "topk-s0", [0.2, 0.3, 0.4, 0.6], method="topk")
    runs.append(
        report.load_run(tmp_path / "runs" / "topk-s0", report.GroupKey("topk", "shard", 10), 0)
    )
    by_group = report.curves(runs)
    fedbat = by_group[report.GroupKey("fedbat", "shard", 10)]
    assert fedbat.rounds.tolist() == [1, 3, 4] and fedbat.seeds.tolist() == [3, 3, 3]
    assert fedbat.low[-1] == pytest.approx(71.0) and fedbat.high[-1] == pytest.approx(75.0)
    colours = {k.row: "C0" for k in by_group}
    for method, bands in (("fedbat", 1), ("topk", 0)):
        ax = Figure().subplots()
        members = {k: c for k, c in by_group.items() if k.method == method}
        report._panel(ax, (10, "shard"), members, report.ROUND_AXIS, colours, {})
        assert len(ax.collections) == bands, method
    written = report.write_plots(runs, report.aggregate(runs), tmp_path, title="t", labels={})
    assert written[0].name == "accuracy_vs_round.png"
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_only_uses_finished_cells_of_the_suite(tmp_path: Path) -> None:
    suite = load_suite(write_suite(tmp_path, VALID), known_methods=METHODS)
    cells = expand(suite)
    runs = tmp_path / "out" / "runs"
    for cell in cells[:3]:
        fake_run(runs / cell.run_name, [0.3, 0.4, 0.5], method=cell.key.method,
                 config=cell.run_config)  # fmt: skip
    fake_run(runs / cells[3].run_name, [0.3], config=cells[3].run_config, finish=False)
    fake_run(runs / "not-in-suite", [0.9, 0.9, 0.9])
    out = io.StringIO()
    code = sweep.run_suite(suite, tmp_path / "out", report_only=True, out=out)
    assert code == 0
    assert "8 cells (3 done, 4 pending, 1 interrupted)" in out.getvalue()
    assert "3 of 8 runs complete" in (tmp_path / "out" / "table.md").read_text()
    rows = read_csv(tmp_path / "out" / "table.csv")
    assert sorted(int(r["num_seeds"]) for r in rows) == [1, 1, 1]


def test_dry_run_lists_cells_and_why_a_cell_is_stale(tmp_path: Path) -> None:
    suite = load_suite(write_suite(tmp_path, VALID), known_methods=METHODS)
    cells = expand(suite)
    runs = tmp_path / "out" / "runs"
    fake_run(runs / cells[0].run_name, [0.3, 0.4, 0.5], config={**cells[0].run_config, "lr": 0.5})
    out = io.StringIO()
    assert sweep.run_suite(suite, tmp_path / "out", dry_run=True, out=out) == 0
    text = out.getvalue()
    assert "    1 [stale      ] fedavg-shard-n4-s0  seed=0 method=fedavg num-clients=4" in text
    assert "config changed: lr: 0.5 -> 0.1" in text
    assert "    8 [pending    ] fedbat-shard-n8-s1" in text
    assert not (tmp_path / "out" / "table.md").exists()  # a dry run writes nothing


# --- end to end -----------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 600) -> str:
    """The real command in a subprocess; on timeout SIGTERM lets it stop its SuperLink."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedbat_tools.sweep", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=APP_DIR,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        output, _ = proc.communicate(timeout=60)
        pytest.fail(f"fedbat-sweep timed out:\n{output}")
    assert proc.returncode == 0, output
    return output


def assert_superlink_gone(output: str) -> None:
    """The SuperLink the sweep started, and everything started under its Flower home, is gone."""
    match = re.search(r"SuperLink pid (\d+) started \(log (\S+)/superlink\.log\)", output)
    assert match, output
    pid, home = int(match[1]), match[2]
    assert f"SuperLink pid {pid} stopped" in output
    assert not Path(f"/proc/{pid}").exists()
    leftovers = processes_under(Path(home))
    assert not leftovers, f"processes left under {home}: {leftovers}"


@pytest.mark.e2e
def test_smoke_sweep_end_to_end_and_resume(tmp_path: Path) -> None:
    """conf/smoke.yaml through the real command, with one cell left interrupted by an earlier
    call (a round written, no summary.json, FAILED): that cell restarts from a clean run dir
    beside the pending one; a second call finds both done and starts no SuperLink."""
    out = tmp_path / "smoke"
    interrupted = out / "runs" / "fedbat-iid-n3-s0"
    fake_run(interrupted, [0.5], finish=False)
    (interrupted / "FAILED").write_text("interrupted (SIGINT)\n")
    with nothing_left_behind():  # no Flower home, Ray session folder or process stays
        output = run_cli("conf/smoke.yaml", "--output", str(out))
    assert "2 cells (1 pending, 1 interrupted); 4 rounds to run" in output
    assert_superlink_gone(output)
    assert re.findall(r"cell \d/2 (\S+) started", output) == [
        "fedavg-iid-n3-s0",
        "fedbat-iid-n3-s0",
    ]
    assert re.search(r"cell 2/2 \S+ round 2/2 acc \d\.\d{4} ETA \d\d:\d\d", output)
    for name in ("table.md", "table.csv", "accuracy_vs_round.png", "accuracy_vs_uplink.png"):
        assert (out / name).stat().st_size > 0, name
    rows = read_csv(out / "table.csv")
    assert set(REQUIRED_CSV) <= set(rows[0])
    assert {(r["method"], r["num_seeds"]) for r in rows} == {("fedavg", "1"), ("fedbat", "1")}
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["fedavg-iid-n3-s0", "fedbat-iid-n3-s0"]
    assert "[fedbat-flwr] round   2/2" in (out / "runs" / runs[0] / "log.txt").read_text()
    restarted = [json.loads(line) for line in (interrupted / "metrics.jsonl").open()]
    assert [r["round"] for r in restarted] == [1, 2], "the old round 1 is gone, not appended to"
    assert not (interrupted / "FAILED").exists()

    mtimes = {r: (out / "runs" / r / "summary.json").stat().st_mtime_ns for r in runs}
    again = run_cli("conf/smoke.yaml", "--output", str(out))
    assert "2 cells (2 done); 0 rounds to run" in again
    assert again.count("skipped (complete)") == 2
    assert "SuperLink pid" not in again  # nothing to run: no SuperLink at all
    assert {r: (out / "runs" / r / "summary.json").stat().st_mtime_ns for r in runs} == mtimes


def test_a_run_from_before_a_key_counts_as_that_keys_old_behaviour() -> None:
    """A committed run that never recorded bn-payload sent BatchNorm 1-bit: it is stale for a
    float16 cell and done for a binary one."""
    from fedbat_tools.sweep import config_changes

    summary = {"config": {"method": "fedbat", "seed": 0}}
    cell_float = SimpleNamespace(run_config={"method": "fedbat", "bn-payload": "float16"})
    cell_binary = SimpleNamespace(run_config={"method": "fedbat", "bn-payload": "binary"})
    assert config_changes(cell_float, summary) == ["bn-payload: 'binary' -> 'float16'"]  # type: ignore[arg-type]
    assert config_changes(cell_binary, summary) == []  # type: ignore[arg-type]


def test_another_methods_option_never_makes_a_run_stale() -> None:
    """bn-payload only changes the 1-bit methods' runs, fedpm-theta only FedPM's: a FedAvg run
    recorded (or implied) with binary BatchNorm is still done for a float16 cell."""
    from fedbat_tools.sweep import config_changes

    cases = [("fedavg", False), ("fedpaq", False), ("fedbat", True), ("ef-signsgd", True)]
    for method, stale in cases:
        cell = SimpleNamespace(run_config={"method": method, "bn-payload": "float16"})
        for summary in (
            {"config": {"method": method}},
            {"config": {"method": method, "bn-payload": "binary"}},
        ):
            assert bool(config_changes(cell, summary)) == stale, (method, summary)  # type: ignore[arg-type]
    for method, stale in [("fedavg", False), ("fedpm", True)]:
        cell = SimpleNamespace(run_config={"method": method, "fedpm-theta": "mode"})
        assert bool(config_changes(cell, {"config": {"method": method}})) == stale  # type: ignore[arg-type]


def test_each_method_checks_exactly_the_options_it_declares() -> None:
    """`Method.options` is what the sweep trusts: a bad value of a declared option is refused
    by the method, a bad value of another method's option is not even read."""
    from fedbat_flwr.config import ConfigError, RunConfig
    from fedbat_flwr.methods import get_method, method_names

    bad = {"sign-aggregation": "nope", "fedbif-selector": "nope", "fedpm-theta": "nope"}
    every = {k for n in method_names() for k in get_method(n).options} - {"bn-payload"}
    for name in method_names():
        cls = get_method(name)
        for key in sorted(every):
            value = bad.get(key, -1)
            if key == "fedpm-entropy-coding":
                value = "nope"  # a bool option: a string is refused
            config = RunConfig(method=name, extra={key: value})
            if key in cls.options:
                with pytest.raises(ConfigError, match=key):
                    cls(config)
            else:
                cls(config)  # not read: no error


def test_method_base_sets_keys_for_one_methods_cells(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: t\nbase: {num-clients: 2}\nmethod-base: {ef-signsgd: {bn-payload: binary}}\n"
        "grid: {method: [fedbat, ef-signsgd]}\n"
    )
    cells = {c.run_config["method"]: c for c in expand(load_suite(path))}
    assert cells["ef-signsgd"].run_config["bn-payload"] == "binary"
    assert cells["fedbat"].run_config["bn-payload"] == "float16"
    assert cells["ef-signsgd"].run_name == "ef_signsgd-iid-n2-s42"
    path.write_text(
        "name: t\nbase: {num-clients: 2}\nmethod-base: {topk: {bn-payload: binary}}\n"
        "grid: {method: [fedbat]}\n"
    )
    with pytest.raises(SuiteError, match=r"'method-base' names method.*topk"):
        load_suite(path)
    path.write_text("name: t\nbase: {num-clients: 2}\nmethod-base: {fedbat: {bn-payload: 8}}\n")
    with pytest.raises(SuiteError, match=r"method-base\.fedbat: run-config .bn-payload."):
        load_suite(path)
