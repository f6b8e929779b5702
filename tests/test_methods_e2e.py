"""Every registered method's path through the real Flower simulation runtime.

A one-round run takes about 17 s, nearly all of it start-up (AMD EPYC, 2 cores, idle,
2026-12-01), so a method gets a run of its own only where its path through Flower differs from
every other run's: its payload kind (how the server decodes, validates and aggregates the
reply) or a server part of its own. Four such runs are here, four in other modules
(`ELSEWHERE`); the other methods share a run's path (`COVERED_BY`) and their client code is
unit-tested through the same packing (tests/test_methods.py). A fast test keeps this table
complete when a method is added.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tests.test_app_e2e as app_e2e
import tests.test_faults as faults
import tests.test_server_rules_e2e as server_rules_e2e
from fedbat_flwr.methods import get_method, method_names
from fedbat_tools.localrun import LocalSuperLink, app_config_defaults

# One run a payload kind, each with the run-config it adds: EF-SignSGD carries the compressed
# broadcast to a 1-bit method and float BatchNorm (the mixed payload), FedAvg the compressed
# broadcast of a dense method.
E2E_RUNS: dict[str, dict[str, object]] = {
    "fedavg": {"downlink-bits": 2},
    "ef-signsgd": {"downlink-bits": 4, "bn-payload": "float16"},
    "topk": {},
    "bifl": {},
}
# Runs of their own in other modules: FedBAT's default configuration is the results-contract
# run; FedBiF and FedPM have a downlink and aggregation of their own (two rounds each); FedPAQ's
# healthy ClientApps answer beside the one that raises.
ELSEWHERE = {
    "fedbat": app_e2e.test_fedbat_simulation_writes_results_contract_and_repeats,
    "fedpaq": faults.test_a_clientapp_that_raises_is_a_failed_reply,
    "fedbif": server_rules_e2e.test_fedbif_sends_4_bits_down_and_1_bit_up,
    "fedpm": server_rules_e2e.test_fedpm_range_codes_masks_and_saves_a_masked_random_network,
}
# Same payload kind, same server path as the named method's run.
COVERED_BY = {
    "signsgd": "fedbat",
    "noisy-signsgd": "fedbat",
    "stoc-signsgd": "fedbat",
    "zerofl": "topk",
    "bifl-full": "fedavg",  # BiFL's client training runs in the bifl run
}


def test_every_method_runs_end_to_end_or_shares_a_run_path() -> None:
    assert set(method_names()) == set(E2E_RUNS) | set(ELSEWHERE) | set(COVERED_BY)
    kinds = [get_method(name).payload_kind for name in [*E2E_RUNS, *ELSEWHERE]]
    assert len(set(kinds)) == len(kinds), "one run a payload kind"
    for name, twin in COVERED_BY.items():
        assert twin in E2E_RUNS or twin in ELSEWHERE, name
        assert get_method(name).payload_kind == get_method(twin).payload_kind, name
    # the contract run is FedBAT's default configuration
    assert "method" not in app_e2e.RUN_CONFIG and app_config_defaults()["method"] == "fedbat"


@pytest.mark.e2e
@pytest.mark.parametrize("method", list(E2E_RUNS))
def test_method_runs_one_round_in_simulation(
    superlink: LocalSuperLink, tmp_path: Path, method: str
) -> None:
    """Three real ClientApps train from the broadcast and every reply is accepted; both
    directions are measured from the serialized messages."""
    extra = E2E_RUNS[method]
    config = {
        "method": method,
        **extra,
        "num-server-rounds": 1,
        "max-examples-per-client": 64,
        "max-test-examples": 200,
        "output-dir": str(tmp_path),
        "run-name": method,
    }
    lines: list[str] = []
    code = superlink.run(config, num_supernodes=3, on_line=lines.append, timeout=300)
    assert code == 0, "\n".join(lines[-30:])
    rows = [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["method"] == method, lines[-30:]
    (row,) = rows
    assert row["num_replies"] == 3 and row["num_rejected"] == 0, lines[-30:]
    assert row["model_updated"] is True
    assert 0 < row["uplink_bits_per_param"] < 33
    if "downlink-bits" in extra:
        bits = int(extra["downlink-bits"])  # type: ignore[call-overload]
        assert bits < row["downlink_bits_per_param"] <= bits + 0.2
    elif method == "bifl":  # the model, then the binary network whose statistics it refits
        assert 63.9 < row["downlink_bits_per_param"] < 65
    else:
        assert 31.9 < row["downlink_bits_per_param"] < 33  # dense float32 global model
    if extra.get("bn-payload") == "float16":
        assert 1.05 < row["uplink_bits_per_param"] <= 1.10  # signs + float16 BatchNorm
