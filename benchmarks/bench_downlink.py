"""Downlink bits per parameter of every method: what the server sends each sampled client.

Methods without a server rule get the dense global model (Flower `.npy` arrays); FedBiF and
FedPM send their rule's payload (packed raw arrays). Measured as `wire_bytes * 8 / d` on CNN4.
"""

from __future__ import annotations

import json

from fedbat_flwr.config import RunConfig
from fedbat_flwr.methods import get_method, method_names
from fedbat_flwr.records import arrays_to_record, payload_to_record, wire_bytes
from fedbat_flwr.task import build_model_for, model_spec, state_arrays

GOALS = {"fedbif": 4.1}


def downlink_bits_per_param(method: str) -> float:
    config = RunConfig(method=method, dataset="fashion_mnist", model="cnn4")
    model = build_model_for(config)
    spec, weights = model_spec(model), state_arrays(model)
    rule = get_method(method).server_rule(config, spec)
    if rule is None:
        record = arrays_to_record(weights)
    else:
        record = payload_to_record(rule.downlink(rule.initial(weights), 1))
    return 8 * wire_bytes(record) / spec.num_params


def run() -> list[dict]:
    figures = []
    for method in method_names():
        value = downlink_bits_per_param(method)
        goal = GOALS.get(method)
        figures.append(
            {
                "name": f"downlink.{method}.cnn4",
                "value": value,
                "unit": "bits/param",
                "goal": None if goal is None else f"<= {goal}",
                "pass": goal is None or value <= goal,
            }
        )
    return figures


if __name__ == "__main__":
    for figure in run():
        print(json.dumps(figure))
