"""End to end: the real Flower simulation runtime (`flwr run` on the test run's shared SuperLink,
tests/conftest.py) trains FedBAT in its default configuration on a Fashion-MNIST subset and
writes the results contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedbat_flwr.results import METRIC_KEYS, SUMMARY_KEYS
from fedbat_tools.localrun import LocalSuperLink

pytestmark = pytest.mark.e2e

ROUNDS = 2
# 25 local steps a round (400 examples, batch 16): well above chance after two rounds, at 40 %
# of the training 1,000 examples in batches of 64 cost.
RUN_CONFIG = {
    "num-server-rounds": ROUNDS,
    "max-examples-per-client": 400,
    "batch-size": 16,
    "max-test-examples": 1000,
    "local-epochs": 1,
}


def test_fedbat_simulation_writes_results_contract(superlink: LocalSuperLink, tmp_path: Path):
    lines: list[str] = []
    config = {**RUN_CONFIG, "output-dir": str(tmp_path), "run-name": "fedbat-e2e"}
    code = superlink.run(config, num_supernodes=4, on_line=lines.append, timeout=600)
    assert code == 0, "\n".join(lines[-40:])

    run_dir = tmp_path / "fedbat-e2e"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    for row in rows:
        assert set(METRIC_KEYS) <= set(row)
        assert row["method"] == "fedbat"
        assert row["num_replies"] == 4 and row["num_rejected"] == 0
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
    progress = [line for line in lines if line.startswith("[fedbat-flwr] round")]
    assert len(progress) == ROUNDS, "a progress line per round on the console"
