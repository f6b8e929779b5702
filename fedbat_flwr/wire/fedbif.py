"""FedBiF wire formats: the m-bit global model (downlink) and the activated bits (uplink).

Bits freezing (FedBiF) trains individual bits of m-bit integer weights. Which tensors: the conv /
linear weights (trainable, >= 2-D, ``is_binarized``); "the others" are BatchNorm affine
parameters, running statistics and any 1-D bias (0.5% of CNN4), trained in full precision by
the clients and sent the way every 1-bit method here sends BatchNorm statistics.

Quantizer (paper Eq. 5 with Eq. 1-2): per tensor ``alpha = ||theta||_inf / 2^(m-1)``, the integer
``q = round(clamp(theta / alpha, -2^(m-1), 2^(m-1) - 1))`` with stochastic rounding, sent as the
code ``c = q + 2^(m-1)`` in ``[0, 2^m)``, whose binary digits are the m magnitude bits of Eq. 4:
``q = sum_i 2^i b_i - 2^(m-1)``.

Downlink (codec id 16, version 1):

======== ======= ====== ================================================================
key      dtype   shape  content
======== ======= ====== ================================================================
header   uint8   (5,)   ``b"FB"``, 16, version 1, m (1..8)
codes    uint8   (B,)   per bit-trained tensor (spec order): its codes, ``pack_uint(c, m)``
                        (m bits each, little bit order), byte-aligned per tensor, pad 0
alphas   float32 (Lq,)  alpha per bit-trained tensor; finite, >= 0
dense    float16 (D,)   the other tensors, flattened, spec order (``wire.half``)
======== ======= ====== ================================================================

Uplink (codec id 17, version 1):

======== ======= ====== ================================================================
key      dtype   shape  content
======== ======= ====== ================================================================
header   uint8   (6,)   ``b"FB"``, 17, version 1, m, active-bit mask (bit i set = b_i sent)
bits     uint8   (B,)   per bit-trained tensor, per active bit i (ascending): the d new values
                        of b_i, ``np.packbits(bitorder="little")``, byte-aligned, pad 0
signs    uint8   (S,)   the other tensors' update signs, exactly as ``signs.py``
alphas   float32 (Lo,)  one step per other tensor: mean |update|, within the stat bounds
======== ======= ====== ================================================================

The decoded "update" of a bit-trained tensor is the activated bits' integer contribution
``sum_{i active} 2^i b_i`` (Eq. 6's inner sum), of another tensor ``alpha * (±1)``: only the
FedBiF server rule knows the frozen bits and alphas it combines them with.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from fedbat_flwr.wire.binary import split_spec
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
from fedbat_flwr.wire.half import encode_half, validate_half
from fedbat_flwr.wire.kbit import check_bits, check_packed, header_bits, pack_uint, unpack_uint
from fedbat_flwr.wire.signs import (
    SignsPayload,
    accumulate_sign_view,
    encode_sign_part,
    validate_sign_part,
)
from fedbat_flwr.wire.spec import AlphaBounds, ModelSpec

FEDBIF_MODEL_ID = 16
FEDBIF_BITS_ID = 17
FEDBIF_VERSION = 1
MODEL_LAYOUT = {
    "header": (np.dtype(np.uint8), 1),
    "codes": (np.dtype(np.uint8), 1),
    "alphas": (np.dtype(np.float32), 1),
    "dense": (np.dtype(np.float16), 1),
}
BITS_LAYOUT = {
    "header": (np.dtype(np.uint8), 1),
    "bits": (np.dtype(np.uint8), 1),
    "signs": (np.dtype(np.uint8), 1),
    "alphas": (np.dtype(np.float32), 1),
}


# --- the quantizer and the bits of Eq. 4 --------------------------------------------------


def quantize_eq5(
    theta: np.ndarray, bits: int, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """Codes ``q + 2^(m-1)`` (uint8, theta's shape) and the float32 step alpha of Eq. 5."""
    check_bits(bits)
    half = 1 << (bits - 1)
    flat = np.asarray(theta, dtype=np.float64)
    if not np.isfinite(flat).all():
        raise ValueError("cannot quantize non-finite values")
    alpha = float(np.float32(np.abs(flat).max() / half)) if flat.size else 0.0
    if alpha == 0.0:  # an all-zero tensor: q = 0 everywhere
        return np.full(flat.shape, half, np.uint8), 0.0
    x = np.clip(flat / alpha, -half, half - 1)
    low = np.floor(x)
    q = low + (rng.random(x.shape) < x - low)
    return (q + half).astype(np.uint8), alpha


def bit_planes(codes: np.ndarray, bits: int) -> np.ndarray:
    """The m bits of each code (Eq. 4), shape ``(m, *codes.shape)``; plane i is b_i."""
    shifts = np.arange(bits, dtype=np.uint8).reshape(-1, *([1] * np.ndim(codes)))
    return ((np.asarray(codes, np.uint8)[None] >> shifts) & 1).astype(bool)


def integers(planes: np.ndarray) -> np.ndarray:
    """Eq. 4: ``q = sum_i 2^i b_i - 2^(m-1)`` from bit planes ``(m, ...)`` (int16)."""
    m = planes.shape[0]
    powers = (1 << np.arange(m, dtype=np.int16)).reshape(-1, *([1] * (planes.ndim - 1)))
    return (planes.astype(np.int16) * powers).sum(axis=0, dtype=np.int16) - (1 << (m - 1))


def dequantize(codes: np.ndarray, alpha: float, bits: int) -> np.ndarray:
    """Eq. 3: ``alpha * q`` as float32."""
    q = np.asarray(codes, np.float32) - np.float32(1 << (bits - 1))
    return np.float32(alpha) * q


# --- downlink: the m-bit global model -----------------------------------------------------


@dataclass(frozen=True, eq=False)
class FedBiFModel:
    """A validated downlink: codes and alpha per bit-trained tensor, float32 for the others."""

    spec: ModelSpec
    bits: int
    codes: dict[str, np.ndarray]
    alphas: dict[str, float]
    dense: dict[str, np.ndarray]

    def weights(self) -> dict[str, np.ndarray]:
        """The dequantized model (Eq. 3), every spec tensor, spec order."""
        return {
            t.name: dequantize(self.codes[t.name], self.alphas[t.name], self.bits)
            if t.name in self.codes
            else self.dense[t.name]
            for t in self.spec
        }


def encode_fedbif_model(
    spec: ModelSpec,
    codes: Mapping[str, np.ndarray],
    alphas: Mapping[str, float],
    dense: Mapping[str, np.ndarray],
    bits: int,
) -> dict[str, np.ndarray]:
    """Pack codes (``quantize_eq5``) + alphas of bit-trained tensors and the others as float16."""
    check_bits(bits)
    quantized, others = split_spec(spec)
    check_names(codes, quantized, "codes")
    check_names(alphas, quantized, "alphas")
    packed = []
    for t in quantized:
        c = np.asarray(codes[t.name])
        if c.shape != t.shape:
            raise PayloadError(t.name, "codes", f"shape={c.shape} (allowed: {t.shape})")
        packed.append(pack_uint(c, bits))
    alpha_values = np.array([alphas[t.name] for t in quantized], dtype=np.float32)
    if not (np.isfinite(alpha_values) & (alpha_values >= 0)).all():
        raise PayloadError(None, "alphas", "alphas must be finite and >= 0")
    return {
        "header": make_header(FEDBIF_MODEL_ID, FEDBIF_VERSION, bits),
        "codes": np.concatenate([np.zeros(0, np.uint8), *packed]),
        "alphas": alpha_values,
        "dense": encode_half(others, dense),
    }


def validate_fedbif_model(payload: Mapping[str, np.ndarray], spec: ModelSpec) -> FedBiFModel:
    """Check every field of a downlink against ``spec``; raise PayloadError if bad."""
    check_fields(payload, MODEL_LAYOUT)
    header = payload["header"]
    check_header(header, FEDBIF_MODEL_ID, FEDBIF_VERSION, "fedbif model", length=5)
    bits = header_bits(header)
    quantized, others = split_spec(spec)
    pieces = check_packed(payload["codes"], quantized, bits, "codes")
    alphas = check_nonnegative(payload["alphas"], quantized, "alphas", "alpha")
    unpacked = {
        t.name: unpack_uint(p, bits, t.size).reshape(t.shape)
        for t, p in zip(quantized, pieces, strict=True)
    }
    alpha_of = {t.name: float(a) for t, a in zip(quantized, alphas, strict=True)}
    dense = validate_half(payload["dense"], others, "dense")
    return FedBiFModel(spec, bits, unpacked, alpha_of, dense)


# --- uplink: the activated bits -----------------------------------------------------------


def active_mask(active: Sequence[int]) -> int:
    """The header byte naming the active bits."""
    return sum(1 << int(i) for i in set(active))


@dataclass(frozen=True, eq=False)
class FedBiFBits:
    """A validated uplink; ``planes[name][j]`` holds the packed new b_{active[j]} of a tensor."""

    spec: ModelSpec
    bits: int
    active: tuple[int, ...]
    planes: dict[str, tuple[np.ndarray, ...]]
    signs: SignsPayload
    scales: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(float(1 << i) for i in self.active))

    def active_value(self, name: str) -> np.ndarray:
        """``sum_{i active} 2^i b_i`` of one bit-trained tensor, flat float32."""
        size = self.spec[name].size
        out = np.zeros(size, np.float32)
        for packed, scale in zip(self.planes[name], self.scales, strict=True):
            out += scale * np.unpackbits(packed, count=size, bitorder="little")
        return out

    def new_bits(self, name: str) -> np.ndarray:
        """The sent bit planes of one tensor, ``(len(active), *shape)`` bool."""
        t = self.spec[name]
        return np.stack(
            [
                np.unpackbits(p, count=t.size, bitorder="little").view(bool)
                for p in self.planes[name]
            ]
        ).reshape(len(self.active), *t.shape)


def encode_fedbif_bits(
    spec: ModelSpec,
    bits: int,
    active: Sequence[int],
    planes: Mapping[str, np.ndarray],
    signs: Mapping[str, np.ndarray],
    alphas: Mapping[str, float],
) -> dict[str, np.ndarray]:
    """``planes[name]``: the new active bits of a weight tensor, ``(len(active), *shape)``, in
    ascending bit order; ``signs`` / ``alphas``: the other tensors' 1-bit updates."""
    check_bits(bits)
    active = sorted(set(active))
    if not active or active[-1] >= bits:
        raise ValueError(f"active bits {active} (allowed: a non-empty subset of 0..{bits - 1})")
    quantized, others = split_spec(spec)
    check_names(planes, quantized, "bits")
    packed = []
    for t in quantized:
        p = np.asarray(planes[t.name])
        if p.shape != (len(active), *t.shape) or p.dtype != np.bool_:
            reason = f"shape={p.shape}, dtype={p.dtype} (allowed: bool {(len(active), *t.shape)})"
            raise PayloadError(t.name, "bits", reason)
        packed += [np.packbits(plane.reshape(-1), bitorder="little") for plane in p]
    return {
        "header": make_header(FEDBIF_BITS_ID, FEDBIF_VERSION, bits, active_mask(active)),
        "bits": np.concatenate([np.zeros(0, np.uint8), *packed]),
        **encode_sign_part(others, signs, alphas),
    }


def validate_fedbif_bits(
    payload: Mapping[str, np.ndarray], spec: ModelSpec, bounds: AlphaBounds
) -> FedBiFBits:
    """Check every field of an untrusted uplink against ``spec``; raise PayloadError if bad.

    The other tensors' steps are mean |update| of full-precision tensors: a statistic's lies
    within the run's stat bounds (as for every kind), a parameter's (BatchNorm affine, 1-D
    bias) within [0, max-update-entry], the bound of every data-sized parameter step (before,
    these took the stat bound too: up to 20, where FedBAT's limit for them is alpha-max).
    """
    check_fields(payload, BITS_LAYOUT)
    header = payload["header"]
    check_header(header, FEDBIF_BITS_ID, FEDBIF_VERSION, "fedbif bits", length=6)
    bits, mask = header_bits(header), int(header[5])
    if mask == 0 or mask >> bits:
        raise PayloadError(None, "header", f"active mask=0b{mask:b} (allowed: 1..{2**bits - 1})")
    active = tuple(i for i in range(bits) if mask >> i & 1)
    quantized, others = split_spec(spec)
    sizes = [t.size for t in quantized for _ in active]
    nbytes = [(d + 7) // 8 for d in sizes]
    stream = payload["bits"]
    check_length(stream, sum(nbytes), "bits", "sum(ceil(d/8)) per active bit per weight tensor")
    names = [t.name for t in quantized for _ in active]
    check_pad_bits(stream, sizes, names, "bits")
    pieces = split_by(read_only_copy(stream), nbytes)
    k = len(active)
    planes = {t.name: tuple(pieces[j * k : (j + 1) * k]) for j, t in enumerate(quantized)}
    step_bounds = replace(bounds, param=(0.0, bounds.update))
    signs = validate_sign_part(payload["signs"], payload["alphas"], others, step_bounds)
    return FedBiFBits(spec, bits, active, planes, signs)


@dataclass(frozen=True)
class FedBiFBitsDecoded:
    """The wire ``Decoded`` of an uplink (see the module docstring for what the update is)."""

    view: FedBiFBits
    absolute: ClassVar[bool] = False

    def accumulate(self, acc: MutableMapping[str, np.ndarray], weight: float) -> None:
        check_weight(weight)
        w = np.float32(weight)
        for name in self.view.planes:
            flat_target(acc, self.view.spec[name])[:] += w * self.view.active_value(name)
        accumulate_sign_view(acc, self.view.signs, weight)

    def delta(self) -> dict[str, np.ndarray]:
        return dense_by_accumulating(self.view.spec, self.accumulate)


def decode_fedbif_bits(
    payload: Mapping[str, np.ndarray], spec: ModelSpec, bounds: AlphaBounds
) -> FedBiFBitsDecoded:
    """The ``fedbif-bits`` kind (registered in ``codecs.py``)."""
    return FedBiFBitsDecoded(validate_fedbif_bits(payload, spec, bounds))
