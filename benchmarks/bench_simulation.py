"""Flower simulation round vs the pure local compute of the same round (10 clients).

Reference: the same 10 clients trained in this process exactly as the ClientApp trains them
(model built, global weights loaded, method `train`, payload packed) plus the server's central
evaluation, one after the other. Measured: `round_seconds` of the warm rounds of a real
`flwr run` on a SuperLink we own (Ray actors, messages, serialization, aggregation included).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from fedbat_flwr.config import RunConfig
from fedbat_flwr.data import load_partition, load_test_set
from fedbat_flwr.methods import client_task, get_method
from fedbat_flwr.records import payload_to_record
from fedbat_flwr.results import read_metrics
from fedbat_flwr.task import (
    build_model_for,
    data_config,
    state_arrays,
)
from fedbat_flwr.training import default_device, evaluate, keep_freed_memory, prepare_model
from fedbat_tools.localrun import LocalSuperLink

CLIENTS = 10
ROUNDS = 3
RUN_CONFIG = {
    "num-server-rounds": ROUNDS,
    "max-examples-per-client": 1200,
    "max-test-examples": 2000,
    "local-epochs": 1,
}


def pure_round_seconds(config: RunConfig) -> float:
    """One round's work without Flower: 10 clients in a loop, then the central evaluation."""
    keep_freed_memory()  # as the ClientApp does at start-up
    device = default_device()
    model = build_model_for(config)
    global_state = state_arrays(model)
    method = get_method(config.method)(config)
    for pid in range(CLIENTS):  # warm the partition cache, as the simulation's workers are
        load_partition(data_config(config, CLIENTS), pid)
    test = load_test_set(data_config(config, 1), max_examples=config.max_test_examples)
    start = time.perf_counter()
    for pid in range(CLIENTS):
        data = load_partition(data_config(config, CLIENTS), pid)
        task = client_task(method, data, global_state, partition_id=pid, server_round=2)
        payload_to_record(method.train(task).payload)
    evaluate(prepare_model(model, device), test.x, test.y, batch_size=1024, device=device)
    return time.perf_counter() - start


def flower_round_seconds() -> float:
    """Median `round_seconds` of the warm rounds (2..) of a real simulation run."""
    with tempfile.TemporaryDirectory() as out, LocalSuperLink() as link:
        config = {**RUN_CONFIG, "output-dir": out, "run-name": "bench"}
        code = link.run(config, num_supernodes=CLIENTS)
        rows = read_metrics(Path(out) / "bench")
    if code != 0 or len(rows) != ROUNDS:
        raise RuntimeError(f"simulation run failed (exit {code}, {len(rows)} rounds)")
    return statistics.median(r["round_seconds"] for r in rows[1:])


def run() -> list[dict]:
    config = RunConfig.from_flower(RUN_CONFIG)
    flower = flower_round_seconds()
    pure = pure_round_seconds(config)
    ratio = flower / pure
    return [
        {"name": "simulation.flower_round_s", "value": flower, "unit": "s", "goal": None},
        {"name": "simulation.pure_round_s", "value": pure, "unit": "s", "goal": None},
        {
            "name": "simulation.round_over_local_compute",
            "value": ratio,
            "unit": "x",
            "goal": "<= 1.25",
            "pass": ratio <= 1.25,
        },
    ]


if __name__ == "__main__":
    for figure in run():
        figure.setdefault("pass", True)
        print(json.dumps(figure))
