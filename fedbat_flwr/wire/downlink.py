"""Quantized broadcast of the global model (run-config ``downlink-bits``; layout version 1).

The server keeps full-precision master weights and sends every sampled client the same
quantized copy of them; each broadcast stands alone (it is the whole model, not a change since an
earlier broadcast), so a client that sat out many rounds decodes it like any other.

- Conv / linear weights (``is_binarized``: trainable, >= 2-D) are quantized row by row (a row is
  one output channel, ``shape[0]`` rows of ``prod(shape[1:])`` entries) to ``k`` bits on the
  ``2^k`` evenly spaced levels from the row's minimum to its maximum. Rounding is stochastic and
  unbiased (a value between two levels goes up with probability equal to its distance from the
  lower level over the step), so the expected broadcast is the master model.
- Every other tensor (BatchNorm affine and statistics, biases: 0.5 % of CNN4) travels as float16
  (``half.py``: a running variance stays > 0).
- ``downlink-bits = 16`` sends every tensor as float16; 32 is the dense float32 model (no payload).

======== ======= ====== ================================================================
key      dtype   shape  content
======== ======= ====== ================================================================
header   uint8   (5,)   ``b"FB"``, codec id (6 = downlink), layout version (1), k (1-8, 16)
codes    uint8   (B,)   per quantized tensor, spec order: its k-bit level indices, rows one
                        after the other (``kbit.pack_uint``), byte-aligned per tensor
lows     float32 (R,)   per row of every quantized tensor: the lowest level (the row minimum)
steps    float32 (R,)   per row: the spacing of its levels, >= 0 (0 for a constant row)
half     float16 (H,)   every other tensor, flattened, spec order, concatenated
======== ======= ====== ================================================================

On CNN4 (390,880 quantized entries in 490 rows, 1,920 float16) ``k = 4`` costs 4.15 bits per
parameter before Flower's framing.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedbat_flwr.wire.binary import split_spec
from fedbat_flwr.wire.errors import PayloadError
from fedbat_flwr.wire.fields import (
    check_fields,
    check_header,
    check_length,
    make_header,
    read_only_copy,
    split_by,
)
from fedbat_flwr.wire.half import encode_half, validate_half
from fedbat_flwr.wire.kbit import check_packed, pack_uint, unpack_uint
from fedbat_flwr.wire.spec import ModelSpec, TensorSpec

DOWNLINK_CODEC_ID = 6
DOWNLINK_VERSION = 1
QUANTIZED_BITS = tuple(range(1, 9))
DOWNLINK_BITS = (*QUANTIZED_BITS, 16, 32)
LAYOUT = {
    "header": (np.dtype(np.uint8), 1),
    "codes": (np.dtype(np.uint8), 1),
    "lows": (np.dtype(np.float32), 1),
    "steps": (np.dtype(np.float32), 1),
    "half": (np.dtype(np.float16), 1),
}


def rows_of(t: TensorSpec) -> tuple[int, int]:
    """(rows, entries per row) of a quantized tensor: one row per output channel."""
    rows = t.shape[0]
    return rows, (t.size // rows if rows else 0)


def _parts(spec: ModelSpec, bits: int) -> tuple[ModelSpec, ModelSpec]:
    """(row-quantized tensors, float16 tensors); with 16 bits every tensor is float16."""
    if bits == 16:
        return ModelSpec(()), spec
    return split_spec(spec)


def encode_downlink(
    spec: ModelSpec, weights: Mapping[str, np.ndarray], bits: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """The broadcast of ``weights`` at ``bits`` bits per quantized entry; ``rng`` draws the
    stochastic rounding (the server seeds it from the run seed and the round)."""
    if bits not in (*QUANTIZED_BITS, 16):
        raise ValueError(f"downlink bits={bits!r} (allowed: {list(QUANTIZED_BITS)} or 16)")
    quantized, rest = _parts(spec, bits)
    codes, lows, steps = [], [], []
    for t in quantized:
        w = np.asarray(weights[t.name], dtype=np.float32).reshape(rows_of(t))
        c, lo, step = quantize_rows(w, bits, rng)
        codes.append(pack_uint(c, bits))
        lows.append(lo)
        steps.append(step)
    return {
        "header": make_header(DOWNLINK_CODEC_ID, DOWNLINK_VERSION, bits),
        "codes": np.concatenate([np.zeros(0, np.uint8), *codes]),
        "lows": np.concatenate([np.zeros(0, np.float32), *lows]),
        "steps": np.concatenate([np.zeros(0, np.float32), *steps]),
        "half": encode_half(rest, weights),
    }


def quantize_rows(
    w: np.ndarray, bits: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Level indices (uint8, ``w``'s shape), row minima and steps of ``w`` (rows, columns).

    Unbiased: ``E[low + code * step] = w`` entry by entry (up to float32 rounding).
    """
    if not np.isfinite(w).all():
        raise ValueError("weights to broadcast are not finite")
    lo = w.min(axis=1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
    hi = w.max(axis=1) if w.shape[1] else lo
    top = (1 << bits) - 1
    step = ((hi.astype(np.float64) - lo) / top).astype(np.float32)
    safe = np.where(step > 0, step, np.float32(1.0))[:, None]
    position = (w - lo[:, None]) / safe  # in [0, top]
    codes = np.floor(position + rng.random(w.shape, dtype=np.float32))
    return np.clip(codes, 0, top).astype(np.uint8), lo.astype(np.float32), step


def decode_downlink(payload: Mapping[str, np.ndarray], spec: ModelSpec) -> dict[str, np.ndarray]:
    """The float32 model a broadcast describes; PayloadError naming the field if it is not a
    well-formed broadcast of ``spec`` (a client never trains from a corrupt model)."""
    check_fields(payload, LAYOUT)
    header = payload["header"]
    check_header(header, DOWNLINK_CODEC_ID, DOWNLINK_VERSION, "downlink", length=5)
    bits = int(header[4])
    if bits not in (*QUANTIZED_BITS, 16):
        raise PayloadError(None, "header", f"bits={bits} (allowed: 1-8 or 16)")
    quantized, rest = _parts(spec, bits)
    rows = [rows_of(t) for t in quantized]
    num_rows = sum(r for r, _ in rows)
    check_length(payload["lows"], num_rows, "lows", "one per row of the quantized tensors")
    check_length(payload["steps"], num_rows, "steps", "one per row of the quantized tensors")
    codes_of = check_packed(payload["codes"], quantized, bits, "codes")
    lows, steps = read_only_copy(payload["lows"]), read_only_copy(payload["steps"])
    out = validate_half(payload["half"], rest, "half")
    row_counts = [r for r, _ in rows]
    pieces = zip(
        quantized,
        codes_of,
        split_by(lows, row_counts),
        split_by(steps, row_counts),
        strict=True,
    )
    for t, packed, lo, step in pieces:
        _check_rows(t, lo, step, bits)
        codes = unpack_uint(packed, bits, t.size).reshape(rows_of(t))
        out[t.name] = (lo[:, None] + codes * step[:, None]).astype(np.float32).reshape(t.shape)
    return {t.name: out[t.name] for t in spec}


def _check_rows(t: TensorSpec, lo: np.ndarray, step: np.ndarray, bits: int) -> None:
    """Finite lows, finite steps >= 0, and a finite top level."""
    with np.errstate(over="ignore", invalid="ignore"):
        top = lo + np.float32((1 << bits) - 1) * step
        ok = np.isfinite(lo) & np.isfinite(step) & (step >= 0) & np.isfinite(top)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        reason = (
            f"row {i}: low={float(lo[i])!r}, step={float(step[i])!r} "
            "(allowed: finite, step >= 0, a finite top level)"
        )
        raise PayloadError(t.name, "steps", reason)
