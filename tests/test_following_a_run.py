"""A run a user can follow and that cleans up after itself (issue 33), without Flower's runtime:
the failure reason logged after Flower's exit message, every method's options checked whatever
the method, the console without Flower's routine lines, the progress and final lines, stopping
the SuperLink plain `flwr run .` leaves running, the README's generated key table.

The end-to-end side (plain `flwr run` against a real SuperLink, run_local.sh leaving nothing
behind) is in test_following_a_run_e2e.py.
"""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedbat_flwr import failure
from fedbat_flwr.config import ConfigError, RunConfig, declared_defaults
from fedbat_flwr.preflight import check_startup, unread_options
from fedbat_flwr.results import (
    CHECKPOINT,
    CheckpointError,
    RunRecorder,
    final_line,
    load_checkpoint,
    progress_line,
)
from fedbat_tools import keytable, localrun, sweep
from fedbat_tools.localrun import APP_DIR, is_alive, is_noise, stop_flower_local_superlink

ROW = {
    "round": 2, "method": "fedbat", "test_accuracy": 0.5, "test_loss": 1.0,
    "uplink_bytes": 1_500_000, "uplink_bits_per_param": 1.099, "downlink_bytes": 24_000_000,
    "downlink_bits_per_param": 32.0, "num_replies": 10, "num_rejected": 0, "round_seconds": 30.0,
}  # fmt: skip


# -- item 1: the reason is the last line --------------------------------------------------------
def test_the_reason_is_logged_after_flowers_own_exit_handlers(monkeypatch):
    """Flower runs exit handlers last-in first-out: the reason, registered when the ServerApp
    fails, is logged before the executor's own handler (which uploads the log) runs."""
    from flwr.supercore.exit import add_exit_handler
    from flwr.supercore.exit.exit_handler import trigger_exit_handlers

    said: list[str] = []
    monkeypatch.setattr(failure, "log", lambda level, text: said.append(text))
    add_exit_handler(lambda: said.append("executor: upload the log, mark the run failed"))
    with pytest.raises(ConfigError), failure.reason_logged_last():
        RunConfig.from_flower({"lr": -1.0})
    assert said == [], "nothing is said before Flower's exit message"
    trigger_exit_handlers(run_before_force_exit=False)
    assert said == [
        "fedbat-flwr: run failed: run-config 'lr' = -1.0 is out of range; allowed: (0.0, inf]",
        "executor: upload the log, mark the run failed",
    ]


def test_a_failure_reason_is_one_line():
    assert failure.one_line(ConfigError("run-config 'x' = 1 is not allowed")) == (
        "run-config 'x' = 1 is not allowed"
    )
    assert failure.one_line(RuntimeError("first\nrun-config 'min-train-nodes' = 5: only 2")) == (
        "RuntimeError: run-config 'min-train-nodes' = 5: only 2"
    )
    assert failure.one_line(KeyError()) == "KeyError"


# -- item 4: every key's value is checked, whatever the method ---------------------------------
def test_another_methods_option_is_checked_whatever_the_method(tmp_path: Path):
    bad = RunConfig.from_flower({"method": "fedbat", "topk-density": 5.0, "output-dir": "x"})
    with pytest.raises(ConfigError, match=r"'topk-density' = 5\.0 is not allowed.*'topk'"):
        check_startup(bad)
    fine = {"method": "fedbat", "topk-density": 0.1, "output-dir": str(tmp_path)}
    check_startup(RunConfig.from_flower(fine))
    # a combination only the chosen method forbids does not stop another method's run
    krum = {"method": "fedbat", "aggregator": "krum", "output-dir": str(tmp_path)}
    check_startup(RunConfig.from_flower(krum))


def test_an_option_the_method_ignores_gets_one_warning_naming_its_reader():
    defaults = declared_defaults()
    config = RunConfig.from_flower({**defaults, "method": "fedbat", "topk-density": 0.1})
    assert unread_options(config, defaults) == [
        "run-config key 'topk-density' is read only by method 'topk'; method 'fedbat' ignores it"
    ]
    assert unread_options(RunConfig.from_flower({**defaults, "topk-density": 0.03}), defaults) == []
    own = RunConfig.from_flower({**defaults, "method": "topk", "topk-density": 0.1})
    assert unread_options(own, defaults) == []
    binary = RunConfig.from_flower({**defaults, "method": "fedavg", "bn-payload": "binary"})
    (warning,) = unread_options(binary, defaults)
    assert warning.startswith("run-config key 'bn-payload' is read only by methods 'ef-signsgd'")


def test_a_near_miss_value_gets_a_did_you_mean():
    with pytest.raises(ConfigError, match=r"'partitioner' = 'shards'.*did you mean 'shard'\?"):
        RunConfig.from_flower({"partitioner": "shards"})
    with pytest.raises(
        ConfigError, match=r"'method' = 'fedbatt' is unknown.*did you mean 'fedbat'"
    ):
        check_startup(RunConfig.from_flower({"method": "fedbatt", "output-dir": "x"}))


# -- item 5: following the run -----------------------------------------------------------------
def test_the_progress_line_carries_elapsed_time_and_eta():
    line = progress_line(ROW, 5, elapsed=75.0, eta=90.4)
    assert line.startswith("[fedbat-flwr] round   2/5 | fedbat | test acc 0.5000")
    assert line.endswith("| 30.0 s | elapsed 1:15 | ETA 1:30")


def test_the_recorder_prints_an_eta_from_the_mean_round(tmp_path: Path, capsys):
    recorder = RunRecorder(tmp_path / "run", "fedbat", {}, 10, 4)
    recorder.add_round({**ROW, "round": 1, "round_seconds": 10.0})
    recorder.add_round({**ROW, "round": 2, "round_seconds": 30.0})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("ETA 0:30") and lines[1].endswith("ETA 0:40")  # 3 x 10, 2 x 20
    assert " | elapsed 0:0" in lines[1]


def test_the_final_line_gives_folder_accuracies_traffic_and_wall_time(tmp_path: Path):
    summary = {
        "rounds_completed": 5, "wall_seconds": 3725.0, "final_accuracy": 0.8621,
        "best_accuracy": 0.87, "total_uplink_bytes": 2_750_000, "total_downlink_bytes": 88_080_000,
    }  # fmt: skip
    assert final_line(summary, tmp_path) == (
        "5 rounds in 1:02:05: final accuracy 0.8621, best 0.8700, uplink 2.75 MB, "
        f"downlink 88.08 MB; results in {tmp_path}"
    )


INFO, WARN, ERR = (
    "\x1b[92mINFO \x1b[0m:      ",
    "\x1b[93mWARNING \x1b[0m:   ",
    "\x1b[91mERROR \x1b[0m:     ",
)
# (line as streamed, what the console shows of it or None): lines of real runs.
STREAMED = [
    ("Successfully started run 29266", "Successfully started run 29266"),
    (INFO + "Starting logstream for run_id `29266`", None),
    (WARN + "Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.", None),
    (INFO + "Federation `@none/default` (10 simulated SuperNodes)", "Federation"),
    (INFO + "To change federation size, use the following command:", None),
    (
        INFO + "\tflwr federation simulation-config @none/default <superlink> --num-supernodes 2",
        None,
    ),
    ("Successfully installed fedbat-flwr to /tmp/h/apps/fedbat-flwr.fedbat-flwr.0.1.0.3f8a", None),
    (INFO + "fedbat-flwr: fedbat on fashion_mnist, results in /x/run", "fedbat on"),
    (WARN + "fedbat-flwr: run-config key 'topk-density' is read only by", "topk-density"),
    (WARN + "fraction_evaluate is set to 0.0. Federated evaluation will be skipped.", None),
    (INFO + "Starting ValidatingStrategy strategy:", None),
    (INFO + "\t├── Number of rounds: 2", None),
    (INFO + "\t│\t├──Minimum nodes: train (2) | evaluate (0)", None),
    (INFO, None),
    (INFO + "Initial global evaluation results: {'test-accuracy': 0.12}", "Initial global"),
    (INFO + "[ROUND 1/2]", None),
    ("/v/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray, Ray", None),
    ("  warnings.warn(", None),
    (INFO + "round 1: sampled partitions [0, 1] (2 of 2 connected)", "sampled partitions"),
    (INFO + "\t└──> Aggregated MetricRecord: {'train-loss': 2.26}", None),
    (INFO + "Global evaluation", None),
    ("[fedbat-flwr] round   1/2 | fedbat | test acc 0.1200", "[fedbat-flwr] round   1/2"),
    (
        "\x1b[36m(ClientAppActor pid=5281)\x1b[0m WARNING : Manually terminating ClientAppActor",
        None,
    ),
    (INFO + "Strategy execution finished in 42.42s", None),
    (INFO + "Final results:", None),
    (INFO + "\t{ 0: {'test-accuracy': '1.2000e-01', 'test-loss': '2.3026e+00'},", None),
    (INFO + "fedbat-flwr: 2 rounds in 0:45: final accuracy 0.1250, ...; results in /x/run", None),
    (ERR + "ServerApp raised an exception", "ServerApp raised"),
    ("Traceback (most recent call last):", "Traceback"),
    (ERR + "fedbat-flwr: run failed: run-config 'lr' = -1.0 is out of range", "run failed"),
]


@pytest.mark.parametrize(("line", "shown"), STREAMED)
def test_the_console_leaves_out_flowers_routine_lines_only(line: str, shown: str | None):
    assert is_noise(line) == (shown is None)
    if shown is not None:
        assert shown in line


# -- item 6: a bad checkpoint is named plainly -------------------------------------------------
@pytest.mark.parametrize("content", [b"x" * 100, b"", b"PK\x03\x04 not really a zip"])
def test_a_file_that_is_no_checkpoint_gets_no_unsafe_advice(tmp_path: Path, content: bytes):
    (tmp_path / CHECKPOINT).write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"checkpoint {tmp_path / CHECKPOINT} is corrupt or partial")
    assert "allow_pickle" not in message and "unsafely" not in message


# -- item 2/3: the SuperLink `flwr run .` leaves running -----------------------------------------
FAKE = """\
import subprocess, sys, time
if sys.argv[1:2] == ["--with-child"]:
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
time.sleep(600)
"""


def _fake(folder: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    script = folder / name
    script.write_text(textwrap.dedent(FAKE))
    return subprocess.Popen([sys.executable, str(script), *args])


def test_stopping_flwr_runs_superlink_stops_its_tree_and_nothing_else(tmp_path, monkeypatch):
    """A SuperLink of Flower home `home` (with a child, as its executor), an executor that lost
    its parent but still dials the SuperLink's port, and another home's SuperLink."""
    monkeypatch.setenv("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "1")  # no real SuperLink uses it
    home, other = tmp_path / "home", tmp_path / "other"
    log_arg = f"{home}/local-superlink/superlink.log"
    link = _fake(tmp_path, "flower-superlink", "--with-child", "--log-file", log_arg)
    orphan = _fake(tmp_path, "flwr-simulation", "--runtime-api-address", "127.0.0.1:1")
    stranger = _fake(tmp_path, "flower-superlink", "--log-file", f"{other}/local-superlink/x.log")
    try:
        deadline = time.monotonic() + 30
        while not localrun.descendants(link.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        child = localrun.descendants(link.pid)
        assert child, "the fake SuperLink started its child"
        stopped = stop_flower_local_superlink(home)
        assert sorted(stopped) == sorted([link.pid, orphan.pid, *child])
        assert not any(is_alive(pid) for pid in stopped)
        assert is_alive(stranger.pid), "another Flower home's SuperLink is not touched"
    finally:
        localrun.stop_trees([link, orphan, stranger], grace=1)


# -- item 6: the README's key table --------------------------------------------------------------
def test_every_key_has_help_and_the_readme_table_is_generated_from_them():
    keys = keytable.declared_keys()
    assert [k.key for k in keys] == list(declared_defaults())
    assert all(k.help for k in keys)
    readme = (APP_DIR / "README.md").read_text()
    assert keytable.with_table(readme, keytable.markdown_table(keys)) == readme, (
        "README.md's run-config table is out of date: python -m fedbat_tools.keytable"
    )


def test_a_key_without_help_is_refused(tmp_path: Path):
    path = tmp_path / "pyproject.toml"
    path.write_text(
        "[tool.flwr.app.config]\nlr = 0.1  # learning rate\nseed = 1\n[tool.x]\na = 1\n"
    )
    with pytest.raises(keytable.KeyTableError, match="'seed' has no help"):
        keytable.declared_keys(path)


# -- the sweep's plan counts only the cells --only selects ---------------------------------------
def test_the_sweep_plan_counts_the_cells_only_selects(tmp_path: Path):
    suite = tmp_path / "s.yaml"
    suite.write_text(
        "name: s\nbase: {num-server-rounds: 3}\n"
        "grid: {method: [fedavg, fedbat], seed: [0, 1], num-clients: [2]}\n"
    )
    out = io.StringIO()
    code = sweep.run_suite(
        sweep.load_suite(suite), tmp_path / "o", dry_run=True, only=["fedbat-*"], out=out
    )
    assert code == 0
    first = out.getvalue().splitlines()[0]
    assert first == "suite s: 4 cells (4 pending); 2 of them selected by --only; 6 rounds to run"


def test_deploy_local_writes_where_the_user_stands(tmp_path: Path, monkeypatch, capsys):
    script = APP_DIR / "scripts" / "deploy_local.py"
    spec = importlib.util.spec_from_file_location("deploy_local", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    made: list[Path] = []

    class Deployment:
        def __init__(self, num_nodes: int, *, log_dir: Path, **kwargs: object) -> None:
            made.append(log_dir)

    monkeypatch.setattr(module, "LocalDeployment", Deployment)
    monkeypatch.setattr(module, "deploy_and_run", lambda *args, **kwargs: (0, None))
    monkeypatch.chdir(tmp_path)
    assert module.main(["--num-nodes", "2"]) == 1  # no run happened: no summary.json
    (log_dir,) = made
    assert log_dir.parent.parent == tmp_path / "outputs" and log_dir.name == "logs"
    assert str(tmp_path / "outputs") in capsys.readouterr().err.splitlines()[-1]
