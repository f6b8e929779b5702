"""A run that fails says so: one line naming the run-config key, a non-zero exit, no result-like
folder, no process left behind (issue 18's table, row by row).

Most rows are caught by the pre-flight check before Flower starts, so they run here in
`localrun.main` (what scripts/run_local.sh executes) without a SuperLink. One test starts
Flower: Ctrl-C during a simulation (every process stopped). The ServerApp's own start-up check
through plain `flwr run` is in test_following_a_run_e2e.py.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedbat_flwr.config import ConfigError, RunConfig, check_keys
from fedbat_flwr.preflight import check_startup, wait_for_nodes
from fedbat_flwr.results import FAILED_FILE, RunRecorder, default_run_name, holds_results
from fedbat_tools import localrun, sweep
from fedbat_tools.localrun import (
    APP_DIR,
    RunStatus,
    app_config_defaults,
    descendants,
    failure_reason,
    is_alive,
)
from fedbat_tools.sweep import SuiteError, expand, load_suite
from tests.leftovers import nothing_left_behind


def child_pids() -> set[int]:
    """Living direct children of this test process (Linux /proc).

    A command that starts Flower starts it as our child. The test run's shared SuperLink
    (tests/conftest.py) may be one already, so a test that must start nothing compares the
    set before and after.
    """
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if parent == os.getpid() and is_alive(int(entry.name)):
            children.add(int(entry.name))
    return children


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = localrun.main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("run_config", "nodes", "needle"),
    [
        ("method='nope'", 2, "'method' = 'nope' is unknown"),
        ("method='topk' topk-density=5.0", 2, "'topk-density' = 5.0 is not allowed"),
        ("method='fedbat' topk-density=5.0", 2, "'topk-density' = 5.0 is not allowed"),
        ("local-epoch=2", 2, "'local-epoch' is unknown; did you mean 'local-epochs'?"),
        ("output-dir='/proc/x'", 2, "'output-dir' = '/proc/x' cannot be created"),
        ("labels-per-client=20", 2, "'labels-per-client' = 20 is more than"),
        ("data-dir='/nonexistent/fmnist'", 2, "data-dir '/nonexistent/fmnist'"),
        ("min-train-nodes=2", 1, "'min-train-nodes' = 2 needs that many SuperNodes"),
        ("topk-densty=0.1", 2, "did you mean 'topk-density'?"),
        ("lr='fast'", 2, "'lr' = 'fast' has type str"),
        ("method='fedavg' aggregator='majority'", 2, "'aggregator' = 'majority' votes on sign"),
    ],
)
def test_bad_run_config_fails_before_flower_with_one_line(
    capsys, tmp_path: Path, run_config: str, nodes: int, needle: str
):
    out = tmp_path / "out"
    config = f"{run_config} output-dir='{out}'" if "output-dir" not in run_config else run_config
    before = child_pids()
    code, err = run_main(capsys, "--num-supernodes", str(nodes), "--run-config", config)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: run-config"), err
    assert needle in err[0]
    assert "DataConfig" not in err[0] and "Traceback" not in err[0]
    assert not out.exists() or not any(out.iterdir()), "no run folder for a run that never ran"
    assert child_pids() <= before, "no SuperLink was started"


def test_reused_run_name_is_refused_not_overwritten(capsys, tmp_path: Path):
    RunRecorder(tmp_path / "mine", "fedbat", {}, 10, 1).finish({})
    before = (tmp_path / "mine" / "summary.json").read_text()
    code, err = run_main(capsys, "--run-config", f"run-name='mine' output-dir='{tmp_path}'")
    assert code == 2 and "'run-name' = 'mine'" in err[-1] and "resume-from=" in err[-1]
    assert (tmp_path / "mine" / "summary.json").read_text() == before


def test_run_local_sh_exits_non_zero_with_the_key_last(tmp_path: Path):
    """The README's command itself: a typo'd key stops it with the key in the last line."""
    result = subprocess.run(
        ["bash", str(APP_DIR / "scripts/run_local.sh"), "--run-config", "local-epoch=2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    last = result.stderr.splitlines()[-1]
    assert "'local-epoch' is unknown; did you mean 'local-epochs'?" in last


def test_every_key_of_the_app_is_known_and_types_follow_the_defaults():
    known = app_config_defaults()
    check_keys({"local-epochs": 2, "topk-density": 1, "fault-kind": "hang"}, known)
    with pytest.raises(ConfigError, match="'topk-density' = 'a' has type str; allowed: float"):
        check_keys({"topk-density": "a"}, known)
    with pytest.raises(ConfigError, match="'zzz' is unknown; every key"):
        check_keys({"zzz": 1}, known)


def test_startup_check_is_what_the_server_app_runs(tmp_path: Path):
    """The ServerApp calls check_startup first: a bad option never reaches round 1."""
    config = RunConfig.from_flower({"method": "fedpaq", "quant-bits": 40, "output-dir": "x"})
    with pytest.raises(ConfigError, match="'quant-bits' = 40"):
        check_startup(config)
    check_startup(RunConfig.from_flower({"output-dir": str(tmp_path / "new")}))
    assert (tmp_path / "new").is_dir() and not any((tmp_path / "new").iterdir())
    bad_resume = RunConfig.from_flower({"resume-from": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match=r"'resume-from'.*no checkpoint"):
        check_startup(bad_resume)
    with pytest.raises(ConfigError, match=r"'node-wait-timeout' = 0\.0"):
        check_startup(RunConfig.from_flower({"node-wait-timeout": 0.0, "output-dir": "x"}))


def test_waiting_for_nodes_is_bounded():
    counts = iter([0, 1, 1, 1, 1])
    with pytest.raises(RuntimeError, match=r"'min-train-nodes' = 2: only 1 SuperNode\(s\)"):
        wait_for_nodes(lambda: next(counts), 2, timeout=0.05, poll=0.02)
    wait_for_nodes(lambda: 3, 2, timeout=0.05)  # enough nodes: returns at once


def test_success_is_read_from_the_results_not_from_the_exit_code(tmp_path: Path):
    run_dir = tmp_path / "run"
    failed = RunStatus("7", "finished:failed", "Simulation failed with exception: boom")
    assert failure_reason(run_dir, 2, 0, failed) == "Simulation failed with exception: boom"
    assert "summary.json" in failure_reason(run_dir, 2, 0, None)
    assert failure_reason(run_dir, 2, 3, None) == "flwr run exited with status 3"
    recorder = RunRecorder(run_dir, "fedbat", {}, 10, 2)
    recorder.finish({})  # 0 of 2 rounds: a summary, but not a finished run
    assert failure_reason(run_dir, 2, 0, None) is not None
    run_dir.joinpath("summary.json").write_text(json.dumps({"rounds_completed": 2}))
    assert failure_reason(run_dir, 2, 0, failed) is None


def test_a_new_run_makes_no_folder_before_its_first_round(tmp_path: Path):
    recorder = RunRecorder(tmp_path / "run", "fedbat", {}, 10, 2)
    assert not (tmp_path / "run").exists()
    row = {
        "round": 1, "method": "fedbat", "test_accuracy": 0.5, "test_loss": 1.0,
        "uplink_bytes": 1, "uplink_bits_per_param": 1.0, "downlink_bytes": 1,
        "downlink_bits_per_param": 32.0, "num_replies": 2, "num_rejected": 0,
        "round_seconds": 0.1,
    }  # fmt: skip
    recorder.add_round(row)
    assert holds_results(tmp_path / "run")


def test_default_run_names_never_reuse_a_folder(tmp_path: Path):
    first = default_run_name("fedbat", "fashion_mnist", "iid", tmp_path)
    RunRecorder(tmp_path / first, "fedbat", {}, 10, 1).finish({})
    second = default_run_name("fedbat", "fashion_mnist", "iid", tmp_path)
    assert second != first and not holds_results(tmp_path / second)


def test_failed_run_is_marked_and_exits_non_zero(monkeypatch, capsys, tmp_path: Path):
    """The wrapper's path after Flower: flwr run exits 0, the SuperLink says failed."""

    class FailingLink:
        env = None

        def start(self) -> None:
            pass

        def stop(self) -> list[int]:
            return []

        def run(self, run_config, *, num_supernodes, on_line, timeout, federation) -> int:
            on_line("Traceback (most recent call last): ...")
            return 0

    monkeypatch.setattr(localrun, "LocalSuperLink", FailingLink)
    status = RunStatus("1", "finished:failed", "Simulation failed with exception: no data")
    monkeypatch.setattr(localrun, "latest_run_status", lambda *args: status)
    code, err = run_main(capsys, "--run-config", f"output-dir='{tmp_path}' run-name='r'")
    assert code == 1
    assert err[-1].startswith("error: Simulation failed with exception: no data (log: ")
    assert (tmp_path / "r" / FAILED_FILE).read_text().strip().endswith("no data")
    assert "Traceback" in (tmp_path / "r" / "log.txt").read_text()
    assert not holds_results(tmp_path / "r")


SMALL = {"max-examples-per-client": 32, "max-test-examples": 100, "num-server-rounds": 1}


@pytest.mark.e2e
def test_ctrl_c_stops_every_process_of_the_run(tmp_path: Path):
    command = [sys.executable, "-m", "fedbat_tools.localrun", "--num-supernodes", "2"]
    command += ["--run-config", " ".join(f"{k}={v}" for k, v in SMALL.items())]
    command += ["--run-config", f"num-server-rounds=20 output-dir='{tmp_path}' run-name='c'"]
    seen: set[int] = set()
    ray_started = False
    with nothing_left_behind():  # no Flower home, Ray session folder or process stays
        proc = subprocess.Popen(
            command, cwd=APP_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and proc.poll() is None:
                tree = descendants(proc.pid)
                seen.update(tree)
                ray_started = any(b"raylet" in _cmdline(pid) for pid in tree)
                if ray_started:
                    break  # the simulation's Ray processes are up
                time.sleep(0.5)
            seen.update(descendants(proc.pid))
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                localrun.stop_process_group(proc)
    assert proc.returncode == 130, err.decode()
    assert "interrupted" in err.decode().strip().splitlines()[-1]
    assert ray_started, "the simulation never started its Ray processes"
    assert not [pid for pid in seen if is_alive(pid)], "a process of the run is still running"
    assert (tmp_path / "c" / FAILED_FILE).exists()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_sweep_checks_every_cell_before_flower(tmp_path: Path):
    suite = tmp_path / "s.yaml"
    suite.write_text(
        "name: s\nbase: {num-server-rounds: 1, min-train-nodes: 3}\n"
        "grid: {method: [topk], topk-density: [0.5, 5.0], num-clients: [4]}\n"
    )
    with pytest.raises(SuiteError, match=r"'topk-density' = 5\.0 is not allowed"):
        load_suite(suite)
    suite.write_text("name: s\nbase: {min-train-nodes: 3}\ngrid: {num-clients: [2, 4]}\n")
    with pytest.raises(SuiteError, match=r"'min-train-nodes' = 3 needs that many SuperNodes"):
        load_suite(suite)


def test_failed_sweep_cell_gives_its_reason_and_a_failed_marker(tmp_path: Path):
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\nbase: {num-server-rounds: 2}\ngrid: {num-clients: [2]}\n")
    (cell,) = expand(load_suite(suite))

    class DeadLink:
        env = None

        def run(self, run_config, *, num_supernodes, on_line) -> int:
            on_line("ValueError: no data")
            return 0

    status = RunStatus("1", "finished:failed", "Simulation failed with exception: no data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep, "latest_run_status", lambda *args: status)
        out = io.StringIO()
        reason = sweep.run_cell(DeadLink(), cell, tmp_path / "runs", sweep.Progress(1, 2, out))
    assert reason == "Simulation failed with exception: no data"
    assert out.getvalue().splitlines()[-1] == f"  failed: {reason}"
    assert (tmp_path / "runs" / cell.run_name / FAILED_FILE).exists()
    assert sweep.cell_status(cell, tmp_path / "runs") != "done"


def test_deploy_local_checks_the_run_config_against_its_nodes(capsys):
    script = APP_DIR / "scripts" / "deploy_local.py"
    spec = importlib.util.spec_from_file_location("deploy_local", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before = child_pids()
    code = module.main(["--num-nodes", "1", "--run-config", "min-train-nodes=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "'min-train-nodes' = 2 needs that many SuperNodes" in err[-1]
    assert child_pids() <= before, "no SuperLink or SuperNode was started"
