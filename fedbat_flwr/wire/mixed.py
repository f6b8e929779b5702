"""Mixed 1-bit codec: sign bits for conv / linear weights, float BatchNorm (layout version 1).

What run-config ``bn-payload = "float16" | "float32"`` sends for the 1-bit methods (FedBAT and the
SignSGD family). Conv / linear weight updates travel exactly as in ``signs.py`` (packed bits + one
alpha per tensor); every other tensor (BatchNorm affine gamma / beta and running statistics)
travels as its update in float16 or float32, as the authors' FedBAT code sends it. On CNN4 the
float part is 1,920 of 391,840 entries: +0.08 bit/param in float16, +0.16 in float32.

======== ============== ====== ============================================================
key      dtype          shape  content
======== ============== ====== ============================================================
header   uint8          (5,)   ``b"FB"``, codec id (5 = mixed), layout version (1), and the
                               float width of ``dense`` in bits (16 or 32)
signs    uint8          (B,)   the binarized tensors' sign bits exactly as in ``signs.py``
alphas   float32        (Lb,)  one alpha per binarized tensor (the sign kind's bounds)
dense    float16/32     (D,)   every other tensor's update in its domain (``ModelSpec.delta``:
                               ``running_var`` as log(new / old)), spec order, concatenated
======== ============== ====== ============================================================

Bounds: every ``dense`` entry is finite and at most ``max-update-entry`` in size for an affine
value, ``stat-alpha-max`` for a statistic (the bounds a k-bit or sparse update of the same tensor
meets). A ``running_var`` is updated as ``w * exp(delta)`` and stays > 0.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import numpy as np

from fedbat_flwr.wire.binary import (
    accumulate_signs_and_floats,
    encode_signs_and_floats,
    split_spec,
    validate_signs_and_floats,
)
from fedbat_flwr.wire.errors import PayloadError
from fedbat_flwr.wire.fields import (
    check_fields,
    check_header,
    check_stat_steps,
    declared_codec,
    make_header,
)
from fedbat_flwr.wire.signs import SignsPayload
from fedbat_flwr.wire.spec import AlphaBounds, ModelSpec

MIXED_CODEC_ID = 5
MIXED_VERSION = 1
FLOAT_WIDTHS = {16: np.dtype(np.float16), 32: np.dtype(np.float32)}
LAYOUT = {
    "header": (np.dtype(np.uint8), 1),
    "signs": (np.dtype(np.uint8), 1),
    "alphas": (np.dtype(np.float32), 1),
    "dense": (tuple(FLOAT_WIDTHS.values()), 1),  # the header's float width says which
}


@dataclass(frozen=True, eq=False)
class MixedPayload:
    """A validated payload: the signs view of the binarized part, the float part per tensor."""

    spec: ModelSpec
    signs: SignsPayload
    dense: dict[str, np.ndarray]  # float32, flat, read-only


def encode_mixed(
    spec: ModelSpec,
    bits: Mapping[str, np.ndarray],
    alphas: Mapping[str, float],
    dense: Mapping[str, np.ndarray],
    width: int,
) -> dict[str, np.ndarray]:
    """Binarized tensors as bits (True = +alpha) and alpha; the others' updates as ``width``-bit
    floats."""
    if width not in FLOAT_WIDTHS:
        raise ValueError(f"float width={width!r} (allowed: {sorted(FLOAT_WIDTHS)})")
    sign_part, flat = encode_signs_and_floats(spec, bits, alphas, dense)
    narrow = []
    for t, v in zip(split_spec(spec)[1], flat, strict=True):
        with np.errstate(over="ignore"):
            narrow.append(v.astype(FLOAT_WIDTHS[width]))
        if not np.isfinite(narrow[-1]).all():
            raise PayloadError(t.name, "dense", f"values not finite in float{width}")
    return {
        "header": make_header(MIXED_CODEC_ID, MIXED_VERSION, width),
        **sign_part,
        "dense": np.concatenate([np.zeros(0, FLOAT_WIDTHS[width]), *narrow]),
    }


def is_mixed(payload: Mapping[str, np.ndarray]) -> bool:
    """True if ``payload`` declares this codec (its header's codec id); nothing else checked."""
    return declared_codec(payload) == MIXED_CODEC_ID


def validate_mixed(
    payload: Mapping[str, np.ndarray], spec: ModelSpec, bounds: AlphaBounds
) -> MixedPayload:
    """Check every field of an untrusted payload against ``spec``; raise PayloadError if bad."""
    check_fields(payload, LAYOUT)
    header = payload["header"]
    check_header(header, MIXED_CODEC_ID, MIXED_VERSION, "mixed", length=5)
    width = int(header[4])
    if width not in FLOAT_WIDTHS:
        raise PayloadError(None, "header", f"float width={width} (allowed: 16 or 32)")
    found, declared = payload["dense"].dtype, FLOAT_WIDTHS[width]
    if found != declared:
        reason = f"dtype={found} (allowed: {declared}, as the header declares)"
        raise PayloadError(None, "dense", reason)
    signs, floats = validate_signs_and_floats(payload, spec, bounds, weights=False)
    check_stat_steps(split_spec(spec)[1], list(floats.values()), bounds, "dense")
    return MixedPayload(spec, signs, {name: _float32(v) for name, v in floats.items()})


def accumulate_mixed(
    acc: MutableMapping[str, np.ndarray], view: MixedPayload, weight: float
) -> None:
    """In place ``acc[name] += weight * update[name]`` for every tensor (the sign part's alphas
    met the run's bounds on validation: no second check)."""
    accumulate_signs_and_floats(acc, view.spec, view.signs, view.dense, weight)


def _float32(values: np.ndarray) -> np.ndarray:
    """Read-only float32 values of a validated float16 or float32 piece."""
    out = values.astype(np.float32, copy=False)
    out.flags.writeable = False
    return out
