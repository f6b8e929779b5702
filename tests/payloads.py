"""Valid payloads of every payload kind on a tiny model, and what a mutation of them breaks.

Shared by tests/test_validation.py (one readable case per kind and rule) and tests/test_fuzz.py
(hypothesis mutations). The spec is tiny but has what the codecs treat differently: tensors
whose bits leave pad bits (12, 6, 5 entries), two binarized weights (BiFL), BatchNorm affine
parameters, a linear-domain statistic and a log-domain one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord

from fedbat_flwr.records import arrays_to_record, payload_to_record
from fedbat_flwr.server_part import ServerPart
from fedbat_flwr.strategy import build_strategy
from fedbat_flwr.wire import (
    AlphaBounds,
    ModelSpec,
    TensorSpec,
    encode_binary_weights,
    encode_kbit,
    encode_signs,
    encode_sparse,
    is_binarized,
    quantize_stochastic,
)
from fedbat_flwr.wire.binary import split_spec
from fedbat_flwr.wire.fedbif import encode_fedbif_bits
from fedbat_flwr.wire.fedpm import encode_fedpm_mask, fedpm_groups, validate_fedpm_probs
from fedbat_flwr.wire.kbit import packed_nbytes
from fedbat_flwr.wire.sparse import BITMAP

SPEC = ModelSpec(
    (
        TensorSpec("conv.weight", (3, 4)),
        TensorSpec("bn.weight", (5,)),
        TensorSpec("bn.bias", (5,)),
        TensorSpec("bn.running_mean", (5,), kind="stat"),
        TensorSpec("bn.running_var", (5,), kind="stat", domain="log"),
        TensorSpec("fc.weight", (3, 2)),
    )
)
BOUNDS = AlphaBounds(param=(5e-4, 5e-2), stat=(0.0, 10.0))
CAP = 1000  # max-num-examples of every test strategy
KBIT_BITS = 4

# Kinds the default server part aggregates (FedBiF / FedPM kinds need their method's own part).
KINDS = ("signs", "signs-unbounded", "dense", "kbit", "sparse", "binary-weights")
SIGN_KINDS = ("signs", "signs-unbounded")
# Kinds with a server part of their own (`make_strategy` builds it); "fedpm-coded" and
# "fedpm-theta-coded" are FedPM's range-coded layouts (codecs 20, 21) of its payload kind,
# "fedpm-mask".
FEDPM_KINDS = ("fedpm-mask", "fedpm-coded", "fedpm-theta-coded")
RULE_KINDS = ("fedbif-bits", *FEDPM_KINDS)
ALL_KINDS = KINDS + RULE_KINDS
PAYLOAD_KIND = {kind: "fedpm-mask" for kind in FEDPM_KINDS}
FEDBIF_BITS = 4
# Float fields whose entries must be >= 0 (a step size or a scale), per kind.
NONNEG_FIELDS = {
    "signs": ("alphas",),
    "signs-unbounded": ("alphas",),
    "kbit": ("scales",),
    "binary-weights": ("alphas",),
    "fedbif-bits": ("alphas",),
    **{kind: ("alphas",) for kind in FEDPM_KINDS},
}


def global_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """A global model: positive entries (so running_var is a valid variance)."""
    rng = np.random.default_rng(seed)
    return {t.name: (rng.random(t.shape) + 0.5).astype(np.float32) for t in SPEC}


def make_strategy(
    kind: str,
    aggregator: str = "fedavg",
    policy: str = "cap",
    seed: int = 0,
    bounds: AlphaBounds = BOUNDS,
    **kwargs: object,
):
    """The server's strategy for `kind`, holding the global model of `global_arrays(seed)`
    (for a kind of FedBiF / FedPM: its method's server part, and the part's global arrays made
    from that model)."""
    part = make_part(kind, seed)
    strategy = build_strategy(
        aggregator,
        spec=SPEC,
        payload_kind=PAYLOAD_KIND.get(kind, kind),
        bounds=bounds,
        max_num_examples=CAP,
        num_examples_policy=policy,
        min_train_nodes=1,
        part=part,
        **kwargs,
    )
    strategy.global_arrays = part.initial(global_arrays(seed))
    part.downlink(strategy.global_arrays, 1)  # as `configure_train` does before any reply
    return strategy


def make_part(kind: str, seed: int = 0) -> ServerPart:
    """FedBiF's part (m = 4, one bit a round: bit 3 in round 1), FedPM's (the reference
    network is `global_arrays(seed)`) or the default one of every other kind."""
    from fedbat_flwr.methods.server.fedbif import FedBiFPart
    from fedbat_flwr.methods.server.fedpm import FedPMPart

    if kind == "fedbif-bits":
        return FedBiFPart(SPEC, FEDBIF_BITS, 1, "cycle", seed=seed)
    if kind in FEDPM_KINDS:
        return FedPMPart(SPEC, global_arrays(seed), 1, seed=seed)
    return ServerPart(SPEC)


# -- valid payloads ------------------------------------------------------------------------------


def _signs(rng: np.random.Generator, param_hi: float) -> dict[str, np.ndarray]:
    bits = {t.name: rng.random(t.shape) < 0.5 for t in SPEC}
    alphas = {
        t.name: float(rng.uniform(*BOUNDS.param) if t.kind == "param" else rng.uniform(0, 1.0))
        for t in SPEC
    }
    if param_hi != BOUNDS.param[1]:
        alphas.update({t.name: float(rng.uniform(0, param_hi)) for t in SPEC if t.kind == "param"})
    return encode_signs(SPEC, bits, alphas)


def _update(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A small update of every tensor (statistics well inside the stat bound)."""
    return {t.name: rng.normal(0, 0.01, t.shape).astype(np.float32) for t in SPEC}


def _dense(rng: np.random.Generator) -> dict[str, np.ndarray]:
    w = global_arrays()
    return {
        name: (value * np.exp(d) if name.endswith("running_var") else value + d).astype(np.float32)
        for (name, value), d in zip(w.items(), _update(rng).values(), strict=True)
    }


def _kbit(rng: np.random.Generator) -> dict[str, np.ndarray]:
    codes, scales = {}, {}
    for name, m in _update(rng).items():
        codes[name], scales[name] = quantize_stochastic(m, KBIT_BITS, rng)
    return encode_kbit(SPEC, codes, scales, KBIT_BITS)


def _sparse(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Positions of each format: all (statistics), a bitmap (dense half) or varint gaps (one)."""
    update = _update(rng)
    positions, values = {}, {}
    for t in SPEC:
        density = 1.0 if t.kind == "stat" else rng.choice([0.5, 0.1])
        keep = np.flatnonzero(rng.random(t.size) < density)
        if keep.size == 0:
            keep = np.array([int(rng.integers(t.size))])
        positions[t.name] = keep
        values[t.name] = update[t.name].reshape(-1)[keep]
    return encode_sparse(SPEC, positions, values)


def _binary(rng: np.random.Generator) -> dict[str, np.ndarray]:
    binarized, full = split_spec(SPEC)
    bits = {t.name: rng.random(t.shape) < 0.5 for t in binarized}
    alphas = {t.name: float(rng.uniform(0, 0.1)) for t in binarized}
    dense = {name: v for name, v in _dense(rng).items() if name in full.names}
    return encode_binary_weights(SPEC, bits, alphas, dense)


def _fedbif(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Round 1's activated bit (3) of each weight, the other tensors' 1-bit updates."""
    quantized, others = split_spec(SPEC)
    planes = {t.name: rng.random((1, *t.shape)) < 0.5 for t in quantized}
    signs = {t.name: rng.random(t.shape) < 0.5 for t in others}
    alphas = {t.name: float(rng.uniform(0, 0.05)) for t in others}
    return encode_fedbif_bits(SPEC, FEDBIF_BITS, [3], planes, signs, alphas)


def fedpm_sent_theta(seed: int = 0) -> dict[str, np.ndarray]:
    """The theta `make_strategy`'s FedPM part sends in round 1, as a client reads it."""
    part = make_part("fedpm-mask", seed)
    return validate_fedpm_probs(part.payload(part.initial(global_arrays(seed)), 1), SPEC).theta


def _fedpm(rng: np.random.Generator, coding: str) -> dict[str, np.ndarray]:
    masked, stats = fedpm_groups(SPEC)
    masks = {t.name: rng.random(t.shape) < rng.uniform(0.2, 0.8) for t in masked}
    signs = {t.name: rng.random(t.shape) < 0.5 for t in stats}
    alphas = {t.name: float(rng.uniform(0, 1.0)) for t in stats}
    theta = fedpm_sent_theta() if coding == "theta" else None
    return encode_fedpm_mask(SPEC, masks, signs, alphas, coding=coding, theta=theta)


VALID: dict[str, Callable[[np.random.Generator], dict[str, np.ndarray]]] = {
    "signs": lambda rng: _signs(rng, BOUNDS.param[1]),
    "signs-unbounded": lambda rng: _signs(rng, 0.1),
    "dense": _dense,
    "kbit": _kbit,
    "sparse": _sparse,
    "binary-weights": _binary,
    "fedbif-bits": _fedbif,
    "fedpm-mask": lambda rng: _fedpm(rng, coding="packed"),
    "fedpm-coded": lambda rng: _fedpm(rng, coding="density"),
    "fedpm-theta-coded": lambda rng: _fedpm(rng, coding="theta"),
}


def valid_payload(kind: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return VALID[kind](rng)


def to_record(kind: str, payload: dict[str, np.ndarray]) -> ArrayRecord:
    """What the ClientApp sends: dense weights as `.npy` Arrays, every other kind raw."""
    return arrays_to_record(payload) if kind == "dense" else payload_to_record(payload)


# -- where a payload's entries belong --------------------------------------------------------


def float_fields(kind: str, payload: dict[str, np.ndarray]) -> dict[str, list[TensorSpec]]:
    """Float32 fields of a payload, with the tensor each entry (flat order) belongs to."""
    if kind in SIGN_KINDS:
        return {"alphas": list(SPEC.tensors)}
    if kind == "kbit":
        return {"scales": list(SPEC.tensors)}
    if kind == "sparse":
        counts = payload["meta"][:, 0].astype(np.int64)
        return {"values": [t for t, c in zip(SPEC, counts, strict=True) for _ in range(c)]}
    if kind == "binary-weights":
        binarized, full = split_spec(SPEC)
        return {
            "alphas": list(binarized.tensors),
            "dense": [t for t in full for _ in range(t.size)],
        }
    if kind == "fedbif-bits":
        return {"alphas": list(split_spec(SPEC)[1].tensors)}
    if kind in FEDPM_KINDS:
        return {"alphas": list(fedpm_groups(SPEC)[1].tensors)}
    return {t.name: [t] * t.size for t in SPEC}


def step_bound(kind: str, field: str, t: TensorSpec) -> float:
    """The largest |value| an entry of `field` about tensor `t` may have (inf = unbounded).

    The documented bounds (docs/ARCHITECTURE.md, "Influence of one client"): FedBAT's alpha
    within [alpha-min, alpha-max]; every BatchNorm statistic's step within stat-alpha-max;
    every other data-sized parameter step within max-update-entry; weights (dense, BiFL)
    unbounded by design.
    """
    if kind in ("dense", "binary-weights"):
        return float("inf")
    if t.kind == "stat":
        return BOUNDS.stat[1]
    return BOUNDS.param[1] if kind == "signs" else BOUNDS.update


def value_is_valid(kind: str, field: str, t: TensorSpec, value: float) -> bool:
    """Whether setting one entry of `field` (about tensor `t`) to `value` keeps it valid."""
    if not np.isfinite(value):
        return False
    if field in NONNEG_FIELDS.get(kind, ()) and value < 0:
        return False
    if kind == "signs" and t.kind == "param" and value < np.float32(BOUNDS.param[0]):
        return False
    is_weight = kind in ("dense", "binary-weights")
    if is_weight and t.domain == "log" and value <= 0:
        return False
    return abs(value) <= np.float32(step_bound(kind, field, t))


def pad_bits(kind: str, payload: dict[str, np.ndarray]) -> list[tuple[str, int, int]]:
    """(field, byte index, mask of its pad bits) of every byte that ends a tensor's bits early."""
    if kind in SIGN_KINDS:
        return _pad_positions("signs", [t.size for t in SPEC])
    if kind == "binary-weights":
        return _pad_positions("signs", [t.size for t in SPEC if is_binarized(t)])
    if kind == "kbit":
        return _pad_positions("levels", [t.size * KBIT_BITS for t in SPEC])
    if kind == "fedbif-bits":
        quantized, others = split_spec(SPEC)
        return _pad_positions("bits", [t.size for t in quantized]) + _pad_positions(
            "signs", [t.size for t in others]
        )
    if kind in FEDPM_KINDS:
        masked, stats = fedpm_groups(SPEC)
        signs = _pad_positions("signs", [t.size for t in stats])
        return (
            signs
            if kind != "fedpm-mask"
            else _pad_positions("masks", [t.size for t in masked]) + signs
        )
    if kind == "sparse":
        meta = payload["meta"].astype(np.int64)
        starts = np.cumsum(meta[:, 2]) - meta[:, 2]
        out = []
        for t, (_, fmt, nbytes), start in zip(SPEC, meta, starts, strict=True):
            if fmt == BITMAP and t.size % 8:
                out.append(("index", int(start + nbytes - 1), (0xFF << (t.size % 8)) & 0xFF))
        return out
    return []


def _pad_positions(field: str, nbits: list[int]) -> list[tuple[str, int, int]]:
    ends = np.cumsum([packed_nbytes(n, 1) for n in nbits])
    return [
        (field, int(end - 1), (0xFF << (n % 8)) & 0xFF)
        for n, end in zip(nbits, ends, strict=True)
        if n % 8
    ]
