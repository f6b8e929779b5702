"""Uplink bits per parameter of every method, from the bytes of its serialized reply.

Run from the repo root: ``python -m benchmarks.bench_uplink`` (JSON lines) or with
``--markdown`` (the README table). Each method's real ``train`` runs one local step on a few
random examples of CNN4 (Fashion-MNIST shape) and ResNet-10 (CIFAR shape, width 32); its payload
goes through the ClientApp's packing (``payload_to_record``, ``arrays_to_record`` for dense) and
is measured as ``wire_bytes(record) * 8 / spec.num_params``: Flower's serialized objects, with
keys, dtypes, shapes and framing included, over every exchanged entry (BatchNorm statistics too).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any

import torch

from fedbat_flwr.config import RunConfig
from fedbat_flwr.data import TensorData
from fedbat_flwr.methods import client_task, get_method, method_names
from fedbat_flwr.records import arrays_to_record, payload_to_record, record_to_payload, wire_bytes
from fedbat_flwr.task import build_model_for, model_spec, state_arrays

EXAMPLES = 8  # one batch: one local step
MODELS = {  # label -> (run config, input shape)
    "cnn4": (RunConfig(dataset="fashion_mnist", model="cnn4", batch_size=EXAMPLES), (1, 28, 28)),
    "resnet10": (RunConfig(dataset="cifar10", model="resnet10", batch_size=EXAMPLES), (3, 32, 32)),
}
MODEL_TITLES = {"cnn4": "CNN4", "resnet10": "ResNet-10"}
# FedBAT as it runs by default (float16 BatchNorm) within 1.10 on CNN4; the all-1-bit payload's
# framing overhead within 3 % on ResNet-10.
GOALS = {("fedbat", "cnn4"): 1.10, ("fedbat (bn-payload binary)", "resnet10"): 1.03}


ORDER = ("fedavg", "fedbat", "signsgd", "ef-signsgd", "noisy-signsgd", "stoc-signsgd", "fedpaq",
         "topk", "zerofl", "bifl", "bifl-full")  # fmt: skip


def variants() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(row label, method, run-config keys): every method as it runs by default; FedPAQ at 4
    and 3 bits, FedBAT with each bn-payload."""
    names = method_names()
    for name in [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]:
        if name == "fedpaq":
            yield "fedpaq (4-bit)", name, {"quant-bits": 4}
            yield "fedpaq (3-bit)", name, {"quant-bits": 3}
        else:
            yield name, name, {}
        if name == "fedbat":  # the other ways BatchNorm travels (default: float16 updates)
            yield "fedbat (bn-payload float32)", name, {"bn-payload": "float32"}
            yield "fedbat (bn-payload binary)", name, {"bn-payload": "binary"}


def uplink_bits_per_param(method: str, model_label: str, extra: dict[str, Any]) -> float:
    """Train ``method`` for one step and measure its reply's serialized size."""
    base, shape = MODELS[model_label]
    config = RunConfig.from_flower({**base.to_flower(), **extra, "method": method})
    gen = torch.Generator().manual_seed(0)
    instance = get_method(method)(config)
    model = build_model_for(config)
    weights, spec = state_arrays(model), model_spec(model)
    part = instance.server_part(spec)  # FedBiF / FedPM: their own downlink
    downlink = record_to_payload(part.downlink(part.initial(weights), 1))
    data = TensorData(
        torch.randn(EXAMPLES, *shape, generator=gen),
        torch.randint(0, 10, (EXAMPLES,), generator=gen),
    )
    task = client_task(
        instance, data, downlink, partition_id=0, server_round=1, device=torch.device("cpu")
    )
    update = instance.train(task)
    pack = arrays_to_record if instance.payload_kind == "dense" else payload_to_record
    return wire_bytes(pack(update.payload)) * 8 / task.spec.num_params


def measure() -> list[tuple[str, str, float]]:
    """(row label, model label, bits per parameter) for every method variant and model."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # sizes, not timings: one thread avoids spinning on a shared CPU
    try:
        return [
            (label, model_label, uplink_bits_per_param(method, model_label, extra))
            for label, method, extra in variants()
            for model_label in MODELS
        ]
    finally:
        torch.set_num_threads(threads)


def records(measured: list[tuple[str, str, float]]) -> list[dict]:
    out = []
    for label, model_label, value in measured:
        goal = GOALS.get((label, model_label))
        out.append(
            {
                "name": f"{model_label}_{label.replace(' ', '')}_uplink_bits_per_param",
                "value": round(value, 4),
                "unit": "bits/param",
                "goal": None if goal is None else f"<= {goal}",
                "pass": goal is None or value <= goal,
            }
        )
    return out


def run() -> list[dict]:
    """One record per (method, model): {"name", "value", "unit", "goal", "pass"}."""
    return records(measure())


def markdown(measured: list[tuple[str, str, float]]) -> str:
    """The README table: one row per method, one column per model."""
    values = {(label, model): value for label, model, value in measured}
    rows = list(dict.fromkeys(label for label, _, _ in measured))
    header = "| method | " + " | ".join(f"{MODEL_TITLES[m]} bits/param" for m in MODELS) + " |"
    lines = [header, "|---|" + "---:|" * len(MODELS)]
    for row in rows:
        cells = [f"{values[(row, m)]:.3f}" for m in MODELS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    args = parser.parse_args()
    measured = measure()
    if args.markdown:
        print(markdown(measured))
    else:
        for record in records(measured):
            print(json.dumps(record))


if __name__ == "__main__":
    main()
