"""k-bit codec: unbiased stochastic quantization of an update, packed densely (layout version 1).

Quantizer (FedPAQ's "low-precision quantizer", here the uniform-grid variant): per tensor
``s = ||m||_inf`` (rounded up to float32) and ``2^k`` evenly spaced levels
``q_c = s * (2c / (2^k - 1) - 1)``, c = 0 .. 2^k - 1, spanning ``[-s, s]``. Each entry is rounded
to one of its two neighbouring levels at random, up with probability equal to its distance from
the lower one (stochastic rounding), so ``E[q] = m`` exactly and ``|q - m| <= 2s / (2^k - 1)``.
All ``2^k`` codes are used (a QSGD-style sign + magnitude split would waste one code on -0).

======== ======= ====== ================================================================
key      dtype   shape  content
======== ======= ====== ================================================================
header   uint8   (5,)   ``b"FB"``, codec id (2 = kbit), layout version (1), k (1..8)
levels   uint8   (B,)   per tensor, in spec order: its codes packed k bits each, little
                        bit order (``pack_uint``), byte-aligned per tensor (pad bits zero);
                        B = sum(ceil(d_l * k / 8))
scales   float32 (L,)   one ``s`` per tensor, spec order; finite and >= 0
======== ======= ====== ================================================================

Every k-bit code is a valid level, so the code range needs no check beyond the pad bits.
``pack_uint`` / ``unpack_uint`` are the reusable part: any stream of m-bit integers (e.g. a
FedBiF downlink) packs the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import numpy as np

from fedbat_flwr.wire.errors import PayloadError
from fedbat_flwr.wire.fields import (
    check_fields,
    check_header,
    check_length,
    check_names,
    check_nonnegative,
    check_pad_bits,
    check_weight,
    dense_by_accumulating,
    flat_target,
    make_header,
    read_only_copy,
    split_by,
)
from fedbat_flwr.wire.spec import ModelSpec

KBIT_CODEC_ID = 2
KBIT_VERSION = 1
MAX_BITS = 8
LAYOUT = {
    "header": (np.dtype(np.uint8), 1),
    "levels": (np.dtype(np.uint8), 1),
    "scales": (np.dtype(np.float32), 1),
}


# --- packing m-bit integers ---------------------------------------------------------------


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes ``count`` values of ``bits`` bits take when packed: ceil(count * bits / 8)."""
    return (count * bits + 7) // 8


def pack_uint(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack integers in ``[0, 2^bits)`` densely, ``bits`` each, little bit order; pad bits zero.

    Value i occupies stream bits ``i*bits .. i*bits + bits - 1`` (least significant first).
    """
    check_bits(bits)
    v = np.asarray(values).reshape(-1)
    if v.size and (not np.issubdtype(v.dtype, np.integer) or v.min() < 0 or v.max() >> bits):
        bad = v[(v < 0) | (v >= 1 << bits)] if np.issubdtype(v.dtype, np.integer) else v
        raise ValueError(f"value={bad[0]!r} does not fit in {bits} bits (allowed: integers)")
    group_bytes, per_group = _group(bits)
    codes = np.zeros(-(-v.size // per_group) * per_group, np.uint64)
    codes[: v.size] = v
    shifts = (bits * np.arange(per_group)).astype(np.uint64)
    words = np.bitwise_or.reduce(codes.reshape(-1, per_group) << shifts, axis=1)
    byte_shifts = (8 * np.arange(group_bytes)).astype(np.uint64)
    stream = ((words[:, None] >> byte_shifts) & np.uint64(0xFF)).astype(np.uint8)
    return stream.reshape(-1)[: packed_nbytes(v.size, bits)]


def unpack_uint(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` uint8 values ``pack_uint`` packed into ``packed``."""
    check_bits(bits)
    if packed.size != packed_nbytes(count, bits):
        raise ValueError(f"{packed.size} bytes cannot hold exactly {count} x {bits}-bit values")
    group_bytes, per_group = _group(bits)
    stream = np.zeros(-(-count // per_group) * group_bytes, np.uint64)
    stream[: packed.size] = packed
    byte_shifts = (8 * np.arange(group_bytes)).astype(np.uint64)
    words = np.bitwise_or.reduce(stream.reshape(-1, group_bytes) << byte_shifts, axis=1)
    shifts = (bits * np.arange(per_group)).astype(np.uint64)
    codes = (words[:, None] >> shifts) & np.uint64((1 << bits) - 1)
    return codes.astype(np.uint8).reshape(-1)[:count]


def check_packed(stream: np.ndarray, spec: ModelSpec, bits: int, field: str) -> list[np.ndarray]:
    """A ``pack_uint`` stream of every ``spec`` tensor's entries (``bits`` each, byte-aligned
    per tensor): its length and zero pad bits; the tensors' pieces, read-only, of a private
    copy. The k-bit update, the FedBiF model and the quantized downlink all read theirs here."""
    nbytes = [packed_nbytes(t.size, bits) for t in spec]
    rule = f"sum(ceil(d * {bits} / 8)) over {len(spec)} tensors"
    check_length(stream, sum(nbytes), field, rule)
    check_pad_bits(stream, [t.size for t in spec], spec.names, field, bits)
    return split_by(read_only_copy(stream), nbytes)


def _group(bits: int) -> tuple[int, int]:
    """(bytes, values) of the smallest whole-byte group of ``bits``-bit values: lcm(bits, 8)."""
    g = math.gcd(bits, 8)
    return bits // g, 8 // g


def check_bits(bits: int) -> None:
    """A caller's bits per value (an encoder's argument): ValueError, not a PayloadError."""
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r} (allowed: an integer in [1, {MAX_BITS}])")


def header_bits(header: np.ndarray) -> int:
    """The bits per value a checked header declares in its byte 4 (k-bit, FedBiF layouts)."""
    bits = int(header[4])
    if not 1 <= bits <= MAX_BITS:
        raise PayloadError(None, "header", f"bits={bits} (allowed: 1..{MAX_BITS})")
    return bits


# --- the quantizer ------------------------------------------------------------------------


def level_values(scale: float, bits: int) -> np.ndarray:
    """The ``2^bits`` float32 levels ``scale * (2c / (2^bits - 1) - 1)``, c = 0 .. 2^bits - 1."""
    top = (1 << bits) - 1
    return (scale * (2.0 * np.arange(top + 1) / top - 1.0)).astype(np.float32)


def quantize_stochastic(
    m: np.ndarray, bits: int, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """Codes (uint8, m's shape) and float32 scale of an unbiased k-bit quantization of ``m``."""
    check_bits(bits)
    flat = np.asarray(m, dtype=np.float64).reshape(-1)
    if not np.isfinite(flat).all():
        raise ValueError("cannot quantize non-finite values")
    top = (1 << bits) - 1
    scale = _float32_at_least(float(np.abs(flat).max()) if flat.size else 0.0)
    if scale == 0.0:
        return np.zeros(np.shape(m), np.uint8), 0.0
    u = np.clip((flat / scale + 1.0) * (top / 2.0), 0.0, top)
    low = np.floor(u)
    codes = low + (rng.random(u.shape) < u - low)
    return codes.astype(np.uint8).reshape(np.shape(m)), scale


def _float32_at_least(x: float) -> float:
    """The smallest float32 >= x, so every |m_i| <= scale after the server rounds it."""
    y = np.float32(x)
    if float(y) < x:
        y = np.nextafter(y, np.float32(np.inf))
    return float(y)


# --- payload ------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class KbitPayload:
    """A validated k-bit payload; ``packed[i]`` holds tensor i's codes, ``scales[i]`` its s."""

    spec: ModelSpec
    bits: int
    packed: tuple[np.ndarray, ...]
    scales: np.ndarray


def encode_kbit(
    spec: ModelSpec,
    codes: Mapping[str, np.ndarray],
    scales: Mapping[str, float],
    bits: int,
) -> dict[str, np.ndarray]:
    """Pack per-tensor codes (``quantize_stochastic``) and scales into a version-1 payload."""
    check_bits(bits)
    check_names(codes, spec, "levels")
    check_names(scales, spec, "scales")
    packed = []
    for t in spec:
        c = np.asarray(codes[t.name])
        if c.shape != t.shape:
            raise PayloadError(t.name, "levels", f"shape={c.shape} (allowed: {t.shape})")
        try:
            packed.append(pack_uint(c, bits))
        except ValueError as exc:
            raise PayloadError(t.name, "levels", str(exc)) from None
    scale_values = np.array([scales[t.name] for t in spec], dtype=np.float64)
    if not (np.isfinite(scale_values) & (scale_values >= 0)).all():
        raise PayloadError(None, "scales", "scales must be finite and >= 0")
    return {
        "header": make_header(KBIT_CODEC_ID, KBIT_VERSION, bits),
        "levels": np.concatenate([np.zeros(0, np.uint8), *packed]),
        "scales": scale_values.astype(np.float32),
    }


def validate_kbit(payload: Mapping[str, np.ndarray], spec: ModelSpec) -> KbitPayload:
    """Check every field of an untrusted payload against ``spec``; raise PayloadError if bad."""
    check_fields(payload, LAYOUT)
    header = payload["header"]
    check_header(header, KBIT_CODEC_ID, KBIT_VERSION, "kbit", length=5)
    bits = header_bits(header)
    packed = tuple(check_packed(payload["levels"], spec, bits, "levels"))
    scales = check_nonnegative(payload["scales"], spec, "scales", "scale")
    return KbitPayload(spec, bits, packed, scales)


def accumulate_kbit(acc: MutableMapping[str, np.ndarray], view: KbitPayload, weight: float) -> None:
    """In place ``acc[name] += weight * q`` per tensor: one table gather per tensor."""
    check_weight(weight)
    targets = [flat_target(acc, t) for t in view.spec]
    for t, out, packed, scale in zip(view.spec, targets, view.packed, view.scales, strict=True):
        codes = unpack_uint(packed, view.bits, t.size)
        out += np.take(level_values(weight * float(scale), view.bits), codes)


def decode_kbit(view: KbitPayload) -> dict[str, np.ndarray]:
    """Dense float32 dequantized update per tensor, in the tensor's shape."""
    return dense_by_accumulating(view.spec, lambda acc, w: accumulate_kbit(acc, view, w))
