"""Downlink bits per parameter: what the server sends each sampled client, per setting.

Methods with the default server part broadcast the global model: dense float32
(`downlink-bits = 32`, Flower `.npy` arrays) or its quantized copy (16, 8, 4, 2:
`wire/downlink.py`); the size is the same whichever of them runs. FedBiF and FedPM send their
server part's own payload. Measured as `wire_bytes * 8 / d` of the serialized record on CNN4
and ResNet-10 (width 32).

Run from the repo root: ``python -m benchmarks.bench_downlink`` (JSON lines) or with
``--markdown`` (the README table).
"""

from __future__ import annotations

import argparse
import json

from fedbat_flwr.config import RunConfig
from fedbat_flwr.methods import get_method
from fedbat_flwr.records import wire_bytes
from fedbat_flwr.task import build_model_for, model_spec, state_arrays

MODELS = {"cnn4": ("fashion_mnist", "cnn4"), "resnet10": ("cifar10", "resnet10")}
MODEL_TITLES = {"cnn4": "CNN4", "resnet10": "ResNet-10"}
SETTINGS = [f"downlink-bits {b}" for b in (32, 16, 8, 4, 2)] + ["fedbif", "fedpm"]
GOALS = {("fedbif", "cnn4"): 4.1, ("downlink-bits 4", "cnn4"): 4.2}


def downlink_bits_per_param(setting: str, model_label: str) -> float:
    dataset, model_name = MODELS[model_label]
    own = setting in ("fedbif", "fedpm")
    method = setting if own else "fedbat"
    bits = 32 if own else int(setting.split()[-1])
    config = RunConfig(method=method, dataset=dataset, model=model_name, downlink_bits=bits)
    model = build_model_for(config)
    spec, weights = model_spec(model), state_arrays(model)
    part = get_method(method)(config).server_part(spec)
    record = part.downlink(part.initial(weights), 1)
    return 8 * wire_bytes(record) / spec.num_params


def measure() -> list[tuple[str, str, float]]:
    return [
        (setting, label, downlink_bits_per_param(setting, label))
        for setting in SETTINGS
        for label in MODELS
    ]


def run() -> list[dict]:
    figures = []
    for setting, label, value in measure():
        goal = GOALS.get((setting, label))
        figures.append(
            {
                "name": f"downlink.{setting.replace(' ', '')}.{label}",
                "value": round(value, 4),
                "unit": "bits/param",
                "goal": None if goal is None else f"<= {goal}",
                "pass": goal is None or value <= goal,
            }
        )
    return figures


def markdown(measured: list[tuple[str, str, float]]) -> str:
    values = {(s, m): v for s, m, v in measured}
    lines = [
        "| downlink | " + " | ".join(f"{MODEL_TITLES[m]} bits/param" for m in MODELS) + " |",
        "|---|" + "---:|" * len(MODELS),
    ]
    for setting in SETTINGS:
        cells = " | ".join(f"{values[(setting, m)]:.3f}" for m in MODELS)
        lines.append(f"| {setting} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    if parser.parse_args().markdown:
        print(markdown(measure()))
    else:
        for figure in run():
            print(json.dumps(figure))


if __name__ == "__main__":
    main()
