"""1-bit sign codec: packed sign bits plus one float32 alpha per tensor (layout version 1).

Every exchanged tensor ``l`` with ``d_l`` elements travels as ``d_l`` sign bits and one alpha; the
decoded update is ``alpha_l * (+1 if bit else -1)``. A payload is three flat arrays whatever the
model depth, because each Flower Array costs ~300 bytes of framing:

======== ======= ====== ================================================================
key      dtype   shape  content
======== ======= ====== ================================================================
header   uint8   (4,)   ``b"F"``, ``b"B"``, codec id (1 = signs), layout version (1)
signs    uint8   (B,)   per tensor, in spec order: ``np.packbits(bits, bitorder="little")``
                        of its flattened bits, byte-aligned per tensor (pad bits zero),
                        concatenated; bit 1 = +alpha, 0 = -alpha; B = sum(ceil(d_l / 8))
alphas   float32 (L,)   one alpha per tensor, spec order
======== ======= ====== ================================================================

Shapes and order come from the server's ``ModelSpec``, never from the payload. The server
validates every field (``validate_signs``) before anything is decoded; a rejected payload raises
``PayloadError`` naming the layer, the field, the bad value and what is allowed.

Aggregation does not unpack bits into a ±1 array: ``accumulate_signs`` gathers rows of a
256x8 table of ±1 (one row per byte value, scaled by ``weight * alpha``) into a small scratch
buffer that stays in cache, and adds it into the accumulator.
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
    check_names,
    check_pad_bits,
    check_weight,
    dense_by_accumulating,
    flat_target,
    make_header,
    read_only_copy,
)
from fedbat_flwr.wire.spec import AlphaBounds, ModelSpec, TensorSpec

SIGNS_CODEC_ID = 1
SIGNS_VERSION = 1
LAYOUT = {
    "header": (np.dtype(np.uint8), 1),
    "signs": (np.dtype(np.uint8), 1),
    "alphas": (np.dtype(np.float32), 1),
}
# Bytes of packed signs handled per step of the fused accumulate: the (CHUNK_BYTES, 8) float32
# scratch is 256 KiB, small enough to stay in L2 (bigger chunks measured ~2x slower).
CHUNK_BYTES = 8192

# _PM1[b, i] = +1.0 if bit i (little bit order) of byte value b is set, else -1.0.
_PM1 = (
    2.0 * np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little") - 1.0
).astype(np.float32)


@dataclass(frozen=True, eq=False)
class SignsPayload:
    """A validated 1-bit payload, not unpacked yet.

    ``packed[i]`` holds the ceil(d/8) sign bytes of ``spec.tensors[i]`` and ``alphas[i]`` its
    alpha. Both are read-only and backed by a private copy, so the payload the view was
    validated from can change afterwards without invalidating it.
    """

    spec: ModelSpec
    packed: tuple[np.ndarray, ...]
    alphas: np.ndarray


def encode_signs(
    spec: ModelSpec, bits: Mapping[str, np.ndarray], alphas: Mapping[str, float]
) -> dict[str, np.ndarray]:
    """Pack per-tensor sign bits (True = +alpha) and alphas into a version-1 payload."""
    return {
        "header": make_header(SIGNS_CODEC_ID, SIGNS_VERSION),
        **encode_sign_part(spec, bits, alphas),
    }


def encode_sign_part(
    spec: ModelSpec, bits: Mapping[str, np.ndarray], alphas: Mapping[str, float]
) -> dict[str, np.ndarray]:
    """The ``signs`` and ``alphas`` fields alone: what every codec that sends some tensors as
    1 bit + alpha (mixed, binary weights, FedBiF, FedPM) embeds under its own header."""
    check_names(bits, spec, "signs")
    check_names(alphas, spec, "alphas")
    packed = [_pack(t, bits[t.name]) for t in spec]
    alpha_values = [_encode_alpha(t, alphas[t.name]) for t in spec]
    return {
        "signs": np.concatenate([np.zeros(0, np.uint8), *packed]),
        "alphas": np.array(alpha_values, dtype=np.float32),
    }


def validate_signs(
    payload: Mapping[str, np.ndarray], spec: ModelSpec, bounds: AlphaBounds
) -> SignsPayload:
    """Check every field of an untrusted payload against ``spec``; raise PayloadError if bad."""
    check_fields(payload, LAYOUT)
    check_header(payload["header"], SIGNS_CODEC_ID, SIGNS_VERSION, "signs")
    return validate_sign_part(payload["signs"], payload["alphas"], spec, bounds)


def validate_sign_part(
    signs: np.ndarray, alphas: np.ndarray, spec: ModelSpec, bounds: AlphaBounds
) -> SignsPayload:
    """The ``signs`` / ``alphas`` fields of any codec that embeds them, against ``spec``:
    length, zero pad bits, alphas finite and within ``bounds``.

    The caller has checked both fields' dtype (uint8, float32) and that they are 1-D, with its
    own layout and header (``check_fields``, ``check_header``).
    """
    nbytes = _bytes_per_tensor(spec)
    checked = _check_signs(signs, spec, nbytes)
    packed = tuple(np.split(checked, np.cumsum(nbytes)[:-1])) if len(spec) else ()
    return SignsPayload(spec, packed, _check_alphas(alphas, spec, bounds))


def decode_signs(
    payload: Mapping[str, np.ndarray] | SignsPayload, spec: ModelSpec, bounds: AlphaBounds
) -> dict[str, np.ndarray]:
    """Dense float32 ``alpha * (±1)`` per tensor, in the tensor's shape (validates first)."""
    return dense_by_accumulating(
        spec, lambda acc, weight: accumulate_signs(acc, payload, spec, bounds, weight)
    )


def accumulate_signs(
    acc: MutableMapping[str, np.ndarray],
    payload: Mapping[str, np.ndarray] | SignsPayload,
    spec: ModelSpec,
    bounds: AlphaBounds,
    weight: float,
) -> None:
    """In place ``acc[name] += weight * alpha * (±1)`` for every tensor, without a ±1 array.

    ``acc[name]`` must be a writable C-contiguous float32 array of the tensor's shape (or flat,
    ``(d,)``); it is updated through a flat view. A raw payload is validated first. Nothing is
    modified unless every accumulator entry is usable.
    """
    accumulate_sign_view(acc, _as_view(payload, spec, bounds), weight)


def accumulate_sign_view(
    acc: MutableMapping[str, np.ndarray], view: SignsPayload, weight: float
) -> None:
    """``accumulate_signs`` of a view validated already (its alphas met the bounds then): the
    sign part of a mixed, binary-weights, FedBiF or FedPM payload."""
    check_weight(weight)
    targets = [flat_target(acc, t) for t in view.spec]
    scratch = np.empty((CHUNK_BYTES, 8), np.float32)
    for out, packed, alpha in zip(targets, view.packed, view.alphas, strict=True):
        _add_signs(out, packed, np.float32(weight * float(alpha)), scratch)


def sign_bits_from_payload(view: SignsPayload) -> dict[str, np.ndarray]:
    """Raw sign bits (bool, True = +alpha) per tensor, in the tensor's shape (e.g. for votes)."""
    return {
        t.name: np.unpackbits(p, count=t.size, bitorder="little").view(bool).reshape(t.shape)
        for t, p in zip(view.spec, view.packed, strict=True)
    }


def payload_nbytes(payload: Mapping[str, np.ndarray]) -> int:
    """Bytes of array data in a payload (what the codec costs, without Flower's framing)."""
    return sum(int(np.asarray(a).nbytes) for a in payload.values())


# --- encoding helpers ---------------------------------------------------------------------


def _pack(t: TensorSpec, bits: np.ndarray) -> np.ndarray:
    b = np.asarray(bits)
    if b.shape != t.shape:
        raise PayloadError(t.name, "signs", f"shape={b.shape} (allowed: {t.shape})")
    if b.dtype != np.bool_:
        if not np.issubdtype(b.dtype, np.integer):
            raise PayloadError(t.name, "signs", f"dtype={b.dtype} (allowed: bool or 0/1 ints)")
        not_bit = (b != 0) & (b != 1)
        if np.any(not_bit):
            bad = b[not_bit][0]
            raise PayloadError(t.name, "signs", f"bit value={bad} (allowed: 0 or 1)")
    return np.packbits(b.reshape(-1).astype(bool, copy=False), bitorder="little")


def _encode_alpha(t: TensorSpec, alpha: float) -> np.float32:
    with np.errstate(over="ignore"):
        value = np.float32(alpha)
    if not np.isfinite(value):
        raise PayloadError(t.name, "alphas", f"alpha={alpha!r} is not finite in float32")
    return value


# --- validation helpers -------------------------------------------------------------------


def _bytes_per_tensor(spec: ModelSpec) -> np.ndarray:
    return np.array([(t.size + 7) // 8 for t in spec], dtype=np.int64)


def _check_signs(signs: np.ndarray, spec: ModelSpec, nbytes: np.ndarray) -> np.ndarray:
    """Length and zero pad bits; returns a read-only private copy."""
    expected = int(nbytes.sum())
    if signs.size != expected:
        reason = f"length={signs.size} bytes (allowed: {expected} = sum(ceil(d/8)) over the spec)"
        raise PayloadError(None, "signs", reason)
    check_pad_bits(signs, [t.size for t in spec], spec.names, "signs")
    return read_only_copy(signs)


def _check_alphas(alphas: np.ndarray, spec: ModelSpec, bounds: AlphaBounds) -> np.ndarray:
    """Count, finiteness and per-kind bounds; returns a read-only private copy."""
    if alphas.size != len(spec):
        reason = f"length={alphas.size} (allowed: {len(spec)}, one per tensor)"
        raise PayloadError(None, "alphas", reason)
    ranges = np.array([bounds.for_tensor(t) for t in spec], dtype=np.float64).reshape(-1, 2)
    # Compare in float32: an alpha clipped to exactly alpha-max must pass once rounded.
    lo, hi = ranges[:, 0].astype(np.float32), ranges[:, 1].astype(np.float32)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(alphas) & (alphas >= lo) & (alphas <= hi)
    bad = np.flatnonzero(~ok)
    if bad.size:
        i = int(bad[0])
        value = float(alphas[i])
        problem = "is not finite" if not math.isfinite(value) else "is out of range"
        reason = (
            f"alpha={value:.7g} {problem} "
            f"(allowed: finite, within [{ranges[i, 0]:g}, {ranges[i, 1]:g}])"
        )
        raise PayloadError(spec.tensors[i].name, "alphas", reason)
    return read_only_copy(alphas)


# --- accumulation helpers -----------------------------------------------------------------


def _as_view(
    payload: Mapping[str, np.ndarray] | SignsPayload, spec: ModelSpec, bounds: AlphaBounds
) -> SignsPayload:
    if not isinstance(payload, SignsPayload):
        return validate_signs(payload, spec, bounds)
    if payload.spec is not spec and payload.spec != spec:
        raise ValueError("the SignsPayload was validated against a different ModelSpec")
    return payload


def _add_signs(out: np.ndarray, packed: np.ndarray, scale: np.float32, scratch: np.ndarray) -> None:
    """``out += scale * (±1 per bit)``, one table gather per chunk of bytes (see CHUNK_BYTES)."""
    table = _PM1 * scale
    full = out.size // 8
    body = out[: full * 8].reshape(full, 8)
    for start in range(0, full, CHUNK_BYTES):
        stop = min(start + CHUNK_BYTES, full)
        rows = scratch[: stop - start]
        # uint8 indices are always in range; mode="clip" avoids take's buffered "raise" path.
        np.take(table, packed[start:stop], axis=0, out=rows, mode="clip")
        np.add(body[start:stop], rows, out=body[start:stop])
    tail = out.size - full * 8
    if tail:
        out[full * 8 :] += table[packed[full], :tail]
