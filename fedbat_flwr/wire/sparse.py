"""Sparse codec: kept values (float32) plus compact positions per tensor (layout version 1).

A tensor's positions are stored in whichever of three formats is smallest:

- ``ALL`` (0): every entry is kept, no position bytes (e.g. BatchNorm statistics sent dense);
- ``BITMAP`` (1): ``ceil(d/8)`` bytes, bit i set iff entry i is kept (little bit order, pad 0);
- ``GAPS`` (2): the first index, then the gaps ``idx[j] - idx[j-1] >= 1``, each as an unsigned
  LEB128 varint (7 bits a byte, high bit = "more bytes follow", at most 5 bytes, canonical).

Measured on CNN4 tensors at 3% density (random positions), bytes per kept entry: bitmap 4.2,
uint16 gaps 2.0, uint32 gaps 4.0, varint gaps 1.02 (mean gap ~33 < 128 fits one byte). So
varint gaps win below ~12% density; a bitmap above.

======== ======= ====== ================================================================
key      dtype   shape  content
======== ======= ====== ================================================================
header   uint8   (4,)   ``b"FB"``, codec id (3 = sparse), layout version (1)
meta     uint32  (L, 3) per tensor, spec order: kept count, format, position bytes
values   float32 (K,)   kept values, tensor by tensor, increasing position; K = sum(count)
index    uint8   (B,)   position bytes, tensor by tensor; B = sum(position bytes)
======== ======= ====== ================================================================

Validation rejects, naming tensor and field: an unknown format, a count above d or inconsistent
with the format, byte totals that do not add up, non-finite values, non-zero bitmap pad bits, a
truncated, over-long or non-canonical varint, positions out of range and positions that are not
strictly increasing (a zero gap is a duplicate).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import numpy as np

from fedbat_flwr.wire.errors import PayloadError
from fedbat_flwr.wire.fields import (
    check_fields,
    check_header,
    check_length,
    check_names,
    check_pad_bits,
    check_weight,
    dense_by_accumulating,
    flat_target,
    make_header,
    read_only_copy,
    split_by,
)
from fedbat_flwr.wire.spec import ModelSpec, TensorSpec

SPARSE_CODEC_ID = 3
SPARSE_VERSION = 1
ALL, BITMAP, GAPS = 0, 1, 2
FORMAT_NAMES = {ALL: "all", BITMAP: "bitmap", GAPS: "gaps"}
MAX_VARINT_BYTES = 5  # 35 bits: any index of a tensor with < 2^32 entries
LAYOUT = {
    "header": (np.dtype(np.uint8), 1),
    "meta": (np.dtype(np.uint32), 2),
    "values": (np.dtype(np.float32), 1),
    "index": (np.dtype(np.uint8), 1),
}


@dataclass(frozen=True, eq=False)
class SparsePayload:
    """A validated sparse payload: per tensor its positions (None = all) and kept values."""

    spec: ModelSpec
    positions: tuple[np.ndarray | None, ...]
    values: tuple[np.ndarray, ...]


# --- varints ------------------------------------------------------------------------------


def varint_encode(values: np.ndarray) -> np.ndarray:
    """Unsigned LEB128 of non-negative integers < 2^35, vectorised."""
    v = np.asarray(values, dtype=np.int64).reshape(-1)
    if v.size and (v.min() < 0 or v.max() >= 1 << (7 * MAX_VARINT_BYTES)):
        raise ValueError(f"varint values must be in [0, 2^{7 * MAX_VARINT_BYTES})")
    lengths = 1 + sum((v >> (7 * j) > 0).astype(np.int64) for j in range(1, MAX_VARINT_BYTES))
    starts = np.cumsum(lengths) - lengths
    pos = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
    out = (np.repeat(v, lengths) >> (7 * pos)) & 0x7F
    out |= (pos < np.repeat(lengths, lengths) - 1) << 7
    return out.astype(np.uint8)


def varint_decode(stream: np.ndarray, count: int, layer: str, field: str = "index") -> np.ndarray:
    """``count`` int64 values from exactly ``stream``; PayloadError if it is not canonical."""
    if count == 0:
        if stream.size:
            raise PayloadError(layer, field, f"{stream.size} position bytes for 0 kept entries")
        return np.zeros(0, np.int64)
    ends = np.flatnonzero(stream < 0x80)
    if stream[-1] >= 0x80:
        raise PayloadError(layer, field, "truncated varint: the last byte has the high bit set")
    if ends.size != count:
        reason = f"{ends.size} varints (allowed: {count} = the tensor's kept count)"
        raise PayloadError(layer, field, reason)
    lengths = np.diff(ends, prepend=-1)
    if lengths.max() > MAX_VARINT_BYTES:
        reason = f"varint of {int(lengths.max())} bytes (allowed: <= {MAX_VARINT_BYTES})"
        raise PayloadError(layer, field, reason)
    if np.any((lengths > 1) & (stream[ends] == 0)):
        raise PayloadError(layer, field, "non-canonical varint (a trailing zero byte)")
    starts = ends - lengths + 1
    pos = np.arange(stream.size) - np.repeat(starts, lengths)
    groups = (stream & 0x7F).astype(np.int64) << (7 * pos)
    return np.add.reduceat(groups, starts)


# --- encoding -----------------------------------------------------------------------------


def encode_sparse(
    spec: ModelSpec, positions: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Pack per-tensor flat positions (strictly increasing) and their values."""
    check_names(positions, spec, "index")
    check_names(values, spec, "values")
    meta, kept, index = [], [], []
    for t in spec:
        idx = np.asarray(positions[t.name], dtype=np.int64).reshape(-1)
        val = np.asarray(values[t.name], dtype=np.float32).reshape(-1)
        _check_positions(t, idx)
        if val.shape != idx.shape:
            raise PayloadError(t.name, "values", f"{val.size} values for {idx.size} positions")
        fmt, body = _smallest_format(t, idx)
        meta.append((idx.size, fmt, body.size))
        kept.append(val)
        index.append(body)
    return {
        "header": make_header(SPARSE_CODEC_ID, SPARSE_VERSION),
        "meta": np.array(meta, dtype=np.uint32).reshape(len(spec), 3),
        "values": np.concatenate([np.zeros(0, np.float32), *kept]),
        "index": np.concatenate([np.zeros(0, np.uint8), *index]),
    }


def _check_positions(t: TensorSpec, idx: np.ndarray) -> None:
    if idx.size and (idx[0] < 0 or idx[-1] >= t.size):
        raise PayloadError(t.name, "index", f"positions outside [0, {t.size})")
    if np.any(np.diff(idx) <= 0):
        raise PayloadError(t.name, "index", "positions are not strictly increasing")


def _smallest_format(t: TensorSpec, idx: np.ndarray) -> tuple[int, np.ndarray]:
    if idx.size == t.size:
        return ALL, np.zeros(0, np.uint8)
    gaps = varint_encode(np.diff(idx, prepend=0))
    if gaps.size <= (t.size + 7) // 8:
        return GAPS, gaps
    bitmap = np.zeros(t.size, bool)
    bitmap[idx] = True
    return BITMAP, np.packbits(bitmap, bitorder="little")


# --- validation ---------------------------------------------------------------------------


def validate_sparse(payload: Mapping[str, np.ndarray], spec: ModelSpec) -> SparsePayload:
    """Check every field of an untrusted payload against ``spec``; raise PayloadError if bad."""
    check_fields(payload, LAYOUT)
    check_header(payload["header"], SPARSE_CODEC_ID, SPARSE_VERSION, "sparse")
    meta = payload["meta"].astype(np.int64)
    if meta.shape != (len(spec), 3):
        raise PayloadError(None, "meta", f"shape={meta.shape} (allowed: ({len(spec)}, 3))")
    for t, (count, fmt, nbytes) in zip(spec, meta, strict=True):
        _check_meta(t, int(count), int(fmt), int(nbytes))
    values, index = payload["values"], payload["index"]
    check_length(values, int(meta[:, 0].sum()), "values", "sum of the kept counts")
    check_length(index, int(meta[:, 2].sum()), "index", "sum of the position bytes")
    kept = split_by(read_only_copy(values), meta[:, 0].tolist())
    bodies = split_by(index, meta[:, 2].tolist())
    for t, v in zip(spec, kept, strict=True):
        if not np.isfinite(v).all():
            raise PayloadError(t.name, "values", "non-finite values (allowed: finite float32)")
    positions = tuple(
        _positions(t, int(fmt), int(count), body)
        for t, (count, fmt, _), body in zip(spec, meta, bodies, strict=True)
    )
    return SparsePayload(spec, positions, tuple(kept))


def _check_meta(t: TensorSpec, count: int, fmt: int, nbytes: int) -> None:
    if fmt not in FORMAT_NAMES:
        raise PayloadError(t.name, "meta", f"format={fmt} (allowed: {FORMAT_NAMES})")
    if count > t.size:
        raise PayloadError(t.name, "meta", f"count={count} (allowed: <= d={t.size})")
    if fmt == ALL and (count != t.size or nbytes != 0):
        reason = f"format all with count={count}, bytes={nbytes} (allowed: d={t.size}, 0)"
        raise PayloadError(t.name, "meta", reason)
    if fmt == BITMAP and nbytes != (t.size + 7) // 8:
        reason = f"bitmap of {nbytes} bytes (allowed: ceil(d/8)={(t.size + 7) // 8})"
        raise PayloadError(t.name, "meta", reason)
    if fmt == GAPS and not count <= nbytes <= MAX_VARINT_BYTES * count:
        reason = f"{nbytes} gap bytes for count={count} (allowed: count .. 5*count)"
        raise PayloadError(t.name, "meta", reason)


def _positions(t: TensorSpec, fmt: int, count: int, body: np.ndarray) -> np.ndarray | None:
    """Decoded flat positions (None = all entries), checked in range and strictly increasing."""
    if fmt == ALL:
        return None
    if fmt == BITMAP:
        check_pad_bits(body, [t.size], [t.name], "index")
        idx = np.flatnonzero(np.unpackbits(body, count=t.size, bitorder="little"))
        if idx.size != count:
            reason = f"bitmap sets {idx.size} bits (allowed: {count} = the kept count)"
            raise PayloadError(t.name, "index", reason)
        return idx
    gaps = varint_decode(body, count, t.name)
    if count > 1 and gaps[1:].min() == 0:
        j = int(np.flatnonzero(gaps[1:] == 0)[0]) + 1
        reason = f"gap {j} is 0: position repeated (allowed: strictly increasing positions)"
        raise PayloadError(t.name, "index", reason)
    idx = np.cumsum(gaps)
    if count and idx[-1] >= t.size:
        reason = f"position={int(idx[-1])} is out of range (allowed: [0, {t.size}))"
        raise PayloadError(t.name, "index", reason)
    return idx


# --- decoding -----------------------------------------------------------------------------


def accumulate_sparse(
    acc: MutableMapping[str, np.ndarray], view: SparsePayload, weight: float
) -> None:
    """In place ``acc[name][positions] += weight * values`` (positions are unique)."""
    check_weight(weight)
    targets = [flat_target(acc, t) for t in view.spec]
    w = np.float32(weight)
    for out, idx, vals in zip(targets, view.positions, view.values, strict=True):
        if idx is None:
            out += w * vals
        else:
            out[idx] += w * vals


def decode_sparse(view: SparsePayload) -> dict[str, np.ndarray]:
    """Dense float32 update per tensor (zeros where nothing was kept)."""
    return dense_by_accumulating(view.spec, lambda acc, w: accumulate_sparse(acc, view, w))
