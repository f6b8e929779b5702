"""Server-side cost of a round: FedBAT vs FedAvg aggregation, and its memory as K grows.

Replies are built once as Flower Messages (what `grid.send_and_receive` hands the strategy) for a
synthetic ResNet-like model of d = 11M parameters. Timed: the strategy's whole `aggregate_train`,
which deserializes every reply (`record_to_payload` / `.npy` parsing), validates it, decodes and
accumulates it, and builds the new global ArrayRecord. Memory: tracemalloc's peak of the same call
(numpy allocations are traced), for K = 10 and K = 100 replies; the replies themselves exist
before the call and are not counted.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
from flwr.app import Message

from fedbat_flwr.records import arrays_to_record
from fedbat_flwr.strategy import build_strategy
from fedbat_flwr.wire import AlphaBounds, ModelSpec, TensorSpec
from tests.strategy_helpers import reply, signs_record

D_TARGET = 11_000_000
REPEATS = 3


def resnet_like_spec(d_target: int = D_TARGET) -> ModelSpec:
    """~60 tensors, conv weights of growing width plus BN vectors, about `d_target` in all."""
    tensors: list[TensorSpec] = []
    width, total, i = 64, 0, 0
    while total < d_target:
        shape = (width, width, 3, 3)
        tensors.append(TensorSpec(f"layer{i}.conv.weight", shape))
        for suffix in ("weight", "bias"):
            tensors.append(TensorSpec(f"layer{i}.bn.{suffix}", (width,)))
        tensors.append(TensorSpec(f"layer{i}.bn.running_mean", (width,), kind="stat"))
        tensors.append(TensorSpec(f"layer{i}.bn.running_var", (width,), "stat", "log"))
        total += int(np.prod(shape)) + 4 * width
        width = min(512, width * 2) if i % 3 == 2 else width
        i += 1
    return ModelSpec(tuple(tensors))


def _strategy(spec: ModelSpec, kind: str):
    strategy = build_strategy(
        "fedavg",
        spec=spec,
        payload_kind=kind,
        bounds=AlphaBounds(),
        max_num_examples=10**6,
        min_train_nodes=1,
    )
    rng = np.random.default_rng(0)
    strategy.global_arrays = {t.name: rng.random(t.shape, np.float32) + 0.5 for t in spec}
    return strategy


def _replies(spec: ModelSpec, kind: str, k: int) -> list[Message]:
    rng = np.random.default_rng(1)
    if kind == "signs":
        return [reply(i, signs_record(spec, rng), num_examples=600) for i in range(1, k + 1)]
    weights = {t.name: rng.random(t.shape, np.float32) + 0.5 for t in spec}
    record = arrays_to_record(weights)  # one dense record shared: the bytes are what count
    return [reply(i, record, num_examples=600) for i in range(1, k + 1)]


def _best_seconds(fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _peak_bytes(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def run() -> list[dict]:
    spec = resnet_like_spec()
    figures = [{"name": "server.d", "value": spec.num_params, "unit": "params", "goal": None}]
    seconds = {}
    for kind in ("signs", "dense"):
        strategy, replies = _strategy(spec, kind), _replies(spec, kind, 10)
        seconds[kind] = _best_seconds(lambda s=strategy, r=replies: s.aggregate_train(1, r))
        figures.append(
            {"name": f"server.aggregate_{kind}_k10_s", "value": seconds[kind], "unit": "s"}
        )
    figures.append(
        {
            "name": "server.aggregate_fedbat_over_fedavg",
            "value": seconds["signs"] / seconds["dense"],
            "unit": "x",
            "goal": "<= 0.5",
            "pass": seconds["signs"] / seconds["dense"] <= 0.5,
        }
    )
    peaks = {}
    for k in (10, 100):
        strategy, replies = _strategy(spec, "signs"), _replies(spec, "signs", k)
        peaks[k] = _peak_bytes(lambda s=strategy, r=replies: s.aggregate_train(1, r))
        figures.append({"name": f"server.peak_mb_k{k}", "value": peaks[k] / 1e6, "unit": "MB"})
    ratio = peaks[100] / peaks[10]
    figures.append(
        {
            "name": "server.peak_memory_k100_over_k10",
            "value": ratio,
            "unit": "x",
            "goal": "<= 1.2",
            "pass": ratio <= 1.2,
        }
    )
    for fig in figures:
        fig.setdefault("goal", None)
        fig.setdefault("pass", True)
    return figures


if __name__ == "__main__":
    for figure in run():
        print(json.dumps(figure))
