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

from fedbat_flwr.wire.binary import split_spec
from fedbat_flwr.wire.errors import PayloadError
from fedbat_flwr.wire.fields import (
    ANY_STEP,
    check_header,
    check_length,
    check_names,
    check_stat_steps,
    check_weight,
    flat_target,
    make_header,
    read_only_copy,
    split_by,
)
from fedbat_flwr.wire.signs import (
    SIGNS_CODEC_ID,
    SIGNS_VERSION,
    SignsPayload,
    accumulate_signs,
    encode_signs,
    validate_signs,
)
from fedbat_flwr.wire.spec import AlphaBounds, ModelSpec

MIXED_CODEC_ID = 5
MIXED_VERSION = 1
FLOAT_WIDTHS = {16: np.dtype(np.float16), 32: np.dtype(np.float32)}
_KEYS = ("header", "signs", "alphas", "dense")


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
    binarized, full = split_spec(spec)
    signs = encode_signs(binarized, bits, alphas)
    check_names(dense, full, "dense")
    flat = []
    for t in full:
        v = np.asarray(dense[t.name], dtype=np.float32).reshape(-1)
        if v.size != t.size:
            raise PayloadError(t.name, "dense", f"{v.size} values (allowed: {t.size})")
        with np.errstate(over="ignore"):
            flat.append(v.astype(FLOAT_WIDTHS[width]))
        if not np.isfinite(flat[-1]).all():
            raise PayloadError(t.name, "dense", f"values not finite in float{width}")
    return {
        "header": make_header(MIXED_CODEC_ID, MIXED_VERSION, width),
        "signs": signs["signs"],
        "alphas": signs["alphas"],
        "dense": np.concatenate([np.zeros(0, FLOAT_WIDTHS[width]), *flat]),
    }


def is_mixed(payload: Mapping[str, np.ndarray]) -> bool:
    """True if ``payload`` declares this codec (its header's codec id); nothing else checked."""
    header = payload.get("header") if isinstance(payload, Mapping) else None
    return (
        isinstance(header, np.ndarray)
        and header.dtype == np.uint8
        and header.ndim == 1
        and header.size >= 3
        and int(header[2]) == MIXED_CODEC_ID
    )


def validate_mixed(
    payload: Mapping[str, np.ndarray], spec: ModelSpec, bounds: AlphaBounds
) -> MixedPayload:
    """Check every field of an untrusted payload against ``spec``; raise PayloadError if bad."""
    width = _check_layout(payload)
    binarized, full = split_spec(spec)
    signs_header = make_header(SIGNS_CODEC_ID, SIGNS_VERSION)
    signs = validate_signs(
        {"header": signs_header, "signs": payload["signs"], "alphas": payload["alphas"]},
        binarized,
        bounds,
    )
    dense = payload["dense"]
    check_length(dense, full.num_params, "dense", "the float tensors' sizes")
    values = read_only_copy(dense.astype(np.float32))
    pieces = split_by(values, [t.size for t in full])
    for t, v in zip(full, pieces, strict=True):
        if not np.isfinite(v).all():
            raise PayloadError(t.name, "dense", f"non-finite values (allowed: finite float{width})")
    check_stat_steps(full, pieces, bounds, "dense")
    return MixedPayload(spec, signs, dict(zip(full.names, pieces, strict=True)))


def accumulate_mixed(
    acc: MutableMapping[str, np.ndarray], view: MixedPayload, weight: float
) -> None:
    """In place ``acc[name] += weight * update[name]`` for every tensor."""
    check_weight(weight)
    # The signs view was checked against the run's bounds on validation: no second check.
    accumulate_signs(acc, view.signs, view.signs.spec, ANY_STEP, weight)
    w = np.float32(weight)
    for t in view.spec:
        if t.name in view.dense:
            flat_target(acc, t)[:] += w * view.dense[t.name]


def _check_layout(payload: Mapping[str, np.ndarray]) -> int:
    """Keys, dtypes and header; returns the float width the header declares."""
    if not isinstance(payload, Mapping):
        raise PayloadError(None, "payload", f"type={type(payload).__name__} (allowed: mapping)")
    allowed = ", ".join(_KEYS)
    for key in _KEYS:
        if key not in payload:
            raise PayloadError(None, key, f"missing (required keys: {allowed})")
        if not isinstance(payload[key], np.ndarray) or payload[key].ndim != 1:
            raise PayloadError(None, key, "not a 1-D numpy array (allowed: 1-D numpy.ndarray)")
    for key in payload:
        if key not in _KEYS:
            raise PayloadError(None, str(key), f"unexpected key (allowed keys: {allowed})")
    header = payload["header"]
    if header.dtype != np.uint8:
        raise PayloadError(None, "header", f"dtype={header.dtype} (allowed: uint8)")
    check_header(header, MIXED_CODEC_ID, MIXED_VERSION, "mixed", length=5)
    width = int(header[4])
    if width not in FLOAT_WIDTHS:
        raise PayloadError(None, "header", f"float width={width} (allowed: 16 or 32)")
    expected = {"signs": np.dtype(np.uint8), "alphas": np.dtype(np.float32)}
    expected["dense"] = FLOAT_WIDTHS[width]
    for key, dtype in expected.items():
        if payload[key].dtype != dtype:
            reason = f"dtype={payload[key].dtype} (allowed: {dtype}, as the header declares)"
            raise PayloadError(None, key, reason)
    return width
