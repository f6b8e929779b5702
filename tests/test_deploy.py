"""End to end on Flower's Deployment Engine: a real SuperLink and real SuperNodes on loopback.

Each test starts its own processes (private Flower home, free ports), runs FedBAT briefly, and
checks both the results contract and that every process it started is gone afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fedbat_flwr.deploy import LocalDeployment, all_gone
from fedbat_flwr.results import METRIC_KEYS, SUMMARY_KEYS

pytestmark = pytest.mark.e2e

NUM_NODES = 3
SHORT_RUN = {
    "num-server-rounds": 2,
    "max-examples-per-client": 300,
    "max-test-examples": 1000,
    "local-epochs": 1,
}


@pytest.fixture
def deployments() -> Iterator[list[LocalDeployment]]:
    """Deployments a test starts; stopped afterwards, and no process of theirs may survive."""
    started: list[LocalDeployment] = []
    yield started
    for deployment in started:
        pids = deployment.pids()
        deployment.stop()
        assert all_gone(pids), f"processes left behind: {[p for p in pids if not all_gone([p])]}"
        assert deployment.pids() == []


def run_and_read(
    deployment: LocalDeployment, config: dict[str, Any], run_dir: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    lines: list[str] = []
    code = deployment.run(config, on_line=lines.append, timeout=600)
    assert code == 0, "\n".join(lines[-40:])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return rows, summary


def check_contract(rows: list[dict[str, Any]], summary: dict[str, Any], rounds: int) -> None:
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for row in rows:
        assert set(METRIC_KEYS) <= set(row)
        assert row["method"] == "fedbat"
        assert 1.0 < row["uplink_bits_per_param"] <= 1.10  # 1-bit signs + fixed framing
        assert row["uplink_bytes"] > 0 and row["round_seconds"] > 0
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["rounds_completed"] == rounds
    assert summary["total_uplink_bytes"] == sum(r["uplink_bytes"] for r in rows)


def trained_rounds(log: Path) -> int:
    """Train replies a SuperNode sent, from its own log (each one a flwr-clientapp run)."""
    return log.read_text().count("Sending: train message")


def test_deployment_trains_fedbat_on_real_supernodes(
    deployments: list[LocalDeployment], tmp_path: Path
) -> None:
    deployment = LocalDeployment(NUM_NODES, log_dir=tmp_path / "logs")
    deployments.append(deployment)
    deployment.start()

    config = {**SHORT_RUN, "output-dir": str(tmp_path), "run-name": "deploy"}
    rows, summary = run_and_read(deployment, config, tmp_path / "deploy")

    check_contract(rows, summary, rounds=2)
    assert all(r["num_replies"] == NUM_NODES and r["num_rejected"] == 0 for r in rows)
    for node in deployment.nodes.values():
        assert trained_rounds(node.log_path) == 2, node.log_path.read_text()[-2000:]


def test_tls_and_node_authentication_refuse_an_unregistered_node(
    deployments: list[LocalDeployment], tmp_path: Path
) -> None:
    deployment = LocalDeployment(NUM_NODES, log_dir=tmp_path / "logs", tls=True, auth=True)
    deployments.append(deployment)
    deployment.start()
    with pytest.raises(httpx.HTTPError):  # no plain HTTP on the SuperLink's port
        httpx.get(f"http://{deployment.address}/health", timeout=5)

    intruder = deployment.add_node(0, register=False, name="unregistered")
    assert intruder.process.wait(timeout=90) != 0, "an unregistered SuperNode was let in"
    assert "Failed to activate SuperNode" in intruder.log_path.read_text()
    superlink_log = (deployment.log_dir / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log
    assert "Uvicorn running on https://" in superlink_log

    config = {**SHORT_RUN, "output-dir": str(tmp_path), "run-name": "deploy-tls"}
    rows, summary = run_and_read(deployment, config, tmp_path / "deploy-tls")

    check_contract(rows, summary, rounds=2)
    assert all(r["num_replies"] == NUM_NODES and r["num_rejected"] == 0 for r in rows)
    for node in deployment.nodes.values():
        assert trained_rounds(node.log_path) == 2


def test_a_supernode_killed_mid_run_does_not_stop_the_run(
    deployments: list[LocalDeployment], tmp_path: Path
) -> None:
    deployment = LocalDeployment(NUM_NODES, log_dir=tmp_path / "logs")
    deployments.append(deployment)
    deployment.start()
    victim = NUM_NODES - 1

    def kill_at_round_two(line: str) -> None:
        if "[ROUND 2/" in line and victim in deployment.nodes:
            deployment.kill_node(victim)  # SIGKILL of its whole tree, like a crash

    config = {
        **SHORT_RUN,
        "num-server-rounds": 3,
        "fraction-train": 1.0,
        "min-train-nodes": 2,
        "output-dir": str(tmp_path),
        "run-name": "deploy-kill",
    }
    code = deployment.run(config, on_line=kill_at_round_two, timeout=600)
    assert code == 0
    run_dir = tmp_path / "deploy-kill"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())

    check_contract(rows, summary, rounds=3)
    assert victim not in deployment.nodes
    assert rows[0]["num_replies"] == NUM_NODES
    # Round 2 was sent to the dead node too: its reply is a "Node Unavailable" error once its
    # heartbeat expires; round 3 samples the two nodes still online.
    assert [r["num_replies"] for r in rows[1:]] == [NUM_NODES - 1] * 2
    assert all(r["model_updated"] for r in rows)
