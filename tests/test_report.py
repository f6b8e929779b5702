"""fedbat-report (runs side by side: table + plots) and fedbat-eval (score model.npz), on tiny
run folders written through the results contract; no training, no Flower."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from fedbat_flwr.config import RunConfig
from fedbat_flwr.data import load_test_set
from fedbat_flwr.results import FAILED_FILE, RunRecorder
from fedbat_flwr.task import build_model_for, data_config, load_state, state_arrays
from fedbat_flwr.training import evaluate
from fedbat_tools import evaluate_run
from fedbat_tools.localrun import APP_DIR
from fedbat_tools.report import report_main

# One machine's provenance (summary.json's `environment`): runs that share it are comparable.
ENVIRONMENT = {
    "commit": "a" * 40, "dirty": False, "code_sha256": "c" * 64, "python": "3.12.3",
    "flwr": "1.22.0", "torch": "2.8.0", "numpy": "2.3.2", "torch_threads": 1,
    "client_torch_threads": [1], "cpu": "AMD EPYC", "cpu_cores": 2, "gpu": None,
}  # fmt: skip


def write_run(
    run_dir: Path,
    accuracies: list[float | None],
    config: dict,
    *,
    uplink: int = 1000,
    finish: bool = True,
    arrays: dict[str, np.ndarray] | None = None,
    environment: dict | None = None,
) -> None:
    """A run folder as the ServerApp writes it; `environment` defaults to ENVIRONMENT ({}: an
    older run that recorded none)."""
    env = dict(ENVIRONMENT if environment is None else environment)
    recorder = RunRecorder(
        run_dir, config["method"], config, num_params=10, num_rounds=3, environment=env
    )
    for i, acc in enumerate(accuracies, 1):
        row = {
            "round": i, "method": config["method"], "test_accuracy": acc, "test_loss": 1.0,
            "uplink_bytes": uplink, "uplink_bits_per_param": 1.0, "downlink_bytes": 4 * uplink,
            "downlink_bits_per_param": 32.0, "num_replies": 2, "num_rejected": 0,
            "round_seconds": 0.5,
        }  # fmt: skip
        recorder.add_round(row)
    if finish:
        recorder.finish(arrays or {"w": np.zeros(3, np.float32)})


def test_report_prints_runs_side_by_side_and_draws_both_plots(tmp_path: Path, capsys):
    base = {"dataset": "fashion_mnist", "partitioner": "iid", "lr": 0.1}
    write_run(tmp_path / "a", [0.2, None, 0.6], {**base, "method": "fedbat"})
    fedavg = {**base, "method": "fedavg", "lr": 0.05}
    write_run(tmp_path / "b", [0.3, 0.5, 0.7], fedavg, uplink=32000)
    out = tmp_path / "report"
    capsys.readouterr()  # the recorder's progress lines
    assert report_main([str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("|")[2:4] == [" a ", " b "]
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in lines if "|" in line}
    assert [c.strip() for c in rows["method"]] == ["fedbat", "fedavg"]
    assert [c.strip() for c in rows["final accuracy (%)"]] == ["60.0", "70.0"]
    assert [c.strip() for c in rows["best accuracy (%)"]] == ["60.0", "70.0"]
    assert [c.strip() for c in rows["uplink MB"]] == ["0.00", "0.10"]
    assert [c.strip() for c in rows["lr"]] == ["0.1", "0.05"], "differing keys are listed"
    assert "dataset" in rows and "seed" not in rows, "equal keys beyond the main ones are not"
    for name in ("accuracy_vs_round.png", "accuracy_vs_traffic.png", "table.md"):
        assert (out / name).stat().st_size > 0


def report_rows(out: str) -> dict[str, list[str]]:
    """fedbat-report's printed table: row name -> cells (warning lines are not rows)."""
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("|")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_report_window_row_and_differences_to_a_reference_run(tmp_path: Path, capsys):
    write_run(tmp_path / "a", [0.2, 0.4, 0.6, 0.8, 0.9], {"method": "fedavg"})
    write_run(tmp_path / "b", [0.3, 0.5, 0.7], {"method": "fedbat"})
    runs = [str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "r")]
    capsys.readouterr()
    assert report_main(runs) == 0  # default: the last 10 rounds of the shortest run (3)
    rows = report_rows(capsys.readouterr().out)
    assert rows["mean of rounds 1-3 (%)"] == ["40.0", "50.0"]
    assert rows["final accuracy (%)"] == ["90.0", "70.0"], "the older rows stay"
    assert report_main([*runs, "--window", "2-3", "--reference", "a"]) == 0
    rows = report_rows(capsys.readouterr().out)
    assert rows["mean of rounds 2-3 (%)"] == ["50.0", "60.0"]
    assert rows["rounds 2-3 minus a (points)"] == ["+0.0", "+10.0"]
    assert report_main([*runs, "--window", "4-5", "--reference", "a"]) == 0
    rows = report_rows(capsys.readouterr().out)
    assert rows["mean of rounds 4-5 (%)"] == ["85.0", "–"], "a run short of the window: no value"
    assert rows["rounds 4-5 minus a (points)"] == ["+0.0", "–"]
    assert report_main([*runs, "--reference", "c"]) == 2
    assert "--reference 'c' is not one of the runs: a, b" in capsys.readouterr().err


def test_report_warns_first_when_runs_differ_in_provenance(tmp_path: Path, capsys):
    write_run(tmp_path / "a", [0.5], {"method": "fedavg"})
    write_run(
        tmp_path / "b", [0.6], {"method": "fedbat"}, environment={**ENVIRONMENT, "torch_threads": 2}
    )
    write_run(tmp_path / "old", [0.6], {"method": "fedbat"}, environment={})
    out = ["--output", str(tmp_path / "r")]
    capsys.readouterr()
    assert report_main([str(tmp_path / n) for n in ("a", "b", "old")] + out) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("> **WARNING: these runs differ in provenance")
    assert "> - no recorded environment: old" in lines
    assert "> - torch_threads differs: a=1, b=2" in lines
    assert (tmp_path / "r" / "table.md").read_text().startswith("> **WARNING")
    write_run(tmp_path / "c", [0.7], {"method": "fedbat"})  # a's environment
    capsys.readouterr()
    assert report_main([str(tmp_path / "a"), str(tmp_path / "c"), *out]) == 0
    text = capsys.readouterr().out
    assert "WARNING" not in text and text.startswith("|  | a | c |"), "one environment: no warning"


def test_runs_sharing_a_folder_name_are_told_apart_by_their_parents(tmp_path: Path, capsys):
    for suite in ("cpu-fmnist", "cpu-fmnist-downlink"):
        write_run(tmp_path / suite / "runs" / "fedbat-s0", [0.5], {"method": "fedbat"})
    write_run(tmp_path / "other", [0.5], {"method": "fedavg"})
    capsys.readouterr()
    runs = [str(tmp_path / s / "runs" / "fedbat-s0") for s in ("cpu-fmnist", "cpu-fmnist-downlink")]
    assert report_main([*runs, str(tmp_path / "other"), "--output", str(tmp_path / "r")]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert [c.strip() for c in header.split("|")[2:5]] == [
        "cpu-fmnist/runs/fedbat-s0", "cpu-fmnist-downlink/runs/fedbat-s0", "other"
    ]  # fmt: skip


def test_report_of_one_run_writes_into_it_and_shows_an_unfinished_run(tmp_path: Path, capsys):
    write_run(tmp_path / "r", [0.2, 0.4], {"method": "fedbat"}, finish=False)
    capsys.readouterr()
    assert report_main([str(tmp_path / "r")]) == 0
    assert "| status | unfinished |" in capsys.readouterr().out
    assert (tmp_path / "r" / "accuracy_vs_round.png").exists()


def test_report_refuses_a_folder_without_results_and_says_why(tmp_path: Path, capsys):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / FAILED_FILE).write_text("run-config 'lr' = 0.0 is out of range\n")
    assert report_main([str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "holds no results" in err and "'lr' = 0.0" in err


def test_eval_scores_model_npz_like_the_server(tmp_path: Path, capsys):
    config = RunConfig.from_flower({"max-test-examples": 64, "seed": 3})
    model = build_model_for(config)
    write_run(tmp_path / "run", [0.1], config.to_flower(), arrays=state_arrays(model))
    capsys.readouterr()
    assert evaluate_run.main([str(tmp_path / "run"), "--max-test-examples", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    test = load_test_set(data_config(config, 1), max_examples=64)
    same = build_model_for(config.replace(seed=0))  # other weights, then the saved ones
    load_state(same, state_arrays(model))
    loss, accuracy = evaluate(same, test.x, test.y, batch_size=64, device=torch.device("cpu"))
    assert result["num_examples"] == 64
    assert result["test_accuracy"] == pytest.approx(accuracy)
    assert result["test_loss"] == pytest.approx(loss, rel=1e-5)


def test_eval_says_what_is_missing(tmp_path: Path, capsys):
    write_run(tmp_path / "run", [0.1], {"method": "fedbat"}, finish=False)
    assert evaluate_run.main([str(tmp_path / "run")]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_console_scripts_point_at_the_commands():
    scripts = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["project"]["scripts"]
    for name in ("fedbat-report", "fedbat-eval", "fedbat-sweep"):
        module, _, func = scripts[name].partition(":")
        assert callable(getattr(importlib.import_module(module), func))


def test_tensorboard_scalars_follow_metrics_jsonl(tmp_path: Path):
    pytest.importorskip("tensorboard")  # the optional extra: pip install -e ".[tensorboard]"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_run(tmp_path / "run", [0.25, None, 0.75], {"method": "fedbat", "tensorboard": True})
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    accuracy = [(e.step, e.value) for e in events.Scalars("test_accuracy")]
    assert accuracy == [(1, 0.25), (3, 0.75)], "unevaluated rounds have no point"
    assert [e.value for e in events.Scalars("uplink_bytes")] == [1000, 1000, 1000]


def test_tensorboard_off_writes_nothing_and_on_needs_the_package(tmp_path: Path, monkeypatch):
    write_run(tmp_path / "run", [0.5], {"method": "fedbat"})
    assert not (tmp_path / "run" / "tensorboard").exists()
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    from fedbat_flwr.config import ConfigError
    from fedbat_flwr.preflight import check_tracking

    with pytest.raises(ConfigError, match=r"'tensorboard' = true needs the tensorboard package"):
        check_tracking(RunConfig.from_flower({"tensorboard": True}))
