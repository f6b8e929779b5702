"""Training-room timings: FedBAT step (binarizing phase) vs plain SGD, channels_last speed-up.

``run()`` returns JSON-able dicts {"name", "value", "unit", "goal", "pass"}; ratios compare
timings taken in the same run (best of N repeats, so noise from a shared machine counts less).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch
from torch import nn

from fedbat_flwr.training import (
    CNN4,
    ResNet10,
    TensorBatches,
    attach_binarized_updates,
    keep_freed_memory,
    prepare_model,
    run_sgd,
)

BATCH = 64
STEPS = 8  # steps per timed call
REPEATS = 15  # best-of
CPU = torch.device("cpu")


def _batches(shape: tuple[int, int, int], steps: int = STEPS) -> TensorBatches:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * steps, *shape, generator=gen)
    y = torch.randint(0, 10, (BATCH * steps,), generator=gen)
    return TensorBatches(x, y, BATCH, generator=gen)


def _best_step_seconds(*trains: Callable[[], None]) -> list[float]:
    """Best-of-REPEATS seconds per step of each ``train``, timed interleaved.

    Interleaving means load from other processes hits all candidates alike.
    """
    for train in trains:
        train()  # warm-up: oneDNN primitive caches, allocator
    best = [float("inf")] * len(trains)
    for _ in range(REPEATS):
        for i, train in enumerate(trains):
            start = time.perf_counter()
            train()
            best[i] = min(best[i], time.perf_counter() - start)
    return [b / STEPS for b in best]


def _sgd(model: nn.Module, batches: TensorBatches) -> Callable[[], None]:
    params = list(model.parameters())
    return lambda: run_sgd(model, params, batches, epochs=1, lr=0.01, device=CPU)


def _fedbat(model: nn.Module, batches: TensorBatches, binarizing: bool) -> Callable[[], None]:
    """Steps of FedBAT: warm-up (Eq. 12) or binarization-aware (Eq. 14, m and alpha_e learned)."""
    updates = attach_binarized_updates(
        model, rho=6.0, alpha_min=5e-4, alpha_max=5e-2, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        updates.update.uniform_(-0.01, 0.01)
    if binarizing:
        updates.start_binarization()
    params = [updates.update, updates.alpha_e]
    return lambda: run_sgd(model, params, batches, epochs=1, lr=0.01, device=CPU)


def _ratio_record(name: str, value: float, goal: float, higher_is_better: bool) -> dict:
    ok = value >= goal if higher_is_better else value <= goal
    op = ">=" if higher_is_better else "<="
    return {"name": name, "value": round(value, 3), "unit": "x", "goal": f"{op} {goal}", "pass": ok}


def _time_record(name: str, seconds: float) -> dict:
    return {
        "name": name,
        "value": round(seconds * 1e3, 2),
        "unit": "ms",
        "goal": None,
        "pass": True,
    }


def _throughput_record(name: str, step_seconds: float) -> dict:
    return {
        "name": name,
        "value": round(BATCH / step_seconds),
        "unit": "samples/s",
        "goal": None,
        "pass": True,
    }


def run(num_threads: int | None = None) -> list[dict]:
    """Measure and return the records (CPU, channels_last, batch 64).

    ``num_threads`` sets torch's intra-op threads for the run (default: torch's own choice);
    1 thread is the robust setting on a busy shared machine.
    """
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _measure(torch.get_num_threads())
    finally:
        torch.set_num_threads(previous)


def _measure(threads: int) -> list[dict]:
    keep_freed_memory()  # as the ClientApp does at start-up
    torch.manual_seed(0)
    # Other processes on a small machine stall OpenMP barriers: read the ratios with this in mind.
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    records: list[dict] = [
        {
            "name": "load_average_1min_at_start",
            "value": round(load, 2),
            "unit": "",
            "goal": f"< {cores} (quiet machine)",
            "pass": load < cores,
        },
        {"name": "torch_threads", "value": threads, "unit": "", "goal": None, "pass": True},
    ]
    cases: list[tuple[str, Callable[[], nn.Module], tuple[int, int, int]]] = [
        ("cnn4", lambda: CNN4(in_channels=1, image_size=28), (1, 28, 28)),
        ("resnet10", lambda: ResNet10(in_channels=3), (3, 32, 32)),
    ]
    for name, factory, shape in cases:
        batches = _batches(shape)
        trains = [
            _sgd(prepare_model(factory(), CPU), batches),
            _fedbat(prepare_model(factory(), CPU), batches, binarizing=False),
            _fedbat(prepare_model(factory(), CPU), batches, binarizing=True),
        ]
        if name == "cnn4":
            trains.append(_sgd(factory(), batches))  # default (contiguous) layout
        sgd, warmup, binarizing, *rest = _best_step_seconds(*trains)
        records += [
            _time_record(f"{name}_sgd_step", sgd),
            _time_record(f"{name}_fedbat_warmup_step", warmup),
            _time_record(f"{name}_fedbat_binarizing_step", binarizing),
            _ratio_record(f"{name}_fedbat_warmup_over_sgd", warmup / sgd, 1.10, False),
            _ratio_record(f"{name}_fedbat_binarizing_over_sgd", binarizing / sgd, 1.10, False),
        ]
        if rest:
            records.append(_time_record(f"{name}_sgd_step_contiguous", rest[0]))
            for layout, seconds in (("channels_last", sgd), ("contiguous", rest[0])):
                records.append(_throughput_record(f"{name}_samples_per_s_{layout}", seconds))
            records.append(_ratio_record(f"{name}_channels_last_speedup", rest[0] / sgd, 1.8, True))
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    for record in run(parser.parse_args().threads):
        print(json.dumps(record))
