"""End to end: the real Flower simulation runtime (`flwr run` on the test run's shared SuperLink,
tests/conftest.py) trains FedBAT in its default configuration on a Fashion-MNIST subset, writes
the results contract, and repeats itself: one seed pins the partitions every method trains and,
at one torch thread, every round's numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedbat_flwr.provenance import COMPARED_KEYS
from fedbat_flwr.results import METRIC_KEYS, SUMMARY_KEYS
from fedbat_tools.localrun import LocalSuperLink

pytestmark = pytest.mark.e2e

ROUNDS = 3
NODES = 20
SAMPLED = 6  # int(0.3 * 20)
# 13 local steps a round (200 examples, batch 16): above chance after three rounds.
RUN_CONFIG = {
    "num-server-rounds": ROUNDS,
    "fraction-train": 0.3,
    "max-examples-per-client": 200,
    "batch-size": 16,
    "max-test-examples": 1000,
    "local-epochs": 1,
    "seed": 5,
    "torch-threads": 1,
}
ENVIRONMENT_KEYS = (*COMPARED_KEYS, "cpu", "cpu_cores", "gpu", "started", "ended")


def _run(superlink: LocalSuperLink, out: Path, name: str, **changes: Any) -> Path:
    lines: list[str] = []
    config = {**RUN_CONFIG, **changes, "output-dir": str(out), "run-name": name}
    code = superlink.run(config, num_supernodes=NODES, on_line=lines.append, timeout=600)
    assert code == 0, "\n".join(lines[-40:])
    progress = [line for line in lines if line.startswith("[fedbat-flwr] round")]
    assert len(progress) == ROUNDS, "a progress line per round on the console"
    return out / name


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fedbat_simulation_writes_results_contract_and_repeats(
    superlink: LocalSuperLink, tmp_path: Path
) -> None:
    """One test, so that its three runs share this worker's SuperLink (tests/conftest.py)."""
    fedbat = _run(superlink, tmp_path, "fedbat")
    _check_contract(fedbat)
    repeat = _run(superlink, tmp_path, "fedbat-again")
    fedavg = _run(superlink, tmp_path, "fedavg", method="fedavg")

    sampled = [r["sampled_partitions"] for r in _rows(fedbat)]
    assert all(len(p) == SAMPLED and p == sorted(set(p)) for p in sampled), sampled
    assert all(0 <= i < NODES for p in sampled for i in p)
    assert len({tuple(p) for p in sampled}) > 1, "each round draws its own partitions"
    assert [r["sampled_partitions"] for r in _rows(fedavg)] == sampled, "same seed, same clients"

    for key in ("test_accuracy", "test_loss", "train_loss", "uplink_bytes"):
        assert [r[key] for r in _rows(repeat)] == [r[key] for r in _rows(fedbat)], key


def _check_contract(run_dir: Path) -> None:
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    for row in rows:
        assert set(METRIC_KEYS) <= set(row)
        assert row["method"] == "fedbat"
        assert row["num_replies"] == SAMPLED and row["num_rejected"] == 0
        assert 1.0 < row["uplink_bits_per_param"] <= 1.10  # 1-bit signs + fixed framing
        assert 31.9 < row["downlink_bits_per_param"] < 33  # dense float32 global model
        assert row["uplink_bytes"] > 0 and row["round_seconds"] > 0
    print(f"test accuracy by round: {[r['test_accuracy'] for r in rows]}")
    assert rows[-1]["test_accuracy"] > 0.2, "no better than chance (0.1)"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["rounds_completed"] == ROUNDS
    assert summary["final_accuracy"] == rows[-1]["test_accuracy"]
    assert summary["total_uplink_bytes"] == sum(r["uplink_bytes"] for r in rows)
    assert (run_dir / "model.npz").stat().st_size > 0

    env = summary["environment"]
    assert set(ENVIRONMENT_KEYS) <= set(env), set(ENVIRONMENT_KEYS) - set(env)
    assert len(env["commit"]) == 40 and isinstance(env["dirty"], bool), env
    assert env["torch_threads"] == 1 and env["client_torch_threads"] == [1], env
    assert env["torch"] and env["flwr"] and env["numpy"] and env["python"]
    assert env["started"] <= env["ended"]
