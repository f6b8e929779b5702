"""Issue 33 end to end: what a user sees and what stays behind, through the real commands.

Plain `flwr run --stream` (the README's "Running with flwr run yourself", here against the test
run's shared SuperLink, tests/conftest.py) ends a run that fails at start-up with the reason as
one of its last lines and a failed status in Flower's own `flwr ls`. `scripts/run_local.sh`,
called from another folder, writes its results there, prints one line a round with an ETA and
a final line, warns once about an option the method ignores, and leaves neither files nor
processes behind.
"""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedbat_tools.localrun import APP_DIR, LocalSuperLink, is_noise, latest_run_status
from tests.leftovers import nothing_left_behind

pytestmark = pytest.mark.e2e

SMALL = {"max-examples-per-client": 32, "max-test-examples": 100, "num-server-rounds": 2}
STARTUP_FAILURES = [
    ("lr", {"lr": -1.0}),
    ("method", {"method": "nope"}),
    ("output-dir", {"output-dir": "/proc/x"}),
]
RUN_ID_RE = re.compile(r"Successfully started run (\d+)")


def test_plain_flwr_run_ends_with_the_reason_and_a_failed_status(
    superlink: LocalSuperLink, tmp_path: Path
) -> None:
    """One test whose three runs go to this worker's SuperLink at once (it runs them side by
    side), each streamed by its own `flwr run --stream`."""

    def submit(key: str, bad: dict[str, object]) -> list[str]:
        lines: list[str] = []
        config = {**SMALL, "output-dir": str(tmp_path), "run-name": key, **bad}
        superlink.run(config, num_supernodes=2, on_line=lines.append, timeout=300)
        return lines

    with ThreadPoolExecutor(len(STARTUP_FAILURES)) as pool:
        streamed = list(pool.map(lambda failure: submit(*failure), STARTUP_FAILURES))
    for (key, _), lines in zip(STARTUP_FAILURES, streamed, strict=True):
        last = lines[-5:]
        print(f"{key}: last 5 lines", *last, sep="\n  ")
        assert any(f"'{key}'" in line for line in last), "\n".join(lines[-30:])
        assert "fedbat-flwr: run failed: run-config" in last[-1]
        run_id = next(m[1] for line in lines if (m := RUN_ID_RE.search(line)))
        status = latest_run_status(["--run-id", run_id], superlink.env)
        assert status is not None and status.status == "finished:failed", status
        assert f"'{key}'" in status.details
        assert not (tmp_path / key).exists(), "no run folder for a run that never started"
        assert not any("[fedbat-flwr] round" in line for line in lines)


def test_run_local_sh_reads_well_writes_here_and_leaves_nothing_behind(tmp_path: Path) -> None:
    here = tmp_path / "here"
    here.mkdir()
    overrides = " ".join(f"{k}={v}" for k, v in SMALL.items())
    command = ["bash", str(APP_DIR / "scripts" / "run_local.sh"), "--num-supernodes", "2"]
    command += ["--run-config", f"{overrides} topk-density=0.1 run-name='r'"]
    with nothing_left_behind():
        result = subprocess.run(
            command, cwd=here, capture_output=True, text=True, timeout=600, check=False
        )
    console = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = here / "outputs" / "r"  # the default output-dir, relative to the caller's folder
    assert (run_dir / "summary.json").is_file()

    ignored = [line for line in console if "'topk-density' is read only by method 'topk'" in line]
    assert len(ignored) == 1 and "method 'fedbat' ignores it" in ignored[0], console
    progress = [line for line in console if line.startswith("[fedbat-flwr] round")]
    assert len(progress) == 2 and all(" | elapsed " in line for line in progress), progress
    assert " | ETA " in progress[0]
    assert not [line for line in console if is_noise(line)], "Flower's routine lines are out"
    assert console[-1].startswith("2 rounds in ") and "final accuracy" in console[-1]
    assert f"results in {run_dir} (" in console[-1] and "downlink" in console[-1]
    log = (run_dir / "log.txt").read_text()
    assert "Starting ValidatingStrategy strategy:" in log, "log.txt keeps every line"
