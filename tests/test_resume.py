"""Checkpoints and resume: a crashed server continues where it stopped, never silently afresh."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedbat_flwr.results import (
    CHECKPOINT,
    CHECKPOINT_VERSION,
    Checkpoint,
    CheckpointError,
    check_resumable,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
)
from fedbat_tools.localrun import LocalSuperLink

CONFIG = {"method": "fedbat", "num-server-rounds": 4, "seed": 1}


def _checkpoint(round_: int = 2) -> Checkpoint:
    meta = {"version": CHECKPOINT_VERSION, "config": CONFIG, "rows": [{"round": 1}]}
    arrays = {"conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    state = {"m_t/conv.weight": np.ones((2, 3), np.float32)}
    return Checkpoint(round_, arrays, state, {"torch": np.arange(4, dtype=np.uint8)}, meta)


def test_checkpoint_round_trip(tmp_path: Path):
    save_checkpoint(tmp_path, _checkpoint())
    loaded = load_checkpoint(tmp_path)
    assert loaded.round == 2 and loaded.meta["rows"] == [{"round": 1}]
    np.testing.assert_array_equal(loaded.arrays["conv.weight"], _checkpoint().arrays["conv.weight"])
    assert set(loaded.strategy_state) == {"m_t/conv.weight"} and set(loaded.rng) == {"torch"}
    assert not list(tmp_path.glob(".*tmp*")), "write-then-rename leaves no temporary file"


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_or_partial_checkpoint_is_a_clear_error(tmp_path: Path, damage: str):
    save_checkpoint(tmp_path, _checkpoint())
    path = tmp_path / CHECKPOINT
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"x" * 100, "empty": b""}[damage]
    )
    with pytest.raises(CheckpointError, match="corrupt or partial"):
        load_checkpoint(tmp_path)


def test_resume_refuses_a_different_experiment(tmp_path: Path):
    checkpoint = _checkpoint()
    check_resumable(checkpoint, {**CONFIG, "num-server-rounds": 6, "resume-from": "x"}, tmp_path)
    with pytest.raises(CheckpointError, match=r"seed: 1 -> 2"):
        check_resumable(checkpoint, {**CONFIG, "seed": 2}, tmp_path)
    with pytest.raises(CheckpointError, match="already completed 2 rounds"):
        check_resumable(checkpoint, {**CONFIG, "num-server-rounds": 2}, tmp_path)


@pytest.mark.e2e
def test_killed_run_resumes_with_the_same_first_rounds(superlink: LocalSuperLink, tmp_path: Path):
    """Kill the whole simulation (by PID) after round 2 of 4 on a SuperLink of its own; resume
    on the test run's shared SuperLink; rounds 1-2 are kept."""
    config = {
        "num-server-rounds": 4,
        "max-examples-per-client": 300,
        "max-test-examples": 1000,
        "output-dir": str(tmp_path),
        "run-name": "crash",
    }
    run_dir = tmp_path / "crash"
    first = LocalSuperLink()
    first.start()
    try:
        submit = threading.Thread(target=first.run, args=(config,), kwargs={"num_supernodes": 3})
        submit.start()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if (run_dir / CHECKPOINT).exists() and load_checkpoint(run_dir).round >= 2:
                break
            time.sleep(0.2)
    finally:
        first.stop()  # SIGTERM/SIGKILL of the SuperLink's whole process tree: the "crash"
    submit.join(timeout=60)
    crashed = read_metrics(run_dir)
    done = load_checkpoint(run_dir).round
    assert 2 <= done < 4, f"the run was stopped after round {done}"
    assert not (run_dir / "summary.json").exists()

    lines: list[str] = []
    code = superlink.run(
        {**config, "resume-from": str(run_dir)}, num_supernodes=3, on_line=lines.append
    )
    assert code == 0, "\n".join(lines[-30:])
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[:done] == crashed[:done], "completed rounds are kept exactly"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (
        summary["rounds_completed"] == 4 and summary["final_accuracy"] == rows[-1]["test_accuracy"]
    )
    assert load_checkpoint(run_dir).round == 4
