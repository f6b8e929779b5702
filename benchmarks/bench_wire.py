"""Server-side cost of the 1-bit codec: decode + accumulate vs a dense float32 axpy.

Run from the repo root: ``python -m benchmarks.bench_wire``. Prints one JSON line per figure.

The model is d = 11,000,000 elements split like a ResNet-18 (CIFAR stem): ~60 tensors, from
64-element BatchNorm vectors to 2.4M-element convolutions (the largest is trimmed to hit d).
Figures (best of N, time.perf_counter):

(a) dense float32 axpy ``acc += w * x`` over one 11M array: what FedAvg pays per client;
(b) plain decode: validate, ``np.unpackbits`` to a ±1 float32 array per tensor, scale, add;
(c) fused ``accumulate_signs`` (validation included): 256x8 table gather into a cached scratch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np

from fedbat_flwr.wire import (
    AlphaBounds,
    ModelSpec,
    TensorSpec,
    accumulate_signs,
    encode_signs,
    payload_nbytes,
    validate_signs,
)

D = 11_000_000
REPEATS = 5
GOAL_FUSED_OVER_AXPY = 1.5


def resnet_like_spec(d: int = D) -> ModelSpec:
    """ResNet-18 (CIFAR) conv, BN-affine and fc shapes, trimmed to exactly ``d`` elements."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("conv1.weight", (64, 3, 3, 3))]
    shapes += _bn("bn1", 64)
    c_in = 64
    for stage, c_out in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{stage}.{block}"
            first_in = c_in if block == 0 else c_out
            shapes += [(f"{p}.conv1.weight", (c_out, first_in, 3, 3)), *_bn(f"{p}.bn1", c_out)]
            shapes += [(f"{p}.conv2.weight", (c_out, c_out, 3, 3)), *_bn(f"{p}.bn2", c_out)]
            if block == 0 and first_in != c_out:
                shapes += [(f"{p}.shortcut.weight", (c_out, first_in, 1, 1))]
                shapes += _bn(f"{p}.shortcut_bn", c_out)
        c_in = c_out
    shapes += [("fc.weight", (10, 512)), ("fc.bias", (10,))]
    sizes = [int(np.prod(s)) for _, s in shapes]
    big = int(np.argmax(sizes))  # the largest conv absorbs the difference, flattened
    shapes[big] = (shapes[big][0], (sizes[big] + d - sum(sizes),))
    return ModelSpec(tuple(TensorSpec(name, shape) for name, shape in shapes))


def _bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,))]


def best_of(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Fastest of ``repeats`` runs after one warm-up, in seconds (least disturbed by neighbours)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def plain_accumulate(acc: dict[str, np.ndarray], payload, spec, bounds, weight: float) -> None:
    """Reference path: validate, unpack to ±1 float32, scale, add."""
    view = validate_signs(payload, spec, bounds)
    for t, packed, alpha in zip(spec, view.packed, view.alphas, strict=True):
        pm1 = np.unpackbits(packed, count=t.size, bitorder="little").astype(np.float32)
        pm1 *= 2.0
        pm1 -= 1.0
        pm1 *= np.float32(weight * float(alpha))
        acc[t.name] += pm1.reshape(t.shape)


def _figure(name: str, value: float, unit: str, goal: float | None = None) -> dict:
    """A record like bench_training's: figures without a goal always pass."""
    passed = True if goal is None else bool(value <= goal)
    return {
        "name": name,
        "value": round(value, 4),
        "unit": unit,
        "goal": None if goal is None else f"<= {goal}",
        "pass": passed,
    }


def run() -> list[dict]:
    """Time (a), (b), (c) on an 11M-element ResNet-like model; return one dict per figure."""
    spec = resnet_like_spec()
    bounds = AlphaBounds()
    rng = np.random.default_rng(0)
    bits = {t.name: rng.random(t.shape, dtype=np.float32) < 0.5 for t in spec}
    alphas = {t.name: float(rng.uniform(*bounds.for_tensor(t))) for t in spec}
    payload = encode_signs(spec, bits, alphas)
    weight = 0.1

    x = rng.standard_normal(D, dtype=np.float32)
    dense_acc = np.zeros(D, np.float32)
    acc = {t.name: np.zeros(t.shape, np.float32) for t in spec}

    def axpy() -> None:
        nonlocal dense_acc
        dense_acc += np.float32(weight) * x

    t_axpy = best_of(axpy)
    t_plain = best_of(lambda: plain_accumulate(acc, payload, spec, bounds, weight))
    t_fused = best_of(lambda: accumulate_signs(acc, payload, spec, bounds, weight))
    return [
        _figure("wire.tensors", float(len(spec)), "count"),
        _figure("wire.axpy_dense_ms", 1e3 * t_axpy, "ms"),
        _figure("wire.plain_unpack_accumulate_ms", 1e3 * t_plain, "ms"),
        _figure("wire.fused_accumulate_ms", 1e3 * t_fused, "ms"),
        _figure("wire.fused_over_axpy", t_fused / t_axpy, "x", GOAL_FUSED_OVER_AXPY),
        _figure("wire.plain_over_axpy", t_plain / t_axpy, "x"),
        _figure("wire.signs_bits_per_param", 8 * payload_nbytes(payload) / D, "bits/param"),
    ]


if __name__ == "__main__":
    for figure in run():
        print(json.dumps(figure))
